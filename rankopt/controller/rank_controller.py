"""The controller of one model: gathers scores from its layers, allocates, applies the resizes.

Importance of component i of a layer (see :mod:`rankopt.adapters.layer`): ``sensitivity``
(AdaLoRA's, :mod:`.importance`) or ``energy``, |lam_i| |P_i| |Q_i| * scale, the component's
singular value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankopt import distributed
from rankopt.adapters.layer import Resize, SVDLinear
from rankopt.adapters.weight_gradient import WeightGradientProbe
from rankopt.controller.allocation import allocate, component_costs, counted_in
from rankopt.controller.importance import SensitivityTracker, to_host
from rankopt.controller.schedule import BudgetSchedule


@dataclass
class Reallocation:
    """What one reallocation did: the total rank reached, new ranks, the scores of both kinds, the resizes."""

    step: int
    budget: int  # total rank after it: the schedule's budget, or what a parameter budget bought
    ranks: dict[str, int]
    scores: dict[str, dict[str, torch.Tensor]]  # kind -> layer -> per-component score (before the change)
    resizes: list[Resize]


class RankController:
    """Drives the layers of one model through the budget schedule.

    Both importance kinds are kept up to date and reported; ``importance`` picks the one
    that decides. A component grown at a reallocation cannot be pruned for the next
    ``min_age`` reallocations: its sensitivity needs steps to build up from lam = 0. In the
    final phase (from t_f) nothing grows unless the budget cannot be met otherwise, so the last
    reallocation never swaps trained components for fresh zero ones.

    Under data parallelism (:mod:`rankopt.distributed`) the scores come from the gradients summed
    over processes, the plan is rank 0's, broadcast, and the gradient pairs are found from products
    summed over processes; the trainer then broadcasts rank 0's resized tensors.

    ``growth="gradient"``: on the step before a reallocation a :class:`WeightGradientProbe`
    finds each layer's top weight-gradient pairs off its span, and new components start along
    them (lam = 0, so growth stays function-preserving); ``growth="random"``: random orthogonal
    directions. Either way a would-be component competes at its layer's weakest score. (Scoring
    it by the gain scale x sigma x typical |lam| instead was measured and lost: the top pair of a
    fresh gradient always looks steeper than trained components, so growth became churn.)

    ``budget_unit="params"``: the schedule's total rank is spent as the parameters of a uniform
    adapter of that rank, so components compete by score per parameter and a cheap layer's
    component no longer costs the budget what a wide layer's does (see :func:`allocate`).
    """

    def __init__(self, layers: dict[str, SVDLinear], schedule: BudgetSchedule, importance: str,
                 min_rank: int, max_rank: int, max_grow: int, beta1: float = 0.85, beta2: float = 0.85,
                 seed: int = 0, min_age: int = 1, growth: str = "gradient", probe_tokens: int = 512,
                 budget_unit: str = "rank", swap: float = 0.0):
        self.layers = layers
        self.schedule = schedule
        self.importance = importance
        self.min_rank, self.max_rank, self.max_grow = min_rank, max_rank, max_grow
        self.min_age = min_age
        self.tracker = SensitivityTracker(beta1, beta2)
        self.generator = torch.Generator().manual_seed(seed + 7919)
        # step at which each component was grown (-1: there from the start), for layers that grew
        self.born: dict[SVDLinear, torch.Tensor] = {}
        self.growth = growth
        self.swap = swap if growth == "gradient" else 0.0  # RigL's grow step needs the gradient's pairs
        self.costs = component_costs(layers.values()) if budget_unit == "params" else None
        # under data parallelism each process probes its shard: probe_tokens stays the global sample
        per_process = max(1, probe_tokens // distributed.current().world)
        self.probe = (WeightGradientProbe(layers, max_tokens=per_process, seed=seed)
                      if growth == "gradient" and max_grow > 0 else None)

    def before_step(self, step: int) -> None:
        """Arm the gradient probe when the step about to run (``step``) ends with a growing reallocation."""
        if self.probe is not None and self.schedule.is_reallocation_step(step) and step < self.schedule.decay_end:
            self.probe.arm(self.max_grow, step=step)

    def after_backward(self, step: int) -> None:
        """Feed this step's gradients to the sensitivity EMA (``step``: steps finished before this one)."""
        if self.schedule.is_tracking_step(step):
            self.tracker.update(list(self.layers.values()))

    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """Both kinds of score of every layer, on the host; each kind read back in one transfer."""
        layers = self.layers.values()
        return {
            "sensitivity": dict(zip(self.layers, self.tracker.scores_of(layers))),
            "energy": dict(zip(self.layers, to_host([layer.component_energy() for layer in layers]))),
        }

    def swap_share(self, step: int) -> float:
        """The share of the budget moved to new components at ``step``: ``swap`` at the warm-up's end,
        decaying to 0 at the final phase along RigL's cosine."""
        t_i, t_f = self.schedule.warmup_steps, self.schedule.decay_end
        if not self.swap or step >= t_f:
            return 0.0
        progress = max(0.0, (step - t_i) / max(1, t_f - t_i))
        return self.swap * (1 + math.cos(math.pi * progress)) / 2

    def young(self, layer: SVDLinear, step: int) -> torch.Tensor | None:
        """Components of ``layer`` grown within the last ``min_age`` reallocation intervals."""
        born = self.born.get(layer)
        if born is None or self.min_age == 0:
            return None
        return layer.live((born >= 0) & (step - born <= self.min_age * self.schedule.interval))

    def step(self, step: int) -> Reallocation | None:
        """Reallocate if ``step`` (the count of finished steps) is a reallocation step."""
        if not self.schedule.is_reallocation_step(step):
            return None
        budget = counted_in(self.schedule.budget_at(step), self.costs)
        scores = self.scores()
        layers = list(self.layers.values())
        final = step >= self.schedule.decay_end
        pairs = dict(self.probe.pairs) if self.probe is not None else {}
        if self.probe is not None:
            self.probe.clear()
        gains = [pairs[layer].sigma.cpu() if layer in pairs else None for layer in layers] if self.swap else None
        plan = allocate(list(scores[self.importance].values()), budget, self.min_rank, self.max_rank,
                        0 if final else self.max_grow, protect=[self.young(layer, step) for layer in layers],
                        costs=self.costs, gains=gains, swap=0 if final else round(self.swap_share(step) * budget))
        # every process scores the same summed gradients; rank 0's plan is still the one all apply,
        # so no rounding difference can ever give two processes different shapes
        plan = distributed.broadcast_object(plan)
        resizes: list[Resize] = []
        for layer, alloc in zip(layers, plan):
            old_rank = layer.rank
            if alloc.grow == 0 and alloc.keep.numel() == old_rank:
                continue
            found = pairs.get(layer)
            directions = (found.u, found.v) if found is not None and alloc.grow else None
            changes = layer.resize(alloc.keep, alloc.grow, self.generator, directions=directions)
            resizes.extend(changes)
            source = changes[0].source
            self.tracker.remap(layer, source)
            self._remap_birth(layer, source, step, old_rank)
        # the total rank reached: the schedule's budget in rank units, what the parameters bought in params
        return Reallocation(step=step, budget=sum(alloc.rank for alloc in plan), ranks={n: l.rank for n, l in self.layers.items()},
                            scores=scores, resizes=resizes)

    def _remap_birth(self, layer: SVDLinear, source: torch.Tensor, step: int, old_rank: int) -> None:
        born = self.born.get(layer)
        if born is None and bool((source >= 0).all()):
            return  # pruned only, never grew: every component is an original one
        if born is None:
            born = torch.full((old_rank,), -1, dtype=torch.long)
        inherited = born[source.clamp(min=0)] if born.numel() else torch.full_like(source, -1)  # from rank 0: all new
        self.born[layer] = torch.where(source < 0, step, inherited)
