"""Optimizer and schedule, and keeping the optimizer consistent when adapters change shape.

When a layer's rank changes its parameters are replaced by new, smaller or larger
tensors (static mode: rewritten in place). :func:`apply_resizes` swaps them into the
optimizer's parameter groups and carries each survivor's state (Adam's moments and step
counts) by index; new components start with zeroed state. Without this the optimizer would
keep updating the old tensors.
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

    The update runs over all parameters of a group at once with torch's ``_foreach`` ops: ~17
    kernel launches per (group, device, dtype) instead of ~15 per tensor (at Llama-8B's 224
    adapters, 672 tensors, that was ~10k launches per step). The arithmetic is the per-tensor
    one, op for op, so results and checkpoints are unchanged to the bit.
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
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.zeros_like(p, dtype=torch.float32),
                                         exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            lists = [params, [p.grad for p in params]] + [[self.state[p][key] for p in params]
                                                          for key in ("step", "exp_avg", "exp_avg_sq")]
            for ps, grads, steps, ms, vs in self._bucketed(lists):
                _adamw_foreach(ps, grads, steps, ms, vs, group)
        return loss

    @staticmethod
    def _bucketed(lists: list[list[torch.Tensor]]):
        """The parallel lists split by the parameter's (device, dtype): a ``_foreach`` call takes one of each."""
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for row in zip(*lists):
            bucket = buckets.setdefault((row[0].device, row[0].dtype), [[] for _ in lists])
            for column, t in zip(bucket, row):
                column.append(t)
        return buckets.values()


def _adamw_foreach(params, grads, steps, exp_avgs, exp_avg_sqs, group) -> None:
    """One AdamW update of many tensors, each element bias-corrected by its own step count."""
    beta1, beta2 = group["betas"]
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(params, 1 - lr * decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, _sqrt_bias_correction(beta2, steps))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, _bias_correction(beta1, steps))
    torch._foreach_addcdiv_(params, update, denom, value=-lr)


def _bias_correction(beta: float, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1 - beta ** step`` per element (negate-and-add-one is bitwise ``1 - x``)."""
    powers = torch._foreach_pow(beta, steps)
    torch._foreach_neg_(powers)
    torch._foreach_add_(powers, 1)
    return powers


def _sqrt_bias_correction(beta: float, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    corrections = _bias_correction(beta, steps)
    torch._foreach_sqrt_(corrections)
    return corrections


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
    """Replace resized parameters in ``optimizer`` and remap their state component-wise.

    A parameter rewritten in place (static mode: ``new is old``) stays where it is, and so do its
    state tensors: their values are remapped in place (unused and new slots zeroed), so the
    optimizer holds the same tensors before and after, as a compiled or graphed step needs.
    """
    if not resizes:
        return
    position = {id(p): (gi, pi) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])}
    for change in resizes:
        where = position.get(id(change.old))
        if where is None:
            raise KeyError("a resized parameter is not in the optimizer")
        in_place = change.new is change.old
        if not in_place:
            gi, pi = where
            optimizer.param_groups[gi]["params"][pi] = change.new
            position[id(change.new)] = where
        old_state = optimizer.state.get(change.old) if in_place else optimizer.state.pop(change.old, None)
        if not old_state:
            continue
        new_state = {}
        for key, value in old_state.items():
            if torch.is_tensor(value) and value.shape == change.old.shape:
                moved = take_components(value, change.source, change.dim)
                new_state[key] = value.copy_(moved) if in_place else moved.contiguous()
            else:
                new_state[key] = value
        optimizer.state[change.new] = new_state
