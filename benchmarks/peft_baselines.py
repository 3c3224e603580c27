"""PEFT LoRA and AdaLoRA on the same model, data and loop as a rankopt run: the benchmarks' baselines.

A baseline starts from the same pretrained weights and the same seeded task head as rankopt
(``rankopt.training.setup.load_base``), sees the same batches in the same order, and uses the same
optimizer, schedule and gradient clipping, so the adapters are the only difference.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

from rankopt.config import Config
from rankopt.tasks.data import TaskData
from rankopt.training.optim import build_optimizer, build_scheduler
from rankopt.training.trainer import evaluate, seeded_batches

def peft_model(cfg: Config, base: nn.Module, method: str, rank: int, init_rank: int) -> nn.Module:
    """``base`` wrapped by PEFT: fixed-rank LoRA at ``rank``, or AdaLoRA from ``init_rank`` down to ``rank``.

    Both use scale 2 (alpha = 2 x the starting rank), as the rankopt runs do.
    """
    t, c = cfg.training, cfg.controller
    torch.manual_seed(t.seed)  # PEFT draws its initial A (LoRA) / A, B (AdaLoRA) from the global RNG
    common = {"task_type": "SEQ_CLS", "target_modules": list(cfg.model.target_modules), "lora_dropout": 0.0}
    if method == "peft_lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, **common)
    elif method == "peft_adalora":
        config = AdaLoraConfig(init_r=init_rank, target_r=rank, lora_alpha=2 * init_rank, total_step=t.steps,
                               tinit=round(c.warmup * t.steps), tfinal=round(c.final * t.steps),
                               deltaT=c.interval, **common)
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    return get_peft_model(base, config)


def effective_adapter_params(model: nn.Module, method: str) -> int:
    """Adapter parameters that carry weight: AdaLoRA masks pruned components to zero instead of removing them."""
    total = 0
    for module in model.modules():
        if method == "peft_adalora" and hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            total += kept * (module.in_features + module.out_features + 1)
        elif method == "peft_lora" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            total += sum(p.numel() for p in (module.lora_A["default"].weight, module.lora_B["default"].weight))
    return total


class PeftStepper:
    """rankopt's step order around a PEFT model: forward, backward, clip, optimizer, lr, [AdaLoRA], zero grad."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, schedule: str, steps: int,
                 warmup_ratio: float, max_grad_norm: float, adalora: bool, device: str = "cpu",
                 autocast: torch.dtype | None = None):
        self.model, self.adalora, self.device, self.max_grad_norm = model, adalora, device, max_grad_norm
        self.autocast = autocast  # bf16: forward/backward under torch.autocast, as rankopt's training.precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, lr, weight_decay)
        self.scheduler = build_scheduler(self.optimizer, schedule, steps, warmup_ratio)
        self.done = 0

    def step(self, batch: dict) -> torch.Tensor:
        step = self.done + 1
        batch = {k: v.to(self.device) for k, v in batch.items()}
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


def train_peft(cfg: Config, model: nn.Module, data: TaskData, method: str) -> dict[str, float]:
    """rankopt's loop (same batches, AdamW, schedule, clipping) around a PEFT model; returns the final metrics."""
    t = cfg.training
    model.train()
    stepper = PeftStepper(model, t.lr, t.weight_decay, t.scheduler, t.steps, t.warmup_ratio, t.max_grad_norm,
                          adalora=method == "peft_adalora")
    batches = seeded_batches(data, t.batch_size, t.seed)
    for _ in range(t.steps):
        if not math.isfinite(stepper.step(next(batches))):
            return {cfg.task.metric: float("nan")}
    return evaluate(SimpleNamespace(model=model), data, cfg.task.type, t.eval_batch_size)
