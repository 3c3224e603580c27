"""rankopt.search.trials without any training: samplers and pruners by name, the search space, the
report / prune bridge, and how best trials are picked, driven through Optuna's own
``study.ask()`` / ``trial.report()`` / ``study.tell()`` and ``FixedTrial``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from rankopt.config import Config, Distribution, SearchConfig
from rankopt.errors import RankoptError
from rankopt.search.trials import (ReportToTrial, TrialSummary, best_trials, default_storage,
                            make_pruner, make_sampler, suggest, summarize, trial_config)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def test_every_allowed_name_is_covered():
    """The tables above list exactly the names the preset schema accepts."""
    fields = SearchConfig.model_fields
    assert set(fields["sampler"].annotation.__args__) == set(SAMPLERS)
    assert set(fields["pruner"].annotation.__args__) == set(PRUNERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_make_sampler_by_name(name):
    sampler = make_sampler(SearchConfig(sampler=name), seed=3, n_objectives=1)
    assert type(sampler) is SAMPLERS[name]


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "gp"])
def test_samplers_for_two_objectives(name):
    sampler = make_sampler(SearchConfig(sampler=name, objectives=["metric", "params"]), seed=0, n_objectives=2)
    assert type(sampler) is SAMPLERS[name]


def test_cmaes_refuses_two_objectives():
    with pytest.raises(RankoptError, match="cmaes.*nsga2"):
        make_sampler(SearchConfig(sampler="cmaes", objectives=["metric", "params"]), seed=0, n_objectives=2)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError):
        SearchConfig(sampler="grid")
    with pytest.raises(ValueError):
        SearchConfig(pruner="patient")
    # a config built without validation still cannot smuggle a name through
    with pytest.raises(RankoptError, match="unknown sampler"):
        make_sampler(SearchConfig.model_construct(sampler="grid", startup_trials=0), seed=0, n_objectives=1)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_make_pruner_by_name(name):
    assert type(make_pruner(SearchConfig(pruner=name), eval_steps=5)) is PRUNERS[name]


def _run(study: optuna.Study, reports: dict[int, float], final: float | None = None) -> bool:
    """Ask a trial, report ``reports``; tell it complete (``final``) or pruned; True if it was pruned."""
    trial = study.ask()
    for step, value in reports.items():
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return True
    study.tell(trial, final if final is not None else list(reports.values())[-1])
    return False


@pytest.mark.parametrize("startup", [0, 2])
def test_median_pruner_waits_for_startup_trials(startup):
    """The first ``startup_trials`` trials run to the end however bad they are."""
    pruner = make_pruner(SearchConfig(pruner="median", startup_trials=startup), eval_steps=5)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    assert not _run(study, {5: 0.9, 10: 0.95})
    pruned = _run(study, {5: 0.1, 10: 0.1})
    assert pruned is (startup == 0)


def test_median_pruner_waits_for_prune_after_of_the_steps():
    """Near-chance early evaluations never stop a trial; from ``prune_after`` x steps on they can."""
    pruner = make_pruner(SearchConfig(pruner="median", startup_trials=0, prune_after=0.25), eval_steps=5,
                         total_steps=40)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    _run(study, {5: 0.30, 10: 0.9, 20: 0.95})
    trial = study.ask()
    trial.report(0.29, 5)  # a hair below the median at the first evaluation: noise, not a verdict
    assert not trial.should_prune()
    trial.report(0.2, 10)  # step 10 = 25 % of 40: the pruner may act
    assert trial.should_prune()


def test_successive_halving_first_rung_is_one_evaluation():
    """``min_resource`` is the evaluation interval: the first rung is the first evaluation."""
    pruner = make_pruner(SearchConfig(pruner="successive_halving"), eval_steps=5)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    assert not _run(study, {5: 0.9, 10: 0.9, 20: 0.9})
    trial = study.ask()
    trial.report(0.1, 4)  # below the first rung: never pruned
    assert not trial.should_prune()
    trial.report(0.1, 5)
    assert trial.should_prune()


def test_nop_pruner_never_prunes():
    study = optuna.create_study(direction="maximize", pruner=make_pruner(SearchConfig(pruner="none"), 5))
    _run(study, {5: 0.9})
    assert not _run(study, {5: 0.0, 10: 0.0})


SPACE = {
    "controller.target_rank": Distribution(type="float", low=1.0, high=8.0),
    "training.lr": Distribution(type="float", low=1e-4, high=1e-1, log=True),
    "controller.max_grow": Distribution(type="int", low=0, high=4, step=2),
    "adapter.init_rank": Distribution(type="int", low=2, high=16, log=True),
    "training.weight_decay": Distribution(type="float", low=0.0, high=0.1, step=0.05),
    "controller.importance": Distribution(type="categorical", choices=["sensitivity", "energy"]),
}


def test_suggest_turns_each_dimension_into_an_optuna_distribution():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        values = suggest(trial, SPACE)
        assert set(values) == set(SPACE)
        assert 1.0 <= values["controller.target_rank"] <= 8.0
        assert 1e-4 <= values["training.lr"] <= 1e-1
        assert values["controller.max_grow"] in (0, 2, 4)
        assert isinstance(values["adapter.init_rank"], int) and 2 <= values["adapter.init_rank"] <= 16
        assert any(math.isclose(values["training.weight_decay"], v, abs_tol=1e-12) for v in (0.0, 0.05, 0.1))
        assert values["controller.importance"] in ("sensitivity", "energy")
        study.tell(trial, 0.0)
    dists = study.trials[0].distributions
    assert dists["controller.target_rank"] == FloatDistribution(1.0, 8.0)
    assert dists["training.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["controller.max_grow"] == IntDistribution(0, 4, step=2)
    assert dists["adapter.init_rank"] == IntDistribution(2, 16, log=True)
    assert dists["training.weight_decay"] == FloatDistribution(0.0, 0.1, step=0.05)
    assert dists["controller.importance"] == CategoricalDistribution(["sensitivity", "energy"])


def test_suggest_with_fixed_trial():
    fixed = {"controller.target_rank": 2.5, "training.lr": 3e-3, "controller.max_grow": 2, "adapter.init_rank": 4,
             "training.weight_decay": 0.05, "controller.importance": "energy"}
    assert suggest(optuna.trial.FixedTrial(fixed), SPACE) == fixed


def test_report_to_trial_prunes_a_bad_trial():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
    good = study.ask()
    ReportToTrial(good, "accuracy", can_prune=True).on_eval(5, {"accuracy": 0.9, "loss": 0.3})
    study.tell(good, 0.9)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="step 5 with accuracy=0.1000"):
        ReportToTrial(bad, "accuracy", can_prune=True).on_eval(5, {"accuracy": 0.1, "loss": 2.0})
    study.tell(bad, state=TrialState.PRUNED)
    assert study.trials[1].intermediate_values == {5: 0.1}
    assert study.trials[1].state == TrialState.PRUNED


def test_report_to_trial_never_prunes_the_final_evaluation():
    """A run that reached its last step is complete: a bad final score is a bad result, not a pruned trial."""
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
    good = study.ask()
    for step in (5, 10):
        ReportToTrial(good, "loss", can_prune=True, final_step=10).on_eval(step, {"loss": 0.3})
    study.tell(good, 0.3)
    early = study.ask()
    with pytest.raises(optuna.TrialPruned):  # lower loss is better: 2.0 at step 5 is pruned
        ReportToTrial(early, "loss", can_prune=True, final_step=10).on_eval(5, {"loss": 2.0})
    study.tell(early, state=TrialState.PRUNED)
    finished = study.ask()
    ReportToTrial(finished, "loss", can_prune=True, final_step=10).on_eval(10, {"loss": 2.0})
    assert finished.should_prune()  # what the pruner alone would have done at the last step
    study.tell(finished, 2.0)
    assert study.trials[2].state == TrialState.COMPLETE


def test_report_to_trial_is_silent_for_two_objectives():
    """Optuna cannot prune on two objectives (report raises there), so nothing is reported."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    ReportToTrial(trial, "accuracy", can_prune=False).on_eval(5, {"accuracy": 0.1})
    study.tell(trial, [0.1, 100.0])
    assert study.trials[0].intermediate_values == {}


