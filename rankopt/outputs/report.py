"""A study's report: one self-contained HTML page with its figures, for people who never open MLflow.

    study (storage) -> best trial (:func:`rankopt.outputs.export.select_trial`) -> its run's
    ``rank_history.json`` (MLflow) -> five PNGs -> ``report.html`` with each PNG inlined as a
    ``data:`` URI -> the out folder (written whole or not at all) -> artifacts ``report/`` of the
    study's parent MLflow run

The page opens offline from the single .html file (mail it, attach it to a ticket); the PNGs sit
beside it for slides. The study is found as ``rankopt export`` finds it (same options, same
defaults), and the out folder defaults to ``reports/STUDY`` in the tuning job's runs folder, beside
``optuna.db`` and ``mlflow.db``. Every check a user can fail runs before anything is written.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankopt.errors import RankoptError
from rankopt.outputs.export import require_sqlite_file, runs_folder, load_study, select_trial
from rankopt.search import holdout
from rankopt.search.selection import check_within
from rankopt.tracking.urls import mask_url

HTML_NAME = "report.html"
FIGURES = {  # file -> caption, in page order
    "rank_heatmap.png": "Rank allocation of the best trial: each row a layer, each column a reallocation step.",
    "rank_by_layer_type.png": "Final mean rank per layer type across complete trials: where the budget goes.",
    "metric_vs_budget.png": "Metric against total rank; hollow points are pruned trials (budget, last reported "
                            "metric).",
    "pareto_front.png": "Metric against adapter size; the orange trials are not beaten by a smaller, better one.",
    "optimization_history.png": "The metric of each trial in order, and the best so far.",
}


@dataclass
class TrialRow:
    """One trial as the report shows it."""

    number: int
    state: str
    metric: float | None  # final for complete trials, last reported for pruned ones
    total_rank: int | None
    budget: int | None  # the target total rank the controller worked toward
    adapter_params: int | None
    trainable_params: int | None
    ranks: dict[str, int]
    params: dict[str, Any]
    test_metric: float | None = None  # on the held-out test split, for the trials scored after the study


@dataclass
class ReportResult:
    """What :func:`report` wrote, and where it logged it."""

    html: Path
    study: str
    best_trial: int
    figures: list[str]
    counts: dict[str, int]
    run_id: str | None = None  # the parent MLflow run that holds ``report/``
    notes: list[str] = field(default_factory=list)
    smallest_trial: int | None = None  # with ``within``: the fewest adapter params within DELTA of the best


def report(study: str, storage: str | None = None, tracking_uri: str | None = None, out: str | Path | None = None,
           force: bool = False, within: float | None = None) -> ReportResult:
    """Write ``report.html`` (figures inlined) and its PNGs to ``out`` and log them to the study's MLflow run.

    ``within`` DELTA marks the trial ``rankopt export --within DELTA`` would take.

    Example:
        >>> import rankopt
        >>> rankopt.report("demo").html  # doctest: +SKIP
        PosixPath('runs/reports/demo/report.html')
    """
    from rankopt.adapters.atomic import check_target
    from rankopt.search.trials import default_storage
    from rankopt.tracking.mlflow_runs import default_tracking_uri

    out = Path(out) if out is not None else runs_folder(storage) / "reports" / _folder_name(study)
    check_target(out, force)  # a folder rankopt did not write is refused before anything is done
    check_within(within)
    found = load_study(study, storage or default_storage(runs_folder(None)))
    best, _, _ = select_trial(found)
    smallest = select_trial(found, within=within)[0] if within is not None else None
    uri = tracking_uri or default_tracking_uri(runs_folder(storage))
    notes: list[str] = []
    client, parent = _tracking(found, best, uri, notes)
    history = _rank_history(client, best, notes)
    rows = [_row(t, found) for t in found.trials]
    for row in rows:
        row.test_metric = holdout.score_of(found, row.number, _metric_name(found))
    counts = {s: sum(r.state == s for r in rows) for s in ("complete", "pruned", "failed", "running", "waiting")}
    from rankopt.adapters.atomic import MARKER, atomic_folder

    with atomic_folder(out, force=force) as dest:
        figures = _figures(found, rows, best.number, history, dest, notes)
        page = _page(found, rows, best, counts, {name: dest / name for name in figures}, parent, notes,
                     (smallest, within) if smallest is not None else None)
        (dest / HTML_NAME).write_text(page, encoding="utf-8")
    if client is not None and parent is not None:
        for path in sorted(out.iterdir()):
            if path.name != MARKER:  # the marker is for --force on this disk, not for MLflow
                client.log_artifact(parent, str(path), "report")
    return ReportResult(html=out / HTML_NAME, study=study, best_trial=best.number, figures=figures, counts=counts,
                        run_id=parent, notes=notes, smallest_trial=smallest.number if smallest is not None else None)


def _folder_name(study: str) -> str:
    """The study name as one safe folder name: no separators, no leading dots ('..' must not climb out)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", study).lstrip(".") or "study"


