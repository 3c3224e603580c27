"""The training loop on a tiny random BERT: budget, frozen weights, gradients, events, reproducibility."""

from __future__ import annotations

import pytest
import torch

from conftest import N_TINY_ADAPTERS, make_tiny_adapted
from rankopt.api import train
from rankopt.config import build_config
from rankopt.controller import BudgetSchedule
from rankopt.errors import RankoptError, TrainingDiverged
from rankopt.training.events import Callback
from rankopt.training.trainer import build_controller, evaluate, train_adapted


class Recorder(Callback):
    def __init__(self):
        self.calls: list[str] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.evals: list[tuple[int, dict]] = []
        self.reallocations = []
        self.start_info = None
        self.result = None

    def on_train_start(self, info):
        self.calls.append("start")
        self.start_info = info

    def on_step(self, step, loss):
        self.steps.append(step)
        self.losses.append(loss)

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_reallocation(self, event):
        self.reallocations.append(event)

    def on_train_end(self, result):
        self.calls.append("end")
        self.result = result


def frozen_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_training_meets_the_budget_and_reports_through_callbacks(tiny_config, tiny_task_data):
    adapted = make_tiny_adapted(seed=0, rank=4, alpha=8.0)
    rec = Recorder()
    result = train_adapted(tiny_config, adapted, tiny_task_data, [rec])
    steps = tiny_config.training.steps
    c = tiny_config.controller
    sched = BudgetSchedule.from_fractions(4 * N_TINY_ADAPTERS, 2 * N_TINY_ADAPTERS, steps, c.warmup, c.final,
                                          c.interval)

    assert rec.calls == ["start", "end"] and rec.result is result
    assert rec.steps == list(range(1, steps + 1)) and all(loss > 0 for loss in rec.losses)
    assert [s for s, _ in rec.evals] == [10, 20, 30] == [s for s, _ in result.eval_history]
    assert result.metrics == rec.evals[-1][1] and result.metric == result.metrics["accuracy"]
    assert {"accuracy", "f1", "matthews", "loss"} <= set(result.metrics)
    # a reallocation at every scheduled step, each meeting that step's budget exactly
    realloc_steps = [t for t in range(1, steps + 1) if sched.is_reallocation_step(t)]
    assert [e.step for e in rec.reallocations] == realloc_steps
    for event in rec.reallocations:
        assert sum(event.ranks.values()) == event.budget == sched.budget_at(event.step)
        assert all(c.min_rank <= r <= c.max_rank for r in event.ranks.values())
        assert set(event.scores) == {"sensitivity", "energy"}
        assert {n: len(s) for n, s in event.scores["energy"].items()}.keys() == event.ranks.keys()
    assert result.rank_history[0].step == 0 and result.rank_history[0].budget == 4 * N_TINY_ADAPTERS
    assert result.rank_history[1:] == rec.reallocations
    # the end state: target budget, and counts that follow the final ranks
    assert result.total_rank == 2 * N_TINY_ADAPTERS == adapted.total_rank()
    assert result.ranks == adapted.ranks()
    assert len(set(result.ranks.values())) > 1  # the budget was shared unevenly
    assert result.adapter_params == sum(layer.rank * (layer.in_features + layer.out_features + 1)
                                        for layer in adapted.adapters.values())
    assert result.trainable_params == adapted.count_trainable() > result.adapter_params


def test_frozen_weights_stay_bit_identical(tiny_config, tiny_task_data):
    adapted = make_tiny_adapted()
    frozen = frozen_snapshot(adapted.model)
    head = {n: p.detach().clone() for n, p in adapted.model.classifier.named_parameters()}
    assert len(frozen) > 20
    train_adapted(tiny_config, adapted, tiny_task_data)
    after = dict(adapted.model.named_parameters())
    for name, value in frozen.items():
        assert not after[name].requires_grad, name
        assert torch.equal(after[name].detach(), value), name
    # ...while the head and the adapters did train
    assert any(not torch.equal(p.detach(), head[n]) for n, p in adapted.model.classifier.named_parameters())
    assert all(layer.lora_lam.detach().abs().sum() > 0 for layer in adapted.adapters.values())


