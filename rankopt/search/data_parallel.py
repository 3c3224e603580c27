"""Data-parallel trials: rank 0 talks to Optuna, every process trains.

Under ``torchrun`` (or ``--nproc-per-node``), rank 0 runs the study as a single process would:
storage, sampler, pruner, MLflow, checkpoints, heartbeats. Before each trial it announces it to
the others; then every process draws the trial's values through optuna-integration's
:class:`~optuna_integration.TorchDistributedTrial` (rank 0 asks Optuna, the others receive the
same values), builds the same config and trains its shard of each batch. Reports and pruning
decisions go through that object too, so a pruned trial stops on every process at the same
evaluation. Errors a trial raises on every process alike (a config that cannot be built, a
diverged loss, pruning) end that trial everywhere and the study goes on. Any other error (a full
disk on rank 0, one GPU out of memory) ends the job, as a dead process does: the others would
otherwise sit in the lost trial's collectives while rank 0 went on to the next trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from rankopt import distributed
from rankopt.config import Config, build_config
from rankopt.errors import RankoptError
from rankopt.search.trials import ReportToTrial, suggest, trial_config
from rankopt.training.memory import release_memory
from rankopt.training.setup import build_model, prepare_data
from rankopt.training.trainer import train_adapted

TRIAL, WAIT, STOP = "trial", "wait", "stop"


def survivable() -> tuple[type[BaseException], ...]:
    """The errors a trial may fail with while the study goes on (Optuna's ``catch``)."""
    return (RankoptError,) if distributed.current().parallel else (Exception,)


def shared(trial: optuna.Trial):
    """The trial every process sees alike (rank 0's ``trial`` itself when training in one process)."""
    if not distributed.current().parallel:
        return trial
    from optuna_integration import TorchDistributedTrial

    return TorchDistributedTrial(trial)


def announce(checkpoint_number: int | None) -> None:
    """Rank 0, before a trial: the others join it (``checkpoint_number``: whose checkpoints it resumes)."""
    if distributed.current().parallel:
        distributed.broadcast_object((TRIAL, checkpoint_number))


def keep_waiting() -> None:
    """Rank 0, while it waits for other workers' trials: the others keep waiting too (within the timeout)."""
    if distributed.current().parallel:
        distributed.broadcast_object((WAIT, None))


def release_followers() -> None:
    """Rank 0, when it takes no more trials: the others stop following."""
    if distributed.current().parallel:
        distributed.broadcast_object((STOP, None))


def set_up(setup: Callable[[], Any], config_of: Callable[[Any], tuple[Config, Any]]) -> tuple[Any, Config, Any]:
    """Run ``setup`` (checks, study, MLflow) on rank 0 only; every process gets its config and checkpoint store.

    Returns (rank 0's setup result or None, config, checkpoint store). Rank 0's user error is
    raised on every process, so all of them end with the same one line.
    """
    if not distributed.current().parallel:
        prepared = setup()
        return (prepared, *config_of(prepared))
    if distributed.current().main:
        try:
            prepared = setup()
        except RankoptError as exc:
            distributed.broadcast_object(("error", str(exc)))
            raise
        cfg, checkpoints = config_of(prepared)
        distributed.broadcast_object(("ok", (cfg.model_dump(mode="json"), checkpoints)))
        return prepared, cfg, checkpoints
    kind, payload = distributed.broadcast_object(None)
    if kind == "error":
        raise RankoptError(payload)
    dumped, checkpoints = payload
    return None, build_config(dumped, {}, origin="rank 0's config"), checkpoints


def follow(base: Config, checkpoints) -> int:
    """Ranks > 0: train every trial rank 0 announces, until it says stop; returns how many were followed."""
    followed = 0
    while True:
        kind, number = distributed.broadcast_object(None)
        if kind == STOP:
            return followed
        if kind == WAIT:
            continue
        followed += 1
        try:
            _follow_one(base, checkpoints, number)
        finally:
            release_memory()


def _follow_one(base: Config, checkpoints, number: int | None) -> None:
    from optuna_integration import TorchDistributedTrial

    trial = TorchDistributedTrial(None)
    values = suggest(trial, base.search.space)
    try:
        cfg = trial_config(base, values)
        data = prepare_data(cfg)
        adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
    except RankoptError:
        return  # rank 0 hit the same error and records it
    checkpoint = None
    if number is not None and checkpoints is not None and checkpoints.every > 0:
        checkpoint = checkpoints.for_trial(number, cfg.model_dump())  # read on a resume; rank 0 writes
    report = ReportToTrial(trial, cfg.task.metric, can_prune=len(base.search.objectives) == 1,
                           final_step=cfg.training.steps)
    try:
        train_adapted(cfg, adapted, data, [report], checkpointer=checkpoint)
    except (optuna.TrialPruned, RankoptError):
        return  # raised on every process at the same step
