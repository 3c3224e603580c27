"""The Python API: one call per job. The CLI is a thin layer over these functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankopt import distributed
from rankopt.config import Config, resolve_config
from rankopt.search import owners
from rankopt.tasks.modeling import portable_model_name
from rankopt.training.events import Callback, TrainResult
from rankopt.training.memory_plan import MemoryPlan, check_memory, estimate
from rankopt.training.setup import build_model, prepare_data
from rankopt.training.trainer import train_adapted

__all__ = ["plan", "train"]


def train(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, data_dir: str | None = None,
          tracking_uri: str | None = None, out: str | Path = "runs", callbacks: list[Callback] | None = None,
          track: bool = True, run_name: str | None = None, resume: bool = False) -> TrainResult:
    """Fine-tune once with adaptive ranks; log to MLflow unless ``track`` is False.

    A tracked run (or one with ``resume``) saves a checkpoint under ``OUT/checkpoints/train/NAME``
    (NAME: ``run_name``, else the task's) every ``search.checkpoint_every`` evaluations, as a
    trial does; it is removed when the run ends. ``resume`` goes on from it, exactly as the
    uninterrupted run would have, in the same MLflow run; without ``resume`` a left checkpoint is
    replaced (with a warning).

    Started under ``torchrun`` (several processes), the fine-tune runs data-parallel: every
    process must call this with the same arguments; only rank 0 logs to MLflow, and every process
    returns the same result (``run_id`` set on rank 0 only).

    Example:
        >>> import rankopt
        >>> result = rankopt.train("demo", {"training.steps": 60})  # doctest: +SKIP
        >>> result.metric, result.total_rank  # doctest: +SKIP
    """
    from rankopt.training.checkpoint import train_checkpoint

    cfg = resolve_config(preset, overrides, data_dir)
    procs = distributed.init_from_environment(cfg.training.device)
    distributed.check_divisible(cfg.training.batch_size)  # before anything is written
    check_memory(cfg, procs.world)  # on a GPU: a run that cannot fit stops here, in one line
    data = prepare_data(cfg)
    adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
    callbacks = list(callbacks or [])
    checkpoint = None
    if track or resume:
        checkpoint = train_checkpoint(out, run_name or cfg.task.name, cfg.search.checkpoint_every, cfg.model_dump())
        _check_resumable(checkpoint, resume)
    if not track or not procs.main:
        if checkpoint is not None and procs.main and not resume:
            checkpoint.clear()  # starting over
        return _run(cfg, adapted, data, callbacks, checkpoint if procs.main or resume else None, procs.main)
    from rankopt.tracking import mlflow_runs

    if tracking_uri:
        mlflow_runs.check_reachable(tracking_uri)  # a wrong or dead URI fails here, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or mlflow_runs.default_tracking_uri(out)
    client = mlflow_runs.client_for(uri)
    exp_id = mlflow_runs.ensure_experiment(client, cfg.task.name, mlflow_runs.artifact_root(tracking_uri, out))
    run_id = _earlier_run(client, checkpoint, exp_id, resume)
    _close_lost_runs(client, exp_id, keep=run_id)
    if not resume:
        checkpoint.clear()  # starting over
    if run_id is None:
        run = client.create_run(exp_id, run_name=run_name, tags={
            "rankopt.kind": "train", "rankopt.task": cfg.task.name, PROCESS_TAG: owners.this_process()})
        run_id = run.info.run_id
        checkpoint.folder.mkdir(parents=True, exist_ok=True)
        (checkpoint.folder / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run_id}))
        mlflow_runs.log_params(client, run_id, cfg.model_dump(exclude={"search"}))
    logger = mlflow_runs.MLflowLogger(client, run_id, base_model=portable_model_name(cfg.model.name),
                                      meta={"config": cfg.model_dump()}, log_history=not resume)
    try:
        result = _run(cfg, adapted, data, [*callbacks, logger], checkpoint, True)
    except BaseException:
        client.set_terminated(run_id, "KILLED" if _interrupted() else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    result.run_id = run_id
    result.artifacts = mlflow_runs.artifact_folder(client, exp_id)
    return result


RUN_FILE = "run.json"  # beside a train run's checkpoints: the MLflow run a resume continues
PROCESS_TAG = "rankopt.process"  # on a train run: the process that runs it (rankopt.search.owners)


def _check_resumable(checkpoint, resume: bool) -> None:
    """``resume`` needs a checkpoint that fits this config; without it, a left one is replaced, with a warning."""
    import logging

    from rankopt.errors import RankoptError

    found = checkpoint.load()
    if resume and found is None:
        raise RankoptError(f"--resume: no checkpoint of this run (same preset and --set values) under "
                           f"{checkpoint.folder}; run without --resume to start from step 0")
    if not resume and found is not None:
        logging.getLogger("rankopt").warning(
            "starting over from step 0: the checkpoint an interrupted run left at step %d (%s) is removed; pass "
            "--resume to go on from a checkpoint instead", found.step, checkpoint.folder)


def _earlier_run(client, checkpoint, experiment_id: str, resume: bool) -> str | None:
    """With ``resume``, the MLflow run the interrupted run logged to, reopened; else None (a new run)."""
    if not resume:
        return None
    try:
        run_id = json.loads((checkpoint.folder / RUN_FILE).read_text())["mlflow_run_id"]
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - no file, another tracking store, a deleted run: a new run
        return None
    if run.info.experiment_id != experiment_id:
        return None
    client.update_run(run_id, status="RUNNING")
    return run_id


def _close_lost_runs(client, experiment_id: str, keep: str | None) -> None:
    """End as KILLED the train runs left RUNNING by a process of this machine that is gone (killed).

    Any moment of a kill is covered: the process is a tag of the run from its creation on.
    """
    try:
        runs = client.search_runs([experiment_id], filter_string="tags.`rankopt.kind` = 'train' and "
                                  "attributes.status = 'RUNNING'", max_results=1000)
    except Exception:  # noqa: BLE001 - best effort: the next run looks again
        return
    for run in runs:
        owner = run.data.tags.get(PROCESS_TAG)
        if run.info.run_id != keep and owner and owners.is_gone(owner):
            client.set_terminated(run.info.run_id, "KILLED")


def _run(cfg: Config, adapted, data, callbacks: list[Callback], checkpoint, main: bool) -> TrainResult:
    """Train; the checkpoint goes when the run ends, stays when it is interrupted (to resume)."""
    try:
        result = train_adapted(cfg, adapted, data, callbacks, checkpointer=checkpoint)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if checkpoint is not None and main:
            checkpoint.clear()
        raise
    if checkpoint is not None and main:
        checkpoint.clear()
    return result


def plan(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, data_dir: str | None = None,
         device_memory: str | int | None = None, processes: int = 1, config_json: str | None = None) -> MemoryPlan:
    """The peak memory of one process of a run, by part, from the model's shapes alone (no weights read).

    ``device_memory`` ('80GB', or bytes) plans for a device this machine lacks; without it the
    plan is held against this machine's GPU (``training.device: cuda``) or host RAM (cpu).
    ``processes`` data-parallel processes each get ``training.batch_size / processes`` rows.
    ``config_json`` is the model's config.json, for a hub model that cannot be reached from here.

    Example:
        >>> import rankopt
        >>> p = rankopt.plan("llm_gpu", device_memory="80GB")  # doctest: +SKIP
        >>> p.peak / 2**30, p.peak_phase, p.fits  # doctest: +SKIP
    """
    cfg = resolve_config(preset, overrides, data_dir)
    return estimate(cfg, processes=processes, device_memory=device_memory, config_json=config_json)


def _interrupted() -> bool:
    import sys

    return sys.exc_info()[0] is KeyboardInterrupt
