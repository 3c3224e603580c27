"""Tuning jobs on a tiny random BERT: the trial objective (through Optuna's ``FixedTrial``) and
whole studies through :func:`rankopt.search.tuner.tune`, with real SQLite stores for Optuna and MLflow.

A trial here is 20 steps on 64 rows and takes well under a second on one CPU thread; the
slow part of each study is MLflow creating its database.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from rankopt.config import Config
from rankopt.errors import RankoptError
from rankopt.search.trials import default_storage, suggest
from rankopt.tracking.mlflow_runs import default_tracking_uri
from rankopt.search.tuner import Objective, _mask, open_study, tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---------------------------------------------------------------------------------------------
# a tiny model, a tiny learnable task, a tiny preset

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bad", "good"] + [f"w{i}" for i in range(40)]
N_LAYERS = 12  # rankopt's default target_modules: 6 linears in each of the 2 BERT layers
GOOD_LR, TINY_LR, HUGE_LR = 5e-2, 1e-5, 1e6  # learns in ~10 steps / learns nothing / loss NaN at step 2


def write_tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved like a hub model.

    ``initializer_range`` is 10x BERT's so that the frozen random encoder carries the marker
    word to the pooled output, and dropout is off, so 20 steps of adapters + head learn it.
    """
    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_data(folder: Path, n_train: int = 64, n_eval: int = 32) -> Path:
    """train.jsonl / validation.jsonl: 'good' (label 1) or 'bad' (label 0), maybe beside one filler word."""
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("validation", n_eval, 2)):
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = ["good" if label else "bad"]
            if rng.random() < 0.5:
                words.insert(rng.randint(0, 1), f"w{rng.randrange(40)}")
            rows.append({"text": " ".join(words), "label": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_preset(model_dir: Path, data_dir: Path, search: dict | None = None) -> dict:
    """20 steps, evaluated every 5; ranks start at 4 per layer; the budget is what Optuna searches."""
    return {
        "task": {"name": "tiny", "data_dir": str(data_dir), "text_columns": ["text"], "label_column": "label",
                 "metric": "accuracy", "max_length": 16},
        "model": {"name": str(model_dir)},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": 20, "batch_size": 8, "eval_batch_size": 64, "lr": GOOD_LR, "warmup_ratio": 0.0,
                     "eval_every": 5, "seed": 0},
        # a rank budget: the trials' total ranks are then exact multiples of the layers
        "controller": {"budget_unit": "rank", "target_rank": 2, "min_rank": 1, "max_rank": 8, "warmup": 0.1,
                       "final": 0.2, "interval": 4},
        "search": {"sampler": "random", "pruner": "none", "n_trials": 3, "startup_trials": 0,
                   "space": {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0},
                             "training.lr": {"type": "float", "low": 1e-2, "high": 1e-1, "log": True}},
                   **(search or {})},
    }


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_tune")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def make_config(tiny_files, search: dict | None = None) -> Config:
    return Config.model_validate(tiny_preset(*tiny_files, search))


def write_preset(path: Path, tiny_files, search: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(tiny_preset(*tiny_files, search)))
    return path


def enqueue(out: Path, params: list[dict], name: str = "tiny", directions=("maximize",)) -> None:
    """Pin the first trials of study ``name`` in ``out`` (tune then loads the study and runs them first)."""
    study = optuna.create_study(storage=default_storage(out), study_name=name, directions=list(directions))
    for p in params:
        study.enqueue_trial(p)


# ---------------------------------------------------------------------------------------------
# MLflow side: one nested run per trial, states matching

