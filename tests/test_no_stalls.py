"""No host sync on an ordinary step: rankopt's own code reads nothing back from the device between log steps.

Every Python-level way of reading a tensor's value (``item``, ``bool``, ``float``, ``int``,
``tolist``) is counted while a call stack frame from ``rankopt/`` made it; the loop may read only
at log, evaluation and reallocation steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rankopt
from conftest import make_tiny_adapted
from rankopt.config import build_config
from rankopt.training.checkpoint import optimizer_state_on
from rankopt.training.trainer import Stepper, seeded_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PACKAGE = str(Path(rankopt.__file__).parent)
READS = ("item", "__bool__", "__float__", "__int__", "tolist")


class SyncCounter:
    """Counts value reads of tensors made directly from a rankopt module."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted


def test_only_log_steps_read_the_device(tiny_config, tiny_task_data, monkeypatch):
    cfg = build_config(tiny_config.model_dump(), {"training.steps": 40, "training.log_every": 10,
                                                  "training.eval_every": 40, "controller.enabled": False})
    stepper = Stepper(cfg, make_tiny_adapted(0))
    batches = seeded_batches(tiny_task_data, 8, 0)
    stepper.step(next(batches))  # the first step builds Adam's state
    counter = SyncCounter(monkeypatch)
    per_step = []
    for _ in range(2, 21):
        before = len(counter.calls)
        stepper.step(next(batches))
        per_step.append(len(counter.calls) - before)
    reads = {step: n for step, n in zip(range(2, 21), per_step) if n}
    assert set(reads) == {10, 20}, counter.calls  # steps 2-9 and 11-19 read nothing
    assert all(n == 1 for n in reads.values()), counter.calls  # one transfer for ten losses


def test_tracking_steps_with_controller_and_penalty_read_nothing(tiny_config, tiny_task_data, monkeypatch):
    cfg = build_config(tiny_config.model_dump(), {"training.steps": 60, "training.log_every": 50,
                                                  "training.eval_every": 50, "controller.interval": 50,
                                                  "controller.warmup": 0.5, "training.orth_reg": 0.1})
    stepper = Stepper(cfg, make_tiny_adapted(0))
    batches = seeded_batches(tiny_task_data, 8, 0)
    stepper.step(next(batches))
    counter = SyncCounter(monkeypatch)
    for _ in range(2, 10):  # warm-up steps: the sensitivity EMA is updated on every one
        stepper.step(next(batches))
    assert stepper.controller.tracker.ema and counter.calls == []


def test_restored_adam_step_stays_on_the_cpu():
    state = {"step": torch.tensor(7.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}
    moved = optimizer_state_on("meta", state)
    assert moved["step"].device.type == "cpu"  # where torch keeps it: Adam reads it without a sync
    assert moved["exp_avg"].device.type == moved["exp_avg_sq"].device.type == "meta"
