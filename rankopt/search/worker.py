"""A worker: joins a study in a shared database and takes trials until the study's limit is reached.

Start as many as there are GPUs (or machines), all with the same ``--study`` and ``--storage``.
The first one (or ``rankopt tune PRESET --trials 0``) creates the study and stores the
resolved config and the trial limit in it, so the others need no preset. Each loop turn,
under the study lock (:class:`rankopt.search.studies.StudyLock`): fail trials whose worker stopped
sending heartbeats (they come back as retries), count, then take a trial, wait, or stop.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from rankopt import distributed
from rankopt.search import data_parallel
from rankopt.training.memory_plan import check_memory
from rankopt.training.setup import build_model, prepare_data
from rankopt.config import Config, build_config, parse_overrides, resolve_config
from rankopt.devices import check_device
from rankopt.errors import RankoptError
from rankopt.search.studies import (CONFIG_ATTR, LIMIT_ATTR, PARENT_CLOSED_ATTR, Decision, StaleTrialHandler, StudyLock,
                             Tally, TrialLimit, check_study_name, close_orphan_runs, open_storage, tally)
from rankopt.search.owners import fail_orphaned_trials
from rankopt.search.tuner import Objective, open_study, start_tracking
from rankopt.tracking.urls import check_storage_url, check_tracking_uri, mask_url

log = logging.getLogger(__name__)


@dataclass
class WorkerResult:
    """What one worker did, and where the study stands."""

    study_name: str
    storage: str  # masked
    limit: int
    ran: list[int] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    reason: str = ""


def _stored_study(url: str, name: str) -> tuple[dict, int] | None:
    """The config and limit a study was created with, or None when there is no such study."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None  # do not create an empty database just to look into it
    storage = open_storage(url)
    try:
        if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            return None
        study = optuna.load_study(study_name=name, storage=storage)
        if CONFIG_ATTR not in study.user_attrs:
            raise RankoptError(f"study '{name}' was not created by rankopt (no stored config); pass a PRESET to "
                               "run it, or use another --study")
        return study.user_attrs[CONFIG_ATTR], int(study.user_attrs.get(LIMIT_ATTR, 0))
    finally:
        storage.engine.dispose()


def worker_config(stored: dict | None, preset: str | None, overrides: list[str] | None, data_dir: str | None,
                  device: str | None, trust_remote_code: bool = False) -> Config:
    """The study's stored config (or the preset's, for a new study), with this worker's device and paths.

    Whoever can write the study database writes the stored config, so a stored
    ``model.trust_remote_code`` (code from the model's files runs here) needs this worker's own
    ``--trust-remote-code`` (or ``--set model.trust_remote_code=true``): alone it is refused.
    """
    if stored is not None:
        over = parse_overrides(overrides)
        asks = bool((stored.get("model") or {}).get("trust_remote_code"))
        if asks and not (trust_remote_code or over.get("model.trust_remote_code") is True):
            name = (stored.get("model") or {}).get("name")
            raise RankoptError(f"the study's stored config sets model.trust_remote_code (model '{name}' would run "
                               "code from its files), and a shared study database alone cannot allow that; pass "
                               "--trust-remote-code to this worker if you trust that model's code")
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise RankoptError(f"--data '{data_dir}' is not a folder; point it at a folder of train/validation files")
            over.update({"task.data_dir": str(Path(data_dir).resolve()), "task.dataset": None, "task.subset": None,
                         "task.builtin": None})
        cfg = build_config(stored, over, origin="stored study config")
    else:
        cfg = resolve_config(preset, overrides, data_dir)
    if device is not None:
        cfg = build_config(cfg.model_dump(), {"training.device": device}, origin="--device")
    return cfg


