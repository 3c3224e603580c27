"""Study figures drawn by Optuna's own matplotlib visualizations, saved as PNG."""

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
        if len(study.directions) == 1:
            paths.append(_save(ovm.plot_optimization_history(study, target_name=names[0]),
                               folder / "optimization_history.png"))
        else:
            paths.append(_save(ovm.plot_optimization_history(study, target=lambda t: t.values[0],
                                                             target_name=names[0]),
                               folder / "optimization_history.png"))
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
