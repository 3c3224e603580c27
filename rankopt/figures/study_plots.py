"""Study figures, saved as PNG: Optuna's own matplotlib visualizations, and the trade-off plots of
``rankopt report`` (rank per layer type, metric vs budget, metric vs adapter size).

The report's plots take plain numbers, not a study, so they are drawn the same for any source.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402


def _save(ax_or_fig, path: Path) -> Path:
    fig = ax_or_fig.figure if hasattr(ax_or_fig, "figure") and not isinstance(ax_or_fig, plt.Figure) else ax_or_fig
    if hasattr(fig, "__len__"):  # some plots return an array of axes
        fig = fig.flat[0].figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def study_figures(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimization history, parameter importances, and the Pareto front (two objectives)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    names = study.user_attrs.get("objectives", ["metric"])
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths.append(optimization_history(study, folder / "optimization_history.png"))
        if len(study.directions) > 1:
            paths.append(_save(ovm.plot_pareto_front(study, target_names=names), folder / "pareto_front.png"))
        varied = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
        if len(complete) >= 2 and varied:
            try:
                target = None if len(study.directions) == 1 else (lambda t: t.values[0])
                paths.append(_save(ovm.plot_param_importances(study, target=target, target_name=names[0]),
                                   folder / "param_importances.png"))
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # importances need variation in both params and values
    return paths


def optimization_history(study: optuna.Study, path: Path, target_name: str | None = None) -> Path:
    """Optuna's history plot of the metric (the first objective when there are two)."""
    target_name = target_name or study.user_attrs.get("objectives", ["metric"])[0]
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'experimental' in Optuna
        return _save(ovm.plot_optimization_history(study, target=target, target_name=target_name), path)


def rank_by_layer_type(per_trial: dict[int, dict[str, float]], path: Path, best: int | None = None) -> Path:
    """Box per layer type of the trials' final mean rank, each trial a dot, the best a star.

    ``per_trial``: trial number -> layer type -> mean final rank of that type's layers. Shows
    where the budget goes (attention vs feed-forward) and whether trials agree on it.
    """
    types = list(dict.fromkeys(t for ranks in per_trial.values() for t in ranks))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = [[ranks[t] for ranks in per_trial.values() if t in ranks] for t in types]
    ax.boxplot(data, positions=range(len(types)), widths=0.5, showfliers=False)
    for i, values in enumerate(data):
        offsets = (i + (j - (len(values) - 1) / 2) * 0.06 for j in range(len(values)))
        ax.scatter(list(offsets), values, s=14, color="tab:blue", alpha=0.6, zorder=3)
    if best is not None and best in per_trial:
        xs = [i for i, t in enumerate(types) if t in per_trial[best]]
        ax.scatter(xs, [per_trial[best][types[i]] for i in xs], marker="*", s=160, color="tab:red", zorder=4,
                   label=f"best trial ({best})")
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(len(types)), types, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("final mean rank per layer")
    ax.set_title(f"rank per layer type across {len(per_trial)} complete trial(s)")
    return _save(fig, path)


def metric_vs_budget(points: list[tuple[int, float, float, bool]], path: Path, metric: str,
                     best: int | None = None) -> Path:
    """Metric against total rank: filled for complete trials, hollow for pruned ones.

    ``points``: (trial number, total rank, metric, pruned). A pruned trial has no final ranks:
    its x is its budget and its y the last metric it reported before it was stopped.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for pruned, style in ((False, dict(color="tab:blue", label="complete")),
                          (True, dict(facecolors="none", edgecolors="tab:gray", label="pruned (budget, last report)"))):
        chosen = [p for p in points if p[3] == pruned]
        if chosen:
            ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], s=40, zorder=3, **style)
    _mark_best(ax, [(p[0], p[1], p[2]) for p in points if not p[3]], best)
    _label_points(ax, [(p[0], p[1], p[2]) for p in points])
    ax.set_xlabel("total rank (final; the budget for pruned trials)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs rank budget")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def pareto_front(points: list[tuple[int, float, float]], front: set[int], path: Path, metric: str,
                 best: int | None = None) -> Path:
    """Metric against adapter parameters, the non-dominated trials joined as a front.

    ``points``: (trial number, adapter params, metric) of complete trials; ``front``: the
    numbers of the non-dominated ones (none has a better metric with fewer params).
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    others = [p for p in points if p[0] not in front]
    on_front = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if others:
        ax.scatter([p[1] for p in others], [p[2] for p in others], s=36, color="tab:gray", alpha=0.7,
                   label="dominated", zorder=3)
    if on_front:
        ax.plot([p[1] for p in on_front], [p[2] for p in on_front], "-o", color="tab:orange", drawstyle="steps-post",
                label="Pareto front", zorder=4)
    _mark_best(ax, points, best)
    _label_points(ax, points)
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs adapter size: Pareto front")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _mark_best(ax, points: list[tuple[int, float, float]], best: int | None) -> None:
    for number, x, y in points:
        if number == best:
            ax.scatter([x], [y], marker="*", s=220, color="tab:red", zorder=5, label=f"best trial ({best})")


def _label_points(ax, points: list[tuple[int, float, float]]) -> None:
    """Trial numbers beside the points, while there are few enough to read."""
    if len(points) <= 30:
        for number, x, y in points:
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
