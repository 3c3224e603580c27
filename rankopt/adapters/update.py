"""The adapter's update added to the base output, ``out + scale * ((x Q^T) * lam) P^T``, as one autograd node.

Written as plain torch ops the update costs 5 kernels forward and 8 backward per layer, against
plain LoRA's 4 and 5: ``lam * scale`` and its gradient, the reduction of the broadcast product for
lam's gradient and a separate add, about 900 launches more per step at Llama-8B's 224 adapters.
Here the scale rides on the matrix products (``addmm``'s alpha; beta 0 where nothing is added) and
the base output is added by the last one: 3 kernels forward, 7 backward.

Numerics: a power-of-two scale (alpha / r with the usual alpha = 2r, r, ...) multiplies exactly
wherever it is applied, so every value is then bit for bit the plain expression's (tested on the
CPU); any other scale differs from it by float rounding.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class LowRankUpdate(torch.autograd.Function):
    """``out + scale * ((x @ q.T) * lam) @ p.T`` for ``x`` (..., in), ``out`` (..., out), one dtype throughout."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, p: torch.Tensor,
                scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ q.T  # (tokens, r)
        hl = h * lam
        ctx.scale = scale
        ctx.save_for_backward(x2, q, lam, p, h, hl)
        ctx.x_shape = x.shape
        return torch.addmm(out.reshape(-1, out.shape[-1]), hl, p.T, alpha=scale).view(out.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2, q, lam, p, h, hl = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        # beta 0: addmm's first argument only gives the shape and is never read
        g_hl = torch.addmm(lam, g, p, beta=0, alpha=s)  # d/d(h * lam): scale * g P
        d_p = torch.addmm(lam, g.T, hl, beta=0, alpha=s)  # (out, r), as autograd lays out a column-major P^T's
        d_lam = (g_hl * h).sum(0)
        g_h = g_hl * lam
        d_q = g_h.T @ x2  # (r, in)
        # the first adapted layer's input (frozen embeddings) needs none: skip that product there
        d_x = (g_h @ q).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return grad, d_x, d_q, d_lam, d_p, None


def plain_update(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, p: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """The same update in torch ops (autocast decides their dtypes; the update is cast to the output's)."""
    return out + (((x @ q.T) * (lam * scale)) @ p.T).to(out.dtype)


def add_update(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, p: torch.Tensor,
               scale: float) -> torch.Tensor:
    """:class:`LowRankUpdate` where every tensor has one dtype and autocast is off; else :func:`plain_update`."""
    if out.dtype == x.dtype == q.dtype and not torch.is_autocast_enabled(x.device.type):
        return LowRankUpdate.apply(out, x, q, lam, p, scale)
    return plain_update(out, x, q, lam, p, scale)
