"""Which trial a study's user gets: the best by metric, the best under a size cap, or the smallest good one.

"How small can the adapter be before quality drops?" is :func:`smallest_within`: among the
candidates (the complete trials, or the Pareto set of a two-objective study), those whose metric
is within DELTA of the best (in the metric's direction: a loss may be DELTA higher), and of them
the one with the fewest adapter parameters. ``rankopt export``, ``report`` and ``tune`` share it.
"""

from __future__ import annotations

import math

import optuna

from rankopt.errors import RankoptError

TS = optuna.trial.TrialState


def check_within(delta: float | None) -> None:
    """A DELTA is a non-negative distance in metric units (0.01 = one accuracy point)."""
    if delta is not None and (not isinstance(delta, (int, float)) or math.isnan(delta) or delta < 0):
        raise RankoptError(f"--within {delta} is not a distance: pass 0 or more, in the metric's units "
                           "(e.g. --within 0.01 for one accuracy point)")


def metric_index(study) -> tuple[int, float]:
    """(position of the task metric among the study's values, +1 when higher is better else -1)."""
    objectives = study.user_attrs.get("objectives", ["metric"])
    mi = objectives.index("metric") if "metric" in objectives else 0
    return mi, 1.0 if study.directions[mi] == optuna.study.StudyDirection.MAXIMIZE else -1.0


def candidates(study) -> list:
    """Complete trials (one objective) or the Pareto set (two): the pool every choice picks from."""
    if len(study.directions) == 1:
        return [t for t in study.trials if t.state == TS.COMPLETE]
    return list(study.best_trials)


def smallest_within(study, delta: float):
    """(the trial with the fewest adapter params within ``delta`` of the best, the best) among the candidates.

    Ties in size go to the better metric, then the earlier trial. Trials that never recorded
    their size count as infinitely large.
    """
    check_within(delta)
    pool = candidates(study)
    if not pool:
        raise RankoptError(f"study '{study.study_name}' has no complete trial yet; run `rankopt tune` until one "
                           "finishes")
    mi, sign = metric_index(study)
    best = max(pool, key=lambda t: (sign * t.values[mi], -t.number))
    good = [t for t in pool if sign * (best.values[mi] - t.values[mi]) <= delta + 1e-12]
    chosen = min(good, key=lambda t: (t.user_attrs.get("adapter_params", math.inf), -sign * t.values[mi], t.number))
    return chosen, best


def select_trial(study, number: int | None = None, max_params: int | None = None, within: float | None = None):
    """The trial to export, notes for the user, and why it was chosen (for the model card).

    ``number`` picks one (it must be complete). Otherwise the best by the task metric among the
    candidates: all complete trials for one objective (Optuna's ``best_trial`` unless
    ``max_params`` narrows them), the Pareto front for two; ``max_params`` keeps those with
    ``adapter_params <= max_params`` and falls back to the best of all, with a note, when none is small enough.
    ``within`` takes the smallest good one instead (:func:`smallest_within`).
    """
    name = study.study_name
    if number is not None:
        match = [t for t in study.trials if t.number == number]
        if not match:
            raise RankoptError(f"study '{name}' has no trial {number} (it has {len(study.trials)} trials, "
                               "numbered from 0); check --trial")
        if match[0].state != TS.COMPLETE:
            raise RankoptError(f"trial {number} of study '{name}' is {match[0].state.name.lower()}; only complete "
                               "trials have a final adapter: pick a complete one or omit --trial for the best")
        return match[0], [], "chosen with --trial"
    complete = [t for t in study.trials if t.state == TS.COMPLETE]
    if not complete:
        raise RankoptError(f"study '{name}' has no complete trial yet; run `rankopt tune` until one finishes")
    mi, sign = metric_index(study)
    single = len(study.directions) == 1
    pool = f"{len(complete)} complete trials" if single else f"the {len(study.best_trials)} Pareto-optimal trials"
    if within is not None:
        if max_params is not None:
            raise RankoptError("pass --within or --max-params, not both")
        chosen, best = smallest_within(study, within)
        return chosen, [], (f"fewest adapter params of {pool} within {within:g} of the best "
                            f"({best.values[mi]:.4f}, trial {best.number})")
    if single and max_params is None:
        return study.best_trial, [], f"best metric of {pool}"
    chosen_from = candidates(study)
    notes, reason = [], f"best metric of {pool}"
    if max_params is not None:
        small = [t for t in chosen_from if t.user_attrs.get("adapter_params", float("inf")) <= max_params]
        if small:
            chosen_from, reason = small, f"best metric of {pool} with at most {max_params:,} adapter params"
        else:
            notes.append(f"no {'complete' if single else 'Pareto'} trial has at most {max_params:,} adapter "
                         "params; exporting the best by metric instead")
    return max(chosen_from, key=lambda t: sign * t.values[mi]), notes, reason
