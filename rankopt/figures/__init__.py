"""Matplotlib figures of what a run or a study did, written as PNG files.

:mod:`.rank_plots` draws a run's rank history (layer x step heatmap), :mod:`.study_plots` a
study's trials (metric vs budget, Pareto front, Optuna's history). Both MLflow tracking and the
HTML report use them, so they sit below both: they import :mod:`rankopt.training.events`,
matplotlib and Optuna, nothing else of rankopt.
"""
