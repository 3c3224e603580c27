"""Optuna searches the global rank budget (and whatever else the preset's ``search.space`` names).

One trial = one fine-tune whose config is the preset plus the trial's suggestions (dotted
keys). The trial objective turns the trainer's ``on_eval`` events into ``trial.report`` /
``should_prune``; tracking is a separate listener. The data is tokenized and the base
weights are loaded once per process (see :func:`rankopt.training.setup.prepare_data`,
:func:`rankopt.tasks.modeling.load_pretrained`), not once per trial.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from rankopt.config import Config, Distribution, SearchConfig, build_config
from rankopt.errors import RankoptError
from rankopt.training.events import Callback


def objective_directions(cfg: Config) -> list[str]:
    """Optuna directions of the preset's objectives: the task metric's own (loss: down), params down."""
    from rankopt.tasks.metrics import HIGHER_IS_BETTER

    metric = "maximize" if HIGHER_IS_BETTER[cfg.task.metric] else "minimize"
    return [metric if o == "metric" else "minimize" for o in cfg.search.objectives]


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'optuna.db').resolve()}"


def make_sampler(search: SearchConfig, seed: int, n_objectives: int,
                 constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    """Optuna's own samplers, by the name the preset gives.

    ``constant_liar``: several workers share the study; TPE then treats running trials as bad
    results so that concurrent workers spread out instead of proposing the same point.
    """
    name = search.sampler
    if name == "tpe":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is 'experimental' in Optuna
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, search.startup_trials),
                                              multivariate=True, constant_liar=constant_liar)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "cmaes":
        if n_objectives > 1:
            raise RankoptError("search.sampler=cmaes handles one objective; use nsga2 or tpe for two")
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=search.startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(1, search.startup_trials))
    raise RankoptError(f"unknown sampler {name!r}")


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: a fixed mix of ``training.seed`` and the trial's number."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"rankopt:{seed}:{number}".encode()).digest()[:4], "big")


class SeededPerTrial(optuna.samplers.BaseSampler):
    """The preset's sampler, seeded afresh for every trial from (``training.seed``, trial number).

    A study numbers its trials once, so processes sharing it (two ``rankopt tune`` on one study,
    workers) draw from different streams: they never propose the same point for having the same
    seed. One process alone stays reproducible (trial k always draws from the same seed), and a
    resumed study draws new points. Optuna's samplers keep their history in the study, not in
    the sampler, so a fresh one per trial loses nothing but caches.

    ``on_new_trial(study, trial)`` runs first, as soon as Optuna has made the trial (the earliest
    moment rankopt's code sees it): :func:`rankopt.search.owners.mark` records the process there.
    """

    def __init__(self, make, seed: int, on_new_trial=None):
        self._make, self._seed, self._on_new_trial = make, seed, on_new_trial
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        if self._on_new_trial is not None:
            self._on_new_trial(study, trial)
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_pruner(search: SearchConfig, eval_steps: int, total_steps: int | None = None) -> optuna.pruners.BasePruner:
    """Optuna's own pruners, by name; the first ``startup_trials`` trials always run to the end.

    With ``total_steps``, no trial is stopped before ``search.prune_after`` of its steps: at the
    first evaluations every run is still near chance (the learning-rate warmup), and a median
    taken there stops good configurations on noise.
    """
    name = search.pruner
    warmup = int(search.prune_after * total_steps) if total_steps else 0
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=warmup)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(eval_steps, warmup))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(eval_steps, warmup))
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, Distribution]) -> dict[str, Any]:
    """Draw one value per search dimension; keys are dotted config paths."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if dist.type == "categorical":
            values[key] = trial.suggest_categorical(key, dist.choices)
        elif dist.type == "int":
            values[key] = trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1),
                                            log=dist.log)
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


class ReportToTrial(Callback):
    """Feeds each evaluation to Optuna and stops the run when the pruner says so.

    The evaluation at ``final_step`` is reported but never pruned: the run has been paid for in
    full by then, and a finished trial belongs among the complete ones.
    """

    def __init__(self, trial: optuna.Trial, metric: str, can_prune: bool, final_step: int | None = None):
        self.trial, self.metric, self.can_prune, self.final_step = trial, metric, can_prune, final_step

    def on_train_start(self, info: dict[str, Any]) -> None:
        # a retried trial resumed from a checkpoint: the pruner sees the evaluations made before it
        if self.can_prune:
            for step, metrics in info.get("eval_history") or []:
                self.trial.report(metrics[self.metric], step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.can_prune:
            return
        self.trial.report(metrics[self.metric], step)
        if step != self.final_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {self.metric}={metrics[self.metric]:.4f}")


@dataclass
class TrialSummary:
    """One finished trial, as the results table shows it."""

    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    total_rank: int | None
    ranks: dict[str, int] = field(default_factory=dict)
    trainable_params: int | None = None
    run_id: str | None = None
    adapter_params: int | None = None
    test_metric: float | None = None  # on the held-out test split, scored once after the study

    @property
    def metric(self) -> float | None:
        return self.values[0] if self.values else None

    def rank_summary(self) -> str:
        if not self.ranks:
            return "-"
        r = sorted(self.ranks.values())
        return f"min {r[0]} / median {statistics.median(r):g} / max {r[-1]}"


@dataclass
class TuneResult:
    """What a tuning job returns: the study, its best trial(s), and where they were logged."""

    study_name: str
    storage: str
    objectives: list[str]
    best: list[TrialSummary]
    n_complete: int
    n_pruned: int
    n_failed: int
    parent_run_id: str | None
    study: optuna.Study = field(repr=False, default=None)
    metric_name: str = "metric"
    test_note: str | None = None  # which split scored the best trial(s), or why none did
    within: float | None = None  # the DELTA of ``smallest``
    smallest: TrialSummary | None = None  # fewest adapter params within ``within`` of the best
    artifacts: str | None = None  # where the study's MLflow experiment keeps its files
    n_running: int = 0  # trials other processes are running now (a shared study)


def summarize(trial: optuna.trial.FrozenTrial) -> TrialSummary:
    attrs = trial.user_attrs
    return TrialSummary(number=trial.number, state=trial.state.name.lower(), values=trial.values,
                        params=trial.params, total_rank=attrs.get("total_rank"),
                        ranks=json.loads(attrs["ranks"]) if "ranks" in attrs else {},
                        trainable_params=attrs.get("trainable_params"), run_id=attrs.get("mlflow_run_id"),
                        adapter_params=attrs.get("adapter_params"))


def best_trials(study: optuna.Study) -> list[TrialSummary]:
    """The best trial (one objective) or the Pareto set (two), best metric first."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    if len(study.directions) == 1:
        return [summarize(study.best_trial)]
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted((summarize(t) for t in study.best_trials), key=lambda s: sign * (s.metric or -sign * math.inf))


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The preset with one trial's suggestions applied and validated."""
    return build_config(base.model_dump(), values, origin="trial")
