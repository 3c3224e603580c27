"""Training losses kept on the device and read in one transfer every few steps.

Reading a loss (``.item()``) makes the host wait for the device; doing it every step leaves the
GPU idle while Python launches the next step. The loop records each step's loss tensor here and
reads them all at once every ``training.log_every`` steps, before an evaluation and before a
reallocation, so callbacks still get every step's loss, in order, only a little later. A loss
that is not finite is caught at that read, naming the step where it first appeared.
"""

from __future__ import annotations

import math

import torch

from rankopt.errors import TrainingDiverged


class LossLog:
    """Losses of the steps not read yet."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []

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
        return list(zip(steps, values))
