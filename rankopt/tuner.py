"""A tuning job: an Optuna study over fine-tunes, every trial logged as a nested MLflow run.

Running the same job again resumes the study in its storage: finished trials stay, the new
ones add to the count, and the sampler learns from all of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna

from rankopt.api import build_model, prepare_data, resolve_config
from rankopt.config import Config
from rankopt.errors import RankoptError
from rankopt.events import Callback
from rankopt.modeling import resolve_model_path
from rankopt.search import (OBJECTIVE_DIRECTIONS, ReportToTrial, TuneResult, best_trials, default_storage,
                            make_pruner, make_sampler, suggest, trial_config)
from rankopt.trainer import train_adapted

log = logging.getLogger(__name__)


class Objective:
    """One trial: suggest, build the trial's config, train, report; record why it ended."""

    def __init__(self, base: Config, tracker=None, callbacks_for_trial=None):
        self.base = base
        self.objectives = base.search.objectives
        self.tracker = tracker
        self.callbacks_for_trial = callbacks_for_trial or (lambda trial, cfg: [])

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        values = suggest(trial, self.base.search.space)
        try:
            cfg = trial_config(self.base, values)
            data = prepare_data(cfg)
            adapted = build_model(cfg, data.num_labels)
        except RankoptError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        callbacks: list[Callback] = [ReportToTrial(trial, cfg.task.metric, can_prune=len(self.objectives) == 1)]
        callbacks += self.callbacks_for_trial(trial, cfg)
        run_id = None
        if self.tracker is not None:
            from rankopt.tracking import MLflowLogger

            run_id = self.tracker.start_trial(trial.number, cfg.model_dump(exclude={"search"}), values)
            trial.set_user_attr("mlflow_run_id", run_id)
            callbacks.append(MLflowLogger(self.tracker.client, run_id, self.tracker.base_model,
                                          meta={"config": cfg.model_dump(), "study": self.tracker.study_name,
                                                "trial": trial.number}))
        try:
            result = train_adapted(cfg, adapted, data, callbacks)
        except optuna.TrialPruned:
            self._end(run_id, "pruned")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            self._end(run_id, "interrupted", "interrupted")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            self._end(run_id, "failed", reason)
            raise
        trial.set_user_attr("total_rank", result.total_rank)
        trial.set_user_attr("ranks", json.dumps(result.ranks))
        trial.set_user_attr("trainable_params", result.trainable_params)
        trial.set_user_attr("adapter_params", result.adapter_params)
        trial.set_user_attr("metrics", json.dumps(result.metrics))
        self._end(run_id, "complete")
        if len(self.objectives) == 1:
            return result.metric
        return result.metric, float(result.adapter_params)

    def _end(self, run_id: str | None, state: str, reason: str | None = None) -> None:
        if self.tracker is not None and run_id is not None:
            self.tracker.end_trial(run_id, state, reason)


def open_study(cfg: Config, study_name: str, storage: str) -> optuna.Study:
    """Create the study, or load it when it exists (then its objectives must match)."""
    directions = [OBJECTIVE_DIRECTIONS[o] for o in cfg.search.objectives]
    try:
        storage_obj = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
    except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server
        raise RankoptError(f"cannot open Optuna storage '{_mask(storage)}' ({str(exc).splitlines()[0]}); "
                           "pass a valid --storage URL such as sqlite:///runs/optuna.db") from None
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage_obj)}
    if study_name in existing and len(existing[study_name].directions) != len(directions):
        raise RankoptError(f"study '{study_name}' exists with {len(existing[study_name].directions)} objective(s), "
                           f"the preset asks for {len(directions)}; pick another --study name")
    n_before = existing[study_name].n_trials if study_name in existing else 0
    eval_every = cfg.training.eval_every
    study = optuna.create_study(storage=storage_obj, study_name=study_name, directions=directions,
                                load_if_exists=True,
                                sampler=make_sampler(cfg.search, cfg.training.seed + n_before,
                                                     len(directions)),
                                pruner=make_pruner(cfg.search, eval_every))
    study.set_user_attr("objectives", list(cfg.search.objectives))
    return study


def _mask(url: str) -> str:
    """Hide a password in a URL (user:secret@host -> user:***@host)."""
    import re

    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def tune(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, n_trials: int | None = None,
         timeout: float | None = None, study_name: str | None = None, storage: str | None = None,
         tracking_uri: str | None = None, data_dir: str | None = None, out: str | Path = "runs",
         track: bool = True, callbacks_for_trial=None, on_trial_end=None) -> TuneResult:
    """Run (or resume) an Optuna study over adaptive-rank fine-tunes of one preset.

    Example:
        >>> import rankopt
        >>> result = rankopt.tune("demo", n_trials=2)  # doctest: +SKIP
        >>> result.best[0].metric, result.best[0].total_rank  # doctest: +SKIP
    """
    cfg = resolve_config(preset, overrides, data_dir)
    if not cfg.search.space:
        raise RankoptError("the preset's search.space is empty; add dimensions such as controller.target_rank")
    # fail on bad data or model before anything is written
    data = prepare_data(cfg)
    build_model(cfg, data.num_labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = study_name or cfg.task.name
    study = open_study(cfg, name, storage or default_storage(out))
    tracker = None
    if track:
        from rankopt import tracking

        client = tracking.client_for(tracking_uri or tracking.default_tracking_uri(out))
        exp_id = tracking.ensure_experiment(client, cfg.task.name, out / "mlartifacts" if not tracking_uri else None)
        base = resolve_model_path(cfg.model.name)
        tracker = tracking.StudyTracker(client, exp_id, name, base_model=base)
        parent = tracker.start_study(study.user_attrs.get("mlflow_parent_run_id"),
                                     {"study": name, "preset": cfg.task.name, **cfg.model_dump(include={"search"})})
        study.set_user_attr("mlflow_parent_run_id", parent)
    objective = Objective(cfg, tracker, callbacks_for_trial)
    trials = cfg.search.n_trials if n_trials is None else n_trials
    status = "FINISHED"
    try:
        if trials > 0:
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(Exception,),
                           callbacks=[on_trial_end] if on_trial_end else None)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end_study(study, status)
    states = [t.state for t in study.trials]
    TS = optuna.trial.TrialState
    return TuneResult(study_name=name, storage=_mask(storage or default_storage(out)),
                      objectives=list(cfg.search.objectives), best=best_trials(study),
                      n_complete=states.count(TS.COMPLETE), n_pruned=states.count(TS.PRUNED),
                      n_failed=states.count(TS.FAIL), parent_run_id=tracker.parent_run_id if tracker else None,
                      study=study)