STATE_TAG = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def mlflow_runs(out: Path, experiment: str = "tiny"):
    """(client, parent runs, trial runs) of ``experiment`` in the tracking store under ``out``."""
    client = MlflowClient(tracking_uri=default_tracking_uri(out))
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} under {out}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("rankopt.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("rankopt.kind") == "trial"]
    assert len(parents) + len(trials) == len(runs)
    return client, parents, trials


def assert_runs_match_trials(out: Path, study: optuna.Study, parent_run_id: str) -> dict[int, object]:
    """Exactly one nested run per Optuna trial, under the study's one parent run, with its state."""
    client, parents, runs = mlflow_runs(out)
    assert [p.info.run_id for p in parents] == [parent_run_id]
    assert study.user_attrs["mlflow_parent_run_id"] == parent_run_id
    by_number = {int(r.data.tags["optuna.trial"]): r for r in runs}
    assert Counter(int(r.data.tags["optuna.trial"]) for r in runs) == Counter(t.number for t in study.trials)
    for trial in study.trials:
        run = by_number[trial.number]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_run_id
        assert tags["optuna.study"] == study.study_name
        assert tags["optuna.state"] == STATE_TAG[trial.state], (trial.number, trial.state)
        assert run.info.status == RUN_STATUS[trial.state]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert json.loads(tags["optuna.params"]) == pytest.approx(trial.params)
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["final_total_rank"] == trial.user_attrs["total_rank"]
            assert run.data.metrics["final_metric"] == pytest.approx(trial.values[0])
        if trial.state == TrialState.FAIL:
            assert tags["optuna.fail_reason"] == trial.user_attrs["fail_reason"]
    return by_number


def artifact_paths(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


# ---------------------------------------------------------------------------------------------
# the objective, one trial at a time, without a study


def test_objective_runs_one_fine_tune(tiny_files):
    cfg = make_config(tiny_files)
    trial = optuna.trial.FixedTrial({"controller.target_rank": 2.5, "training.lr": GOOD_LR})
    metric = Objective(cfg)(trial)
    attrs = trial.user_attrs
    assert metric >= 0.8  # the task is learnable in 20 steps
    ranks = json.loads(attrs["ranks"])
    assert len(ranks) == N_LAYERS
    assert attrs["total_rank"] == sum(ranks.values()) == round(2.5 * N_LAYERS)
    assert all(1 <= r <= 8 for r in ranks.values())
    assert json.loads(attrs["metrics"])["accuracy"] == metric
    assert attrs["adapter_params"] < attrs["trainable_params"]  # the head is trainable too
    assert "fail_reason" not in attrs and "mlflow_run_id" not in attrs


def test_objective_returns_metric_and_adapter_params_for_two_objectives(tiny_files):
    cfg = make_config(tiny_files, {"objectives": ["metric", "params"], "sampler": "nsga2"})
    small, large = (optuna.trial.FixedTrial({"controller.target_rank": r, "training.lr": GOOD_LR}) for r in (1.0, 4.0))
    metric_s, params_s = Objective(cfg)(small)
    metric_l, params_l = Objective(cfg)(large)
    assert 0 <= metric_s <= 1 and 0 <= metric_l <= 1
    assert params_s == small.user_attrs["adapter_params"] and params_l == large.user_attrs["adapter_params"]
    assert params_s < params_l  # a smaller budget is a smaller adapter
    assert small.user_attrs["total_rank"] == N_LAYERS and large.user_attrs["total_rank"] == 4 * N_LAYERS


def test_objective_records_why_a_trial_config_fails(tiny_files):
    space = {"controller.max_rank": {"type": "categorical", "choices": [8, 64]}}
    cfg = make_config(tiny_files, {"space": space})
    trial = optuna.trial.FixedTrial({"controller.max_rank": 64})
    with pytest.raises(RankoptError, match="max_rank=64 exceeds the smallest adapted layer"):
        Objective(cfg)(trial)
    assert "max_rank=64" in trial.user_attrs["fail_reason"]


def test_objective_records_divergence(tiny_files):
    space = {"training.lr": {"type": "float", "low": 1e-3, "high": HUGE_LR, "log": True}}
    trial = optuna.trial.FixedTrial({"training.lr": HUGE_LR})
    with pytest.raises(RankoptError, match="loss became nan"):
        Objective(make_config(tiny_files, {"space": space}))(trial)
    assert trial.user_attrs["fail_reason"].startswith("TrainingDiverged: loss became nan")


# ---------------------------------------------------------------------------------------------
# whole studies


def test_tune_completes_and_logs_every_trial(tiny_files, tmp_path):
    preset = write_preset(tmp_path / "tiny.yml", tiny_files)
    result = tune(str(preset), n_trials=3, out=tmp_path)
    study = result.study
    assert (result.study_name, result.objectives) == ("tiny", ["metric"])
    assert (result.n_complete, result.n_pruned, result.n_failed) == (3, 0, 0)
    assert result.storage == default_storage(tmp_path) and (tmp_path / "optuna.db").is_file()
    assert [t.number for t in study.trials] == [0, 1, 2]
    for trial in study.trials:
        attrs = trial.user_attrs
        assert {"total_rank", "ranks", "trainable_params", "adapter_params", "metrics", "mlflow_run_id"} <= set(attrs)
        # the controller ends exactly on the scheduled budget: target mean rank x adapted layers
        assert attrs["total_rank"] == round(trial.params["controller.target_rank"] * N_LAYERS)
        assert sum(json.loads(attrs["ranks"]).values()) == attrs["total_rank"]
        assert sorted(trial.intermediate_values) == [5, 10, 15, 20]
    [best] = result.best
    assert best.metric == max(t.value for t in study.trials) == study.best_value
    assert best.number == study.best_trial.number
    assert best.total_rank == round(best.params["controller.target_rank"] * N_LAYERS)
    assert len(best.ranks) == N_LAYERS and best.trainable_params > 0
    assert best.run_id == study.best_trial.user_attrs["mlflow_run_id"]

    by_number = assert_runs_match_trials(tmp_path, study, result.parent_run_id)
    client, [parent], _ = mlflow_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best_run_id"] == best.run_id
    assert parent.data.metrics["best_metric"] == pytest.approx(best.metric)
    assert parent.data.metrics["n_trials"] == 3
    assert "plots/optimization_history.png" in artifact_paths(client, parent.info.run_id, "plots")
    assert {"best_adapter/adapter_config.json", "best_adapter/adapter_model.safetensors"} <= artifact_paths(
        client, parent.info.run_id, "best_adapter")
    best_adapter = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "best_adapter/rankopt.json", str(tmp_path / "dl"))).read_text())
    assert best_adapter["trial"] == best.number and best_adapter["mlflow_run_id"] == best.run_id
    for run in by_number.values():
        assert "adapter/adapter_config.json" in artifact_paths(client, run.info.run_id, "adapter")
        assert {"rank_heatmap.png", "rank_history.json"} <= artifact_paths(client, run.info.run_id, "")