def _tracking(study, best, uri: str, notes: list[str]):
    """(client, parent run id), both None when the study was tuned without MLflow; checks the store answers."""
    from rankopt.tracking import mlflow_runs

    parent = study.user_attrs.get("mlflow_parent_run_id")
    if not parent and not best.user_attrs.get("mlflow_run_id"):
        notes.append(f"study '{study.study_name}' has no MLflow runs (tuned without tracking): the report has "
                     "no rank heatmap and is not logged")
        return None, None
    require_sqlite_file(uri, "MLflow tracking store", "--tracking-uri")
    mlflow_runs.check_reachable(uri)
    client = mlflow_runs.client_for(uri)
    if parent:
        try:
            client.get_run(parent)
        except Exception:  # noqa: BLE001 - MlflowException for a run this store does not hold
            raise RankoptError(f"the MLflow run '{parent}' of study '{study.study_name}' is not in "
                               f"{mask_url(uri)}; pass the --tracking-uri that `rankopt tune` used") from None
    else:
        notes.append("the study has no parent MLflow run: the report is not logged")
    return client, parent or None


def _rank_history(client, best, notes: list[str]):
    """The best trial's rank allocations (a list of RankEvent), or None when its run has none."""
    from rankopt.training.events import RankEvent

    run_id = best.user_attrs.get("mlflow_run_id")
    if client is None or not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "rank_history.json", tmp)
            events = [RankEvent(step=e["step"], budget=e["budget"], ranks=dict(e["ranks"]))
                      for e in json.loads(Path(local).read_text())]
        except Exception:  # noqa: BLE001 - an older run, artifacts kept elsewhere, a damaged file
            notes.append(f"trial {best.number}'s MLflow run has no readable rank_history.json: no rank heatmap")
            return None
    return events or None


def _row(trial, study) -> TrialRow:
    attrs = trial.user_attrs
    ranks = json.loads(attrs["ranks"]) if "ranks" in attrs else {}
    metric = trial.values[0] if trial.values else None
    if metric is None and trial.intermediate_values:
        metric = trial.intermediate_values[max(trial.intermediate_values)]
    state = {"fail": "failed"}.get(trial.state.name.lower(), trial.state.name.lower())
    return TrialRow(number=trial.number, state=state, metric=metric,
                    total_rank=attrs.get("total_rank"), budget=_budget(trial, study, len(ranks)),
                    adapter_params=attrs.get("adapter_params"), trainable_params=attrs.get("trainable_params"),
                    ranks=ranks, params=dict(trial.params))


def _budget(trial, study, n_layers: int) -> int | None:
    """target_rank x layers, as the controller computes it; layers counted on any complete trial."""
    target = trial.params.get("controller.target_rank")
    if target is None:
        target = ((study.user_attrs.get("config") or {}).get("controller") or {}).get("target_rank")
    if not n_layers:
        n_layers = max((len(json.loads(t.user_attrs["ranks"])) for t in study.trials if "ranks" in t.user_attrs),
                       default=0)
    return round(target * n_layers) if target is not None and n_layers else None


def layer_type(name: str, targets: list[str] | None) -> str:
    """The target-module suffix a layer was adapted for: the longest one of ``targets`` it ends with.

    ``bert.encoder.layer.0.attention.output.dense`` -> ``attention.output.dense`` (not ``output.dense``).
    Without a match (``all-linear``), the name after the block number: ``attention.self.query``.
    """
    matches = [t for t in targets or [] if name == t or name.endswith("." + t)]
    if matches:
        return max(matches, key=len)
    parts = name.split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbers[-1] + 1:]) if numbers and numbers[-1] < len(parts) - 1 else parts[-1]


def non_dominated(points: list[tuple[int, float, float]], maximize: bool = True) -> set[int]:
    """Numbers of the points (number, size, metric) that no other point beats on both: smaller and better."""
    sign = 1.0 if maximize else -1.0

    def beats(a, b) -> bool:
        return a[1] <= b[1] and sign * a[2] >= sign * b[2] and (a[1] < b[1] or sign * a[2] > sign * b[2])

    return {p[0] for p in points if not any(beats(q, p) for q in points)}


