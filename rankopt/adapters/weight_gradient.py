"""The top singular pairs of a frozen layer's weight gradient, without forming it.

For y = W x the weight gradient over a batch is G = sum_t d_t x_t^T = D^T X (m x n), with X the
layer's inputs (T x n) and D the gradients of its outputs (T x m). A :class:`WeightGradientProbe`
records X and D on one step (forward hook + tensor hook) and answers, per layer, the top k
singular pairs of G projected off the adapter's current span,

    G' = (I - P P^T) G (I - Q^T Q)      (P, Q orthonormalised by QR),

by block power iteration on products with X and D only: O(iters k (m + n) T), never m x n.
Over several micro-batches of one step the rows are pooled, so G is the step's whole gradient;
at most ``max_tokens`` rows per layer are kept for the whole step (a uniform sample of all its
rows), however many micro-batches it has, and the recompute forward of gradient checkpointing
records nothing (the rows it would add are the ones its original forward already holds).
These are the directions in which a new component (u, v) is steepest: at lam = 0 its
dL/dlam = scale * u^T G v = scale * sigma. Used to grow components (and to start adapters)
where the task's gradient points, not in random directions that catch ~||G||_F / sqrt(mn) of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankopt import distributed
from rankopt.adapters.layer import SVDLinear


@dataclass
class GradientPairs:
    """Top singular pairs of one layer's (projected) weight gradient: G' ~ U diag(sigma) V^T."""

    u: torch.Tensor  # (out, k), orthonormal columns
    sigma: torch.Tensor  # (k,), descending, in units of the full batch's gradient
    v: torch.Tensor  # (in, k), orthonormal columns


@dataclass
class _Forward:
    """The rows one forward of one layer kept: their inputs, output gradients (once known) and sample keys."""

    x: torch.Tensor  # (kept, in)
    rows: torch.Tensor  # (kept,) their indices among the forward's rows (CPU)
    keys: torch.Tensor  # (kept,) their random keys (CPU, float64)
    d: torch.Tensor | None = None  # (kept, out), set by the backward

    def keep(self, mask: torch.Tensor) -> None:
        index = mask.nonzero().squeeze(1)
        on_device = index.to(self.x.device, non_blocking=True)
        self.x, self.rows, self.keys = self.x.index_select(0, on_device), self.rows[index], self.keys[index]
        if self.d is not None:
            self.d = self.d.index_select(0, on_device)


class WeightGradientProbe:
    """Records one step's layer inputs and output gradients and turns them into gradient pairs.

    Armed for a step, it keeps at most ``max_tokens`` rows of each layer's input over the whole
    step, all micro-batches together (bottom-k sampling: every row gets a seeded random key, the
    ``max_tokens`` smallest keys so far stay, so the kept rows are a uniform sample of the step's
    rows, each weighted by seen / kept so that D^T X stays an unbiased estimate of the sum), and
    the matching rows of the output gradient in the backward; :attr:`pairs` then runs the power
    iteration on them. Extra memory for that one step: max_tokens x (in + out) values per layer,
    in the activations' dtype, plus at most as much again while one forward's rows are sorted in.
    A forward that runs inside a backward (the recompute of a gradient-checkpointed block) is
    skipped: it repeats a forward already recorded.
    """

    def __init__(self, layers: dict[str, SVDLinear], max_tokens: int = 512, iters: int = 4, seed: int = 0):
        self.layers = layers
        self.max_tokens, self.iters = max_tokens, iters
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self.k = 0
        self._step = 0
        self.exclude_span = True
        self._rows: dict[SVDLinear, list[_Forward]] = {}  # layer -> the rows each forward of the step kept
        self._seen: dict[SVDLinear, int] = {}  # layer -> rows its forwards saw this step
        self._pairs: dict[SVDLinear, GradientPairs] | None = None
        self._handles: list = []

    def arm(self, k: int, exclude_span: bool = True, step: int = 0) -> None:
        """Record the next forwards and backwards of every layer (call before the step's first forward).

        The random draws (token subset, power-iteration start) depend on the seed and ``step``
        only, so a run resumed from a checkpoint probes exactly as the uninterrupted one did.
        """
        self.clear()
        self._step = step
        self.generator.manual_seed(self.seed + 104729 + step)
        self.k, self.exclude_span = k, exclude_span
        for layer in self.layers.values():
            self._handles.append(layer.register_forward_hook(self._record))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.disarm()
        self._rows, self._seen, self._pairs = {}, {}, None

    def kept_rows(self, layer: SVDLinear) -> int:
        """Input rows of ``layer`` held now (at most ``max_tokens``)."""
        return sum(f.x.shape[0] for f in self._rows.get(layer, []))

    @property
    def pairs(self) -> dict[SVDLinear, GradientPairs]:
        """Each recorded layer's top ``k`` pairs of its step's weight gradient (computed once, on first use).

        Under data parallelism every process holds the rows of its own shard; the products with
        G are summed over processes (:func:`rankopt.distributed.all_sum`), so all of them find the
        pairs of the global batch's gradient, from the same seeded start.
        """
        if self._pairs is None:
            self.disarm()
            self._pairs = {}
            parallel = distributed.current().parallel
            reduce = distributed.all_sum if parallel else None
            start = torch.Generator().manual_seed(self.seed + 3 * 104729 + self._step)
            rows = {}  # layer -> (x, d): its step's kept rows, weighted
            for layer in self.layers.values():
                forwards = self._rows.get(layer, [])
                done = [f for f in forwards if f.d is not None]  # rows without a gradient add nothing to G
                if not done and not parallel:
                    continue
                if done:
                    weight = self._seen[layer] / sum(f.x.shape[0] for f in forwards)
                    x = torch.cat([f.x.float() for f in done]) * weight ** 0.5
                    d = torch.cat([f.d.float() for f in done]) * weight ** 0.5
                else:  # this process's shard never reached the layer: it adds nothing to the sum
                    device = layer.lora_P.device
                    x = torch.zeros(0, layer.in_features, device=device)
                    d = torch.zeros(0, layer.out_features, device=device)
                rows[layer] = (x, d)
            for (layer, (x, d)), usable in zip(rows.items(), usable_rows(list(rows.values()), reduce)):
                found = top_pairs(layer, x, d, self.k, self.iters, self.exclude_span, start, reduce=reduce) \
                    if usable else None
                if found is not None:
                    self._pairs[layer] = found
            self._rows, self._seen = {}, {}
        return self._pairs

    def _record(self, layer: SVDLinear, args: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return  # an evaluation pass: nothing to learn from
        if torch._C._current_graph_task_id() != -1:
            return  # a forward inside a backward: checkpointing's recompute of a forward already recorded
        x = args[0].detach().reshape(-1, layer.in_features)
        seen = x.shape[0]
        self._seen[layer] = self._seen.get(layer, 0) + seen
        forwards = self._rows.setdefault(layer, [])
        keys = torch.rand(seen, generator=self.generator, dtype=torch.float64)
        held = torch.cat([f.keys for f in forwards] + [keys])
        if held.numel() > self.max_tokens:  # keep the smallest keys of the whole step
            chosen = torch.zeros(held.numel(), dtype=torch.bool)
            chosen[held.topk(self.max_tokens, largest=False).indices] = True
            for f, mask in zip(forwards, chosen[:-seen].split([f.keys.numel() for f in forwards])):
                f.keep(mask)
            forwards[:] = [f for f in forwards if f.keys.numel()]
            rows = chosen[-seen:].nonzero().squeeze(1)
        else:
            rows = torch.arange(seen)
        if not rows.numel():
            return
        record = _Forward(x=x.index_select(0, rows.to(x.device, non_blocking=True)), rows=rows, keys=keys[rows])
        forwards.append(record)

        def on_grad(grad: torch.Tensor) -> None:
            d = grad.detach().reshape(-1, layer.out_features)
            record.d = d.index_select(0, record.rows.to(d.device, non_blocking=True))  # rows still kept now

        output.register_hook(on_grad)


def usable_rows(rows: list[tuple[torch.Tensor, torch.Tensor]],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[bool]:
    """For each layer's rows (x, d): finite and not empty on every process, decided in one read-back.

    An overflowed or diverged step says nothing about where to grow. One (layers x 2) tensor of
    flags and row counts is summed over processes and read once, instead of a host round trip
    (and an all-reduce) per layer.
    """
    if not rows:
        return []
    device = rows[0][0].device
    broken = torch.stack([((~torch.isfinite(x)).any() | (~torch.isfinite(d)).any()).to(device, non_blocking=True)
                          for x, d in rows]).float()
    counts = torch.tensor([float(x.shape[0]) for x, _ in rows]).to(device, non_blocking=True)
    flags = torch.stack([broken, counts], dim=1)
    flags = (reduce(flags) if reduce is not None else flags).tolist()
    return [not bad and count > 0 for bad, count in flags]


def _off(basis: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """(I - B B^T) m, twice for float precision; m itself without a basis."""
    if basis is None:
        return m
    for _ in range(2):
        m = m - basis @ (basis.T @ m)
    return m


@torch.no_grad()
def top_pairs(layer: SVDLinear, x: torch.Tensor, d: torch.Tensor, k: int, iters: int = 4,
              exclude_span: bool = True, generator: torch.Generator | None = None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GradientPairs | None:
    """Top ``k`` singular pairs of G = d^T x (off the layer's P/Q span if ``exclude_span``); rows checked
    by :func:`usable_rows` first.

    ``reduce`` sums a product over processes when x and d are one shard's rows of G's sum.
    """
    reduce = reduce or (lambda t: t)
    basis_out = basis_in = None
    if exclude_span:
        p, _, q = layer.factors()  # the live components only: a static layer's unused slots span nothing
        basis_out = torch.linalg.qr(p.detach().float())[0]
        basis_in = torch.linalg.qr(q.detach().float().T)[0]
    taken = basis_out.shape[1] if basis_out is not None else 0
    k = min(k, layer.out_features - taken, layer.in_features - taken)
    if k < 1:
        return None

    def times(v):  # G' v: (out, k)
        return _off(basis_out, reduce(d.T @ (x @ _off(basis_in, v))))

    def times_t(u):  # G'^T u: (in, k)
        return _off(basis_in, reduce(x.T @ (d @ _off(basis_out, u))))

    v = torch.randn(layer.in_features, k, generator=generator).to(x.device, non_blocking=True)
    v = torch.linalg.qr(_off(basis_in, v))[0]
    for _ in range(iters):
        u = torch.linalg.qr(times(v))[0]
        v = torch.linalg.qr(times_t(u))[0]
    u = torch.linalg.qr(times(v))[0]
    cu, sigma, cvt = torch.linalg.svd(u.T @ times(v))  # the k x k core u^T G' v
    u, v = _off(basis_out, u @ cu), _off(basis_in, v @ cvt.T)
    u = u / u.norm(dim=0).clamp_min(1e-12)
    v = v / v.norm(dim=0).clamp_min(1e-12)
    return GradientPairs(u=u, sigma=sigma, v=v)
