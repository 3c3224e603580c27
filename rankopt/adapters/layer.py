"""A variable-rank adapter around one frozen ``nn.Linear``, kept in SVD form.

    y = W x + b + scale * P diag(lam) Q x        P: (out, r)   lam: (r,)   Q: (r, in)

Why SVD form rather than plain LoRA factors B A: every rank-one component i is an
explicit triple (P[:, i], lam[i], Q[i, :]), so

* its importance is read directly (the sensitivity |lam_i * dL/dlam_i|, or its energy
  |lam_i| * |P_i| * |Q_i|, which is its singular value while P and Q stay orthonormal, the
  job of the orthogonality penalty);
* pruning is slicing: the survivors keep their values *and* their optimizer state one to
  one, with no change of basis that would invalidate Adam's moments;
* growing appends components with lam = 0, so the layer's output is exactly unchanged at
  the moment of growth, with new directions orthogonal to the kept ones.

The exact factorisation of ΔW (QR of P and Q^T, then an r x r SVD, O(r^2 (in + out)))
gives the true singular spectrum without ever forming ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Resize:
    """How one parameter changed shape: ``source[k]`` is the old index of new component k (-1: new)."""

    old: nn.Parameter
    new: nn.Parameter
    source: torch.Tensor
    dim: int


# Deviations from orthonormality below this are float rounding, not drift (float32 P^T P of a
# 4096-row factor is off by ~1e-5): the orthogonality penalty ignores them.
ROUNDING_TOLERANCE = 1e-4


def beyond_rounding(deviation: torch.Tensor) -> torch.Tensor:
    """``deviation`` shrunk towards 0 by :data:`ROUNDING_TOLERANCE` (soft threshold).

    Without it, factors that are orthonormal up to rounding get a penalty gradient made of rounding
    noise, which Adam scales up to steps of about lr wherever the task gradient is small (new
    components, lam near 0): numerically equal runs (micro-batches, data-parallel shards) then
    drift apart by 1e-3, and grown directions are shaken for nothing.
    """
    return torch.sign(deviation) * (deviation.abs() - ROUNDING_TOLERANCE).clamp_min(0)


class SVDLinear(nn.Module):
    """Frozen ``base`` plus a trainable rank-r update in SVD form; r may change in place.

    Rank 0 is an adapter that gave up its update (``controller.min_rank: 0``): empty factors, the
    base's output unchanged, and the layer can grow components back at a later reallocation.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 0:
            raise ValueError("an adapter's rank cannot be negative")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # float32 whatever the base holds (bf16, fp16, 4-bit): trained tensors need it (see training.precision)
        out_f, in_f = base.out_features, base.in_features
        dtype, device = torch.float32, base.weight.device
        # contiguous like every resized tensor: a resumed run must see the same layouts (and GEMM paths)
        self.lora_P = nn.Parameter(_orthonormal_columns(out_f, rank, generator).contiguous().to(device, dtype))
        self.lora_lam = nn.Parameter(torch.zeros(rank, device=device, dtype=dtype))
        self.lora_Q = nn.Parameter(_orthonormal_columns(in_f, rank, generator).T.contiguous().to(device, dtype))

    @property
    def rank(self) -> int:
        return self.lora_lam.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the update; the update runs in the adapter's dtype (autocast may lower it)."""
        out = self.base(x)
        h = self.dropout(x.to(self.lora_Q.dtype)) @ self.lora_Q.T
        return out + ((h * (self.lora_lam * self.scale)) @ self.lora_P.T).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (out, in); for tests, export and merging, never on the training path."""
        return (self.lora_P * (self.lora_lam * self.scale)) @ self.lora_Q

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain LoRA factors (A, B) with ΔW = B @ A exactly: A = diag(lam) Q, B = P * scale."""
        return (self.lora_lam[:, None] * self.lora_Q).detach(), (self.lora_P * self.scale).detach()

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact thin SVD of ΔW = U diag(s) Vt via QR of P and Q^T and an r x r SVD."""
        with torch.no_grad():
            p = self.lora_P.float()
            q = self.lora_Q.float()
            qp, rp = torch.linalg.qr(p)
            qq, rq = torch.linalg.qr(q.T)
            core = (rp * (self.lora_lam.float() * self.scale)) @ rq.T
            uc, s, vct = torch.linalg.svd(core)
            return qp @ uc, s, vct @ qq.T

    def component_energy(self) -> torch.Tensor:
        """||scale * lam_i P_i Q_i^T||_F per component: its singular value when P, Q are orthonormal."""
        with torch.no_grad():
            return (self.lora_lam.abs() * self.scale * self.lora_P.norm(dim=0) * self.lora_Q.norm(dim=1)).float()

    def orthogonality_penalty(self) -> torch.Tensor:
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (AdaLoRA's regulariser), keeps components distinct.

        Deviations within float rounding are ignored (:func:`beyond_rounding`).
        """
        eye = torch.eye(self.rank, device=self.lora_P.device, dtype=self.lora_P.dtype)
        return (beyond_rounding(self.lora_P.T @ self.lora_P - eye) ** 2).sum() + \
            (beyond_rounding(self.lora_Q @ self.lora_Q.T - eye) ** 2).sum()

    @torch.no_grad()
    def resize(self, keep: torch.Tensor, n_new: int, generator: torch.Generator | None = None,
               directions: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Resize]:
        """Keep components ``keep`` (old indices, in order), then append ``n_new`` fresh ones.

        Fresh components have lam = 0 (the output is unchanged) and directions orthogonal
        to the kept ones: ``directions`` = (u (out, j), v (in, j)) for the first j of them (the
        weight gradient's top pairs, say), random for the rest. Returns how each parameter was
        remapped so the caller can carry the optimizer state of the survivors.
        """
        keep = keep.to(torch.long).cpu()
        on_device = keep.to(self.lora_P.device, non_blocking=True)  # one copy, no wait
        kept_p = self.lora_P[:, on_device]
        kept_q = self.lora_Q[on_device, :]
        kept_lam = self.lora_lam[on_device]
        if n_new:
            start_p, start_q = directions if directions is not None else (None, None)
            new_p = _orthogonal_complement(kept_p, n_new, generator, start_p)
            new_q = _orthogonal_complement(kept_q.T, n_new, generator, start_q).T
            kept_p = torch.cat([kept_p, new_p], dim=1)
            kept_q = torch.cat([kept_q, new_q], dim=0)
            kept_lam = torch.cat([kept_lam, kept_lam.new_zeros(n_new)])
        source = torch.cat([keep, torch.full((n_new,), -1, dtype=torch.long)])
        changes = []
        for name, value, dim in (("lora_P", kept_p, 1), ("lora_lam", kept_lam, 0), ("lora_Q", kept_q, 0)):
            old = getattr(self, name)
            new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            changes.append(Resize(old=old, new=new, source=source, dim=dim))
        return changes

    @torch.no_grad()
    def restart(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Start over at rank k along given directions: P = u (out, k), Q = v^T, lam = 0.

        Before training only (the optimizer must not hold the old tensors yet). The output is
        unchanged (lam = 0); with u, v the weight gradient's top pairs, dL/dlam_i = scale sigma_i.
        The scale stays as it was: it does not follow the new rank (see :mod:`rankopt.training.gradient_init`).
        """
        dtype, device = self.lora_P.dtype, self.lora_P.device
        p, q = _orthonormal_like(u), _orthonormal_like(v)
        self.lora_P = nn.Parameter(p.contiguous().to(device, dtype))
        self.lora_lam = nn.Parameter(torch.zeros(p.shape[1], device=device, dtype=dtype))
        self.lora_Q = nn.Parameter(q.T.contiguous().to(device, dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def take_components(t: torch.Tensor, source: torch.Tensor, dim: int) -> torch.Tensor:
    """Slices of ``t`` along ``dim`` at indices ``source``; zeros where source is -1 (new).

    ``source`` is a host tensor (as :meth:`SVDLinear.resize` makes it): whether anything is new is
    read there, and the indices go to ``t``'s device without a wait, so a GPU never stalls here.
    """
    new = source < 0
    src = source.to(t.device, non_blocking=True)
    if not bool(new.any()):  # pruning only: a plain gather
        return t.index_select(dim, src)
    if t.shape[dim] == 0:  # a layer growing back from rank 0: every slot is new
        shape = list(t.shape)
        shape[dim] = src.numel()
        return t.new_zeros(shape)
    out = t.index_select(dim, src.clamp(min=0))
    mask_shape = [1] * t.dim()
    mask_shape[dim] = -1
    return out * (~new).to(t.device, non_blocking=True).view(mask_shape).to(t.dtype)


def _orthonormal_like(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``m``'s, each on the side of the column it comes from (QR, signs fixed)."""
    q, r = torch.linalg.qr(m.detach().float().cpu())
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, 1.0, signs)


