"""Memory: gradient checkpointing that still trains adapters, and freeing a trial's memory.

Checkpointing is transformers' own, non-reentrant (``use_reentrant=False``): with the reentrant
variant a checkpointed block whose inputs do not require grad (the frozen embeddings) would
give the adapters inside it no gradient at all; ``enable_input_require_grads`` covers models
that force the reentrant path. Between trials of a study the last model, optimizer and
activations are dropped with ``gc.collect()`` (exceptions such as a pruned trial keep frames, and
with them the model, alive in reference cycles) and the CUDA cache is emptied, the known cause
of out-of-memory errors late in long Optuna studies.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from rankopt.errors import RankoptError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch it on (once: the gradient start's pass and the trainer both ask for it)."""
    if _checkpointing(model) and getattr(model, "_require_grads_hook", None) is not None:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RankoptError(f"{type(model).__name__} does not support gradient checkpointing; "
                           "set training.gradient_checkpointing: false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing


def _checkpointing(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5.x's name, then 4.x's
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


def release_memory() -> None:
    """Collect unreachable models and hand cached CUDA blocks back (when CUDA is in use)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
