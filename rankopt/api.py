"""The Python API: one call per job. The CLI is a thin layer over these functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankopt.adapters.model import AdaptedModel, adapt, find_head
from rankopt.config import Config, build_config, combine_overrides, load_config
from rankopt.tasks.data import TaskData, prepare
from rankopt.training.events import Callback, TrainResult
from rankopt.tasks.modeling import load_pretrained, load_tokenizer, resolve_model_path
from rankopt.training.trainer import train_adapted


def resolve_config(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None,
                   data_dir: str | None = None) -> Config:
    """A validated config from a preset name/path or a Config, with ``--set`` overrides and ``--data``."""
    if not isinstance(preset, Config):
        return load_config(preset, overrides, data_dir)
    if not overrides and not data_dir:
        return preset
    return build_config(preset.model_dump(), combine_overrides(overrides, data_dir))


_DATA_CACHE: dict[str, TaskData] = {}


def prepare_data(cfg: Config) -> TaskData:
    """Tokenized task data for ``cfg``, once per process for the same task, tokenizer and seed.

    Raises RankoptError on missing files or columns.
    """
    key = json.dumps([cfg.task.model_dump(), cfg.model.name, cfg.training.seed], sort_keys=True)
    if key not in _DATA_CACHE:
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        _DATA_CACHE[key] = prepare(cfg.task, tokenizer, seed=cfg.training.seed)
    return _DATA_CACHE[key]


def _reset_head(model: nn.Module, heads: list[str], seed: int) -> None:
    """Re-draw the task head from ``seed`` so a run does not depend on what was loaded before it."""
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in heads:
            for module in model.get_submodule(head).modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if module.bias is not None:
                        module.bias.zero_()


def load_base(cfg: Config, num_labels: int) -> nn.Module:
    """A fresh copy of the pretrained model with its task head drawn from ``cfg.training.seed``."""
    from rankopt.devices import check_device

    check_device(cfg.training.device)  # a device this machine lacks fails here, in one line
    model = load_pretrained(cfg.model, num_labels, cfg.task.type)
    _reset_head(model, find_head(model), cfg.training.seed)
    return model


def build_model(cfg: Config, num_labels: int) -> AdaptedModel:
    """The pretrained model with adapters on its target layers, checked against the rank budget."""
    model = load_base(cfg, num_labels)
    adapted = adapt(model, cfg.model.target_modules, cfg.adapter.init_rank, cfg.adapter.alpha,
                    cfg.adapter.dropout, seed=cfg.training.seed)
    cfg.budget(len(adapted.adapters))  # raises when the budget cannot be met
    max_possible = min(min(l.in_features, l.out_features) for l in adapted.adapters.values())
    if cfg.controller.enabled and cfg.controller.max_rank > max_possible:
        from rankopt.errors import RankoptError

        raise RankoptError(f"controller.max_rank={cfg.controller.max_rank} exceeds the smallest adapted layer "
                           f"({max_possible}); lower it")
    return adapted


def train(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None, *, data_dir: str | None = None,
          tracking_uri: str | None = None, out: str | Path = "runs", callbacks: list[Callback] | None = None,
          track: bool = True, run_name: str | None = None) -> TrainResult:
    """Fine-tune once with adaptive ranks; log to MLflow unless ``track`` is False.

    Example:
        >>> import rankopt
        >>> result = rankopt.train("demo", {"training.steps": 60})  # doctest: +SKIP
        >>> result.metric, result.total_rank  # doctest: +SKIP
    """
    cfg = resolve_config(preset, overrides, data_dir)
    data = prepare_data(cfg)
    adapted = build_model(cfg, data.num_labels)
    callbacks = list(callbacks or [])
    if not track:
        return train_adapted(cfg, adapted, data, callbacks)
    from rankopt import tracking

    if tracking_uri:
        tracking.check_reachable(tracking_uri)  # a wrong or dead URI fails here, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.default_tracking_uri(out)
    client = tracking.client_for(uri)
    exp_id = tracking.ensure_experiment(client, cfg.task.name, out / "mlartifacts" if not tracking_uri else None)
    run = client.create_run(exp_id, run_name=run_name, tags={"rankopt.kind": "train", "rankopt.task": cfg.task.name})
    run_id = run.info.run_id
    tracking.log_params(client, run_id, cfg.model_dump(exclude={"search"}))
    base = resolve_model_path(cfg.model.name)
    logger = tracking.MLflowLogger(client, run_id, base_model=cfg.model.name if base == cfg.model.name else base,
                                   meta={"config": cfg.model_dump()})
    try:
        result = train_adapted(cfg, adapted, data, [*callbacks, logger])
    except BaseException:
        client.set_terminated(run_id, "KILLED" if _interrupted() else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    result.run_id = run_id
    return result


def _interrupted() -> bool:
    import sys

    return sys.exc_info()[0] is KeyboardInterrupt