def test_only_adapters_and_head_get_gradients(tiny_config, tiny_task_data):
    adapted = make_tiny_adapted()
    adapted.model.train()
    batch = tiny_task_data.collator([tiny_task_data.train[i] for i in range(8)])
    adapted.model(**batch).loss.backward()
    trainable = {id(p) for p in adapted.trainable_parameters()}
    assert len(trainable) == 3 * N_TINY_ADAPTERS + 2  # P, lam, Q per adapter; classifier weight and bias
    for name, p in adapted.model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # lam starts at 0, so the first task gradient reaches lam and the head but not yet P and Q
    for layer in adapted.adapters.values():
        assert layer.lora_lam.grad.abs().sum() > 0
        assert not layer.lora_P.grad.any() and not layer.lora_Q.grad.any()


def test_training_without_controller_keeps_the_ranks(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"controller.enabled": False, "training.steps": 8,
                                                  "training.eval_every": 8})
    adapted = make_tiny_adapted()
    assert build_controller(cfg, adapted) is None
    rec = Recorder()
    result = train_adapted(cfg, adapted, tiny_task_data, [rec])
    assert rec.reallocations == [] and len(result.rank_history) == 1
    assert result.ranks == {n: 4 for n in adapted.adapters}


def test_training_learns_the_task(tiny_config, tiny_task_data):
    # random start: on this tiny random BERT learning is a sudden jump that the gradient start delays
    # past 60 steps; on pretrained MiniLM the gradient start learns faster (BENCHMARKS.md, "start and growth")
    cfg = build_config(tiny_config.model_dump(), {"training.steps": 60, "training.eval_every": 60,
                                                  "training.lr": 5e-2, "adapter.init": "random"})
    adapted = make_tiny_adapted()
    before = evaluate(adapted, tiny_task_data, "classification", 64)
    result = train_adapted(cfg, adapted, tiny_task_data)
    assert result.metrics["loss"] < 0.5 * before["loss"]
    assert result.metric >= 0.85 and result.metric > before["accuracy"] + 0.2


def test_evaluate_is_deterministic_and_restores_the_mode(tiny_task_data):
    adapted = make_tiny_adapted()
    adapted.model.train()
    first = evaluate(adapted, tiny_task_data, "classification", 16)
    assert adapted.model.training
    assert evaluate(adapted, tiny_task_data, "classification", 5) == pytest.approx(first)
    assert 0.0 <= first["accuracy"] <= 1.0 and first["loss"] > 0


def test_divergence_is_reported(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"training.lr": 1e30, "training.max_grad_norm": 1e30,
                                                  "training.steps": 20})
    with pytest.raises(TrainingDiverged) as excinfo:
        train_adapted(cfg, make_tiny_adapted(), tiny_task_data)
    assert isinstance(excinfo.value, RankoptError)
    assert "lower training.lr" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_runaway_loss_is_warned_about_once(tiny_config, tiny_task_data, caplog):
    """Issue 25: at lr=10 the loss climbed to hundreds of times its start and the run ended with exit 0 and
    no word. It still finishes (it may recover), with one warning naming the step."""
    import logging

    cfg = build_config(tiny_config.model_dump(), {"training.lr": 10.0, "training.steps": 10})
    with caplog.at_level(logging.WARNING, logger="rankopt"):
        train_adapted(cfg, make_tiny_adapted(), tiny_task_data)
    warned = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert len(warned) == 1 and "over 100x its first value" in warned[0] and "lower training.lr" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rankopt"):
        train_adapted(build_config(tiny_config.model_dump(), {"training.steps": 10}), make_tiny_adapted(),
                      tiny_task_data)
    assert "diverging" not in caplog.text  # a healthy run says nothing


