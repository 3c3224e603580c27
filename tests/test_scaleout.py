"""Scale-out: workers as separate processes share one study in PostgreSQL and one MLflow server.

Needs PostgreSQL on 127.0.0.1:5432 (skips otherwise); each test makes its own databases
and drops them at the end.
"""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient
from scaleout_support import (SECRET, MlflowServer, cli_env, pg_databases,  # noqa: F401
                              rankopt_cmd, spawn, study_preset)

from rankopt.errors import RankoptError
from rankopt.search.studies import Decision, StudyLock, Tally, TrialLimit, tally
from rankopt.tracking.urls import sqlalchemy_url
from rankopt.search.worker import worker_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _runs(uri: str, experiment: str = "tiny"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_three_workers_share_a_nine_trial_study(tmp_path, tiny_model_dir, tiny_data_dir):
    preset = study_preset(tmp_path / "study.yml", tiny_model_dir, tiny_data_dir, n_trials=9, steps=12, eval_every=4)
    with pg_databases(2) as (optuna_db, mlflow_db):
        server = MlflowServer(sqlalchemy_url(mlflow_db), tmp_path / "artifacts", tmp_path / "mlflow.log").start()
        try:
            common = ["--study", "tiny-scale", "--storage", optuna_db, "--tracking-uri", server.uri]
            created = subprocess.run(rankopt_cmd("tune", str(preset), "--trials", "0", *common, "--out",
                                                 str(tmp_path / "tune")),
                                     capture_output=True, text=True, env=cli_env(), timeout=300)
            assert created.returncode == 0, created.stderr
            logs = [tmp_path / f"worker{k}.log" for k in range(3)]
            workers = [spawn(["worker", *common, "--out", str(tmp_path / f"w{k}")], logs[k]) for k in range(3)]
            for proc in workers:
                proc.wait(timeout=900)
            outputs = [log.read_text() for log in logs]
            assert [p.returncode for p in workers] == [0, 0, 0], outputs
            runs = _runs(server.uri)
        finally:
            server.stop()

        study = optuna.load_study(study_name="tiny-scale", storage=sqlalchemy_url(optuna_db))
        trials = study.trials
        assert len(trials) == 9 and sorted(t.number for t in trials) == list(range(9))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert study.user_attrs["trial_limit"] == 9

    trial_runs = [r for r in runs if r.data.tags.get("rankopt.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("rankopt.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trial_runs) == 9
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == list(range(9))
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "complete" for r in trial_runs)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in trial_runs}
    # the password in the storage URL reaches neither the console nor MLflow
    assert all(SECRET not in text for text in outputs + [created.stdout, created.stderr])
    for run in runs:
        assert SECRET not in repr(run.data.params) and SECRET not in repr(run.data.tags)
    assert sum("worker done" in text for text in outputs) == 3


