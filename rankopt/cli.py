"""The ``rankopt`` command: thin verbs over :mod:`rankopt.api`.

User mistakes arrive as :class:`RankoptError` and leave as one line on stderr, exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from rankopt.errors import RankoptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adaptive-rank LoRA fine-tuning: train, tune, export, compare in MLflow.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a preset value: section.key=value")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="folder of train/validation (or test) files")]
UriOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: SQLite under --out)")]
OutOpt = Annotated[str, typer.Option("--out", help="output folder for stores and artifacts")]


@app.callback()
def _root() -> None:
    """Adaptive-rank LoRA fine-tuning: train, tune, export, compare in MLflow."""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import mlflow  # noqa: F401 - configures its loggers on import; quiet them after
    import optuna
    import transformers

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(preset: Annotated[str, typer.Argument(help="preset name (see search_spaces/) or a .yml path")],
          set_: SetOpt = None, data: DataOpt = None, tracking_uri: UriOpt = None, out: OutOpt = "runs") -> None:
    """Fine-tune once with the preset's values, adapting ranks during training."""
    from rankopt.api import resolve_config
    from rankopt.api import train as train_api
    from rankopt.progress import ProgressBar

    try:
        _quiet_libraries()
        cfg = resolve_config(preset, set_, data)
        bar = ProgressBar(cfg.training.steps, description=f"train {cfg.task.name}")
        try:
            result = train_api(cfg, tracking_uri=tracking_uri, out=out, callbacks=[bar])
        finally:
            bar.close()
    except RankoptError as exc:
        _fail(str(exc))
        return
    typer.echo(f"{result.metric_name} {result.metric:.4f} | total rank {result.total_rank} over "
               f"{len(result.ranks)} layers | trainable params {result.trainable_params:,} | "
               f"{result.seconds:.0f}s | mlflow run {result.run_id}")


@app.command()
def tune(preset: Annotated[str, typer.Argument(help="preset name (see search_spaces/) or a .yml path")],
         trials: Annotated[Optional[int], typer.Option("--trials", help="trials to run now (default: the preset's)")] = None,
         timeout: Annotated[Optional[float], typer.Option("--timeout", help="stop starting trials after S seconds")] = None,
         study: Annotated[Optional[str], typer.Option("--study", help="study name (default: the task name)")] = None,
         storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL (default: SQLite under --out)")] = None,
         tracking_uri: UriOpt = None, data: DataOpt = None, set_: SetOpt = None, out: OutOpt = "runs") -> None:
    """Search the rank budget (and the preset's other knobs) with Optuna; rerun to resume."""
    from rankopt.api import resolve_config
    from rankopt.progress import TrialProgress, print_tune_result
    from rankopt.tuner import tune as tune_api

    try:
        _quiet_libraries()
        if trials is not None and trials < 0:
            raise RankoptError("--trials must be 0 or more")
        cfg = resolve_config(preset, set_, data)
        progress = TrialProgress(cfg.training.steps)
        try:
            result = tune_api(cfg, n_trials=trials, timeout=timeout, study_name=study, storage=storage,
                              tracking_uri=tracking_uri, out=out, callbacks_for_trial=progress.for_trial,
                              on_trial_end=progress.trial_ended)
        finally:
            progress.close()
    except RankoptError as exc:
        _fail(str(exc))
        return
    except KeyboardInterrupt:
        typer.echo("interrupted: the current trial was recorded as failed; run the same command to resume",
                   err=True)
        raise typer.Exit(130) from None
    print_tune_result(result)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
