"""Mixed precision: a bf16/fp16 base, float32 adapters, head and Adam state; autocast; fp16 loss scaling."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_adapted
from rankopt.config import build_config
from rankopt.errors import RankoptError
from rankopt.training.precision import Precision
from rankopt.training.setup import build_model
from rankopt.training.trainer import Stepper, seeded_batches, train_adapted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_config, **training):
    return build_config(tiny_config.model_dump(), {f"training.{k}": v for k, v in training.items()})


def test_bf16_base_under_autocast_trains_float32_adapters(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"model.dtype": "bfloat16", "training.precision": "bf16",
                                                  "training.steps": 24, "training.eval_every": 24})
    adapted = build_model(cfg, 2)
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    losses = []

    class Losses:
        def __getattr__(self, name):
            return lambda *a: None

        def on_step(self, step, loss):
            losses.append(loss)

    result = train_adapted(cfg, adapted, tiny_task_data, [Losses()])
    trained = adapted.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.float32 for layer in adapted.adapters.values()
               for p in (layer.lora_P, layer.lora_lam, layer.lora_Q))
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])  # it learns
    moved = [n for n, p in adapted.model.named_parameters() if p.requires_grad and n in before
             and not torch.equal(p, before[n])]
    assert moved  # the head (same tensors throughout) was updated
    for n, p in adapted.model.named_parameters():
        if n in frozen:
            assert p.dtype == torch.bfloat16 and torch.equal(p, frozen[n])
    assert result.total_rank == round(cfg.controller.target_rank * len(adapted.adapters))


def test_adam_state_is_float32_on_a_bf16_base(tiny_config, tiny_task_data):
    cfg = _cfg(tiny_config, precision="bf16", steps=3)
    adapted = make_tiny_adapted(0)
    adapted.model.to(torch.bfloat16)
    for p in adapted.trainable_parameters():  # what build_model does: the trained tensors stay float32
        p.data = p.data.float()
    stepper = Stepper(cfg, adapted)
    for batch in seeded_batches(tiny_task_data, 8, 0):
        stepper.step(batch)
        if stepper.done == 3:
            break
    states = [v for s in stepper.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert states and all(v.dtype == torch.float32 for v in states)


def test_fp16_adapters_are_refused_in_one_line(tiny_config):
    adapted = make_tiny_adapted(0)
    adapted.model.half()
    with pytest.raises(RankoptError) as excinfo:
        Stepper(_cfg(tiny_config, precision="fp16"), adapted)
    message = str(excinfo.value)
    assert "float16" in message and "training.precision" in message and "\n" not in message


def test_fp16_overflow_steps_are_skipped_by_optimizer_and_controller(tiny_config, tiny_task_data):
    cfg = _cfg(tiny_config, precision="fp16", steps=60, orth_reg=0.0)
    adapted = make_tiny_adapted(0)
    stepper = Stepper(cfg, adapted)
    stepper.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 28)  # the first steps overflow
    layer = next(iter(adapted.adapters.values()))
    before = layer.lora_Q.detach().clone()
    batches = seeded_batches(tiny_task_data, 8, 0)
    stepper.step(next(batches))
    assert stepper.skipped_steps == 1
    assert torch.equal(layer.lora_Q, before)  # the optimizer skipped it
    assert not stepper.controller.tracker.ema  # nothing was read from the inf gradients
    while stepper.skipped_steps == stepper.done:  # the scaler backs off until a step fits
        stepper.step(next(batches))
    assert 1 < stepper.skipped_steps < 40 and stepper.controller.tracker.ema
    assert all(torch.isfinite(e).all() for e in stepper.controller.tracker.ema.values())
    assert all(torch.isfinite(p).all() for p in adapted.trainable_parameters())


def test_fp32_precision_has_no_scaler_and_no_autocast():
    plain = Precision("fp32", "cpu")
    assert plain.scaler is None
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with Precision("bf16", "cpu").autocast():
        assert torch.is_autocast_enabled("cpu")
