"""A terminal progress bar that listens to training events (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rankopt.events import Callback, RankEvent, TrainResult


class ProgressBar(Callback):
    """Steps done, last loss, current total rank and last metric, on stderr."""

    def __init__(self, total_steps: int, description: str = "train", console: Console | None = None):
        self.total = total_steps
        self.description = description
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.fields = {"loss": "-", "rank": "-", "metric": "-"}

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("loss {task.fields[loss]}  rank {task.fields[rank]}"
                                                                 "  eval {task.fields[metric]}"),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=self.total, **self.fields)

    def on_step(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.3f}")

    def on_reallocation(self, event: RankEvent) -> None:
        if self.progress is not None:
            self.progress.update(self.task, rank=str(sum(event.ranks.values())))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            shown = next((f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss"), "")
            self.progress.update(self.task, metric=shown)

    def on_train_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
