"""Optimizer and schedule, and keeping the optimizer consistent when adapters change shape.

When a layer's rank changes its parameters are replaced by new, smaller or larger
tensors. :func:`apply_resizes` swaps them into the optimizer's parameter groups and
carries each survivor's state (Adam's moments and step counts) by index; new components
start with zeroed state. Without this the optimizer would keep updating the old tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankopt.adapters.layer import Resize, take_components


class ComponentAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, decoupled weight decay) whose step count is kept per element.

    torch's AdamW counts steps per tensor. A component grown into an adapter at step t would
    inherit t and skip the bias correction a fresh moment needs: its first updates come out
    1.3x (t = 30) to 6.4x (t = 3000) too large. Here ``state["step"]`` has the parameter's
    shape, so :func:`apply_resizes` carries survivors' counts and starts new components at 0,
    and each one gets the bias correction of its own age. No host sync: the counts stay tensors.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                step.add_(1)
                p.mul_(1 - lr * decay)
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                correction1 = 1 - torch.pow(beta1, step)
                correction2 = 1 - torch.pow(beta2, step)
                denom = (v.sqrt() / correction2.sqrt()).add_(eps)
                p.addcdiv_(m / correction1, denom, value=-lr)
        return loss


def build_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return ComponentAdamW(params, lr=lr, weight_decay=weight_decay)


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
