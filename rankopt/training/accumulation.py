"""Gradient accumulation: one optimizer step from K micro-batches, weighted as one large batch.

Each micro-batch's mean loss is weighted by its share of the accumulated batch's targets: its
response tokens for a causal LM (next-token targets, labels[:, 1:] != -100), its examples
otherwise. The summed gradient is then exactly that of the mean over the whole accumulated batch
(not a mean of per-micro-batch means, which would over-weight short micro-batches). The counts
are read from the host-side batches, so weighting costs no device sync.
"""

from __future__ import annotations

import numpy as np
import torch


def target_count(batch: dict, causal_lm: bool) -> int:
    """Targets the loss averages over in ``batch`` (a host-side, collated micro-batch)."""
    labels = batch["labels"]
    if not causal_lm:
        return int(labels.shape[0])
    return int(np.count_nonzero(labels[:, 1:].numpy() != -100))


def micro_batch_weights(batches: list[dict], causal_lm: bool, shards: list[dict] | None = None) -> list[float]:
    """Weight of each micro-batch's mean loss: its targets over all targets (0 for one without any).

    With ``shards`` (this process's rows of each micro-batch, under data parallelism) the weights
    are those of the shards' mean losses, still over the targets of the whole global batch, so
    that the gradients summed over processes are those of the global batch's mean loss.
    """
    total = sum(target_count(b, causal_lm) for b in batches)
    counts = [target_count(b, causal_lm) for b in (batches if shards is None else shards)]
    return [c / total if total else 0.0 for c in counts]


def as_micro_batches(batch: dict | list[dict]) -> list[dict]:
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
