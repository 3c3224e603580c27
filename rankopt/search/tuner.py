"""A tuning job: an Optuna study over fine-tunes, every trial logged as a nested MLflow run.

Running the same job again resumes the study in its storage: finished trials stay, the new
ones add to the count, and the sampler learns from all of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from rankopt import distributed
from rankopt.training.setup import build_model, prepare_data
from rankopt.config import Config, resolve_config
from rankopt.errors import RankoptError
from rankopt.training.events import Callback
from rankopt.tasks.modeling import portable_model_name
from rankopt.search.trials import (ReportToTrial, SeededPerTrial, TuneResult, best_trials, default_storage, make_pruner,
                            make_sampler, objective_directions, suggest, summarize, trial_config)
from rankopt.search import data_parallel, holdout
from rankopt.search import owners
from rankopt.search.owners import fail_orphaned_trials
from rankopt.search.selection import check_within, smallest_within
from rankopt.search.studies import (CONFIG_ATTR, LIMIT_ATTR, StaleTrialHandler, StudyLock, check_study_name,
                             open_storage, retried_from, tally)
from rankopt.training.memory import release_memory
from rankopt.training.memory_plan import check_memory
from rankopt.training.trainer import train_adapted
from rankopt.tracking.urls import mask_text
from rankopt.tracking.urls import mask_url as _mask  # noqa: F401 - kept importable from here

log = logging.getLogger(__name__)


class _RecordResume(Callback):
    """Notes on the trial (and its run) the step a retried trial resumed from."""

    def __init__(self, trial: optuna.Trial, tracker, run_id: str | None):
        self.trial, self.tracker, self.run_id = trial, tracker, run_id

    def on_train_start(self, info: dict[str, Any]) -> None:
        step = info.get("resumed_step") or 0
        if step:
            self.trial.set_user_attr("resumed_from_step", step)
            if self.tracker is not None and self.run_id is not None:
                self.tracker.client.set_tag(self.run_id, "rankopt.resumed_from_step", str(step))


class Objective:
    """One trial: suggest, build the trial's config, train, report; record why it ended.

    With ``checkpoints`` (a :class:`rankopt.training.checkpoint.CheckpointStore`) the trial saves its
    state every ``search.checkpoint_every`` evaluations, and a retry of a lost trial resumes
    from the lost one's last checkpoint.
    """

    def __init__(self, base: Config, tracker=None, callbacks_for_trial=None, checkpoints=None):
        self.base = base
        self.objectives = base.search.objectives
        self.tracker = tracker
        self.callbacks_for_trial = callbacks_for_trial or (lambda trial, cfg: [])
        self.checkpoints = checkpoints

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        release_memory()  # the last trial's model may still sit in a reference cycle (a pruned trial's frames)
        try:
            return self._run(trial)
        finally:
            release_memory()

    def _run(self, trial: optuna.Trial) -> float | tuple[float, float]:
        retry_of = retried_from(trial)
        data_parallel.announce(trial.number if retry_of is None else retry_of)  # the other processes join in
        shared = data_parallel.shared(trial)  # suggestions and pruning decisions reach every process
        values = suggest(shared, self.base.search.space)
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        try:
            cfg = trial_config(self.base, values)
            data = prepare_data(cfg)
            adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
        except RankoptError as exc:
            reason = mask_text(str(exc))
            trial.set_user_attr("fail_reason", reason)
            if self.tracker is not None:  # every trial gets its run, a trial that cannot be built too
                run_id = self.tracker.start_trial(trial.number, values, values)
                trial.set_user_attr("mlflow_run_id", run_id)
                self._end(run_id, "failed", reason)
            raise
        checkpoint = None
        if self.checkpoints is not None and self.checkpoints.every > 0:
            checkpoint = self.checkpoints.for_trial(trial.number if retry_of is None else retry_of, cfg.model_dump())
        callbacks: list[Callback] = list(self.callbacks_for_trial(trial, cfg))
        run_id = None
        if self.tracker is not None:
            from rankopt.tracking.mlflow_runs import MLflowLogger

            tags = {"optuna.retry_of": str(retry_of)} if retry_of is not None else None
            run_id = self.tracker.start_trial(trial.number, cfg.model_dump(exclude={"search"}), values, tags=tags)
            trial.set_user_attr("mlflow_run_id", run_id)
            callbacks.append(MLflowLogger(self.tracker.client, run_id, self.tracker.base_model,
                                          meta={"config": cfg.model_dump(), "study": self.tracker.study_name,
                                                "trial": trial.number}))
        callbacks.append(_RecordResume(trial, self.tracker, run_id))
        # last: the evaluation that prunes the trial has reached every other listener (MLflow, progress) first
        callbacks.append(ReportToTrial(shared, cfg.task.metric, can_prune=len(self.objectives) == 1,
                                       final_step=cfg.training.steps))
        try:
            result = train_adapted(cfg, adapted, data, callbacks, checkpointer=checkpoint)
        except optuna.TrialPruned:
            self._end(run_id, "pruned")
            self._forget(checkpoint)
            raise
        except KeyboardInterrupt:  # the checkpoint stays: a retry of this trial resumes from it
            trial.set_user_attr("fail_reason", "interrupted")
            self._end(run_id, "interrupted", "interrupted")
            raise
        except Exception as exc:
            reason = mask_text(f"{type(exc).__name__}: {exc}")
            trial.set_user_attr("fail_reason", reason[:5000])
            self._end(run_id, "failed", reason)
            self._forget(checkpoint)
            raise
        trial.set_user_attr("total_rank", result.total_rank)
        trial.set_user_attr("ranks", json.dumps(result.ranks))
        trial.set_user_attr("trainable_params", result.trainable_params)
        trial.set_user_attr("adapter_params", result.adapter_params)
        trial.set_user_attr("metrics", json.dumps(result.metrics))
        self._end(run_id, "complete")
        self._forget(checkpoint)
        if len(self.objectives) == 1:
            return result.metric
        return result.metric, float(result.adapter_params)

    def _end(self, run_id: str | None, state: str, reason: str | None = None) -> None:
        if self.tracker is not None and run_id is not None:
            self.tracker.end_trial(run_id, state, reason)

    @staticmethod
    def _forget(checkpoint) -> None:
        if checkpoint is not None:
            checkpoint.clear()


def open_study(cfg: Config, study_name: str, storage: str, *, storage_obj=None) -> optuna.Study:
    """Create the study, or load it when it exists (then its objectives must match).

    Other processes may share the study (workers, a second ``rankopt tune``): each trial's sampler
    is seeded from its trial number (:class:`rankopt.search.trials.SeededPerTrial`), and TPE uses
    the constant-liar strategy, so that concurrent processes do not propose the same trial.
    """
    directions = objective_directions(cfg)
    if storage_obj is None:
        storage_obj = open_storage(storage, cfg.search, StaleTrialHandler(cfg.search))
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage_obj)}
    if study_name in existing and len(existing[study_name].directions) != len(directions):
        raise RankoptError(f"study '{study_name}' exists with {len(existing[study_name].directions)} objective(s), "
                           f"the preset asks for {len(directions)}; pick another --study name")
    eval_every = cfg.training.eval_every
    sampler = SeededPerTrial(lambda seed: make_sampler(cfg.search, seed, len(directions), constant_liar=True),
                             cfg.training.seed, on_new_trial=owners.mark)  # a rerun here sees at once if it dies
    study = optuna.create_study(storage=storage_obj, study_name=study_name, directions=directions,
                                load_if_exists=True, sampler=sampler,
                                pruner=make_pruner(cfg.search, eval_every, cfg.training.steps))
    study.set_user_attr("objectives", list(cfg.search.objectives))
    return study


def remember_for_workers(study: optuna.Study, cfg: Config, trials: int) -> None:
    """Store what a worker needs to join without a preset: the config (once) and the trial limit.

    The limit is the trials the study has settled plus the ones this command asks for
    (``--trials``, or the preset's ``search.n_trials`` when it is 0 or absent); it is never lowered.
    """
    if CONFIG_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_ATTR, cfg.model_dump(mode="json"))
    elif study.user_attrs[CONFIG_ATTR] != cfg.model_dump(mode="json"):
        log.warning("study '%s' keeps the config it was created with for its workers; this run uses the "
                    "preset as given", study.study_name)
    wanted = tally(study).settled + (trials or cfg.search.n_trials)
    if wanted > int(study.user_attrs.get(LIMIT_ATTR, 0)):
        study.set_user_attr(LIMIT_ATTR, wanted)


def start_tracking(study: optuna.Study, cfg: Config, tracking_uri: str | None, out: Path):
    """The study's MLflow side: its experiment and parent run (reused on resume), orphan runs closed."""
    from rankopt.search.studies import close_orphan_runs
    from rankopt.tracking import mlflow_runs

    client = mlflow_runs.client_for(tracking_uri or mlflow_runs.default_tracking_uri(out))
    exp_id = mlflow_runs.ensure_experiment(client, cfg.task.name, mlflow_runs.artifact_root(tracking_uri, out))
    tracker = mlflow_runs.StudyTracker(client, exp_id, study.study_name, base_model=portable_model_name(cfg.model.name))
    parent = tracker.start_study(study.user_attrs.get("mlflow_parent_run_id"),
                                 {"study": study.study_name, "preset": cfg.task.name,
                                  **cfg.model_dump(include={"search"})})
    study.set_user_attr("mlflow_parent_run_id", parent)
    close_orphan_runs(study, tracker)
    return tracker


@dataclass
class PreparedStudy:
    """A study ready for its trials: the resolved config, the Optuna study, where things go."""

    cfg: Config
    study: optuna.Study
    storage: str  # the storage URL, unmasked
    trials: int  # how many trials this command runs
    tracker: Any  # a StudyTracker, or None without tracking
    checkpoints: Any  # a CheckpointStore


def prepare_study(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *,
                  n_trials: int | None = None, study_name: str | None = None, storage: str | None = None,
                  tracking_uri: str | None = None, data_dir: str | None = None, out: str | Path = "runs",
                  track: bool = True) -> PreparedStudy:
    """Everything before the first trial: the checks, the study and its trial limit, the parent run.

    Bad data, model, storage or tracking URI fail here, before anything is written.
    """
    from rankopt.training.checkpoint import CheckpointStore

    cfg = resolve_config(preset, overrides, data_dir)
    if not cfg.search.space:
        raise RankoptError("the preset's search.space is empty; add dimensions such as controller.target_rank")
    check_study_name(study_name or cfg.task.name)
    check_memory(cfg, distributed.current().world)  # on a GPU: a study whose preset cannot fit stops here
    data = prepare_data(cfg)
    build_model(cfg, data.num_labels)
    out = Path(out)
    name = study_name or cfg.task.name
    on_stale = StaleTrialHandler(cfg.search)
    storage_obj = open_storage(storage, cfg.search, on_stale) if storage else None
    if track and tracking_uri:
        from rankopt.tracking import mlflow_runs

        mlflow_runs.check_reachable(tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(out)
    storage_obj = storage_obj or open_storage(url, cfg.search, on_stale)
    trials = cfg.search.n_trials if n_trials is None else n_trials
    lock = StudyLock(url, name)
    try:
        with lock:  # another tune or a worker may be joining the same study: one parent run, one config
            study = open_study(cfg, name, url, storage_obj=storage_obj)
            remember_for_workers(study, cfg, trials)
            tracker = start_tracking(study, cfg, tracking_uri, out) if track else None
            on_stale.tracker = tracker
            fail_orphaned_trials(study, on_stale)  # a killed run's trial: retried now, not after the grace period
    finally:
        lock.close()
    checkpoints = CheckpointStore(out / "checkpoints", name, cfg.search.checkpoint_every)
    return PreparedStudy(cfg, study, url, trials, tracker, checkpoints)


def run_trials(prepared: PreparedStudy, *, timeout: float | None = None, callbacks_for_trial=None,
               on_trial_end=None, within: float | None = None) -> TuneResult:
    """Run the prepared study's trials in this process, score the selected ones on the test split, close the parent run.

    The selected trials are the best (or the Pareto set) and, with ``within``, the smallest
    trial within that DELTA of the best (:func:`rankopt.search.selection.smallest_within`).
    """
    study, cfg, tracker = prepared.study, prepared.cfg, prepared.tracker
    objective = Objective(cfg, tracker, callbacks_for_trial, checkpoints=prepared.checkpoints)
    status = "FINISHED"
    try:
        if prepared.trials > 0:
            study.optimize(objective, n_trials=prepared.trials, timeout=timeout, catch=data_parallel.survivable(),
                           callbacks=[on_trial_end] if on_trial_end else None)
        # the rest (test split, plots) is rank 0's alone; not after a failure, when the others may still
        # be in the failed trial's collectives (the launcher ends them)
        data_parallel.release_followers()
        best = best_trials(study)
        smallest = smallest_within(study, within)[0] if within is not None and best else None
        # after the search, never during it: the selected trial(s) once on the held-out split
        wanted = {b.number for b in best} | ({smallest.number} if smallest else set())
        selected = [t for t in study.trials if t.number in wanted]
        scores = holdout.score_trials(study, cfg, selected, tracker.client if tracker else None,
                                      tracker.parent_run_id if tracker else None)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end_study(study, status)
    smallest_summary = summarize(smallest) if smallest is not None else None
    for summary in [*best, *([smallest_summary] if smallest_summary else [])]:
        summary.test_metric = (scores.get(summary.number) or {}).get("metrics", {}).get(cfg.task.metric)
    test_note = holdout.note(study)
    if tracker is None and test_note and test_note.startswith("split"):
        test_note = "not scored: tracking is off, so no adapter was logged to score"
    states = [t.state for t in study.trials]
    TS = optuna.trial.TrialState
    return TuneResult(study_name=study.study_name, storage=_mask(prepared.storage),
                      objectives=list(cfg.search.objectives), best=best,
                      n_complete=states.count(TS.COMPLETE), n_pruned=states.count(TS.PRUNED),
                      n_failed=states.count(TS.FAIL), n_running=states.count(TS.RUNNING),
                      parent_run_id=tracker.parent_run_id if tracker else None,
                      study=study, metric_name=cfg.task.metric, test_note=test_note, within=within,
                      smallest=smallest_summary, artifacts=_artifacts(tracker))


def _artifacts(tracker) -> str | None:
    """Where the study's experiment keeps trial artifacts, to tell the user (None without tracking)."""
    if tracker is None:
        return None
    from rankopt.tracking.mlflow_runs import artifact_folder

    return artifact_folder(tracker.client, tracker.experiment_id)


def tune(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, n_trials: int | None = None,
         timeout: float | None = None, study_name: str | None = None, storage: str | None = None,
         tracking_uri: str | None = None, data_dir: str | None = None, out: str | Path = "runs",
         track: bool = True, callbacks_for_trial=None, on_trial_end=None,
         within: float | None = None) -> TuneResult | None:
    """Run (or resume) an Optuna study over adaptive-rank fine-tunes of one preset.

    Started under ``torchrun``, every trial trains data-parallel (:mod:`rankopt.search.data_parallel`):
    rank 0 runs the study and returns the result; the other processes return None.

    ``within`` DELTA also picks (and scores on the test split) the trial with the fewest adapter
    params whose metric is within DELTA of the best: ``result.smallest``.

    Example:
        >>> import rankopt
        >>> result = rankopt.tune("demo", n_trials=2)  # doctest: +SKIP
        >>> result.best[0].metric, result.best[0].total_rank  # doctest: +SKIP
    """
    check_within(within)  # a bad DELTA fails before anything is written
    distributed.init_from_environment(resolve_config(preset, overrides, data_dir).training.device)
    prepared, cfg, checkpoints = data_parallel.set_up(
        lambda: prepare_study(preset, overrides, n_trials=n_trials, study_name=study_name, storage=storage,
                              tracking_uri=tracking_uri, data_dir=data_dir, out=out, track=track),
        lambda p: (p.cfg, p.checkpoints))
    if prepared is None:
        data_parallel.follow(cfg, checkpoints)
        return None
    return run_trials(prepared, timeout=timeout, callbacks_for_trial=callbacks_for_trial, on_trial_end=on_trial_end,
                      within=within)
