"""The ``rankopt`` command: thin verbs over :mod:`rankopt.api`.

User mistakes arrive as :class:`RankoptError` and leave as one line on stderr, exit code 2.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from rankopt.errors import RankoptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adaptive-rank LoRA fine-tuning: train, tune, export, report, compare in MLflow.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a preset value: section.key=value")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="folder of train/validation (or test) files")]
UriOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: SQLite under --out)")]
OutOpt = Annotated[str, typer.Option("--out", help="output folder for stores and artifacts")]
NprocOpt = Annotated[int, typer.Option(
    "--nproc-per-node", help="data-parallel processes for one fine-tune on this machine (one per GPU); "
    "the same as starting the command under `torchrun --nproc-per-node N -m rankopt`")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="allow model.trust_remote_code (the model's own code runs here) when it comes from "
    "a shared study or an exported rankopt.json; stored there alone it is refused")]
WithinOpt = Annotated[Optional[float], typer.Option(
    "--within", help="the trial with the fewest adapter params whose metric is within DELTA of the best "
    "(metric units: 0.01 = 1 accuracy point; from the Pareto set for two objectives)")]


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
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_no_traceback_for_user_errors)
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a file it cannot parse is our one-line error
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _no_traceback_for_user_errors(record) -> bool:
    """Optuna logs a failed trial with its traceback; a user's error (a diverged loss, a trial config
    that cannot be built) or Ctrl-C keeps only its one line, which the trial's progress line repeats."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, (RankoptError, KeyboardInterrupt)):
        record.exc_info = None
    return True


def _fail(message: str) -> None:
    from rankopt import distributed
    from rankopt.launcher import leave_error

    # data parallel: every process hits the same user error, and one line says it
    if not leave_error(message) and distributed.current().main:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _launch(nproc: int) -> None:
    """With ``--nproc-per-node N`` > 1, start this command as N processes and exit with their outcome."""
    from rankopt.launcher import launch

    try:
        code = launch(nproc, sys.argv[1:])
    except RankoptError as exc:
        _fail(str(exc))
        return
    if code >= 0:
        raise typer.Exit(code)


def _lost_peer(exc: BaseException) -> None:
    """A collective failed: a peer died, hung past the timeout, or the group could not form."""
    from rankopt import distributed

    from rankopt.launcher import LAUNCHED_HERE

    if os.environ.get(LAUNCHED_HERE):
        raise typer.Exit(1)  # rankopt's launcher says which process died, in one line
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    typer.echo(f"error: data-parallel process {distributed.current().rank} lost its peers ({first[:300]}); the "
               f"job stopped (a peer died, or hung longer than {distributed.TIMEOUT_ENV} seconds)", err=True)
    raise typer.Exit(1)


@contextmanager
def _one_job(interrupted: str, describe=str):
    """How a train, tune or worker process ends when it fails: one line, once under data parallelism."""
    from rankopt import distributed
    from rankopt.launcher import LAUNCHED_HERE

    try:
        yield
    except RankoptError as exc:
        _fail(describe(str(exc)))
    except RuntimeError as exc:
        if not distributed.is_peer_failure(exc):
            raise
        _lost_peer(exc)
    except KeyboardInterrupt:
        if distributed.current().main and not os.environ.get(LAUNCHED_HERE):  # the launcher speaks for its own
            typer.echo(f"interrupted: {interrupted}", err=True)
        raise typer.Exit(130) from None


def _sigterm_interrupts() -> None:
    """Under a launcher, SIGTERM (sent when a peer died) ends the run like Ctrl-C: recorded, not lost."""
    import signal

    from rankopt import distributed

    if distributed.launched() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def interrupt(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
            if sys.exc_info()[0] is None:  # not while an error is already on its way out
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)


