"""A real decoder where rank may matter: SmolLM2-135M-Instruct, chat fine-tuning (the ``chat`` preset).

The field finds rank matters for capacity-limited generation (SFT, continued pretraining), so this
rung trains the chat preset's decoder on its chats for several epochs of a fixed subsample and
scores the validation loss per assistant token. First PEFT LoRA's rank sweep (budgets 1, 4, 16, 64:
does the amount of rank move the loss beyond seed noise?), then the methods at equal size: PEFT
LoRA and AdaLoRA beside rankopt's, all in the same loop (same packed rows, batches, schedule).
"""

from __future__ import annotations

import time
import torch

PEFT_DECODER_METHODS = ("peft_lora", "peft_adalora")


def decoder_config(method: str, budget: int, lr: float, seed: int, args):
    """The chat preset at the rung's size; a rankopt method's start and settings as in ``quality_vs_peft``."""
    from quality_vs_peft import RANKOPT_VARIANTS, variant_settings
    from rankopt.config import resolve_config

    base, _, spec = method.partition(":")
    start, most, controller_on, unit = RANKOPT_VARIANTS.get(base, RANKOPT_VARIANTS["rankopt_fixed"])
    init = start * budget
    overrides = {
        "task.max_train_samples": args.train_samples, "task.max_eval_samples": args.eval_samples,
        "training.steps": args.steps, "training.eval_every": args.steps, "training.lr": lr, "training.seed": seed,
        "training.log_every": args.steps, "adapter.init_rank": init, "adapter.alpha": 2 * init,
        "controller.target_rank": budget, "controller.max_rank": most * budget,
        "controller.enabled": controller_on and not method.startswith("peft_"), "controller.budget_unit": unit,
        "training.device": args.device,
        **({"model.name": args.model} if args.model else {}),
        **variant_settings(spec),
    }
    return resolve_config("chat", overrides)


def peft_decoder(model: torch.nn.Module, method: str, budget: int, cfg):
    """PEFT's LoRA (rank = budget) or AdaLoRA (2 x budget down to it) on the preset's target modules."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    t, c = cfg.training, cfg.controller
    torch.manual_seed(t.seed)  # PEFT draws its initial A from the global RNG
    common = {"task_type": "CAUSAL_LM", "target_modules": list(cfg.model.target_modules), "lora_dropout": 0.0}
    if method == "peft_lora":
        config = LoraConfig(r=budget, lora_alpha=2 * budget, **common)
    elif method == "peft_adalora":
        config = AdaLoraConfig(init_r=2 * budget, target_r=budget, lora_alpha=4 * budget, total_step=t.steps,
                               tinit=round(c.warmup * t.steps), tfinal=round(c.final * t.steps),
                               deltaT=c.interval, **common)
    else:
        raise ValueError(f"unknown PEFT method {method!r}; choose from {', '.join(PEFT_DECODER_METHODS)}")
    return get_peft_model(model, config)


def run_decoder(task: str, method: str, budget: int, lr: float, seed: int, args) -> dict:
    """One fine-tune of the decoder; the row carries the validation loss per assistant token."""
    from quality_vs_peft import CODE
    from peft_baselines import effective_adapter_params, train_peft
    from rankopt.training.setup import build_model, load_base, prepare_data
    from rankopt.training.trainer import train_adapted

    cfg = decoder_config(method, budget, lr, seed, args)
    data = prepare_data(cfg)
    started = time.perf_counter()
    if method.startswith("rankopt"):
        result = train_adapted(cfg, build_model(cfg, data.num_labels), data)
        metrics, params, total_rank = result.metrics, result.adapter_params, result.total_rank
    else:
        model = peft_decoder(load_base(cfg, data.num_labels).to(cfg.training.device), method, budget, cfg)
        metrics = train_peft(cfg, model, data, method, budget)
        params, total_rank = effective_adapter_params(model, method), None
    return {"rung": "decoder", "task": task, "metric_name": "loss", "metric": metrics["loss"], "method": method,
            "budget": budget, "lr": lr, "seed": seed, "steps": args.steps, "train_samples": args.train_samples,
            "adapter_params": params, "total_rank": total_rank, "seconds": round(time.perf_counter() - started, 1),
            "code": CODE, "device": args.device}

