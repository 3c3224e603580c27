"""What the training loop tells the outside world, and the callback shape to listen to it.

The loop never imports Optuna or MLflow: the tuner, the tracker and the progress bar are
all :class:`Callback` subclasses, each overriding only what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RankEvent:
    """Ranks after one reallocation, with the importance scores that decided them."""

    step: int
    budget: int
    ranks: dict[str, int]
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> layer -> per component


@dataclass
class TrainResult:
    """The outcome of one fine-tune."""

    metric_name: str
    metric: float
    metrics: dict[str, float]
    ranks: dict[str, int]
    rank_history: list[RankEvent]
    eval_history: list[tuple[int, dict[str, float]]]
    trainable_params: int
    adapter_params: int
    steps: int
    seconds: float
    adapted: Any = field(repr=False, default=None)  # the AdaptedModel, for export
    run_id: str | None = None  # the MLflow run, when tracked
    artifacts: str | None = None  # where that run's experiment keeps its files (a folder, or a server's URI)
    resumed_from_step: int = 0  # the checkpoint's step, when the run went on from one

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())


class Callback:
    """Hooks the training loop calls; every one is optional."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, step: int, loss: float) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_reallocation(self, event: RankEvent) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


class CallbackList(Callback):
    """Fan one event out to several callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks = list(callbacks or [])

    def on_train_start(self, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info)

    def on_step(self, step: int, loss: float) -> None:
        for cb in self.callbacks:
            cb.on_step(step, loss)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(step, metrics)

    def on_reallocation(self, event: RankEvent) -> None:
        for cb in self.callbacks:
            cb.on_reallocation(event)

    def on_train_end(self, result: TrainResult) -> None:
        for cb in self.callbacks:
            cb.on_train_end(result)


def tensor_lists(scores: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {name: [round(float(v), 8) for v in s] for name, s in scores.items()}
