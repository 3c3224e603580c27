"""Put SVD adapters on the target linears of a transformers model and freeze the rest.

Adapters are kept in a registry by object (:class:`AdaptedModel.adapters`, name -> layer),
never found again by substrings of parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankopt.adapters.groups import add_penalty_gradient, orthogonality_penalty as grouped_penalty
from rankopt.adapters.layer import SVDLinear
from rankopt.errors import RankoptError

HEAD_NAMES = ("classifier", "score", "lm_head")


@dataclass
class AdaptedModel:
    """A model with adapters: the module itself, its adapters by path, and its trainable head."""

    model: nn.Module
    adapters: dict[str, SVDLinear]
    head_names: list[str] = field(default_factory=list)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.adapters.items()}

    def total_rank(self) -> int:
        return sum(layer.rank for layer in self.adapters.values())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.adapters.values() for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.head_names for p in self.model.get_submodule(name).parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter_parameters() + self.head_parameters()

    def count_trainable(self) -> int:
        return self.count_adapter() + sum(p.numel() for p in self.head_parameters())

    def count_adapter(self) -> int:
        """Parameters of the live components (a static adapter's unused slots are not counted)."""
        return sum(layer.rank * (layer.in_features + layer.out_features + 1) for layer in self.adapters.values())

    def make_static(self, capacity: int) -> None:
        """Static shapes: every adapter padded once to ``capacity`` slots (at most its layer's size)."""
        for layer in self.adapters.values():
            layer.make_static(max(layer.rank, min(capacity, layer.in_features, layer.out_features)))


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the ``nn.Linear`` modules to adapt (suffix match on dotted names, or all-linear)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name.split(".")[0] == h or name.endswith(h)
                                                    for h in HEAD_NAMES):
            continue
        if targets == "all-linear":
            if ".pooler" in name or name.startswith("pooler"):
                continue
            names.append(name)
        elif _matches(name, list(targets)):
            names.append(name)
    return names


def find_head(model: nn.Module) -> list[str]:
    """Top-level task heads that must be trained and saved (PEFT's modules_to_save)."""
    return [n for n, _ in model.named_children() if n in HEAD_NAMES[:2]]


def adapt(model: nn.Module, targets: list[str] | str, rank: int, alpha: float, dropout: float = 0.0,
          seed: int = 0, train_head: bool = True, rslora: bool = False) -> AdaptedModel:
    """Freeze ``model``, wrap every target linear in an :class:`SVDLinear`, unfreeze the head.

    The scale is alpha / rank, or alpha / sqrt(rank) with ``rslora`` (rank-stabilised: the
    update's size then does not shrink as the rank grows).
    """
    names = find_targets(model, targets)
    if not names:
        raise RankoptError(f"model.target_modules {targets!r} match no linear layer of this model; "
                           "list module-name suffixes such as 'query' or use 'all-linear'")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, SVDLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if rank > min(base.in_features, base.out_features):
            raise RankoptError(f"adapter.init_rank={rank} exceeds the size of layer {name} "
                               f"({base.out_features}x{base.in_features}); lower it")
        layer = SVDLinear(base, rank, scale=lora_scale(alpha, rank, rslora), dropout=dropout, generator=generator)
        setattr(parent, child, layer)
        adapters[name] = layer
    heads = find_head(model) if train_head else []
    for head in heads:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    return AdaptedModel(model=model, adapters=adapters, head_names=heads)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def orthogonality_penalty(adapted: AdaptedModel) -> torch.Tensor:
    """The sum of every adapter's penalty, batched over same-shape layers (see :mod:`.groups`)."""
    return grouped_penalty(adapted.adapters.values())


def add_orthogonality_gradient(adapted: AdaptedModel, weight: float) -> None:
    """Add ``weight`` x the penalty's gradient to the factors' gradients: :func:`.groups.add_penalty_gradient`."""
    add_penalty_gradient(adapted.adapters.values(), weight)
