"""A study shared by many workers: heartbeat storage, retries of lost trials, the trial limit, a lock.

* **Heartbeats.** Each running trial records a heartbeat every ``search.heartbeat_interval``
  seconds. A trial silent for ``search.grace_period`` seconds (its worker was killed, its
  machine died) is failed by the next worker that looks, and :class:`StaleTrialHandler`
  closes its MLflow run as KILLED and queues a retry (Optuna's retry callback: a WAITING copy
  with the same parameters, up to ``search.max_retry`` times). The retry resumes from the
  lost trial's last checkpoint (:mod:`rankopt.training.checkpoint`).
* **The trial limit.** A study remembers its limit (user attribute ``trial_limit``). A trial
  counts once it is *settled*: COMPLETE, PRUNED, or FAIL for good. A FAIL that was retried
  does not count (its retry does); a FAIL raised by the objective (divergence, a bad config)
  or a lost trial out of retries does, so a study whose trials keep failing still ends.
* **No overshoot.** "Count, then take a trial" happens under :class:`StudyLock` (a PostgreSQL
  advisory lock, or a file lock next to a SQLite file), so N workers together run exactly the
  limit. A worker whose count says the running trials of others would reach the limit waits
  instead of leaving, in case one of them dies and its trial comes back as a retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.trial import TrialState

from rankopt.config import SearchConfig
from rankopt.errors import RankoptError
from rankopt.tracking.urls import check_storage_url, mask_text, mask_url, sqlalchemy_url

log = logging.getLogger(__name__)
CONFIG_ATTR, LIMIT_ATTR = "config", "trial_limit"
PARENT_CLOSED_ATTR = "mlflow_parent_closed_at"

RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback


class StaleTrialHandler:
    """Optuna calls this for each trial it failed for lack of heartbeats: close its run, queue a retry."""

    def __init__(self, search: SearchConfig):
        import warnings

        self.grace = search.grace_period
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'experimental' in Optuna
            self.retry = RetryCallback(max_retry=search.max_retry)
        self.tracker = None  # set once the MLflow side is up

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str | None = None) -> None:
        reason = reason or f"no heartbeat for {self.grace}s"
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.tracker is not None and run_id:
            try:
                self.tracker.end_trial(run_id, "failed", f"worker lost: {reason}; "
                                       "the trial was failed and queued for retry", status="KILLED")
            except Exception as exc:  # noqa: BLE001 - the sweep at the next start closes it then
                log.warning("could not close the MLflow run of lost trial %d (%s)", trial.number, mask_text(exc))
        self.queue_retry(study, trial)
        log.warning("trial %d lost its worker (%s): failed and queued for retry", trial.number, reason)

    def queue_retry(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A WAITING copy of ``trial`` (same parameters), without the lost trial's outcome attributes."""
        import copy

        fresh = copy.deepcopy(trial)
        fresh.user_attrs = {}  # its fail_reason, MLflow run id, ... belong to the lost trial
        self.retry(study, fresh)


def open_storage(url: str, search: SearchConfig | None = None,
                 on_stale: StaleTrialHandler | None = None) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; with ``search``, heartbeats and stale-trial handling are on."""
    check_storage_url(url)
    kwargs: dict = {}
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme != "sqlite":
        engine = {"pool_pre_ping": True}
        if scheme in ("postgresql", "postgres"):
            engine["connect_args"] = {"connect_timeout": 10}
        kwargs["engine_kwargs"] = engine
    if search is not None:
        kwargs.update(heartbeat_interval=search.heartbeat_interval, grace_period=search.grace_period)
        if on_stale is not None:
            params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
            name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
                else "failed_trial_callback"
            kwargs[name] = on_stale
    try:
        import warnings

        from rankopt.tracking.store_lock import opening

        with warnings.catch_warnings(), opening(url):  # a fresh database gets its tables once
            warnings.simplefilter("ignore")  # heartbeats are 'experimental' in Optuna
            return optuna.storages.RDBStorage(sqlalchemy_url(url), **kwargs)
    except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server
        reason = mask_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise RankoptError(f"cannot open Optuna storage '{mask_url(url)}' ({reason}); pass a valid --storage URL "
                           "such as sqlite:///runs/optuna.db or postgresql://user@host:5432/db") from None


def check_study_name(name: str) -> str:
    """A study name also names folders (checkpoints, reports): '.', '..' and path separators are refused."""
    if not name or name.strip() in (".", "..") or any(c in name for c in "/\\\0"):
        raise RankoptError(f"study name {name!r} cannot name a folder (checkpoints go under it): no '.', '..', "
                           "'/' or '\\'; pick another --study (the default is the preset's task.name)")
    return name


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the trial that ``trial`` retries (the first of the chain), or None."""
    study = getattr(trial, "study", None)  # an optuna FixedTrial has no study, and retries nothing
    if study is None:
        return None
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            return frozen.system_attrs.get("failed_trial")
    return None