@pytest.mark.parametrize("pruner", ["median", "successive_halving"])
def test_aggressive_pruner_prunes_a_clearly_worse_trial(tiny_files, tmp_path, pruner):
    space = {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0},
             "training.lr": {"type": "float", "low": TINY_LR, "high": 1e-1, "log": True}}
    preset = write_preset(tmp_path / "tiny.yml", tiny_files, {"pruner": "none", "space": space})
    # a trial that learns, then one whose learning rate is too small to move off chance
    enqueue(tmp_path, [{"controller.target_rank": 2.0, "training.lr": GOOD_LR},
                       {"controller.target_rank": 2.0, "training.lr": TINY_LR}])
    # the pruner is picked the way `rankopt tune --set` picks it
    result = tune(str(preset), [f"search.pruner={pruner}", "search.startup_trials=0"], n_trials=2, out=tmp_path)
    good, bad = result.study.trials
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert (result.n_complete, result.n_pruned, result.n_failed) == (1, 1, 0)
    last = max(bad.intermediate_values)
    assert last < 20  # stopped before the end
    assert bad.intermediate_values[last] < good.intermediate_values[last]
    assert "total_rank" not in bad.user_attrs
    runs = assert_runs_match_trials(tmp_path, result.study, result.parent_run_id)
    assert runs[bad.number].data.tags["optuna.state"] == "pruned"
    # issue 25: the evaluation that triggered pruning reaches MLflow too, so MLflow, Optuna, the CLI and the
    # report show the same last metric of a pruned trial
    client, _, _ = mlflow_runs(tmp_path)
    logged = {m.step: m.value for m in client.get_metric_history(runs[bad.number].info.run_id, "eval_accuracy")}
    assert logged == bad.intermediate_values


