"""PEFT's methods on the same model, data and loop as a rankopt run: the benchmarks' baselines.

``peft_lora`` (fixed rank), ``peft_rslora`` (scale alpha / sqrt(r)), ``peft_eva`` (EVA: A from the
SVD of each layer's inputs on the first batches, ranks redistributed with rho = 2), ``peft_adalora``
(AdaLoRA from 2 x the rank down to it) and ``peft_lora_trunc`` (LoRA trained at 2 x the rank, then
each layer's update truncated by SVD to the rank: the cheap post-hoc alternative).

A baseline starts from the same pretrained weights and the same seeded task head as rankopt
(``rankopt.training.setup.load_base``), sees the same batches in the same order, and uses the same
schedule and gradient clipping. Its optimizer is torch's AdamW with ``foreach=True``, as PEFT users
run it (a Trainer's default): the same update as rankopt's ComponentAdamW while no component is
born mid-run, and the launch count a real PEFT run pays, so step-cost ratios are not flattered.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from peft import AdaLoraConfig, EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from torch import nn
from torch.utils.data import DataLoader

from rankopt.config import Config
from rankopt.tasks.data import TaskData
from rankopt.training.accumulation import to_device
from rankopt.training.optim import build_scheduler
from rankopt.training.trainer import evaluate, seeded_batches

PEFT_METHODS = ("peft_lora", "peft_rslora", "peft_eva", "peft_adalora", "peft_lora_trunc")


def peft_model(cfg: Config, base: nn.Module, method: str, rank: int, init_rank: int) -> nn.Module:
    """``base`` wrapped by PEFT for ``method`` (see the module docstring), ending at ``rank``.

    All use scale 2 (alpha = 2 x the starting rank), as the rankopt runs do; rsLoRA keeps that
    alpha, so its scale is 2 sqrt(r).
    """
    t, c = cfg.training, cfg.controller
    torch.manual_seed(t.seed)  # PEFT draws its initial A (LoRA) / A, B (AdaLoRA) from the global RNG
    common = {"task_type": "SEQ_CLS", "target_modules": list(cfg.model.target_modules), "lora_dropout": 0.0}
    if method == "peft_lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, **common)
    elif method == "peft_rslora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, use_rslora=True, **common)
    elif method == "peft_lora_trunc":
        config = LoraConfig(r=2 * rank, lora_alpha=4 * rank, **common)
    elif method == "peft_eva":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="eva",
                            eva_config=EvaConfig(rho=2.0, use_label_mask=False), **common)
    elif method == "peft_adalora":
        config = AdaLoraConfig(init_r=init_rank, target_r=rank, lora_alpha=2 * init_rank, total_step=t.steps,
                               tinit=round(c.warmup * t.steps), tfinal=round(c.final * t.steps),
                               deltaT=c.interval, **common)
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    return get_peft_model(base, config, low_cpu_mem_usage=method == "peft_eva")


def eva_initialise(model: nn.Module, data: TaskData, cfg: Config) -> None:
    """EVA's data-driven start: SVD of each target layer's inputs over the first training batches."""
    loader = DataLoader(data.train, batch_size=cfg.training.batch_size, shuffle=True, collate_fn=data.collator,
                        generator=torch.Generator().manual_seed(cfg.training.seed))
    batches = [dict(batch) for batch in loader]  # PEFT wants plain dicts, the collator gives BatchEncodings
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)


@torch.no_grad()
def truncate_by_svd(model: nn.Module, rank: int) -> None:
    """Keep each LoRA layer's top-``rank`` singular components of B A (the rest set to zero)."""
    for module in model.modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        u, s, vt = torch.linalg.svd(b.float() @ a.float(), full_matrices=False)
        b.zero_()
        a.zero_()
        b[:, :rank] = (u[:, :rank] * s[:rank]).to(b.dtype)
        a[:rank] = vt[:rank].to(a.dtype)


def effective_adapter_params(model: nn.Module, method: str) -> int:
    """Adapter parameters that carry weight: AdaLoRA masks pruned components to zero instead of removing
    them, and a truncated LoRA keeps only its nonzero rows of A and columns of B."""
    total = 0
    for module in model.modules():
        if method == "peft_adalora" and hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            total += kept * (module.in_features + module.out_features + 1)
        elif hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}) and method != "peft_adalora":
            a = module.lora_A["default"].weight
            rank = int((a.abs().sum(dim=1) != 0).sum()) if method == "peft_lora_trunc" else a.shape[0]
            total += rank * (module.in_features + module.out_features)
    return total


class PeftStepper:
    """rankopt's step order around a PEFT model: forward, backward, clip, optimizer, lr, [AdaLoRA], zero grad."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, schedule: str, steps: int,
                 warmup_ratio: float, max_grad_norm: float, adalora: bool, device: str = "cpu",
                 autocast: torch.dtype | None = None):
        self.model, self.adalora, self.device, self.max_grad_norm = model, adalora, device, max_grad_norm
        self.autocast = autocast  # bf16: forward/backward under torch.autocast, as rankopt's training.precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, foreach=True)
        self.scheduler = build_scheduler(self.optimizer, schedule, steps, warmup_ratio)
        self.done = 0

    def step(self, batch: dict) -> torch.Tensor:
        step = self.done + 1
        batch = to_device(batch, self.device)  # a packed batch also carries use_cache=False
        with torch.autocast(torch.device(self.device).type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.model(**batch).loss  # AdaLoRA adds its orthogonality penalty inside forward
        loss_value = loss.detach()  # no host sync, as rankopt's Stepper (and HF Trainer between logging steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora:
            self.model.base_model.update_and_allocate(step)  # reads the gradients: before zero_grad
        self.optimizer.zero_grad(set_to_none=True)
        self.done = step
        return loss_value


def train_peft(cfg: Config, model: nn.Module, data: TaskData, method: str, rank: int) -> dict[str, float]:
    """rankopt's loop (same batches, AdamW, schedule, clipping) around a PEFT model; returns the final metrics.

    ``model`` is already on ``cfg.training.device``: PEFT builds its adapters where the base lies (EVA's
    stay on the meta device until :func:`eva_initialise`, so the model cannot be moved here)."""
    t = cfg.training
    if method == "peft_eva":
        eva_initialise(model, data, cfg)
    model.train()
    stepper = PeftStepper(model, t.lr, t.weight_decay, t.scheduler, t.steps, t.warmup_ratio, t.max_grad_norm,
                          adalora=method == "peft_adalora", device=t.device)
    batches = seeded_batches(data, t.batch_size, t.seed)
    for _ in range(t.steps):
        if not math.isfinite(stepper.step(next(batches))):
            return {cfg.task.metric: float("nan")}
    if method == "peft_lora_trunc":
        truncate_by_svd(model, rank)
    return evaluate(SimpleNamespace(model=model), data, cfg.task.type, t.eval_batch_size, t.device)
