"""Placement at equal size: PEFT LoRA on a subset of MiniLM's linears, at the rank that costs what a
uniform rank-``budget`` LoRA on all of them costs, against rankopt choosing over all of them.

PEFT's own comparison (Llama-3.2-3B) finds placement matters at equal size (MLP only beats q,v);
this asks whether it does on the GLUE copies, and whether rankopt's allocation finds the better one.
The run is ``quality_vs_peft``'s: same data, steps, head, batches, optimizer and schedule.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import torch
from torch import nn

# module-name patterns (PEFT takes a string as a full-match regex); BERT's FFN output is
# "layer.N.output.dense", its attention output "layer.N.attention.output.dense"
_ATTENTION = r"query|key|value|attention\.output\.dense"
_MLP = r"intermediate\.dense|(?<!attention\.)output\.dense"
PLACEMENTS = {
    "peft_qv": r".*\.(query|value)",
    "peft_attention": rf".*\.({_ATTENTION})",
    "peft_mlp": rf".*\.layer\.\d+\.({_MLP})",
    "peft_all": rf".*\.layer\.\d+\.(.*\.)?({_ATTENTION}|{_MLP})",
}


def linear_sizes(model: nn.Module, pattern: str) -> dict[str, int]:
    """in + out features (one rank's cost) of each linear whose name fully matches ``pattern``."""
    return {name: module.in_features + module.out_features for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and re.fullmatch(pattern, name)}


def matched_rank(model: nn.Module, placement: str, budget: int) -> int:
    """The rank on ``placement``'s linears whose adapter costs (nearest) a rank-``budget`` one on all."""
    everywhere = sum(linear_sizes(model, PLACEMENTS["peft_all"]).values()) * budget
    return max(1, round(everywhere / sum(linear_sizes(model, PLACEMENTS[placement]).values())))


def run_placement(task: str, method: str, budget: int, lr: float, seed: int, args) -> dict:
    """One run: a placement's PEFT LoRA, or a rankopt method over all linears (``quality_vs_peft.run_one``)."""
    from quality_vs_peft import CODE, run_config, run_one

    q_args = SimpleNamespace(train_samples=args.train_samples, eval_samples=args.eval_samples,
                             eval_split="validation", steps=args.steps, device="cpu", data=args.data)
    if method.startswith("rankopt"):
        row = run_one(method, task, budget, lr, seed, q_args)
        return {"rung": "placement", **row, "rank": None}
    from peft import LoraConfig, get_peft_model
    from peft_baselines import train_peft
    from rankopt.training.setup import load_base, prepare_data

    cfg = run_config(task, budget, lr, seed, q_args, "rankopt_fixed")  # the shared data, steps, loop
    data = prepare_data(cfg)
    started = time.perf_counter()
    base = load_base(cfg, data.num_labels, label_mean=data.label_mean)
    rank = matched_rank(base, method, budget)
    targets = PLACEMENTS[method]
    params = sum(linear_sizes(base, targets).values()) * rank  # before PEFT renames the wrapped linears
    torch.manual_seed(seed)  # PEFT draws A from the global RNG
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                            task_type="SEQ_CLS"))
    metrics = train_peft(cfg, model, data, "peft_lora", rank)
    return {"rung": "placement", "task": task, "metric_name": cfg.task.metric, "metric": metrics[cfg.task.metric],
            "method": method, "budget": budget, "lr": lr, "seed": seed, "steps": args.steps,
            "train_samples": args.train_samples, "adapter_params": params, "total_rank": None, "rank": rank,
            "seconds": round(time.perf_counter() - started, 1), "code": CODE}
