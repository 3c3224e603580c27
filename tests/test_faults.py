"""Faults: a worker killed mid-trial, an MLflow server that goes away for a while.

The resilient tracking client is first tested against a fake client and a fake clock (no
waiting), then against a real ``mlflow server`` process stopped and restarted mid-run. The
killed-worker test needs PostgreSQL on 127.0.0.1:5432 (skips otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time

import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scaleout_support import (MlflowServer, pg_databases, slow_worker_script,  # noqa: F401
                              spawn, study_preset)

from rankopt.training.events import Callback
from rankopt.tracking.resilient import CREATE_TAG, ResilientClient, TrackingUnavailable, is_transient
from rankopt.tracking.urls import sqlalchemy_url

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOWN = MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                       "HTTPConnectionPool(host='h', port=5000): Max retries exceeded (Connection refused)")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FlakyClient:
    """An MlflowClient stand-in that is down while ``down`` is set, and records what got through."""

    tracking_uri = "http://user:hunter2@h:5000"

    def __init__(self):
        self.down = False
        self.calls: list[tuple] = []
        self.lose_reply = False

    def _do(self, name, *args):
        if self.down:
            raise DOWN
        self.calls.append((name, *args))
        if self.lose_reply:  # the server did it, but the answer never arrived
            self.lose_reply = False
            raise DOWN

    def log_batch(self, run_id, metrics=()):
        self._do("log_batch", run_id, tuple(metrics))

    def set_tag(self, run_id, key, value):
        self._do("set_tag", run_id, key, value)

    def log_artifact(self, run_id, path):
        self._do("log_artifact", run_id, path)

    def get_run(self, run_id):
        self._do("get_run", run_id)
        return run_id

    def create_run(self, experiment_id, tags=None, run_name=None):
        self._do("create_run", experiment_id, tags[CREATE_TAG])
        return f"run-{len([c for c in self.calls if c[0] == 'create_run'])}"

    def search_runs(self, experiment_ids, filter_string="", max_results=1):
        self._do("search_runs", filter_string)
        token = filter_string.split("'")[1]
        made = [c for c in self.calls if c[0] == "create_run" and c[2] == token]
        return ["run-1"] if made else []


@pytest.fixture
def flaky():
    clock = FakeClock()
    fake = FlakyClient()
    return fake, clock, ResilientClient(fake, max_wait=60, sleep=clock.sleep, clock=clock)


def test_logging_is_queued_while_the_server_is_away_and_delivered_in_order(flaky, caplog):
    fake, clock, client = flaky
    client.log_batch("r", metrics=[1])
    fake.down = True
    with caplog.at_level(logging.WARNING, logger="rankopt.tracking"):
        for k in range(2, 6):
            client.log_batch("r", metrics=[k])  # returns at once: training goes on
            clock.now += 1
        assert clock.now == 4 and client.pending == 4
        fake.down = False
        clock.now += 30
        client.log_batch("r", metrics=[6])
    assert [c[2] for c in fake.calls] == [(1,), (2,), (3,), (4,), (5,), (6,)]
    assert client.pending == 0
    text = caplog.text
    assert "unreachable" in text and "answers again" in text
    assert "hunter2" not in text  # the URL is masked in warnings


def test_blocking_call_waits_for_the_server_with_backoff(flaky):
    fake, clock, client = flaky
    fake.down = True
    client.set_tag("r", "k", "v")  # queued
    delays: list[float] = []

    def sleep(seconds):
        delays.append(seconds)
        clock.now += seconds
        if clock.now > 20:
            fake.down = False

    client._sleep = sleep
    client.log_artifact("r", "file.png")
    assert fake.calls == [("set_tag", "r", "k", "v"), ("log_artifact", "r", "file.png")]  # queue first
    assert delays == sorted(delays) and delays[-1] <= 15 and len(delays) >= 4  # exponential backoff, capped


def test_best_effort_call_is_dropped_and_essential_call_raises_after_max_wait(flaky, caplog):
    fake, clock, client = flaky
    fake.down = True
    with caplog.at_level(logging.WARNING, logger="rankopt.tracking"):
        assert client.log_artifact("r", "x") is None
        assert "gave up on log_artifact" in caplog.text
        with pytest.raises(TrackingUnavailable, match="stayed unreachable"):
            client.get_run("r")


def test_real_errors_are_not_retried(flaky):
    fake, clock, client = flaky

    def bad(*a, **k):
        raise MlflowException("Invalid value for parameter 'x'", error_code="INVALID_PARAMETER_VALUE")

    fake.log_batch = bad
    with pytest.raises(MlflowException, match="Invalid value"):
        client.log_batch("r", metrics=[1])
    assert clock.now == 0 and client.pending == 0  # not queued for replay either
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found",
                                            error_code="RESOURCE_DOES_NOT_EXIST"))
    assert is_transient(DOWN) and is_transient(ConnectionRefusedError())


def test_create_run_after_a_lost_reply_does_not_make_a_second_run(flaky):
    fake, clock, client = flaky
    fake.lose_reply = True
    run = client.create_run("exp", tags={"a": "b"})
    assert run == "run-1"
    assert [c[0] for c in fake.calls] == ["create_run", "search_runs"]


class StopServer(Callback):
    """Stops the server after ``stop_at`` steps and starts it again after ``start_at`` (not waiting)."""

    def __init__(self, server: MlflowServer, stop_at: int, start_at: int):
        self.server, self.stop_at, self.start_at = server, stop_at, start_at
        self.outage: list[float] = []

    def on_step(self, step: int, loss: float) -> None:
        if step == self.stop_at:
            self.server.stop()
            self.outage.append(time.monotonic())
        if step == self.start_at:
            self.server.start(wait=False)
            self.outage.append(time.monotonic())


def test_training_survives_an_mlflow_server_restart(tmp_path, tiny_preset_file, monkeypatch, caplog):
    import rankopt

    monkeypatch.setenv("RANKOPT_MLFLOW_MAX_WAIT", "300")
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
    server.start()
    try:
        stopper = StopServer(server, stop_at=3, start_at=25)
        with caplog.at_level(logging.WARNING, logger="rankopt.tracking"):
            result = rankopt.train(str(tiny_preset_file), {"training.steps": 30, "training.eval_every": 5},
                                   tracking_uri=server.uri, out=tmp_path / "out", callbacks=[stopper])
        server.wait_ready()
        client = MlflowClient(server.uri)
        run = client.get_run(result.run_id)
        history = client.get_metric_history(result.run_id, "eval_accuracy")
        artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    finally:
        server.stop()
    assert len(stopper.outage) == 2  # the server really was away for steps 4-25 (evaluations 5..25)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]  # nothing lost
    assert {"adapter", "rank_heatmap.png", "rank_history.json"} <= artifacts
    assert "unreachable" in caplog.text and "answers again" in caplog.text


def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir):
    """SIGKILL a worker mid-trial: another fails the trial after the grace period, retries it from its
    checkpoint, closes its MLflow run, and the study still ends with its trial count."""
    preset = study_preset(tmp_path / "study.yml", tiny_model_dir, tiny_data_dir, n_trials=3, steps=30,
                          eval_every=5, heartbeat=1, grace=4)
    shared = tmp_path / "checkpoints"
    with pg_databases(1) as (optuna_db,):
        server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
        server.start()
        try:
            common = ["--study", "kill", "--storage", optuna_db, "--tracking-uri", server.uri,
                      "--checkpoint-dir", str(shared)]
            slow = spawn(["worker", str(preset), *common, "--out", str(tmp_path / "a")], tmp_path / "a.log",
                         wrapper=slow_worker_script(tmp_path / "slow.py", delay=0.4))
            first_checkpoint = _wait_for(lambda: list(shared.glob("*/trial-0/step-*")), slow, timeout=300)
            os.kill(slow.pid, signal.SIGKILL)
            slow.wait()
            survivor = spawn(["worker", *common, "--out", str(tmp_path / "b")], tmp_path / "b.log")
            survivor.wait(timeout=600)
            log_b = (tmp_path / "b.log").read_text()
            assert survivor.returncode == 0, log_b
            client = MlflowClient(server.uri)
            exp = client.get_experiment_by_name("tiny")
            runs = client.search_runs([exp.experiment_id], max_results=100)
            histories = {r.info.run_id: sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval_accuracy"))
                         for r in runs}
        finally:
            server.stop()
        study = optuna.load_study(study_name="kill", storage=sqlalchemy_url(optuna_db))
        trials = {t.number: t for t in study.trials}

    assert first_checkpoint
    lost = trials[0]
    assert lost.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost.params
    assert retry.user_attrs["resumed_from_step"] >= 5 and retry.user_attrs["resumed_from_step"] % 5 == 0
    complete = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and len(trials) == 4  # the limit counts the retry, not the lost trial
    assert "queued for retry" in log_b

    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs if r.data.tags.get("rankopt.kind") == "trial"}
    assert sorted(by_trial) == sorted(trials)  # one run per trial
    assert by_trial[0].info.status == "KILLED"
    assert by_trial[retry.number].data.tags["optuna.retry_of"] == "0"
    assert by_trial[retry.number].data.tags["rankopt.resumed_from_step"] == str(retry.user_attrs["resumed_from_step"])
    assert histories[by_trial[retry.number].info.run_id] == [5, 10, 15, 20, 25, 30]  # the retried run's curve is whole
    assert retry.user_attrs["retry_of"] == 0
    assert not any(shared.glob("*/trial-*/step-*"))  # finished trials leave no checkpoints behind


def _wait_for(found, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited early with {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_sigterm_hands_the_trial_back(tmp_path, tiny_model_dir, tiny_data_dir):
    """SIGTERM (or Ctrl-C) mid-trial: the trial is recorded as failed, queued again for another
    worker to resume, and no MLflow run is left RUNNING."""
    preset = study_preset(tmp_path / "study.yml", tiny_model_dir, tiny_data_dir, n_trials=2, steps=30, eval_every=5)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = tmp_path / "out"
    worker = spawn(["worker", str(preset), "--study", "term", "--storage", storage, "--out", str(out)],
                   tmp_path / "w.log", wrapper=slow_worker_script(tmp_path / "slow.py", delay=0.4))
    _wait_for(lambda: list(out.glob("checkpoints/term/trial-0/step-*")), worker, timeout=300)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=120)
    text = (tmp_path / "w.log").read_text()
    assert worker.returncode == 130, text
    assert "handed back" in text and "Traceback" not in text

    trials = optuna.load_study(study_name="term", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert trials[1].user_attrs == {}  # the lost trial's outcome is not carried over
    assert list(out.glob("checkpoints/term/trial-0/step-*"))  # kept for the retry
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted((r.data.tags.get("rankopt.kind"), r.info.status) for r in runs) == [("study", "KILLED"),
                                                                                       ("trial", "KILLED")]


def _open_stores(optuna_url: str, mlflow_url: str, barrier, results) -> None:
    from rankopt.search.studies import open_storage
    from rankopt.tracking.mlflow_runs import check_reachable, client_for, ensure_experiment

    barrier.wait()  # every process opens the fresh databases at the same moment
    try:
        optuna.create_study(storage=open_storage(optuna_url), study_name="s", load_if_exists=True)
        check_reachable(mlflow_url)  # as tune and worker do first with --tracking-uri
        ensure_experiment(client_for(mlflow_url), "e", None)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {str(exc)[:300]}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_opening_fresh_stores_together_create_them_once(tmp_path, backend):
    """Issue 25: on a fresh database the second process died on Optuna's (and MLflow's) table-creation
    race, reported as "pass a valid --storage URL". Opening a store is now serialized."""
    import multiprocessing

    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            urls = (f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
        else:
            urls = tuple(stack.enter_context(pg_databases(2)))
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_stores, args=(*urls, barrier, results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
    assert outcomes == ["ok"] * 4, outcomes


def test_a_store_whose_creation_was_killed_is_made_again_whole(tmp_path):
    """A process killed while MLflow migrated a fresh SQLite store left it half made: every later command
    failed ("out-of-date database schema", a traceback). A fresh store is now made aside and renamed in."""
    from rankopt.tracking.store_lock import made_whole

    url = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def killed(temp_url: str) -> None:
        path = temp_url[len("sqlite:///"):]
        open(path, "wb").write(b"SQLite format 3\x00 half")
        open(path + "-journal", "wb").write(b"hot")
        raise KeyboardInterrupt  # as SIGKILL would, mid-creation

    with pytest.raises(KeyboardInterrupt):
        made_whole(url, killed)
    assert not (tmp_path / "mlflow.db").exists()  # nothing half made where the store goes
    made_whole(url, lambda temp_url: open(temp_url[len("sqlite:///"):], "wb").write(b"whole"))
    assert (tmp_path / "mlflow.db").read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mlflow.db"]
    made_whole(url, killed)  # an existing store is left alone