def test_resume_adds_trials_without_redoing_any(tiny_files, tmp_path):
    preset = str(write_preset(tmp_path / "tiny.yml", tiny_files))
    first = tune(preset, n_trials=2, study_name="resume", out=tmp_path)
    before = [(t.number, t.params, t.values, t.datetime_start, t.datetime_complete, t.user_attrs["mlflow_run_id"])
              for t in first.study.trials]
    second = tune(preset, n_trials=2, study_name="resume", out=tmp_path)
    trials = optuna.load_study(study_name="resume", storage=default_storage(tmp_path)).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert [(t.number, t.params, t.values, t.datetime_start, t.datetime_complete, t.user_attrs["mlflow_run_id"])
            for t in trials[:2]] == before
    # the sampler is reseeded on resume, so the new trials are new points, not a replay
    assert {json.dumps(t.params, sort_keys=True) for t in trials[2:]}.isdisjoint(
        {json.dumps(t.params, sort_keys=True) for t in trials[:2]})
    assert second.n_complete == 4
    assert second.parent_run_id == first.parent_run_id
    assert_runs_match_trials(tmp_path, second.study, first.parent_run_id)
    _, [parent], _ = mlflow_runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4


def test_two_objectives_return_the_pareto_set(tiny_files, tmp_path):
    space = {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0},
             "training.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}
    cfg = make_config(tiny_files, {"objectives": ["metric", "params"], "sampler": "nsga2", "space": space})
    result = tune(cfg, n_trials=5, out=tmp_path)
    study = result.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert result.objectives == ["metric", "params"] and result.n_complete == 5
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in complete:
        assert t.values[1] == t.user_attrs["adapter_params"]

    def dominates(a, b) -> bool:  # maximize metric, minimize params
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    best_numbers = {b.number for b in result.best}
    assert best_numbers
    for b in result.best:
        assert not any(dominates(t.values, b.values) for t in complete), f"trial {b.number} is dominated"
    for t in complete:
        if t.number not in best_numbers:
            assert any(dominates(study.trials[n].values, t.values) for n in best_numbers) or any(
                study.trials[n].values == t.values for n in best_numbers)
    metrics = [b.metric for b in result.best]
    assert metrics == sorted(metrics, reverse=True)

    assert_runs_match_trials(tmp_path, study, result.parent_run_id)
    client, [parent], _ = mlflow_runs(tmp_path)
    plots = artifact_paths(client, parent.info.run_id, "plots")
    assert {"plots/optimization_history.png", "plots/pareto_front.png"} <= plots
    assert {"best_metric", "best_params"} <= set(parent.data.metrics)


def test_failing_trials_do_not_stop_the_study(tiny_files, tmp_path):
    space = {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0},
             "training.lr": {"type": "float", "low": 1e-3, "high": HUGE_LR, "log": True},
             "controller.max_rank": {"type": "categorical", "choices": [8, 64]}}
    cfg = make_config(tiny_files, {"space": space})
    enqueue(tmp_path, [
        {"controller.target_rank": 2.0, "training.lr": GOOD_LR, "controller.max_rank": 8},
        {"controller.target_rank": 2.0, "training.lr": HUGE_LR, "controller.max_rank": 8},  # loss NaN
        {"controller.target_rank": 2.0, "training.lr": GOOD_LR, "controller.max_rank": 64},  # cannot be built
        {"controller.target_rank": 3.0, "training.lr": GOOD_LR, "controller.max_rank": 8},
    ])
    result = tune(cfg, n_trials=4, out=tmp_path)
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 0, 2)
    assert trials[1].user_attrs["fail_reason"].startswith("TrainingDiverged: loss became nan")
    assert "controller.max_rank=64" in trials[2].user_attrs["fail_reason"]
    assert trials[3].user_attrs["total_rank"] == 3 * N_LAYERS
    assert result.best[0].number in (0, 3)
    runs = assert_runs_match_trials(tmp_path, result.study, result.parent_run_id)
    for n in (1, 2):
        assert runs[n].data.tags["optuna.state"] == "failed" and runs[n].info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# opening the study: bad input fails before anything runs


