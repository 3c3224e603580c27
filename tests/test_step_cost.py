"""Counted on a shadow device (rankopt.testing.host_syncs): what a GPU would wait for in one step."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_adapted
from rankopt.config import build_config
from rankopt.testing.host_syncs import DEVICE, StepCounter
from rankopt.training.trainer import Stepper, seeded_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stepper_on_shadow_device(tiny_config, overrides: dict) -> tuple[Stepper, StepCounter]:
    cfg = build_config(tiny_config.model_dump(), overrides)
    cfg.training.__dict__["device"] = str(DEVICE)  # the config's pattern knows only real devices
    adapted = make_tiny_adapted(0)
    counter = StepCounter()
    counter.place(list(adapted.model.parameters()) + list(adapted.model.buffers()))
    return Stepper(cfg, adapted), counter


def model_syncs(stepper: Stepper, counter: StepCounter, batch: dict) -> dict[str, int]:
    """Syncs of the model's own forward and backward (transformers' mask code reads one value)."""
    before = counter.totals()
    with counter.counting():
        stepper.adapted.model(**{k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}).loss.backward()
    stepper.adapted.model.zero_grad(set_to_none=True)
    return {k: v - before[k] for k, v in counter.totals().items()}


def test_an_ordinary_step_with_controller_penalty_and_optimizer_adds_no_sync_to_the_model(tiny_config,
                                                                                       tiny_task_data):
    stepper, counter = stepper_on_shadow_device(tiny_config, {
        "training.steps": 60, "training.log_every": 50, "training.eval_every": 50, "controller.interval": 50,
        "controller.warmup": 0.5, "training.orth_reg": 0.1})
    batches = seeded_batches(tiny_task_data, 8, 0)
    stepper.step(next(batches))  # builds Adam's state (on the device, from the parameters)
    model_only = model_syncs(stepper, counter, next(batches))
    counter.counts = {}
    with counter.counting():
        for _ in range(3):  # tracking steps: the sensitivity EMA is updated on each
            stepper.step(next(batches))
    assert stepper.controller.tracker.ema
    assert counter.totals()["ops"] > 100  # the counter saw the step
    assert counter.totals()["syncs"] == 3 * model_only["syncs"], dict(counter.where)


def test_the_counter_sees_each_kind_of_host_round_trip():
    counter = StepCounter()
    weight = torch.nn.Parameter(torch.randn(3, 3))
    counter.place([weight])
    with counter.counting():
        loss = (torch.randn(2, 3).to(DEVICE) @ weight).sum()  # a blocking copy to the device
        torch.ones(2, 3).to(DEVICE, non_blocking=True)  # not a stall
        loss.backward()
        float(loss)  # read
        moved = weight.detach().cpu()  # to the host
        weight[weight > 0]  # a shape that depends on the data
        weight.grad.tolist()  # read
        assert weight.device == DEVICE and not counter.is_on_device(moved)
    assert counter.totals() | {"ops": 0, "views": 0, "host_ops": 0} == {
        "ops": 0, "views": 0, "host_ops": 0, "syncs": 5, "read": 2, "to_host": 1, "to_device_blocking": 1,
        "data_dependent": 1}
    assert torch.ones(1).device == torch.device("cpu")  # torch's own device property is back


def test_resizing_layers_and_their_adam_state_waits_for_nothing():
    """Before: each state tensor's remap copied its indices with a wait and read back whether any was new
    (2,016 syncs at 224 adapters), and grown directions made a round trip through a CPU QR."""
    from rankopt.training.optim import ComponentAdamW, apply_resizes

    adapted = make_tiny_adapted(0)
    optimizer = ComponentAdamW(adapted.trainable_parameters(), lr=1e-2)
    for p in adapted.trainable_parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    counter = StepCounter()
    counter.place(p for p in adapted.trainable_parameters())
    counter.place(v for state in optimizer.state.values() for v in state.values())
    gen = torch.Generator().manual_seed(0)
    with counter.counting():
        for i, layer in enumerate(adapted.adapters.values()):  # prune some, grow some, both
            apply_resizes(optimizer, layer.resize(torch.arange(layer.rank - i % 2), i % 3, gen))
    assert counter.totals()["ops"] > 0
    assert counter.totals()["syncs"] == 0, dict(counter.where)


def test_a_reallocation_step_reads_back_a_few_values_not_one_per_layer(tiny_config, tiny_task_data):
    """Before: the gradient probe read "broken or empty?" back once per layer (224 syncs at Llama-8B)."""
    stepper, counter = stepper_on_shadow_device(tiny_config, {
        "training.steps": 40, "controller.interval": 4, "controller.warmup": 0.1, "controller.max_grow": 2})
    schedule = stepper.controller.schedule
    realloc = next(s for s in range(1, 40) if schedule.is_reallocation_step(s) and s < schedule.decay_end)
    batches = seeded_batches(tiny_task_data, 8, 0)
    for _ in range(realloc - 1):
        stepper.step(next(batches))
    for p in stepper.adapted.trainable_parameters():  # tensors a reallocation made are device tensors too
        counter.place([p] + [v for v in stepper.optimizer.state.get(p, {}).values() if torch.is_tensor(v)])
    model_only = model_syncs(stepper, counter, next(batches))
    counter.counts = {}
    before = stepper.adapted.ranks()
    with counter.counting():
        stepper.step(next(batches))  # probed, then reallocated
    assert stepper.adapted.ranks() != before
    extra = counter.totals()["syncs"] - model_only["syncs"]
    assert 0 < counter.totals()["ops"]
    assert extra <= 3 < len(stepper.adapted.adapters), dict(counter.where)


def test_moving_a_device_tensor_to_its_own_device_launches_nothing():
    """As on a GPU, where ``t.to(t.device)`` returns ``t``; before, the shadow device copied (cpu:0 is not cpu
    to torch), so clip_grad_norm_ counted one op per parameter that no GPU launches."""
    counter = StepCounter()
    weight = torch.nn.Parameter(torch.randn(3))
    counter.place([weight])
    with counter.counting():
        doubled = weight * 2
        assert doubled.to(DEVICE) is doubled and doubled.to(device=DEVICE, non_blocking=True) is doubled
        widened = doubled.to(DEVICE, torch.float64)  # a real conversion still counts, and stays on the device
        assert counter.is_on_device(widened)
    assert counter.totals()["ops"] == 2 and counter.totals()["syncs"] == 0


def test_a_batched_matmul_counts_its_one_kernel_not_its_reshapes():
    """``matmul`` folds (batch, tokens, in) @ (in, out) into one mm and unfolds it with ``_unsafe_view``, a view
    that torch does not flag as one: counted as an op before, one per adapted linear and per factor."""
    counter = StepCounter()
    weight = torch.nn.Parameter(torch.randn(4, 3))
    counter.place([weight])
    with counter.counting():
        torch.randn(2, 5, 4) @ weight
    assert counter.totals()["ops"] == 1 and counter.totals()["views"] >= 1