def run_worker(study_name: str, storage: str, preset: str | None = None, overrides: list[str] | None = None, *,
               data_dir: str | None = None, tracking_uri: str | None = None, max_trials: int | None = None,
               device: str | None = None, out: str | Path = "runs", checkpoint_dir: str | Path | None = None,
               track: bool = True, callbacks_for_trial=None, on_trial_end=None,
               trust_remote_code: bool = False) -> WorkerResult | None:
    """Take trials of ``study_name`` until its trial limit (or ``max_trials`` here) is reached.

    ``trust_remote_code`` allows a stored ``model.trust_remote_code`` (see :func:`worker_config`).

    Started under ``torchrun``, this worker's trials train data-parallel: rank 0 is the worker
    (storage, lock, heartbeats, MLflow) and returns the result; the other processes follow its
    trials (:mod:`rankopt.search.data_parallel`) and return None.
    """
    check_storage_url(storage)
    check_study_name(study_name)
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri)
    if device is not None:
        check_device(device)
    if max_trials is not None and max_trials < 0:
        raise RankoptError("--trials must be 0 or more")
    distributed.init_from_environment(device)
    joined, cfg, checkpoints = data_parallel.set_up(
        lambda: _join(study_name, storage, preset, overrides, data_dir, tracking_uri, device, out, checkpoint_dir,
                      track, trust_remote_code),
        lambda j: (j.cfg, j.checkpoints))
    if joined is None:
        data_parallel.follow(cfg, checkpoints)
        return None
    try:
        objective = Objective(cfg, joined.tracker, callbacks_for_trial, checkpoints=checkpoints)
        result = _loop(joined.study, storage, joined.lock, objective, cfg, joined.tracker, max_trials, joined.on_stale,
                       on_trial_end)
        data_parallel.release_followers()  # not after a failure: the others may be in its collectives
        return result
    finally:
        joined.lock.close()


@dataclass
class _Joined:
    """A worker that has joined its study: what its trial loop needs."""

    study: optuna.Study
    lock: StudyLock
    cfg: Config
    tracker: Any
    on_stale: StaleTrialHandler
    checkpoints: Any  # a CheckpointStore


def _join(study_name: str, storage: str, preset: str | None, overrides: list[str] | None, data_dir: str | None,
          tracking_uri: str | None, device: str | None, out: str | Path, checkpoint_dir: str | Path | None,
          track: bool, trust_remote_code: bool = False) -> _Joined:
    """The study's config (stored, or the preset's for a new study), checked; the study, its lock and MLflow side."""
    from_preset = worker_config(None, preset, overrides, data_dir, device) if preset is not None else None
    stored = _stored_study(storage, study_name)
    if stored is None and preset is None:
        raise RankoptError(f"no study '{study_name}' in {mask_url(storage)}; create it with `rankopt tune PRESET "
                           f"--study {study_name} --storage URL --trials 0`, or pass a PRESET to this worker")
    if stored is None:
        cfg = from_preset
    else:
        cfg = worker_config(stored[0], None, overrides, data_dir, device, trust_remote_code)
        if from_preset is not None and from_preset.model_dump(mode="json") != cfg.model_dump(mode="json"):
            log.warning("study '%s' exists: using the config stored in it, not the preset's", study_name)
    if not cfg.search.space:
        raise RankoptError("the preset's search.space is empty; add dimensions such as controller.target_rank")
    check_memory(cfg, distributed.current().world)  # on a GPU: a config that cannot fit stops here
    data = prepare_data(cfg)  # fail on bad data or model before anything is written
    build_model(cfg, data.num_labels)
    if track and tracking_uri:
        from rankopt.tracking import mlflow_runs

        mlflow_runs.check_reachable(tracking_uri)
    on_stale = StaleTrialHandler(cfg.search)
    storage_obj = open_storage(storage, cfg.search, on_stale)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = StudyLock(storage, study_name)
    try:
        with lock:  # one worker at a time creates the study, the experiment and the parent run
            study = open_study(cfg, study_name, storage, storage_obj=storage_obj)
            if CONFIG_ATTR not in study.user_attrs:
                study.set_user_attr(CONFIG_ATTR, cfg.model_dump(mode="json"))
            if LIMIT_ATTR not in study.user_attrs:
                study.set_user_attr(LIMIT_ATTR, cfg.search.n_trials)
            tracker = start_tracking(study, cfg, tracking_uri, out) if track else None
        on_stale.tracker = tracker
        from rankopt.training.checkpoint import CheckpointStore

        checkpoints = CheckpointStore(Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints", study_name,
                                      cfg.search.checkpoint_every)
    except BaseException:
        lock.close()
        raise
    return _Joined(study, lock, cfg, tracker, on_stale, checkpoints)