@app.command()
def train(preset: Annotated[str, typer.Argument(help="preset name (see search_spaces/) or a .yml path")],
          set_: SetOpt = None, data: DataOpt = None, tracking_uri: UriOpt = None, out: OutOpt = "runs",
          nproc_per_node: NprocOpt = 1,
          resume: Annotated[bool, typer.Option("--resume", help="go on from the checkpoint an interrupted run left "
                                               "under --out, in the same MLflow run")] = False) -> None:
    """Fine-tune once with the preset's values, adapting ranks during training."""
    from rankopt import distributed
    from rankopt.config import resolve_config
    from rankopt.api import train as train_api
    from rankopt.training.progress import ProgressBar

    if nproc_per_node != 1:
        _launch(nproc_per_node)
    with _one_job("a started MLflow run is marked KILLED; run the same command with --resume to go on from its "
                  "last checkpoint"):
        _quiet_libraries()
        _show_rankopt_warnings()
        _sigterm_interrupts()
        cfg = resolve_config(preset, set_, data)
        procs = distributed.init_from_environment(cfg.training.device)
        bar = ProgressBar(cfg.training.steps, description=f"train {cfg.task.name}") if procs.main else None
        try:
            result = train_api(cfg, tracking_uri=tracking_uri, out=out, callbacks=[bar] if bar else [], resume=resume)
        finally:
            if bar is not None:
                bar.close()
        distributed.shutdown()
    if not procs.main:
        return
    if result.artifacts:
        typer.echo(f"artifacts (adapter, plots): {result.artifacts}")
    if result.resumed_from_step:
        typer.echo(f"resumed from the checkpoint at step {result.resumed_from_step}")
    typer.echo(f"{result.metric_name} {result.metric:.4f} | total rank {result.total_rank} over "
               f"{len(result.ranks)} layers | trainable params {result.trainable_params:,} | "
               f"{result.seconds:.0f}s | mlflow run {result.run_id}")


@app.command()
def plan(preset: Annotated[str, typer.Argument(help="preset name (see search_spaces/) or a .yml path")],
         set_: SetOpt = None, data: DataOpt = None,
         device_memory: Annotated[Optional[str], typer.Option(
             "--device-memory", help="plan for a device of this size, e.g. 80GB or 24GiB (default: this "
             "machine's GPU for training.device cuda, host RAM for cpu)")] = None,
         nproc_per_node: Annotated[int, typer.Option(
             "--nproc-per-node", help="plan one of N data-parallel processes (one per GPU): each gets "
             "training.batch_size / N rows of every micro-batch")] = 1,
         config_json: Annotated[Optional[str], typer.Option(
             "--config-json", help="the model's config.json, for a hub model this machine cannot reach")] = None,
         ) -> None:
    """Print a run's peak memory by part, from the model's shapes alone; exit 2 when it cannot fit."""
    from rankopt.api import plan as plan_api
    from rankopt.training.memory_plan import print_plan

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        result = plan_api(preset, set_, data_dir=data, device_memory=device_memory, processes=nproc_per_node,
                          config_json=config_json)
    except RankoptError as exc:
        _fail(str(exc))
        return
    print_plan(result)
    if result.fits is False:
        _fail(result.refusal())


@app.command()
def tune(preset: Annotated[str, typer.Argument(help="preset name (see search_spaces/) or a .yml path")],
         trials: Annotated[Optional[int], typer.Option("--trials", help="trials to run now (default: the preset's)")] = None,
         timeout: Annotated[Optional[float], typer.Option("--timeout", help="stop starting trials after S seconds")] = None,
         study: Annotated[Optional[str], typer.Option("--study", help="study name (default: the task name)")] = None,
         storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL (default: SQLite under --out)")] = None,
         tracking_uri: UriOpt = None, data: DataOpt = None, set_: SetOpt = None, out: OutOpt = "runs",
         within: WithinOpt = None, nproc_per_node: NprocOpt = 1) -> None:
    """Search the rank budget (and the preset's other knobs) with Optuna; rerun to resume."""
    from rankopt import distributed
    from rankopt.config import resolve_config
    from rankopt.training.progress import TrialProgress, print_tune_result
    from rankopt.search.tuner import tune as tune_api

    if nproc_per_node != 1:
        _launch(nproc_per_node)
    with _one_job("the current trial was recorded as failed; run the same command to resume"):
        _quiet_libraries()
        _show_rankopt_warnings()
        _sigterm_interrupts()
        if trials is not None and trials < 0:
            raise RankoptError("--trials must be 0 or more")
        cfg = resolve_config(preset, set_, data)
        procs = distributed.init_from_environment(cfg.training.device)
        progress = TrialProgress(cfg.training.steps)
        try:
            result = tune_api(cfg, n_trials=trials, timeout=timeout, study_name=study, storage=storage,
                              tracking_uri=tracking_uri, out=out, callbacks_for_trial=progress.for_trial,
                              on_trial_end=progress.trial_ended, within=within)
        finally:
            progress.close()
        distributed.shutdown()
    if result is None or not procs.main:
        return  # a data-parallel follower: rank 0 reports
    print_tune_result(result)
    if result.artifacts:
        typer.echo(f"trial artifacts (adapters, plots): {result.artifacts}")