def test_workers_stop_exactly_at_the_limit(tmp_path):
    """The decision a worker makes under the study lock, driven with ask/tell (no training)."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    limit = TrialLimit(3)
    assert limit.decide(study) == Decision.RUN
    running = [study.ask() for _ in range(3)]
    assert limit.decide(study) == Decision.WAIT  # others' trials would reach the limit: wait, do not leave
    study.tell(running[0], 1.0)
    study.tell(running[1], state=optuna.trial.TrialState.PRUNED)
    study.tell(running[2], state=optuna.trial.TrialState.FAIL)  # failed for good: it counts
    assert tally(study) == Tally(complete=1, pruned=1, failed=1)
    assert limit.decide(study) == Decision.STOP


def test_a_retried_failure_does_not_count_toward_the_limit(tmp_path):
    from rankopt.config import SearchConfig
    from rankopt.search.studies import StaleTrialHandler

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    limit = TrialLimit(2)
    study.tell(study.ask(), 1.0)
    lost = study.ask()
    study.tell(lost, state=optuna.trial.TrialState.FAIL)
    StaleTrialHandler(SearchConfig(max_retry=1)).queue_retry(study, study.trials[lost.number])
    assert tally(study) == Tally(complete=1, retried=1, waiting=1)
    assert limit.decide(study) == Decision.RUN  # the retry is owed
    study.tell(study.ask(), 2.0)  # ask() takes the waiting retry
    assert tally(study).settled == 2 and limit.decide(study) == Decision.STOP


def test_study_lock_excludes_a_second_holder(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    first, second = StudyLock(url, "s"), StudyLock(url, "s")
    first.acquire()
    probe = subprocess.run(
        [sys.executable, "-c", f"import fcntl; f = open({str(tmp_path / 'o.db.rankopt-lock')!r}, 'a+');"
                         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"], capture_output=True)
    assert probe.returncode != 0  # held
    first.release()
    second.acquire()
    second.close()
    first.close()


def test_postgres_lock_is_released_when_its_holder_dies(tmp_path):
    with pg_databases(1) as (url,):
        holder = subprocess.Popen([sys.executable, "-c", f"from rankopt.search.studies import StudyLock; import time; "
                                   f"StudyLock({url!r}, 's').acquire(); print('held', flush=True); time.sleep(60)"],
                                  stdout=subprocess.PIPE, text=True, env=cli_env())
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        lock = StudyLock(url, "s")
        lock.acquire()  # would block forever if the dead holder still had it
        lock.close()


def test_device_flag_reaches_the_config(tiny_preset_file):
    cfg = worker_config(None, str(tiny_preset_file), None, None, "cuda:1")
    assert cfg.training.device == "cuda:1"
    stored = cfg.model_dump(mode="json")
    assert worker_config(stored, None, None, None, "cuda:0").training.device == "cuda:0"
    assert worker_config(stored, None, None, None, None).training.device == "cuda:1"


def test_invalid_device_is_one_line(tmp_path):
    """Through a real process; more device cases run in-process in test_fuzz_presets.py."""
    out = subprocess.run(rankopt_cmd("worker", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                     "--device", "gpu0", "--out", str(tmp_path / "out")),
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'gpu0' is not one of cpu, cuda"), out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("device", ["cuda:0", "cuda:3"])
def test_missing_gpu_is_a_user_error(device):
    import torch

    from rankopt.devices import check_device

    if torch.cuda.is_available() and int(device[-1]) < torch.cuda.device_count():
        pytest.skip("this machine has that GPU")
    with pytest.raises(RankoptError, match=f"device '{device}'"):
        check_device(device)
    assert check_device("cpu") == "cpu"


def test_worker_without_preset_needs_an_existing_study(tmp_path):
    from rankopt.search.worker import run_worker

    with pytest.raises(RankoptError, match="no study 'nope'.*pass a PRESET"):
        run_worker("nope", f"sqlite:///{tmp_path / 'o.db'}", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stored_trust_remote_code_needs_the_workers_own_flag(tmp_path, tiny_preset):
    """Issue 25: workers took model.trust_remote_code from the study database, so whoever could write
    the shared store could make every worker run a model's code. Stored there alone, it is refused."""
    from typer.testing import CliRunner

    from rankopt.cli import app
    from rankopt.config import Config

    stored = Config.model_validate({**tiny_preset, "model": {**tiny_preset["model"], "trust_remote_code": True},
                                    "search": {"space": {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}})
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="shared", storage=url)
    study.set_user_attr("config", stored.model_dump(mode="json"))
    study.set_user_attr("trial_limit", 1)
    join = ["worker", "--study", "shared", "--storage", url, "--trials", "0", "--out", str(tmp_path / "out")]
    refused = CliRunner().invoke(app, join)
    assert refused.exit_code == 2, refused.output
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.trust_remote_code" in lines[0] and "--trust-remote-code" in lines[0]
    assert not (tmp_path / "out").exists()
    dumped = stored.model_dump(mode="json")
    assert worker_config(dumped, None, None, None, None, trust_remote_code=True).model.trust_remote_code
    assert worker_config(dumped, None, ["model.trust_remote_code=true"], None, None).model.trust_remote_code
