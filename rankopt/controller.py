"""The rank controller: importance scores, the budget schedule, and who keeps which rank.

The decisions are made on plain tensors of scores (:func:`allocate`), so the rules are
tested without a model. :class:`RankController` only gathers scores from the layers,
calls :func:`allocate` and applies the result.

Importance of component i of a layer (see :mod:`rankopt.adapters.layer`):

* ``sensitivity`` (AdaLoRA): I_i = |lam_i g_lam_i| + mean_j |P_ji g_P_ji| + mean_j |Q_ij g_Q_ij|
  each step; smoothed Ibar = b1 Ibar + (1 - b1) I, uncertainty Ubar = b2 Ubar + (1 - b2) |I - Ibar|,
  score = Ibar * Ubar.
* ``energy``: |lam_i| |P_i| |Q_i| * scale, the component's singular value.

Budget (total rank over all adapted layers) at step t, with T steps, warm-up t_i and final
phase from t_f: b(t) = b0 for t <= t_i; b_T + (b0 - b_T) (1 - (t - t_i) / (t_f - t_i))^3
between; b_T from t_f on. Reallocation happens every ``interval`` steps in (t_i, t_f].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankopt.adapters.layer import Resize, SVDLinear, take_components


@dataclass(frozen=True)
class BudgetSchedule:
    """Warm-up at the initial budget, cubic decay to the target, then fixed."""

    initial: int
    target: int
    total_steps: int
    warmup_steps: int
    final_steps: int
    interval: int

    @classmethod
    def from_fractions(cls, initial: int, target: int, total_steps: int, warmup: float, final: float,
                       interval: int) -> BudgetSchedule:
        return cls(initial, target, total_steps, round(warmup * total_steps), round(final * total_steps), interval)

    @property
    def decay_end(self) -> int:
        return max(self.warmup_steps, self.total_steps - self.final_steps)

    def budget_at(self, step: int) -> int:
        t_i, t_f = self.warmup_steps, self.decay_end
        if step <= t_i:
            return self.initial
        if step >= t_f:
            return self.target
        progress = (step - t_i) / (t_f - t_i)
        return self.target + round((self.initial - self.target) * (1 - progress) ** 3)

    def is_reallocation_step(self, step: int) -> bool:
        t_i, t_f = self.warmup_steps, self.decay_end
        if step == t_f and self.initial != self.target:
            return True
        return t_i < step <= t_f and (step - t_i) % self.interval == 0

    def is_tracking_step(self, step: int) -> bool:
        """Steps whose gradients feed the sensitivity EMA: from warm-up to the last reallocation."""
        return step < self.decay_end


@dataclass(frozen=True)
class Allocation:
    """For one layer: old indices of the components to keep, and how many to add."""

    keep: torch.Tensor
    grow: int

    @property
    def rank(self) -> int:
        return self.keep.numel() + self.grow


def allocate(scores: list[torch.Tensor], budget: int, min_rank: int, max_rank: int,
             max_grow: int) -> list[Allocation]:
    """Split a global ``budget`` of components across layers, given each component's score.

    Each layer keeps its ``min_rank`` best components. The rest compete globally: real
    components by their score, plus up to ``max_grow`` would-be new components per layer
    scored at that layer's weakest kept score, so a layer grows only when even its weakest
    component beats the global cut. Ties favour real components. Extra growth slots beyond
    ``max_grow`` (score -inf) are used only when the budget cannot be met otherwise. The
    result sums to ``budget`` exactly.
    """
    ranks = [s.numel() for s in scores]
    if not len(scores) * min_rank <= budget <= len(scores) * max_rank:
        raise ValueError(f"budget {budget} is outside [{len(scores) * min_rank}, {len(scores) * max_rank}]")
    order = [torch.argsort(s.float(), descending=True, stable=True) for s in scores]
    forced = [min(min_rank, r) for r in ranks]
    # candidates: (score, is_new, layer, tiebreak)
    pool: list[tuple[float, int, int, int]] = []
    for layer, (s, idx) in enumerate(zip(scores, order)):
        values, ranked = s.float().tolist(), idx.tolist()  # Python numbers: element-wise tensor reads are slow
        for pos in range(forced[layer], min(ranks[layer], max_rank)):
            pool.append((values[ranked[pos]], 0, layer, pos))
        weakest = min(values) if ranks[layer] else -math.inf
        # a layer below min_rank already grows to it (below); only the room above that competes
        for k in range(max(0, max_rank - max(ranks[layer], min_rank))):
            pool.append((weakest if k < max_grow else -math.inf, 1, layer, k))
    pool.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
    n_keep = list(forced)
    n_grow = [0] * len(scores)
    # a layer below min_rank (only possible at the first call) must grow to it
    for layer, r in enumerate(ranks):
        n_grow[layer] = max(0, min_rank - r)
    remaining = budget - sum(n_keep) - sum(n_grow)
    for score, is_new, layer, _ in pool:
        if remaining <= 0:
            break
        if is_new:
            n_grow[layer] += 1
        else:
            n_keep[layer] += 1
        remaining -= 1
    return [Allocation(keep=torch.sort(idx[:k]).values, grow=g) for idx, k, g in zip(order, n_keep, n_grow)]


class SensitivityTracker:
    """EMA of AdaLoRA's sensitivity and of its uncertainty, per component, per layer."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[SVDLinear, torch.Tensor] = {}
        self.unc: dict[SVDLinear, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, layers: list[SVDLinear]) -> None:
        """Fold in the gradients now on the layers (call after backward, before the step)."""
        for layer in layers:
            p, lam, q = layer.lora_P, layer.lora_lam, layer.lora_Q
            if lam.grad is None:
                continue
            inst = (lam * lam.grad).abs() + (p * p.grad).abs().mean(dim=0) + (q * q.grad).abs().mean(dim=1)
            inst = inst.float()
            if layer not in self.ema:
                self.ema[layer] = torch.zeros_like(inst)
                self.unc[layer] = torch.zeros_like(inst)
            ema, unc = self.ema[layer], self.unc[layer]
            ema.mul_(self.beta1).add_(inst, alpha=1 - self.beta1)
            unc.mul_(self.beta2).add_((inst - ema).abs(), alpha=1 - self.beta2)

    def scores(self, layer: SVDLinear) -> torch.Tensor:
        if layer not in self.ema:
            return torch.zeros(layer.rank)
        return (self.ema[layer] * self.unc[layer]).cpu()

    def remap(self, layer: SVDLinear, source: torch.Tensor) -> None:
        """Follow a resize: survivors keep their history, new components start at zero."""
        for state in (self.ema, self.unc):
            if layer in state:
                state[layer] = take_components(state[layer], source, dim=0)


