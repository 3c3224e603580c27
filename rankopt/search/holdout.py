"""The honest final score: the selected trial(s) scored once on the held-out test split, after the study.

The validation metric chose the trial, so it flatters it; the test split (``task.test_split``) is
never looked at during the search. A selected trial's model is recovered from what its MLflow run
logged, the PEFT adapter and the task head (``adapter/``), folded into a fresh copy of the base
model: nothing is retrained. Scores are kept on the study (user attribute ``test_scores``) so a
trial is scored once, whoever asks again (a resumed study, ``rankopt export``), and each is logged
as ``test_<metric>`` on the trial's run, and for the best trial on the study's parent run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rankopt.config import Config

log = logging.getLogger(__name__)
SCORES_ATTR = "test_scores"  # study user attr: {"<trial number>": {"split", "examples", "metrics"}}
NOTE_ATTR = "test_split"  # study user attr: which split scored them, or why there is none


def recorded(study) -> dict[int, dict[str, Any]]:
    """Test scores already recorded on the study, by trial number."""
    return {int(k): v for k, v in (study.user_attrs.get(SCORES_ATTR) or {}).items()}


def note(study) -> str | None:
    """Which split the study's test scores come from, or why it has none (None: never checked)."""
    return study.user_attrs.get(NOTE_ATTR)


def score_of(study, number: int, metric: str) -> float | None:
    """Trial ``number``'s recorded test ``metric``, or None when it was not scored."""
    entry = recorded(study).get(number)
    return entry["metrics"].get(metric) if entry else None


def score_adapter(cfg: Config, data, folder: Path) -> dict[str, float]:
    """Every task metric of the adapter in ``folder`` on ``data.test``: base model + adapter folded in."""
    from rankopt.adapters.peft_format import merge_adapter, read_adapter
    from rankopt.tasks.modeling import load_pretrained
    from rankopt.training.trainer import evaluate

    config, state, _ = read_adapter(folder)
    model = load_pretrained(cfg.model, data.num_labels, cfg.task.type)
    merge_adapter(model, config, state)  # exact to float precision (tests/test_export.py)
    model.to(cfg.training.device)
    # evaluate() reads only ``.model`` of an AdaptedModel; a merged model has no adapter layers left
    return evaluate(SimpleNamespace(model=model), dataclasses.replace(data, eval=data.test), cfg.task.type,
                    cfg.training.eval_batch_size, cfg.training.device)


def score_trials(study, base: Config, trials, client, parent_run_id: str | None = None) -> dict[int, dict[str, Any]]:
    """Score each of ``trials`` not scored yet on the test split, record and log it; returns all recorded.

    ``trials`` are complete FrozenTrials; each one's config is the preset plus its parameters (a
    trial may have searched, say, ``task.max_length``). Without a test split nothing is scored and
    the study notes why; without MLflow (``client`` None) there is no logged adapter to score.
    """
    from rankopt.search.trials import best_trials, trial_config
    from rankopt.training.setup import prepare_data

    scores = recorded(study)
    data = prepare_data(base)
    study.set_user_attr(NOTE_ATTR, data.test_note)
    if parent_run_id and client is not None:
        client.set_tag(parent_run_id, "rankopt.test_split", data.test_note)
    if data.test is None or client is None:
        return scores
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.number in scores or not run_id:
            continue
        cfg = trial_config(base, trial.params)
        trial_data = prepare_data(cfg)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(client.download_artifacts(run_id, "adapter", tmp))
                metrics = score_adapter(cfg, trial_data, folder)
        except Exception as exc:  # noqa: BLE001 - the study's results stand; only this score is missing
            log.warning("trial %d was not scored on the test split (%s: %s)", trial.number, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            continue
        scores[trial.number] = {"split": cfg.task.test_split, "examples": len(trial_data.test), "metrics": metrics}
        study.set_user_attr(SCORES_ATTR, {str(k): v for k, v in sorted(scores.items())})
        _log(client, run_id, metrics)
        client.set_tag(run_id, "rankopt.test_split", cfg.task.test_split)
    best = best_trials(study)
    if parent_run_id and best and best[0].number in scores:  # the parent run speaks for the best trial
        _log(client, parent_run_id, scores[best[0].number]["metrics"])
    return scores


def _log(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), now, 0) for k, v in metrics.items()])