def _figures(study, rows: list[TrialRow], best: int, history, folder: Path, notes: list[str]) -> list[str]:
    """Draw the report's PNGs into ``folder``; returns their file names in page order."""
    from rankopt.figures import study_plots
    from rankopt.figures.rank_plots import rank_heatmap

    metric = _metric_name(study)
    complete = [r for r in rows if r.state == "complete"]
    if history:
        rank_heatmap(history, folder / "rank_heatmap.png", title=f"rank allocation of trial {best}")
    cfg = study.user_attrs.get("config") or {}
    targets = (cfg.get("model") or {}).get("target_modules")
    targets = targets if isinstance(targets, list) else None
    per_trial = {r.number: _mean_by_type(r.ranks, targets) for r in complete if r.ranks}
    if per_trial:
        study_plots.rank_by_layer_type(per_trial, folder / "rank_by_layer_type.png", best)
    else:
        notes.append("no complete trial records its final ranks: no rank-per-layer-type figure")
    points = [(r.number, r.total_rank, r.metric, False) for r in complete if r.total_rank is not None]
    points += [(r.number, r.budget, r.metric, True) for r in rows
               if r.state == "pruned" and r.budget is not None and r.metric is not None]
    if points:
        study_plots.metric_vs_budget(points, folder / "metric_vs_budget.png", metric, best)
    sized = [(r.number, r.adapter_params, r.metric) for r in complete if r.adapter_params is not None]
    if sized:
        if len(study.directions) > 1:
            front = {t.number for t in study.best_trials}
        else:
            front = non_dominated(sized, maximize=study.direction.name == "MAXIMIZE")
        study_plots.pareto_front(sized, front, folder / "pareto_front.png", metric, best)
    study_plots.optimization_history(study, folder / "optimization_history.png", metric)
    return [name for name in FIGURES if (folder / name).is_file()]


def _mean_by_type(ranks: dict[str, int], targets: list[str] | None) -> dict[str, float]:
    groups: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        groups.setdefault(layer_type(name, targets), []).append(rank)
    return {kind: sum(values) / len(values) for kind, values in groups.items()}


def _metric_name(study) -> str:
    return ((study.user_attrs.get("config") or {}).get("task") or {}).get("metric") or "metric"


def _page(study, rows: list[TrialRow], best, counts: dict[str, int], figures: dict[str, Path],
          parent: str | None, notes: list[str], smallest=None) -> str:
    """The HTML, every value escaped by Jinja's autoescape, every figure a base64 data URI."""
    import jinja2

    best_row = next(r for r in rows if r.number == best.number)
    shown = [f"{n} {state}" for state, n in counts.items() if n or state in ("complete", "pruned", "failed")]
    summary = [("study", study.study_name),
               ("trials", ", ".join(shown)),
               ("best trial", str(best.number)),
               (f"{_metric_name(study)} (validation, chose the trial)", _fmt(best_row.metric)),
               (f"{_metric_name(study)} (test, held out)", _test_cell(study, best_row)),
               ("total rank", _fmt(best_row.total_rank)),
               ("adapter params", _fmt(best_row.adapter_params)),
               ("trainable params (adapter + head)", _fmt(best_row.trainable_params)),
               ("parameters", ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) or "-")]
    small_number = None
    if smallest is not None:
        trial, within = smallest
        small_number = trial.number
        row = next(r for r in rows if r.number == trial.number)
        summary.append((f"smallest within {within:g} of the best",
                        f"trial {row.number}: {_metric_name(study)} {_fmt(row.metric)}, test {_test_cell(study, row)}, "
                        f"{_fmt(row.adapter_params)} adapter params"))
    if parent:
        summary.append(("MLflow parent run", parent))
    images = [{"name": name, "caption": FIGURES[name],
               "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")}
              for name, path in figures.items()]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(study=study.study_name, summary=summary, images=images, notes=notes,
                                            rows=rows, best=best.number, metric=_metric_name(study), fmt=_fmt,
                                            smallest=small_number)


def _test_cell(study, row: TrialRow) -> str:
    """The row's test score, or why there is none ("no test split", "not scored": only selected trials are)."""
    if row.test_metric is not None:
        return _fmt(row.test_metric)
    note = holdout.note(study)
    return note if note and note.startswith("no test split") else "not scored"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>rankopt report: {{ study }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } tr.best { background: #fff4d6; } tr.smallest { background: #e3f4e1; }
figure { margin: 2em 0; } img { max-width: 100%; } figcaption { color: #555; font-size: .9em; }
.note { color: #8a5a00; }
</style></head><body>
<h1>rankopt report: study {{ study }}</h1>
<table id="summary">
{% for key, value in summary %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% for note in notes %}<p class="note">note: {{ note }}</p>
{% endfor %}
{% for image in images %}<figure id="{{ image.name[:-4] }}">
<img src="{{ image.src }}" alt="{{ image.name }}"><figcaption>{{ image.caption }}</figcaption></figure>
{% endfor %}
<h2>All trials</h2>
<table id="trials"><tr><th>trial</th><th>state</th><th>{{ metric }}</th><th>test {{ metric }}</th><th>total rank</th><th>budget</th>
<th>adapter params</th><th>parameters</th></tr>
{% for r in rows %}<tr{% if r.number == best %} class="best"{% elif r.number == smallest %} class="smallest"{% endif %}><td>{{ r.number }}{% if r.number == smallest %} (smallest within the margin){% endif %}</td><td>{{ r.state }}</td>
<td>{{ fmt(r.metric) }}</td><td>{{ fmt(r.test_metric) }}</td><td>{{ fmt(r.total_rank) }}</td><td>{{ fmt(r.budget) }}</td>
<td>{{ fmt(r.adapter_params) }}</td><td>{% for k, v in r.params.items() %}{{ k }}={{ fmt(v) }} {% endfor %}</td></tr>
{% endfor %}</table>
</body></html>
"""
