"""The controller of one model: gathers scores from its layers, allocates, applies the resizes.

Importance of component i of a layer (see :mod:`rankopt.adapters.layer`): ``sensitivity``
(AdaLoRA's, :mod:`.importance`) or ``energy``, |lam_i| |P_i| |Q_i| * scale, the component's
singular value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankopt.adapters.layer import Resize, SVDLinear
from rankopt.controller.allocation import allocate
from rankopt.controller.importance import SensitivityTracker
from rankopt.controller.schedule import BudgetSchedule


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
