"""Optimizer and schedule, and keeping the optimizer consistent when adapters change shape.

When a layer's rank changes its parameters are replaced by new, smaller or larger
tensors. :func:`apply_resizes` swaps them into the optimizer's parameter groups and
carries each survivor's state (Adam's moments) by index; new components start with
zeroed state. Without this the optimizer would keep updating the old tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankopt.adapters.layer import Resize, take_components


def build_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                    warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear/cosine decay to 0, or constant."""
    warmup = round(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_resizes(optimizer: torch.optim.Optimizer, resizes: list[Resize]) -> None:
    """Replace resized parameters in ``optimizer`` and remap their state component-wise."""
    if not resizes:
        return
    position = {id(p): (gi, pi) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])}
    for change in resizes:
        where = position.get(id(change.old))
        if where is None:
            raise KeyError("a resized parameter is not in the optimizer")
        gi, pi = where
        optimizer.param_groups[gi]["params"][pi] = change.new
        position[id(change.new)] = where
        old_state = optimizer.state.pop(change.old, None)
        if not old_state:
            continue
        new_state = {}
        for key, value in old_state.items():
            if torch.is_tensor(value) and value.shape == change.old.shape:
                new_state[key] = take_components(value, change.source, change.dim).contiguous()
            else:
                new_state[key] = value
        optimizer.state[change.new] = new_state