def _orthonormal_columns(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """n x k with orthonormal columns (k <= n), random but reproducible through ``generator``."""
    if k > n:
        raise ValueError(f"rank {k} exceeds the layer dimension {n}")
    g = torch.randn(n, k, generator=generator)
    return torch.linalg.qr(g)[0]


def _orthogonal_complement(basis: torch.Tensor, k: int, generator: torch.Generator | None,
                           start: torch.Tensor | None = None) -> torch.Tensor:
    """k unit columns orthogonal to the span of ``basis`` (n x r), same dtype/device.

    The first columns follow ``start`` (n x j, j <= k) as closely as orthogonality allows (QR keeps
    their order); the others are random.
    """
    n, r = basis.shape
    if r + k > n:
        raise ValueError(f"cannot grow to rank {r + k}: the layer dimension is {n}")
    dtype, device = basis.dtype, basis.device
    b = basis.detach().float()  # QR where the factors are: no round trip to the host
    given = start.detach().float()[:, :k].to(device) if start is not None else torch.zeros(n, 0, device=device)
    drawn = torch.randn(n, k - given.shape[1], generator=generator).to(device, non_blocking=True)
    cand = torch.cat([given, drawn], dim=1)
    if r:
        qb, _ = torch.linalg.qr(b)
        cand = cand - qb @ (qb.T @ cand)
        cand = cand - qb @ (qb.T @ cand)  # second pass: orthogonal to float precision
    q, _ = torch.linalg.qr(cand)
    return q.to(dtype=dtype)
