"""Adapters batched by shape: one kernel per group of same-shape layers, not one per layer.

A Llama-7B with all-linear adapters has 224 of them but only three shapes (q/k/v/o, gate/up,
down) times the ranks the controller gave them. Looping over layers launches thousands of tiny
kernels per step (review 2026-12, finding 6: ~9.4k, 15-30 % of a GPU step); stacking each group's
factors and using one ``bmm`` keeps the launch count at a few per group.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from rankopt.adapters.layer import SVDLinear, beyond_rounding


def same_shape_groups(layers) -> list[list[SVDLinear]]:
    """Layers with equal (out, in, capacity, mode, dtype, device), in registry order within each group.

    The capacity is the rank in dynamic mode; static layers of one shape stay one group whatever their ranks.
    """
    groups: dict[tuple, list[SVDLinear]] = defaultdict(list)
    for layer in layers:
        p = layer.lora_P
        groups[(layer.out_features, layer.in_features, layer.capacity, layer.static, p.dtype, p.device)].append(layer)
    return list(groups.values())


def orthogonality_penalty(layers) -> torch.Tensor:
    """Sum over layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2, one batched product per group.

    Deviations within float rounding are ignored, as in :meth:`SVDLinear.orthogonality_penalty`.
    """
    total, _ = _stacked_penalty(layers)
    return total if total is not None else torch.zeros(())


def add_penalty_gradient(layers, weight: float) -> None:
    """Add the gradient of ``weight`` x :func:`orthogonality_penalty` to the factors' ``.grad``.

    The same values, bit for bit, as ``(weight * orthogonality_penalty(layers)).backward()``, whose
    last stage splits each group's stacked gradient into one per factor and adds each to its
    ``.grad`` with a kernel of its own (two per layer: 448 at Llama-8B's 224 adapters); here the
    stacked gradients are taken whole and added with one foreach kernel.
    """
    total, stacks = _stacked_penalty(layers)
    if total is None:
        return
    grads = torch.autograd.grad(weight * total, [t for _, p, q in stacks for t in (p, q)])
    params, parts = [], []
    for (group, _, _), g_p, g_q in zip(stacks, grads[0::2], grads[1::2]):
        params += [layer.lora_P for layer in group] + [layer.lora_Q for layer in group]
        parts += list(g_p.unbind(0)) + list(g_q.unbind(0))
    with torch.no_grad():
        existing = [(p.grad, part) for p, part in zip(params, parts) if p.grad is not None]
        for p, part in zip(params, parts):
            if p.grad is None:  # no task gradient (the layer was not in the forward): the penalty's alone
                p.grad = part.clone()
        if existing:
            torch._foreach_add_([grad for grad, _ in existing], [part for _, part in existing])


def _stacked_penalty(layers) -> tuple[torch.Tensor | None, list[tuple[list[SVDLinear], torch.Tensor, torch.Tensor]]]:
    """The penalty (None without layers) and, per group, its layers and stacked P (G, out, r) and Q (G, r, in)."""
    total, stacks = None, []
    for group in same_shape_groups(layers):
        p = torch.stack([layer.lora_P for layer in group])  # (G, out, r)
        q = torch.stack([layer.lora_Q for layer in group])  # (G, r, in)
        eye = torch.stack([layer.identity() for layer in group]) if group[0].static else group[0].identity()
        term = beyond_rounding(torch.bmm(p.transpose(1, 2), p) - eye).square().sum() + \
            beyond_rounding(torch.bmm(q, q.transpose(1, 2)) - eye).square().sum()
        total = term if total is None else total + term
        stacks.append((group, p, q))
    return total, stacks


@torch.no_grad()
def instant_sensitivity(layers) -> list[torch.Tensor]:
    """|lam g_lam| + mean_j |P_j g_P_j| + mean_j |Q_j g_Q_j| per layer (float32), batched per group.

    Layers without gradients are left out: the result follows the order of ``layers`` that have one.
    Static layers' unused slots score exactly 0 (zero values, zero gradients).
    """
    with_grad = [layer for layer in layers if layer.lora_lam.grad is not None]
    out: dict[SVDLinear, torch.Tensor] = {}
    for group in same_shape_groups(with_grad):
        lam = torch.stack([l.lora_lam for l in group])
        g_lam = torch.stack([l.lora_lam.grad for l in group])
        p = torch.stack([l.lora_P for l in group])
        g_p = torch.stack([l.lora_P.grad for l in group])
        q = torch.stack([l.lora_Q for l in group])
        g_q = torch.stack([l.lora_Q.grad for l in group])
        inst = (lam * g_lam).abs_() + (p * g_p).abs_().mean(dim=1) + (q * g_q).abs_().mean(dim=2)
        out.update(zip(group, inst.float().unbind(0)))
    return [out[layer] for layer in with_grad]