def test_fixed_trial_never_prunes():
    ReportToTrial(optuna.trial.FixedTrial({}), "accuracy", can_prune=True).on_eval(5, {"accuracy": 0.0})


def _add(study: optuna.Study, number_values: list, state=TrialState.COMPLETE, **attrs) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=state, values=number_values if state == TrialState.COMPLETE else None,
        params={"controller.target_rank": 2.0}, distributions={"controller.target_rank": FloatDistribution(1, 8)},
        user_attrs=attrs))


def test_best_trial_of_one_objective():
    study = optuna.create_study(direction="maximize")
    _add(study, [0.7], total_rank=24, ranks=json.dumps({"a": 1, "b": 3, "c": 2}), trainable_params=99,
         mlflow_run_id="r0")
    _add(study, [0.9], total_rank=12, ranks=json.dumps({"a": 6, "b": 1, "c": 2}), mlflow_run_id="r1")
    _add(study, [], state=TrialState.FAIL, fail_reason="boom")
    [best] = best_trials(study)
    assert (best.number, best.metric, best.total_rank, best.run_id) == (1, 0.9, 12, "r1")
    assert best.state == "complete"
    assert best.ranks == {"a": 6, "b": 1, "c": 2}
    assert best.rank_summary() == "min 1 / median 2 / max 6"