@dataclass
class Tally:
    """Trials of a study by what they mean for the limit."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0  # for good: counts toward the limit
    retried: int = 0  # lost, and retried: does not count
    running: int = 0
    waiting: int = 0

    @property
    def settled(self) -> int:
        return self.complete + self.pruned + self.failed


def tally(study: optuna.Study) -> Tally:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = Tally()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out.complete += 1
        elif t.state == TrialState.PRUNED:
            out.pruned += 1
        elif t.state == TrialState.FAIL:
            if t.number in retried:
                out.retried += 1
            else:
                out.failed += 1
        elif t.state == TrialState.RUNNING:
            out.running += 1
        elif t.state == TrialState.WAITING:
            out.waiting += 1
    return out


class Decision(Enum):
    RUN = "run"
    WAIT = "wait"
    STOP = "stop"


class TrialLimit(optuna.study.MaxTrialsCallback):
    """Optuna's MaxTrialsCallback, counting settled trials (COMPLETE, PRUNED, FAIL unless retried).

    As a callback it stops ``study.optimize`` once the limit is reached; :meth:`decide` is
    the check a worker makes, under the study lock, before it takes a trial.
    """

    def __init__(self, n_trials: int):
        super().__init__(n_trials, states=None)
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if tally(study).settled >= self.n_trials:
            study.stop()

    def decide(self, study: optuna.Study) -> Decision:
        t = tally(study)
        if t.waiting:  # a retry (or an enqueued trial) is owed: take it
            return Decision.RUN
        if t.settled >= self.n_trials:
            return Decision.STOP
        if t.settled + t.running < self.n_trials:
            return Decision.RUN
        return Decision.WAIT  # the others' running trials would reach the limit, unless one is lost


class StudyLock:
    """Mutual exclusion between the workers of one study, released when a worker dies.

    PostgreSQL: a session advisory lock on a connection of its own (the server drops it with
    the connection). SQLite: ``fcntl.flock`` on ``FILE.rankopt-lock``. Elsewhere: no lock, and
    N workers may overshoot the limit by up to N - 1 trials.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.study_name = url, study_name
        self.key = int.from_bytes(hashlib.sha256(f"rankopt:{study_name}".encode()).digest()[:8], "big", signed=True)
        self._conn = None
        self._file = None
        self.held = False
        scheme = urlsplit(url).scheme.split("+")[0]
        self.kind = "postgresql" if scheme in ("postgresql", "postgres") else scheme
        if self.kind not in ("postgresql", "sqlite"):
            log.warning("no study lock for %s storage: workers may run a few trials past the limit", scheme)

    def acquire(self) -> None:
        if self.held:
            return
        if self.kind == "postgresql":
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            if self._conn is None:
                engine = create_engine(sqlalchemy_url(self.url), poolclass=NullPool,
                                       connect_args={"connect_timeout": 10})
                self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        elif self.kind == "sqlite":
            path = urlsplit(self.url).path[1:]
            if path and path != ":memory:":
                import fcntl

                if self._file is None:
                    self._file = open(Path(path).with_name(Path(path).name + ".rankopt-lock"), "a+")  # noqa: SIM115
                fcntl.flock(self._file, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.kind == "postgresql" and self._conn is not None:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        elif self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def close_orphan_runs(study: optuna.Study, tracker) -> int:
    """End MLflow trial runs still marked running whose Optuna trial is over (a lost worker's runs).

    Returns how many were closed. A FAIL trial's run ends KILLED; a COMPLETE / PRUNED one
    (its worker died between Optuna and MLflow) ends FINISHED.
    """
    name = study.study_name.replace("\\", "\\\\").replace("'", "\\'")
    try:
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`optuna.study` = '{name}' and tags.`optuna.state` = 'running' "
                          "and attributes.status = 'RUNNING'", max_results=1000)
    except Exception as exc:  # noqa: BLE001 - best effort: try again at the next start
        log.warning("could not look for stale MLflow runs (%s)", mask_text(exc))
        return 0
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in runs:
        try:
            number = int(run.data.tags.get("optuna.trial", "-1"))
        except ValueError:
            continue
        state = states.get(number)
        if state is None or state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if state == TrialState.FAIL:
            tracker.end_trial(run.info.run_id, "failed", "its worker was lost; the trial was failed",
                              status="KILLED")
        else:
            tracker.end_trial(run.info.run_id, state.name.lower())
        closed += 1
    return closed
