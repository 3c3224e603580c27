"""Progress of a fine-tune, listening to training events: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rankopt.training.events import Callback, RankEvent, TrainResult

PLAIN_LINES = 10  # a run prints about this many step lines when its output is not a terminal


class ProgressBar(Callback):
    """Steps done, last loss, current total rank and last metric, on stderr.

    On a terminal this is a live bar. When the output is a file or a pipe (a log, CI, ``nohup``)
    a live bar shows nothing until the end, so each ``every`` steps (about a tenth of the run)
    and at each evaluation one plain line is printed instead, with the time taken and left.
    """

    def __init__(self, total_steps: int, description: str = "train", console: Console | None = None,
                 every: int | None = None):
        self.total = total_steps
        self.description = description
        self.console = console or Console(stderr=True)
        self.plain = not self.console.is_terminal
        self.every = every or max(1, math.ceil(total_steps / PLAIN_LINES))
        self.progress: Progress | None = None
        self.task = None
        self.fields = {"loss": "-", "rank": "-", "metric": "-"}
        self.step, self.first_step, self.started = 0, 0, time.monotonic()

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.step = self.first_step = int(info.get("resumed_step") or 0)
        self.started = time.monotonic()
        if self.plain:
            resumed = f" (resumed at step {self.step})" if self.step else ""
            self._line(f"{self.total} steps{resumed}")
            return
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("loss {task.fields[loss]}  rank {task.fields[rank]}"
                                                                 "  eval {task.fields[metric]}"),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=self.total, completed=self.step, **self.fields)

    def on_step(self, step: int, loss: float) -> None:
        self.step = step
        self.fields["loss"] = f"{loss:.3f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=self.fields["loss"])
        elif self.plain and (step % self.every == 0 or step == self.total):
            self._line(self._status())

    def on_reallocation(self, event: RankEvent) -> None:
        self.fields["rank"] = str(sum(event.ranks.values()))
        if self.progress is not None:
            self.progress.update(self.task, rank=self.fields["rank"])

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.fields["metric"] = next((f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss"), "")
        if self.progress is not None:
            self.progress.update(self.task, metric=self.fields["metric"])
        elif self.plain:
            self._line(f"eval at step {step}: {self.fields['metric']}, loss {metrics.get('loss', math.nan):.4f}")

    def _status(self) -> str:
        step = self.step
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        left = f", ~{_clock(elapsed / done * (self.total - step))} left" if 0 < done and step < self.total else ""
        rank = f"  total rank {self.fields['rank']}" if self.fields["rank"] != "-" else ""
        return f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%, {_clock(elapsed)}{left})  " \
               f"loss {self.fields['loss']}{rank}"

    def _line(self, text: str) -> None:
        self.console.print(f"{self.description}: {text}", markup=False, highlight=False, soft_wrap=True)

    def on_train_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrialProgress:
    """One progress bar per trial, and a line per finished trial, for ``rankopt tune``."""

    def __init__(self, steps: int, console: Console | None = None):
        self.steps = steps
        self.console = console or Console(stderr=True)
        self.bar: ProgressBar | None = None

    def for_trial(self, trial, cfg) -> list[Callback]:
        self.close()
        self.bar = ProgressBar(cfg.training.steps, description=f"trial {trial.number}", console=self.console)
        return [self.bar]

    def trial_ended(self, study, trial) -> None:
        self.close()
        value = f"{trial.values[0]:.4f}" if trial.values else "-"
        reason = trial.user_attrs.get("fail_reason", "")
        extra = f"  ({reason})" if reason and trial.state.name == "FAIL" else ""
        self.console.print(f"trial {trial.number}: {trial.state.name.lower()}  metric {value}  "
                           f"total rank {trial.user_attrs.get('total_rank', '-')}{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_tune_result(result, console: Console | None = None) -> None:
    """The best trial (or the Pareto set) as a table on stdout, its validation metric beside its test score.

    With ``--within`` the smallest good trial gets a row too (marked), unless it is already listed.
    """
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)  # piped: one line per row
    running = getattr(result, "n_running", 0)  # other processes' trials (a shared study), counted too
    others = f"{result.n_pruned} pruned, {result.n_failed} failed" + (f", {running} running" if running else "")
    if not result.best:
        console.print(f"study {result.study_name}: no complete trial yet ({others})")
        return
    title = "Pareto set" if len(result.objectives) > 1 else "best trial"
    table = Table(title=f"study {result.study_name}: {title}  ({result.n_complete} complete, {others})")
    metric = getattr(result, "metric_name", "metric")
    note = getattr(result, "test_note", None)
    smallest, within = getattr(result, "smallest", None), getattr(result, "within", None)
    no_test = note is None or note.startswith("no test split")
    columns = ["trial", f"validation {metric}", f"test {metric}", "final total rank", "per-layer ranks",
               "adapter params", "trainable params", "mlflow run"]
    for col in columns + (["chosen"] if smallest else []):
        table.add_column(col, no_wrap=True)
    rows = list(result.best)
    if smallest is not None and smallest.number not in {t.number for t in rows}:
        rows.append(smallest)
    for t in rows:
        test = f"{t.test_metric:.4f}" if t.test_metric is not None else ("no test split" if no_test else "-")
        cells = [str(t.number), f"{t.metric:.4f}" if t.metric is not None else "-", test, str(t.total_rank),
                 t.rank_summary(), f"{t.adapter_params:,}" if t.adapter_params else "-",
                 f"{t.trainable_params:,}" if t.trainable_params else "-", t.run_id or "-"]
        if smallest is not None:
            marks = (["best"] if t is result.best[0] else []) + \
                    ([f"smallest within {within:g}"] if t.number == smallest.number else [])
            cells.append(", ".join(marks))
        table.add_row(*cells)
    if note:
        table.caption = f"test: {note}; the validation metric chose the trial, the test split was not used in the search"
    console.print(table)