def test_same_seed_same_run_through_the_api(tiny_config, tmp_path, monkeypatch):
    """Local model and data folders, through rankopt.api.train: identical metrics and ranks twice."""
    monkeypatch.chdir(tmp_path)
    cfg = build_config(tiny_config.model_dump(), {"training.steps": 16, "training.eval_every": 8})
    first = train(cfg, track=False)
    second = train(cfg, track=False)
    other = train(cfg, {"training.seed": 1}, track=False)
    assert first.metrics == second.metrics
    assert first.ranks == second.ranks
    assert [(e.step, e.ranks, e.scores) for e in first.rank_history] == \
           [(e.step, e.ranks, e.scores) for e in second.rank_history]
    assert [m for _, m in first.eval_history] == [m for _, m in second.eval_history]
    assert first.metrics["loss"] != other.metrics["loss"]  # the seed matters, so the match is not vacuous
    assert first.run_id is None and list(tmp_path.iterdir()) == []  # track=False writes nothing


def test_the_controller_reads_the_task_sensitivity_not_the_penalty(tiny_config, tiny_task_data):
    """orth_reg is large, yet the EMA after one step equals (1 - beta1) x the task-only sensitivity."""
    import copy

    from rankopt.training.trainer import Stepper

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.orth_reg = 10.0
    adapted = make_tiny_adapted(seed=0, rank=4, alpha=8.0)
    with torch.no_grad():  # lam != 0, so the penalty's P and Q gradients reach the score
        for layer in adapted.adapters.values():
            layer.lora_lam.normal_(0, 0.5)
            layer.lora_P.add_(0.05 * torch.randn_like(layer.lora_P))
    reference = copy.deepcopy(adapted)
    adapted.model.eval()
    reference.model.eval()  # no dropout: both see the same forward
    batch = tiny_task_data.collator([tiny_task_data.train[i] for i in range(8)])
    reference.model(**batch).loss.backward()
    stepper = Stepper(cfg, adapted)
    stepper.step(dict(batch))
    beta1 = cfg.controller.beta1
    for name, layer in reference.adapters.items():
        p, lam, q = layer.lora_P, layer.lora_lam, layer.lora_Q
        task_only = ((lam * lam.grad).abs() + (p * p.grad).abs().mean(0) + (q * q.grad).abs().mean(1)).detach()
        ema = stepper.controller.tracker.ema[adapted.adapters[name]]
        assert torch.allclose(ema, (1 - beta1) * task_only, rtol=1e-4, atol=1e-9), name


def test_a_regression_head_starts_at_the_mean_score(tiny_preset_file, tiny_model_dir, tiny_data_dir, tmp_path):
    """From a zero bias a fresh LoRA adapter collapses its outputs to a constant on 0-5 scores (STS-B)
    before the head reaches their mean; starting there, the first error is the scores' spread."""
    import json

    import numpy as np
    from transformers import AutoTokenizer, BertModel

    from rankopt.config import resolve_config
    from rankopt.training.setup import build_model, prepare_data

    scores = tmp_path / "scores"
    scores.mkdir()
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (tiny_data_dir / f"{split}.jsonl").read_text().splitlines()]
        (scores / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": r["text"], "label": 4.0 if r["label"] == 1 else 1.0}) + "\n"
            for r in rows))
    encoder = tmp_path / "encoder"  # without the tiny model's 2-label head
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(encoder)
    cfg = resolve_config(str(tiny_preset_file), {"task.type": "regression", "task.metric": "pearson",
                                                 "task.data_dir": str(scores), "model.name": str(encoder)})
    data = prepare_data(cfg)
    assert data.label_mean == pytest.approx(float(np.mean(data.train["labels"])))
    adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
    untrained = evaluate(adapted, data, "regression", 16)
    targets = np.asarray(data.eval["labels"])
    assert untrained["loss"] < 0.5 * float(np.mean(targets**2))  # from zero it is mean(y^2) = 8.5 here
    assert untrained["loss"] == pytest.approx(float(np.mean((targets - data.label_mean) ** 2)), abs=0.3)
