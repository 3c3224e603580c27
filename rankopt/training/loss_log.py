"""Training losses kept on the device and read in one transfer every few steps.

Reading a loss (``.item()``) makes the host wait for the device; doing it every step leaves the
GPU idle while Python launches the next step. The loop records each step's loss tensor here and
reads them all at once every ``training.log_every`` steps, before an evaluation and before a
reallocation, so callbacks still get every step's loss, in order, only a little later. A loss
that is not finite is caught at that read, naming the step where it first appeared; one that
grows past :data:`RUNAWAY` times the first step's is warned about once (the run goes on: it may
recover, but a user should not learn it from the final metric alone).
"""

from __future__ import annotations

import logging
import math

import torch

from rankopt.errors import TrainingDiverged

log = logging.getLogger(__name__)
RUNAWAY = 100.0  # a loss this many times the first step's is running away


class LossLog:
    """Losses of the steps not read yet."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.first: float | None = None
        self.warned = False

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach()))

    def read(self) -> list[tuple[int, float]]:
        """(step, loss) of every pending step, with one device-to-host transfer."""
        if not self.pending:
            return []
        values = torch.stack([loss.float() for _, loss in self.pending]).cpu().tolist()
        steps = [step for step, _ in self.pending]
        self.pending = []
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {step}; lower training.lr")
            if self.first is None:
                self.first = value
            elif not self.warned and self.first > 0 and value > RUNAWAY * self.first:
                self.warned = True
                log.warning("the training loss reached %.4g at step %d, over %dx its first value (%.4g): training "
                            "is diverging; lower training.lr", value, step, RUNAWAY, self.first)
        return list(zip(steps, values))