@dataclass
class Reallocation:
    """What one reallocation did: the budget, new ranks, the scores of both kinds, the resizes."""

    step: int
    budget: int
    ranks: dict[str, int]
    scores: dict[str, dict[str, torch.Tensor]]  # kind -> layer -> per-component score (before the change)
    resizes: list[Resize]


class RankController:
    """Drives the layers of one model through the budget schedule.

    Both importance kinds are kept up to date and reported; ``importance`` picks the one
    that decides.
    """

    def __init__(self, layers: dict[str, SVDLinear], schedule: BudgetSchedule, importance: str,
                 min_rank: int, max_rank: int, max_grow: int, beta1: float = 0.85, beta2: float = 0.85,
                 seed: int = 0):
        self.layers = layers
        self.schedule = schedule
        self.importance = importance
        self.min_rank, self.max_rank, self.max_grow = min_rank, max_rank, max_grow
        self.tracker = SensitivityTracker(beta1, beta2)
        self.generator = torch.Generator().manual_seed(seed + 7919)
        # new components get their layer's weakest score as a floor at the next reallocation,
        # so that one interval is enough to prove (or disprove) them
        self._floor: dict[SVDLinear, torch.Tensor] = {}

    def after_backward(self, step: int) -> None:
        """Feed this step's gradients to the sensitivity EMA (``step``: steps finished before this one)."""
        if self.schedule.is_tracking_step(step):
            self.tracker.update(list(self.layers.values()))

    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "sensitivity": {n: self.tracker.scores(layer) for n, layer in self.layers.items()},
            "energy": {n: layer.component_energy().cpu() for n, layer in self.layers.items()},
        }

    def _deciding(self, scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for layer, s in zip(self.layers.values(), scores.values()):
            floor = self._floor.get(layer)
            out.append(torch.maximum(s, floor) if floor is not None else s)
        return out

    def step(self, step: int) -> Reallocation | None:
        """Reallocate if ``step`` (the count of finished steps) is a reallocation step."""
        if not self.schedule.is_reallocation_step(step):
            return None
        budget = self.schedule.budget_at(step)
        scores = self.scores()
        deciding = self._deciding(scores[self.importance])
        plan = allocate(deciding, budget, self.min_rank, self.max_rank, self.max_grow)
        self._floor = {}
        resizes: list[Resize] = []
        for layer, alloc, s in zip(self.layers.values(), plan, deciding):
            if alloc.grow == 0 and alloc.keep.numel() == layer.rank:
                continue
            changes = layer.resize(alloc.keep, alloc.grow, self.generator)
            resizes.extend(changes)
            source = changes[0].source
            self.tracker.remap(layer, source)
            if alloc.grow:
                weakest = s[alloc.keep].min() if alloc.keep.numel() else s.max()
                self._floor[layer] = torch.where(source < 0, weakest, torch.zeros(()))
        return Reallocation(step=step, budget=budget, ranks={n: l.rank for n, l in self.layers.items()},
                            scores=scores, resizes=resizes)
