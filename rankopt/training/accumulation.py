"""Gradient accumulation: one optimizer step from K micro-batches, weighted as one large batch.

Each micro-batch's mean loss is weighted by its share of the accumulated batch's targets: its
response tokens for a causal LM (next-token targets, labels[:, 1:] != -100), its examples
otherwise. The summed gradient is then exactly that of the mean over the whole accumulated batch
(not a mean of per-micro-batch means, which would over-weight short micro-batches). The trainer
collates its batches on the host, where counting costs no device sync; batches already on a
device (a benchmark's, say) are counted there, the weights staying device tensors, never copied
back to the host.
"""

from __future__ import annotations

import torch


def target_count(batch: dict, causal_lm: bool) -> int | torch.Tensor:
    """Targets the loss averages over in ``batch``: an int for a host-side batch, else a count on its device."""
    labels = batch["labels"]
    if not causal_lm:
        return int(labels.shape[0])
    count = torch.count_nonzero(labels[:, 1:] != -100)
    return int(count) if labels.device.type == "cpu" else count


def micro_batch_weights(batches: list[dict], causal_lm: bool,
                        shards: list[dict] | None = None) -> list[float | torch.Tensor]:
    """Weight of each micro-batch's mean loss: its targets over all targets (0 for one without any).

    With ``shards`` (this process's rows of each micro-batch, under data parallelism) the weights
    are those of the shards' mean losses, still over the targets of the whole global batch, so
    that the gradients summed over processes are those of the global batch's mean loss.
    """
    total = sum(target_count(b, causal_lm) for b in batches)
    counts = [target_count(b, causal_lm) for b in (batches if shards is None else shards)]
    if torch.is_tensor(total):  # counted on a device: divide there (0 targets in all: weights 0)
        return [c / total.clamp_min(1) for c in counts]
    return [c / total if total else 0.0 for c in counts]


def as_micro_batches(batch: dict | list[dict]) -> list[dict]:
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