@app.command()
def export(out: Annotated[Optional[str], typer.Option("--out", help="folder to write (default: exports/STUDY, "
           "-merged for --merge, in the runs folder beside the study storage, e.g. runs/exports/demo; must not exist, "
           "unless --force)")] = None,
           study: Annotated[Optional[str], typer.Option("--study", help="study to export from (its best trial by default)")] = None,
           storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL (default: sqlite:///runs/optuna.db)")] = None,
           tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: mlflow.db beside the study storage)")] = None,
           trial: Annotated[Optional[int], typer.Option("--trial", help="export this trial number instead of the best")] = None,
           run_id: Annotated[Optional[str], typer.Option("--run-id", help="export this MLflow run's adapter (no study needed)")] = None,
           merge: Annotated[bool, typer.Option("--merge", help="write a plain transformers model with the adapter folded in")] = False,
           force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
           max_params: Annotated[Optional[int], typer.Option("--max-params", help="best trial with at most P adapter params (Pareto front for two objectives)")] = None,
           register: Annotated[Optional[str], typer.Option("--register", help="also register it in the MLflow Model Registry under NAME")] = None,
           within: WithinOpt = None, trust_remote_code: TrustOpt = False) -> None:
    """Write a tuned adapter as a PEFT folder (or a merged model), with tokenizer and model card."""
    from rankopt.outputs.export import export as export_api

    try:
        _quiet_libraries()
        result = export_api(out, study=study, storage=storage, tracking_uri=tracking_uri, trial=trial, run_id=run_id,
                            merge=merge, force=force, max_params=max_params, register=register, within=within,
                            trust_remote_code=trust_remote_code)
    except RankoptError as exc:
        _fail(str(exc))
        return
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    src = result.source
    what = f"trial {src.trial} of study '{src.study}'" if src.study and src.trial is not None else f"run {src.run_id}"
    if within is not None:
        what += f" ({src.reason})"
    metric = f"{result.metric_name} {result.metric:.4f} | " if result.metric is not None else ""
    params = f" | adapter params {result.adapter_params:,}" if result.adapter_params is not None else ""
    if result.metric_name is not None:
        test = f"{result.test_metric:.4f}" if result.test_metric is not None else result.test_note
        metric += f"test {result.metric_name} {test} | "
    typer.echo(f"exported {what}: {metric}total rank {sum(result.ranks.values())} over {len(result.ranks)} layers"
               f"{params} -> {result.out}{' (merged)' if result.merged else ''}")
    if result.registered:
        typer.echo(f"registered as model '{result.registered[0]}' version {result.registered[1]}")


@app.command()
def report(study: Annotated[str, typer.Option("--study", help="study to report on")] = ...,
           storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL (default: sqlite:///runs/optuna.db)")] = None,
           tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: mlflow.db beside the study storage)")] = None,
           out: Annotated[Optional[str], typer.Option("--out", help="folder to write (default: reports/STUDY beside the study storage; must not exist, unless --force)")] = None,
           force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
           within: WithinOpt = None) -> None:
    """Write a study's HTML report (figures inlined, PNGs beside it) and log it to the study's MLflow run."""
    from rankopt.outputs.report import report as report_api

    try:
        _quiet_libraries()
        result = report_api(study, storage=storage, tracking_uri=tracking_uri, out=out, force=force, within=within)
    except RankoptError as exc:
        _fail(str(exc))
        return
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    logged = f" | logged to MLflow run {result.run_id} under report/" if result.run_id else ""
    smallest = f", smallest within {within:g}: trial {result.smallest_trial}" if result.smallest_trial is not None else ""
    typer.echo(f"report of study '{result.study}' (best trial {result.best_trial}{smallest}, {len(result.figures)} figures)"
               f"{logged} -> {result.html}")


