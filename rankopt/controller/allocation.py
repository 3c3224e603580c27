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