def test_existing_study_with_other_objectives_is_refused(tiny_files, tmp_path):
    enqueue(tmp_path, [], name="two", directions=("maximize", "minimize"))
    with pytest.raises(RankoptError, match="exists with 2 objective.*asks for 1"):
        tune(make_config(tiny_files), n_trials=1, study_name="two", out=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_processes_sharing_a_study_never_draw_the_same_point(tiny_files, tmp_path, sampler):
    """Issue 25: two `rankopt tune --study same` processes seeded their samplers alike (training.seed plus
    the trials before), so they trained the same parameters twice. Each trial now draws from its own
    seed (its number is unique in the study); one process alone still draws reproducibly."""
    cfg = make_config(tiny_files, {"sampler": sampler, "startup_trials": 2})
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = open_study(cfg, "shared", url), open_study(cfg, "shared", url)  # as two processes open it
    drawn = []
    for _ in range(3):
        for study in (first, second):
            trial = study.ask()  # left RUNNING, like a trial the other process is training
            drawn.append(json.dumps(suggest(trial, cfg.search.space), sort_keys=True))
    assert len(set(drawn)) == len(drawn), drawn
    from rankopt.search.owners import OWNER_ATTR, this_process

    # each trial carries its process from the moment Optuna made it (a kill before the objective starts is seen)
    assert {t.user_attrs.get(OWNER_ATTR) for t in first.trials} == {this_process()}
    again = open_study(cfg, "shared", f"sqlite:///{tmp_path / 'again.db'}")
    assert [json.dumps(suggest(again.ask(), cfg.search.space), sort_keys=True) for _ in range(6)] == drawn


def test_a_killed_runs_trial_is_retried_at_once_by_the_rerun(tiny_files, tmp_path):
    """Issue 25: a SIGKILLed `rankopt tune` left its trial RUNNING for the 180 s grace period after an
    immediate rerun, counted nowhere. A rerun on the same machine sees that its process is gone."""
    import socket
    import subprocess
    import sys

    from rankopt.search.owners import OWNER_ATTR

    cfg = make_config(tiny_files)
    study = optuna.create_study(storage=default_storage(tmp_path), study_name="tiny", direction="maximize")
    lost = study.ask({"controller.target_rank": optuna.distributions.FloatDistribution(1.0, 4.0)})
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lost.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{dead}:1")  # as the killed process left it
    live = study.ask({"controller.target_rank": optuna.distributions.FloatDistribution(1.0, 4.0)})
    live.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{os.getpid()}:")  # a live process's: left alone
    result = tune(cfg, n_trials=1, study_name="tiny", out=tmp_path, track=False)
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE]
    assert (result.n_complete, result.n_failed, result.n_running) == (1, 1, 1)  # every trial counted somewhere
    assert trials[2].system_attrs["failed_trial"] == 0
    assert trials[2].params["controller.target_rank"] == trials[0].params["controller.target_rank"]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "..\\up"])
def test_study_names_that_would_climb_out_of_the_checkpoint_folder_are_refused(tiny_files, tmp_path, name):
    """Issue 25: `--study ..` put checkpoints one level above --out/checkpoints."""
    from rankopt.search.worker import run_worker

    with pytest.raises(RankoptError, match="cannot name a folder"):
        tune(make_config(tiny_files), n_trials=0, study_name=name, out=tmp_path / "out")
    with pytest.raises(RankoptError, match="cannot name a folder"):
        run_worker(name, f"sqlite:///{tmp_path / 'o.db'}", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["foo://x", "sqlite:////no/such/folder/optuna.db"])
def test_bad_storage_url_is_a_user_error(tiny_files, tmp_path, url):
    with pytest.raises(RankoptError, match="cannot open Optuna storage"):
        open_study(make_config(tiny_files), "tiny", url)


def test_storage_password_is_masked():
    assert _mask("postgresql://me:s3cret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    assert _mask("sqlite:///runs/optuna.db") == "sqlite:///runs/optuna.db"


def test_cmaes_with_two_objectives_is_refused_before_any_trial(tiny_files, tmp_path):
    cfg = make_config(tiny_files, {"sampler": "cmaes", "objectives": ["metric", "params"]})
    with pytest.raises(RankoptError, match="cmaes handles one objective"):
        tune(cfg, n_trials=1, out=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_empty_search_space_is_refused(tiny_files, tmp_path):
    with pytest.raises(RankoptError, match="search.space is empty"):
        tune(make_config(tiny_files, {"space": {}}), n_trials=1, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_zero_trials_reports_the_study_as_it_is(tiny_files, tmp_path):
    result = tune(make_config(tiny_files), n_trials=0, out=tmp_path, track=False)
    assert (result.n_complete, result.best, result.parent_run_id) == (0, [], None)
