"""Trial checkpoints: a resumed fine-tune goes on bit for bit like the uninterrupted one.

The tiny config reallocates ranks at steps 7, 11, 15, 19, 23 and 24, so a checkpoint at step
15 holds layers of different ranks (resized before loading), live Adam moments, a non-empty
sensitivity EMA, and dropout's RNG in the middle of its stream.
"""

from __future__ import annotations

import json
import logging

import optuna
import pytest
import torch
from conftest import make_tiny_adapted

from rankopt.training.checkpoint import CheckpointStore, TrialCheckpoint, fingerprint, named_trainables
from rankopt.config import Config
from rankopt.training.events import Callback
from rankopt.search.studies import StaleTrialHandler
from rankopt.training.trainer import train_adapted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Losses(Callback):
    def __init__(self):
        self.by_step: dict[int, float] = {}

    def on_step(self, step: int, loss: float) -> None:
        self.by_step[step] = loss


class StopAt(Callback):
    """Kill the run (as a signal would) once ``step`` is done."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step: int, loss: float) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.fixture
def cfg(tiny_preset) -> Config:
    preset = json.loads(json.dumps(tiny_preset))
    preset["training"].update({"eval_every": 5, "steps": 30})
    return Config.model_validate(preset)


def _params(adapted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in named_trainables(adapted).items()}


def test_resumed_run_matches_the_uninterrupted_one_bit_for_bit(cfg, tiny_task_data, tmp_path):
    resume_matches_the_uninterrupted_run(cfg, tiny_task_data, tmp_path)


def test_layers_at_rank_zero_resume_bit_for_bit(cfg, tiny_task_data, tmp_path):
    """min_rank 0 and the swap: layers checkpointed with no adapter at all, and grown back after the resume."""
    cfg = cfg.model_copy(update={"controller": cfg.controller.model_copy(
        update={"min_rank": 0, "swap": 0.5, "target_rank": 1.0, "importance": "energy"})})
    history = resume_matches_the_uninterrupted_run(cfg, tiny_task_data, tmp_path).rank_history
    at_zero = [e.step for e in history if 0 in e.ranks.values()]
    assert at_zero and at_zero[0] <= 15, "no layer reached rank 0 before the checkpoint"
    assert any(e.step > 15 and e.ranks != prev.ranks for prev, e in zip(history, history[1:]))


@pytest.mark.parametrize("controller", [{}, {"min_rank": 0, "swap": 0.5, "target_rank": 1.0, "importance": "energy"}],
                         ids=["sensitivity", "rank-zero-and-swap"])
def test_static_shapes_resume_bit_for_bit(cfg, tiny_task_data, tmp_path, controller):
    """``adapter.static_shapes``: padded factors, their Adam state and the live masks come back as they were."""
    cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"static_shapes": True}),
                                 "controller": cfg.controller.model_copy(update=controller)})
    full = resume_matches_the_uninterrupted_run(cfg, tiny_task_data, tmp_path)
    assert all(layer.static and layer.capacity == cfg.controller.max_rank for layer in full.adapted.adapters.values())


def resume_matches_the_uninterrupted_run(cfg, tiny_task_data, tmp_path):
    """Stop a run after step 17 (checkpoint at 15), resume it: everything as if it had never stopped."""
    full_losses = Losses()
    full = make_tiny_adapted(0)
    full_result = train_adapted(cfg, full, tiny_task_data, [full_losses])

    ckpt = TrialCheckpoint(tmp_path / "trial-0", every=1, config_fingerprint=fingerprint(cfg.model_dump()))
    with pytest.raises(KeyboardInterrupt):
        train_adapted(cfg, make_tiny_adapted(0), tiny_task_data, [StopAt(17)], checkpointer=ckpt)
    snapshot = ckpt.load()
    assert snapshot is not None and snapshot.step == 15
    assert set(snapshot.meta["ranks"].values()) != {cfg.adapter.init_rank}  # ranks moved: resize before load

    resumed_losses = Losses()
    resumed = make_tiny_adapted(0)
    result = train_adapted(cfg, resumed, tiny_task_data, [resumed_losses], checkpointer=ckpt)

    assert min(resumed_losses.by_step) == 16
    assert resumed_losses.by_step == {s: v for s, v in full_losses.by_step.items() if s > 15}
    assert resumed.ranks() == full.ranks()
    for name, value in _params(full).items():
        assert torch.equal(value, _params(resumed)[name]), name
    for name, layer in full.adapters.items():  # static mode: same slots, same masks
        mask = resumed.adapters[name].lora_mask
        assert layer.capacity == resumed.adapters[name].capacity and (layer.lora_mask is None) == (mask is None)
        assert mask is None or torch.equal(layer.lora_mask, mask), name
    assert result.eval_history == full_result.eval_history
    assert [(e.step, e.ranks) for e in result.rank_history] == [(e.step, e.ranks) for e in full_result.rank_history]
    return full_result


def test_checkpoint_is_safetensors_and_json_only(cfg, tiny_task_data, tmp_path):
    ckpt = TrialCheckpoint(tmp_path / "t", every=2, config_fingerprint="x")
    train_adapted(cfg, make_tiny_adapted(0), tiny_task_data, checkpointer=ckpt)
    assert ckpt.saved_step == 20  # every 2nd evaluation (10, 20); none after the last step
    folders = [p for p in (tmp_path / "t").iterdir()]
    assert [p.name for p in folders] == ["step-00000020"]  # older ones removed
    assert sorted(p.name for p in folders[0].iterdir()) == ["state.json", "state.safetensors"]
    meta = json.loads((folders[0] / "state.json").read_text())
    assert meta["step"] == 20 and len(meta["evals"]) == 4 and meta["scheduler"]["last_epoch"] == 20


def test_checkpoint_of_another_config_is_ignored(cfg, tiny_task_data, tmp_path):
    ckpt = TrialCheckpoint(tmp_path / "t", every=1, config_fingerprint="one")
    with pytest.raises(KeyboardInterrupt):
        train_adapted(cfg, make_tiny_adapted(0), tiny_task_data, [StopAt(12)], checkpointer=ckpt)
    assert TrialCheckpoint(tmp_path / "t", every=1, config_fingerprint="two").load() is None
    assert ckpt.load().step == 10


def test_device_does_not_change_the_fingerprint(cfg):
    other = cfg.model_copy(deep=True)
    other.training.device = "cuda:1"
    assert fingerprint(cfg.model_dump()) == fingerprint(other.model_dump())
    other.training.lr = 0.5
    assert fingerprint(cfg.model_dump()) != fingerprint(other.model_dump())


def test_retried_trial_resumes_at_the_checkpointed_step(cfg, tmp_path):
    """A trial is interrupted after its first checkpoint; its retry starts there, not at step 0."""
    from rankopt.search.tuner import Objective

    base = cfg.model_copy(deep=True)
    base.search.space = {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    base = Config.model_validate(base.model_dump())
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    store = CheckpointStore(tmp_path / "ckpt", study.study_name, every=1)
    starts: list[int] = []

    class SeeStart(Callback):
        def on_train_start(self, info):
            starts.append(info["resumed_step"])

    first = Objective(base, callbacks_for_trial=lambda trial, c: [SeeStart(), StopAt(12)], checkpoints=store)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(first, n_trials=1)
    lost = study.trials[0]
    assert lost.state == optuna.trial.TrialState.FAIL
    assert (tmp_path / "ckpt" / study.study_name / "trial-0" / "step-00000010").is_dir()

    StaleTrialHandler(base.search).queue_retry(study, lost)  # what the heartbeat path does for a lost trial
    study.optimize(Objective(base, callbacks_for_trial=lambda trial, c: [SeeStart()], checkpoints=store),
                   n_trials=1)
    retry = study.trials[1]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == lost.params
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["resumed_from_step"] == 10
    assert starts == [0, 10]
    assert not (tmp_path / "ckpt" / study.study_name / "trial-0").exists()  # done: checkpoints removed


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_skipped_with_one_warning_and_the_trial_starts_clean(damage, cfg, tmp_path, caplog):
    """Issue 25: a cut-short state.safetensors raised SafetensorError (neither OSError nor ValueError): the
    retry FAILed for good with a traceback and its checkpoint was deleted. Now it is skipped and the
    retry trains from step 0 to the end."""
    from rankopt.search.tuner import Objective

    base = cfg.model_copy(deep=True)
    base.search.space = {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    base.training.steps = 15
    base = Config.model_validate(base.model_dump())
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    store = CheckpointStore(tmp_path / "ckpt", study.study_name, every=1)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(Objective(base, callbacks_for_trial=lambda t, c: [StopAt(7)], checkpoints=store), n_trials=1)
    [folder] = (tmp_path / "ckpt" / study.study_name / "trial-0").glob("step-*")
    tensors = folder / "state.safetensors"
    data = tensors.read_bytes()
    if damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte of a tensor changed: only the checksum tells
        tensors.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    StaleTrialHandler(base.search).queue_retry(study, study.trials[0])
    with caplog.at_level(logging.WARNING, logger="rankopt"):
        study.optimize(Objective(base, checkpoints=store), n_trials=1)
    retry = study.trials[1]
    assert retry.state == optuna.trial.TrialState.COMPLETE, retry.user_attrs.get("fail_reason")
    assert "resumed_from_step" not in retry.user_attrs  # started clean, from step 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and "\n" not in warnings[0]


def test_train_resume_goes_on_from_its_checkpoint_in_the_same_mlflow_run(tiny_preset_file, tmp_path, caplog):
    """Issue 25: `rankopt train` had no resume: a killed run restarted at step 0 and its MLflow run stayed
    RUNNING. Now it checkpoints under --out like a trial, and --resume goes on in the same run."""
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    import rankopt
    from rankopt.errors import RankoptError

    out = tmp_path / "out"
    short = {"training.steps": 20}
    with pytest.raises(RankoptError, match="--resume: no checkpoint"):
        rankopt.train(str(tiny_preset_file), short, out=out, resume=True)
    with pytest.raises(KeyboardInterrupt):
        rankopt.train(str(tiny_preset_file), short, out=out, callbacks=[StopAt(12)])
    assert [p.name for p in (out / "checkpoints" / "train" / "tiny").glob("step-*")] == ["step-00000010"]
    resumed = rankopt.train(str(tiny_preset_file), short, out=out, resume=True)
    assert resumed.resumed_from_step == 10  # and goes on as the uninterrupted run would (tests above)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_id == resumed.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert sorted(m.step for m in history) == [10, 20]  # each evaluation once, the curve whole
    assert not (out / "checkpoints" / "train" / "tiny").exists()  # done: the checkpoint is gone

    with pytest.raises(KeyboardInterrupt):  # killed again; this time a plain rerun starts over
        rankopt.train(str(tiny_preset_file), short, out=out, callbacks=[StopAt(12)])
    [killed] = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    client.update_run(killed.info.run_id, "RUNNING")  # as SIGKILL leaves it, its process gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client.set_tag(killed.info.run_id, "rankopt.process", f"{socket.gethostname()}:{int(dead.stdout)}:")
    with caplog.at_level(logging.WARNING, logger="rankopt"):
        again = rankopt.train(str(tiny_preset_file), short, out=out)
    assert again.resumed_from_step == 0 and "starting over from step 0" in caplog.text
    assert client.get_run(killed.info.run_id).info.status == "KILLED"


def test_folder_names_never_climb_out():
    from rankopt.training.checkpoint import folder_name

    assert folder_name("demo") == "demo" and folder_name("x.y") == "x.y"
    for name in ("..", ".", "", "a/b", "../up", "..\\up"):
        safe = folder_name(name)
        assert safe.strip(".") and "/" not in safe and "\\" not in safe, (name, safe)
    assert folder_name("a/b") != folder_name("a_b")  # replaced characters do not make two names one