@app.command()
def ui(port: Annotated[int, typer.Option("--port", help="port to serve on")] = 5000,
       host: Annotated[str, typer.Option("--host", help="interface to bind; 0.0.0.0 exposes the UI to the network")] = "127.0.0.1",
       out: OutOpt = "runs", tracking_uri: UriOpt = None) -> None:
    """Serve the MLflow UI for the runs under --out, to compare trials (Ctrl+C stops it)."""
    from rankopt.tracking import ui as ui_api

    try:
        ui_api.server_command(out, tracking_uri, host, port)
        ui_api.check_port(host, port)
    except RankoptError as exc:
        _fail(str(exc))
        return
    note = ui_api.exposure_note(host)
    if note:
        typer.echo(note, err=True)
    typer.echo(f"MLflow UI for {tracking_uri or out}: {ui_api.url(host, port)}  (Ctrl+C to stop)", err=True)
    for label, link in ui_api.experiment_links(out, tracking_uri, host, port):
        typer.echo(f"  {label}: {link}", err=True)
    try:
        code = ui_api.serve(out, tracking_uri, host, port)
    except RankoptError as exc:
        _fail(str(exc))
        return
    raise typer.Exit(0 if code in (0, -2, -15, 130) else code)


@app.command()
def worker(preset: Annotated[Optional[str], typer.Argument(help="preset to create the study with (not needed to join one)")] = None,
           study: Annotated[str, typer.Option("--study", help="study to join (created from PRESET if missing)")] = ...,
           storage: Annotated[str, typer.Option("--storage", help="Optuna RDB URL shared by all workers, e.g. postgresql://user:pw@host/optuna")] = ...,
           tracking_uri: UriOpt = None,
           trials: Annotated[Optional[int], typer.Option("--trials", help="most trials this worker runs (default: until the study's limit)")] = None,
           device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:K: pins this worker to one GPU (sets training.device)")] = None,
           checkpoint_dir: Annotated[Optional[str], typer.Option("--checkpoint-dir", help="trial checkpoints; shared storage for workers on several machines (default: OUT/checkpoints)")] = None,
           data: DataOpt = None, set_: SetOpt = None, out: OutOpt = "runs", nproc_per_node: NprocOpt = 1,
           trust_remote_code: TrustOpt = False) -> None:
    """Join a study in a shared database and take trials until its trial limit is reached."""
    from rankopt import distributed
    from rankopt.training.progress import TrialProgress
    from rankopt.tracking.urls import mask_text
    from rankopt.search.worker import run_worker

    if nproc_per_node != 1:
        _launch(nproc_per_node)
    with _one_job("the current trial was handed back; another worker resumes it from its checkpoint", mask_text):
        _quiet_libraries()
        _show_rankopt_warnings()
        progress = TrialProgress(0)

        def trial_ended(study_, trial) -> None:
            progress.trial_ended(study_, trial)
            if "retry_of" in trial.user_attrs:
                step = trial.user_attrs.get("resumed_from_step")
                where = f"resumed from its checkpoint at step {step}" if step else "no checkpoint: started over"
                typer.echo(f"  trial {trial.number} retried lost trial {trial.user_attrs['retry_of']}: {where}", err=True)

        try:
            result = run_worker(study, storage, preset, set_, data_dir=data, tracking_uri=tracking_uri,
                                max_trials=trials, device=device, out=out, checkpoint_dir=checkpoint_dir,
                                callbacks_for_trial=progress.for_trial, on_trial_end=trial_ended,
                                trust_remote_code=trust_remote_code)
        finally:
            progress.close()
        distributed.shutdown()
    if result is None:
        return  # a data-parallel follower: rank 0 reports
    t = result.tally
    ran = ", ".join(map(str, result.ran)) or "none"
    typer.echo(f"worker done ({result.reason}): ran trials {ran} | study '{result.study_name}': {t.settled}/"
               f"{result.limit} settled ({t.complete} complete, {t.pruned} pruned, {t.failed} failed, "
               f"{t.retried} retried)")


def _show_rankopt_warnings() -> None:
    """rankopt's own warnings (MLflow outages, lost trials) go to stderr as 'warning: ...' lines."""
    import logging

    from rankopt.tracking.urls import mask_text

    class _Stderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(mask_text(f"warning: {record.getMessage()}") + "\n")  # whatever stderr is now

    handler = _Stderr(logging.WARNING)
    logger = logging.getLogger("rankopt")
    if not any(getattr(h, "_rankopt", False) for h in logger.handlers):
        handler._rankopt = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