def _loop(study: optuna.Study, storage: str, lock: StudyLock, objective: Objective, cfg: Config, tracker,
          max_trials: int | None, on_stale: StaleTrialHandler, on_trial_end) -> WorkerResult:
    limit = TrialLimit(int(study.user_attrs.get(LIMIT_ATTR, cfg.search.n_trials)))
    result = WorkerResult(study_name=study.study_name, storage=mask_url(storage), limit=limit.n_trials)
    callbacks = [limit] + ([on_trial_end] if on_trial_end else [])
    current: dict[str, Any] = {}

    def take(trial: optuna.Trial):
        lock.release()  # the trial is RUNNING in the storage now: the others count it
        current["number"] = trial.number
        result.ran.append(trial.number)
        return objective(trial)

    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends the trial like Ctrl-C: recorded, handed back
    interrupted = False
    try:
        while max_trials is None or len(result.ran) < max_trials:
            with lock:
                _fail_stale(study)
                fail_orphaned_trials(study, on_stale)
                decision = limit.decide(study)
                if decision == Decision.RUN:
                    current.clear()
                    try:
                        study.optimize(take, n_trials=1, catch=data_parallel.survivable(), callbacks=callbacks)
                    except KeyboardInterrupt:
                        interrupted = True
                        _hand_back(study, current.get("number"), on_stale)
                        raise
            if decision == Decision.STOP:
                result.reason = "the study reached its trial limit"
                break
            if decision == Decision.WAIT:
                time.sleep(min(10, max(1, cfg.search.heartbeat_interval)))
                data_parallel.keep_waiting()  # this worker's other processes wait with it
        else:
            result.reason = f"this worker ran its {max_trials} trial(s)"
        result.tally = tally(study)
        if tracker is not None and result.tally.settled >= limit.n_trials:
            with lock:
                _close_parent(study, tracker)
    finally:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if tracker is not None and tally(study).settled < limit.n_trials:
            _pause_parent(study, tracker, lock, interrupted)
    return result


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _fail_stale(study: optuna.Study) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def _hand_back(study: optuna.Study, number: int | None, on_stale: StaleTrialHandler) -> None:
    """An interrupted worker queues its trial for retry, so another worker resumes it from its checkpoint."""
    if number is None:
        return
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if frozen is not None and frozen.state == optuna.trial.TrialState.FAIL:
        on_stale.queue_retry(study, frozen)
        log.warning("trial %d was interrupted and queued for retry", number)


def _pause_parent(study: optuna.Study, tracker, lock: StudyLock, interrupted: bool) -> None:
    """Leaving an unfinished study: if no other worker is running a trial, do not leave its parent run RUNNING.

    The next worker to join reopens it.
    """
    try:
        with lock:
            if tally(study).running == 0 and tracker.parent_run_id:
                tracker.client.set_terminated(tracker.parent_run_id, "KILLED" if interrupted else "FINISHED")
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        log.warning("could not end the study's MLflow run (%s)", exc)


def _close_parent(study: optuna.Study, tracker) -> None:
    """The last worker out ends the study's parent run (plots, best trial) once per limit reached."""
    settled = tally(study).settled
    if study.user_attrs.get(PARENT_CLOSED_ATTR) == settled:
        return
    close_orphan_runs(study, tracker)
    tracker.end_study(study, "FINISHED")
    study.set_user_attr(PARENT_CLOSED_ATTR, settled)
