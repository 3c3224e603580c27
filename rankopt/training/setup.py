"""What a run starts from: tokenized task data (cached per process) and the adapted model.

The tuner, the workers and :func:`rankopt.train` all build a run the same way through here, so
a trial and a single fine-tune of the same config see the same data, head and adapters.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from rankopt.adapters.model import AdaptedModel, adapt, find_head
from rankopt.config import Config
from rankopt.tasks.data import TaskData, prepare
from rankopt.tasks.modeling import load_pretrained, load_tokenizer, name_labels
from rankopt.training.precision import keep_head_float32


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


def _reset_head(model: nn.Module, heads: list[str], seed: int, label_mean: float | None = None) -> None:
    """Re-draw the task head from ``seed`` so a run does not depend on what was loaded before it.

    A regression head's output bias starts at ``label_mean``. From zero, on targets such as STS-B's
    0-5 scores, the fastest way down the squared error is to move every prediction towards the
    mean through the encoder, and a LoRA adapter learning at once does exactly that: its outputs
    collapse to a constant (Pearson near 0 at every learning rate) before the head's bias, moving
    by one learning rate per Adam step, gets there.
    """
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in heads:
            for module in model.get_submodule(head).modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if module.bias is not None:
                        module.bias.zero_()
        last = [m for head in heads for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)]
        if label_mean is not None and last and last[-1].out_features == 1 and last[-1].bias is not None:
            last[-1].bias.fill_(label_mean)


def load_base(cfg: Config, num_labels: int, label_names: list[str] | None = None,
              label_mean: float | None = None) -> nn.Module:
    """A fresh copy of the pretrained model with its task head drawn from ``cfg.training.seed``.

    ``label_names`` (the task's, in id order) go on the model's config, and from there into
    every adapter and merged model exported from this run. ``label_mean`` (regression: the
    training targets' mean, :attr:`TaskData.label_mean`) is where the head's output starts.
    """
    from rankopt.devices import check_device

    check_device(cfg.training.device)  # a device this machine lacks fails here, in one line
    model = load_pretrained(cfg.model, num_labels, cfg.task.type, cfg.training.device)
    name_labels(model, label_names)
    heads = find_head(model)
    keep_head_float32(model, heads)  # trained in float32 whatever the base's dtype
    _reset_head(model, heads, cfg.training.seed, label_mean)
    return model


def build_model(cfg: Config, num_labels: int, label_names: list[str] | None = None,
                label_mean: float | None = None) -> AdaptedModel:
    """The pretrained model with adapters on its target layers, checked against the rank budget."""
    model = load_base(cfg, num_labels, label_names, label_mean)
    adapted = adapt(model, cfg.model.target_modules, cfg.adapter.init_rank, cfg.adapter.alpha,
                    cfg.adapter.dropout, seed=cfg.training.seed, rslora=cfg.adapter.rslora)
    cfg.budget(len(adapted.adapters))  # raises when the budget cannot be met
    max_possible = min(min(l.in_features, l.out_features) for l in adapted.adapters.values())
    if cfg.controller.enabled and cfg.controller.max_rank > max_possible:
        from rankopt.errors import RankoptError

        raise RankoptError(f"controller.max_rank={cfg.controller.max_rank} exceeds the smallest adapted layer "
                           f"({max_possible}); lower it")
    return adapted
