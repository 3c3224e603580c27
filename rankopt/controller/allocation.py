"""Who keeps which rank: a global budget split across layers from per-component scores.

Plain tensors in, plain decisions out, so the rules are tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Allocation:
    """For one layer: old indices of the components to keep, and how many to add."""

    keep: torch.Tensor
    grow: int

    @property
    def rank(self) -> int:
        return self.keep.numel() + self.grow


def allocate(scores: list[torch.Tensor], budget: int, min_rank: int, max_rank: int, max_grow: int,
             protect: list[torch.Tensor | None] | None = None,
             costs: list[int] | None = None) -> list[Allocation]:
    """Split a global ``budget`` of components across layers, given each component's score.

    Each layer keeps its ``min_rank`` best components, and every component ``protect`` marks
    (too young to be judged). The rest compete globally: real components by their score,
    plus up to ``max_grow`` would-be new components per layer, scored at that layer's weakest
    score, so that a layer grows only when even its weakest component beats the global cut (see
    :class:`rankopt.controller.rank_controller.RankController` for why not by a predicted gain).
    A non-finite score is never rewarded: it ranks below every finite one. Ties favour real
    components. Extra growth slots beyond ``max_grow`` are used only when the budget cannot be
    met otherwise, best layer first. The result sums to ``budget`` exactly.

    ``costs`` (one per layer: what one component of it costs, e.g. its adapter parameters) make
    ``budget`` a budget of cost: candidates then compete by score per unit of cost (a knapsack's
    greedy order, so a wide layer's component must be worth its size), the fill skips what no
    longer fits, and the result spends at most ``budget``, short of it by less than the costliest
    component. A candidate with no finite claim (a broken score, a growth slot beyond
    ``max_grow``) fills only a shortfall of at least that much.
    """
    n_layers = len(scores)
    ranks = [s.numel() for s in scores]
    cost = list(costs) if costs is not None else [1] * n_layers
    lowest, highest = min_rank * sum(cost), max_rank * sum(cost)
    if not lowest <= budget <= highest:
        raise ValueError(f"budget {budget} is outside [{lowest}, {highest}]")
    protect = protect or [None] * n_layers
    clean = [_finite_or_lowest(s) for s in scores]
    priority = [c if p is None else torch.where(p.to(torch.bool), math.inf, c) for c, p in zip(clean, protect)]
    order = [torch.argsort(pr, descending=True, stable=True) for pr in priority]
    forced = [min(min_rank, r) for r in ranks]
    # candidates: (priority, score, is_new, layer, tiebreak); sorted best first
    pool: list[tuple[float, float, int, int, int]] = []
    for layer in range(n_layers):
        prio, values, ranked = priority[layer].tolist(), clean[layer].tolist(), order[layer].tolist()
        for pos in range(forced[layer], min(ranks[layer], max_rank)):
            i = ranked[pos]
            pool.append((prio[i] / cost[layer], values[i] / cost[layer], 0, layer, pos))
        # a layer below min_rank already grows to it (below); only the room above that competes
        room = max(0, max_rank - max(ranks[layer], min_rank))
        for k, gain in enumerate(_growth_scores(values, room)):
            claim = gain / cost[layer]
            pool.append((claim if k < max_grow else -math.inf, claim, 1, layer, k))
    pool.sort(key=lambda c: (-c[0], -c[1], c[2], c[3], c[4]))
    n_keep = list(forced)
    # a layer below min_rank (only possible at the first call) must grow to it
    n_grow = [max(0, min_rank - r) for r in ranks]
    remaining = budget - sum(k * c for k, c in zip(n_keep, cost)) - sum(g * c for g, c in zip(n_grow, cost))
    for claim, _, is_new, layer, _ in pool:
        if remaining < min(cost):
            break
        if cost[layer] > remaining or (claim == -math.inf and remaining < max(cost)):
            continue
        if is_new:
            n_grow[layer] += 1
        else:
            n_keep[layer] += 1
        remaining -= cost[layer]
    return [Allocation(keep=torch.sort(idx[:k]).values, grow=g) for idx, k, g in zip(order, n_keep, n_grow)]


def component_costs(layers) -> list[int]:
    """Adapter parameters one component adds to each layer: a column of P, an entry of lam, a row of Q."""
    return [layer.in_features + layer.out_features + 1 for layer in layers]


def counted_in(total_rank: int, costs: list[int] | None) -> int:
    """A total rank as a budget in ``costs``: the size of that rank spread evenly over the layers."""
    return total_rank if costs is None else round(total_rank * sum(costs) / len(costs))


def _finite_or_lowest(score: torch.Tensor) -> torch.Tensor:
    """The scores as float, NaN and +-inf replaced by -inf: a broken score never wins a slot."""
    score = score.float()
    return torch.where(torch.isfinite(score), score, -math.inf)


def _growth_scores(values: list[float], room: int) -> list[float]:
    """Scores of a layer's ``room`` would-be components: each at the layer's weakest score."""
    finite = [v for v in values if math.isfinite(v)]
    return [min(finite) if finite else -math.inf] * room
