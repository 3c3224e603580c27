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

Static shapes (``adapter.static_shapes``, :meth:`SVDLinear.make_static`): the factors are
allocated once at a fixed capacity (the controller's max_rank) and the live components are the
first ``rank`` slots, flagged by the buffer ``lora_mask``; the forward uses lam * mask. A resize
then writes values in place (survivors moved to the front in the dynamic mode's order, new ones
after them, the rest zeroed) and never replaces a tensor, so ``torch.compile`` sees the same
shapes and parameters after every reallocation. Everything that reads components (scores,
penalty, SVD, export) goes through :meth:`SVDLinear.live`, so both modes see the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankopt.adapters.update import add_update


@dataclass
class Resize:
    """How one parameter changed: ``source[k]`` is the old index of new component k (-1: new or unused).

    ``new is old`` in static mode: the parameter was rewritten in place, its shape unchanged.
    """

    old: nn.Parameter
    new: nn.Parameter
    source: torch.Tensor
    dim: int


# Deviations from orthonormality below this are float rounding, not drift (float32 P^T P of a
# 4096-row factor is off by ~1e-5): the orthogonality penalty ignores them.
ROUNDING_TOLERANCE = 1e-4


def beyond_rounding(deviation: torch.Tensor) -> torch.Tensor:
    """How far ``deviation`` lies beyond :data:`ROUNDING_TOLERANCE`: |deviation| - tolerance, or 0.

    Without it, factors that are orthonormal up to rounding get a penalty gradient made of rounding
    noise, which Adam scales up to steps of about lr wherever the task gradient is small (new
    components, lam near 0): numerically equal runs (micro-batches, data-parallel shards) then
    drift apart by 1e-3, and grown directions are shaken for nothing.

    Only its square enters the penalty, so the soft threshold's sign is left off: the square and its
    gradient are bit for bit the signed form's (abs's backward carries the sign), in two kernels
    fewer forward and three backward.
    """
    return (deviation.abs() - ROUNDING_TOLERANCE).clamp_min(0)


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
        # static mode only (see make_static): 1.0 for the live slots; not saved with the model's weights
        self.register_buffer("lora_mask", None, persistent=False)
        self._live = rank

    @property
    def static(self) -> bool:
        return self.lora_mask is not None

    @property
    def rank(self) -> int:
        """Live components (a host int: reading it never waits for the device)."""
        return self._live if self.static else self.lora_lam.shape[0]

    @property
    def capacity(self) -> int:
        """Components the factors have room for: the rank in dynamic mode, fixed in static mode."""
        return self.lora_lam.shape[0]

    def live(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The live components' part of a per-component tensor ``t`` (a view; ``t`` itself when dynamic)."""
        return t.narrow(dim, 0, self.rank) if self.static else t

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, lam, Q) of the live components."""
        return self.live(self.lora_P, 1), self.live(self.lora_lam), self.live(self.lora_Q)

    def identity(self) -> torch.Tensor:
        """What P^T P and Q Q^T should be: I, with zeros on the unused slots in static mode."""
        if self.static:
            return torch.diag(self.lora_mask)
        return torch.eye(self.rank, device=self.lora_P.device, dtype=self.lora_P.dtype)

    @torch.no_grad()
    def make_static(self, capacity: int) -> None:
        """Pad the factors with zero components to ``capacity`` slots, once, before any optimizer holds them.

        The output and the live components are unchanged; from now on resizes write in place.
        """
        if self.static:
            if capacity != self.capacity:
                raise ValueError(f"this adapter is already static at capacity {self.capacity}, not {capacity}")
            return
        rank = self.rank
        if not rank <= capacity <= min(self.in_features, self.out_features):
            raise ValueError(f"capacity {capacity} must lie between the rank {rank} and the layer's size")
        extra = capacity - rank
        self.lora_P = nn.Parameter(torch.cat([self.lora_P, self.lora_P.new_zeros(self.out_features, extra)], 1))
        self.lora_lam = nn.Parameter(torch.cat([self.lora_lam, self.lora_lam.new_zeros(extra)]))
        self.lora_Q = nn.Parameter(torch.cat([self.lora_Q, self.lora_Q.new_zeros(extra, self.in_features)]))
        self.lora_mask = torch.zeros_like(self.lora_lam)
        self._set_live(rank)

    def _set_live(self, rank: int) -> None:
        self._live = rank
        self.lora_mask.zero_()
        self.lora_mask[:rank] = 1.0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the update; the update runs in the adapter's dtype (autocast may lower it)."""
        out = self.base(x)
        lam = self.lora_lam if self.lora_mask is None else self.lora_lam * self.lora_mask  # unused slots: 0
        return add_update(out, self.dropout(x.to(self.lora_Q.dtype)), self.lora_Q, lam, self.lora_P, self.scale)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (out, in); for tests, export and merging, never on the training path."""
        p, lam, q = self.factors()
        return (p * (lam * self.scale)) @ q

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain LoRA factors (A, B) with ΔW = B @ A exactly: A = diag(lam) Q, B = P * scale."""
        p, lam, q = self.factors()
        return (lam[:, None] * q).detach(), (p * self.scale).detach()

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact thin SVD of ΔW = U diag(s) Vt via QR of P and Q^T and an r x r SVD."""
        with torch.no_grad():
            p, lam, q = (t.float() for t in self.factors())
            qp, rp = torch.linalg.qr(p)
            qq, rq = torch.linalg.qr(q.T)
            core = (rp * (lam * self.scale)) @ rq.T
            uc, s, vct = torch.linalg.svd(core)
            return qp @ uc, s, vct @ qq.T

    def component_energy(self) -> torch.Tensor:
        """||scale * lam_i P_i Q_i^T||_F per component: its singular value when P, Q are orthonormal."""
        with torch.no_grad():
            p, lam, q = self.factors()
            return (lam.abs() * self.scale * p.norm(dim=0) * q.norm(dim=1)).float()

    def orthogonality_penalty(self) -> torch.Tensor:
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (AdaLoRA's regulariser), keeps components distinct.

        Deviations within float rounding are ignored (:func:`beyond_rounding`). Unused slots (static
        mode) are zero and so is their target: they add exactly nothing, nor any gradient.
        """
        eye = self.identity()
        return (beyond_rounding(self.lora_P.T @ self.lora_P - eye) ** 2).sum() + \
            (beyond_rounding(self.lora_Q @ self.lora_Q.T - eye) ** 2).sum()

    @torch.no_grad()
    def resize(self, keep: torch.Tensor, n_new: int, generator: torch.Generator | None = None,
               directions: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Resize]:
        """Keep components ``keep`` (old indices, in order), then append ``n_new`` fresh ones.

        Fresh components have lam = 0 (the output is unchanged) and directions orthogonal
        to the kept ones: ``directions`` = (u (out, j), v (in, j)) for the first j of them (the
        weight gradient's top pairs, say), random for the rest. Returns how each parameter was
        remapped so the caller can carry the optimizer state of the survivors. In static mode the
        components are written in place to the first slots, the other slots zeroed (their source -1).
        """
        keep = keep.to(torch.long).cpu()
        if self.static and keep.numel() + n_new > self.capacity:
            raise ValueError(f"cannot grow to rank {keep.numel() + n_new}: the adapter has {self.capacity} slots")
        on_device = keep.to(self.lora_P.device, non_blocking=True)  # one copy, no wait
        live_p, live_lam, live_q = self.factors()
        kept_p = live_p[:, on_device]
        kept_q = live_q[on_device, :]
        kept_lam = live_lam[on_device]
        if n_new:
            start_p, start_q = directions if directions is not None else (None, None)
            new_p = _orthogonal_complement(kept_p, n_new, generator, start_p)
            new_q = _orthogonal_complement(kept_q.T, n_new, generator, start_q).T
            kept_p = torch.cat([kept_p, new_p], dim=1)
            kept_q = torch.cat([kept_q, new_q], dim=0)
            kept_lam = torch.cat([kept_lam, kept_lam.new_zeros(n_new)])
        rank = keep.numel() + n_new
        unused = self.capacity - rank if self.static else 0
        source = torch.cat([keep, torch.full((n_new + unused,), -1, dtype=torch.long)])
        changes = []
        for name, value, dim in (("lora_P", kept_p, 1), ("lora_lam", kept_lam, 0), ("lora_Q", kept_q, 0)):
            old = getattr(self, name)
            new = self._write(name, value, dim)
            changes.append(Resize(old=old, new=new, source=source, dim=dim))
        if self.static:
            self._set_live(rank)
        return changes

    def _write(self, name: str, value: torch.Tensor, dim: int) -> nn.Parameter:
        """Make factor ``name`` hold ``value``: a new parameter, or (static) in place in the first slots."""
        old = getattr(self, name)
        if not self.static:
            new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            return new
        old.zero_()  # ``value`` is a copy (gathered or new), never a view of ``old``
        old.narrow(dim, 0, value.shape[dim]).copy_(value)
        return old

    @torch.no_grad()
    def restart(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Start over at rank k along given directions: P = u (out, k), Q = v^T, lam = 0.

        Before training only (the optimizer must not hold the old tensors yet). The output is
        unchanged (lam = 0); with u, v the weight gradient's top pairs, dL/dlam_i = scale sigma_i.
        The scale stays as it was: it does not follow the new rank (see :mod:`rankopt.training.gradient_init`).
        """
        dtype, device = self.lora_P.dtype, self.lora_P.device
        p, q = _orthonormal_like(u), _orthonormal_like(v)
        self._write("lora_P", p.to(device, dtype), 1)
        self._write("lora_lam", torch.zeros(p.shape[1], device=device, dtype=dtype), 0)
        self._write("lora_Q", q.T.to(device, dtype), 0)
        if self.static:
            self._set_live(p.shape[1])

    def extra_repr(self) -> str:
        slots = f", capacity={self.capacity}" if self.static else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}{slots}, scale={self.scale:g}"


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
