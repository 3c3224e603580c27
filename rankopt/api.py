"""The Python API: one call per job. The CLI is a thin layer over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankopt import distributed
from rankopt.config import Config, resolve_config
from rankopt.tasks.modeling import portable_model_name
from rankopt.training.events import Callback, TrainResult
from rankopt.training.memory_plan import MemoryPlan, check_memory, estimate
from rankopt.training.setup import build_model, prepare_data
from rankopt.training.trainer import train_adapted

__all__ = ["plan", "train"]


def train(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, data_dir: str | None = None,
          tracking_uri: str | None = None, out: str | Path = "runs", callbacks: list[Callback] | None = None,
          track: bool = True, run_name: str | None = None) -> TrainResult:
    """Fine-tune once with adaptive ranks; log to MLflow unless ``track`` is False.

    Started under ``torchrun`` (several processes), the fine-tune runs data-parallel: every
    process must call this with the same arguments; only rank 0 logs to MLflow, and every process
    returns the same result (``run_id`` set on rank 0 only).

    Example:
        >>> import rankopt
        >>> result = rankopt.train("demo", {"training.steps": 60})  # doctest: +SKIP
        >>> result.metric, result.total_rank  # doctest: +SKIP
    """
    cfg = resolve_config(preset, overrides, data_dir)
    procs = distributed.init_from_environment(cfg.training.device)
    distributed.check_divisible(cfg.training.batch_size)  # before anything is written
    check_memory(cfg, procs.world)  # on a GPU: a run that cannot fit stops here, in one line
    data = prepare_data(cfg)
    adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
    callbacks = list(callbacks or [])
    if not track or not procs.main:
        return train_adapted(cfg, adapted, data, callbacks)
    from rankopt.tracking import mlflow_runs

    if tracking_uri:
        mlflow_runs.check_reachable(tracking_uri)  # a wrong or dead URI fails here, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or mlflow_runs.default_tracking_uri(out)
    client = mlflow_runs.client_for(uri)
    exp_id = mlflow_runs.ensure_experiment(client, cfg.task.name, mlflow_runs.artifact_root(tracking_uri, out))
    run = client.create_run(exp_id, run_name=run_name, tags={"rankopt.kind": "train", "rankopt.task": cfg.task.name})
    run_id = run.info.run_id
    mlflow_runs.log_params(client, run_id, cfg.model_dump(exclude={"search"}))
    logger = mlflow_runs.MLflowLogger(client, run_id, base_model=portable_model_name(cfg.model.name),
                                   meta={"config": cfg.model_dump()})
    try:
        result = train_adapted(cfg, adapted, data, [*callbacks, logger])
    except BaseException:
        client.set_terminated(run_id, "KILLED" if _interrupted() else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    result.run_id = run_id
    result.artifacts = mlflow_runs.artifact_folder(client, exp_id)
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