def test_pareto_set_of_two_objectives_best_metric_first():
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [(0.80, 1000.0), (0.90, 3000.0), (0.70, 500.0), (0.75, 2000.0), (0.85, 3000.0)]
    for values in points:
        _add(study, list(values))
    best = best_trials(study)
    assert [b.number for b in best] == [1, 0, 2]  # 3 is dominated by 0, 4 by 1
    assert [b.metric for b in best] == [0.90, 0.80, 0.70]


def test_no_best_trial_without_a_complete_one():
    study = optuna.create_study(direction="maximize")
    assert best_trials(study) == []
    _add(study, [], state=TrialState.PRUNED)
    _add(study, [], state=TrialState.FAIL)
    assert best_trials(study) == []


def test_summary_of_a_trial_without_ranks():
    study = optuna.create_study()
    _add(study, [], state=TrialState.FAIL, fail_reason="x")
    summary = summarize(study.trials[0])
    assert summary == TrialSummary(number=0, state="fail", values=None, params={"controller.target_rank": 2.0},
                                   total_rank=None)
    assert summary.metric is None and summary.rank_summary() == "-"


def test_default_storage_is_sqlite_under_out(tmp_path):
    url = default_storage(tmp_path / "runs")
    assert url == f"sqlite:///{(tmp_path / 'runs' / 'optuna.db').resolve()}"


def _base_config(tmp_path: Path) -> Config:
    return Config.model_validate({
        "task": {"name": "t", "data_dir": str(tmp_path), "text_columns": ["text"]},
        "model": {"name": str(tmp_path)},
        "adapter": {"init_rank": 4},
        "controller": {"target_rank": 2, "max_rank": 8},
        "search": {"space": {"controller.target_rank": {"type": "float", "low": 1, "high": 8}}},
    })


def test_trial_config_applies_the_suggestions(tmp_path):
    base = _base_config(tmp_path)
    cfg = trial_config(base, {"controller.target_rank": 6.5, "training.lr": 0.02})
    assert cfg.controller.target_rank == 6.5 and cfg.training.lr == 0.02
    assert base.controller.target_rank == 2  # the preset itself is untouched


def test_trial_config_rejects_an_impossible_trial(tmp_path):
    with pytest.raises(RankoptError, match=r"^trial: .*target_rank"):
        trial_config(_base_config(tmp_path), {"controller.target_rank": 12.0})


def test_search_space_keys_must_exist(tmp_path):
    raw = _base_config(tmp_path).model_dump()
    raw["search"]["space"] = {"training.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}
    with pytest.raises(ValueError, match="unknown config key 'training.lrr'"):
        Config.model_validate(raw)
