"""Packing short causal-LM examples into rows of ``max_length`` tokens, without attention across them.

Examples are placed greedily in data order; each row carries ``position_ids`` that restart at 0
for every example and no ``attention_mask``. From such position ids transformers builds a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``, for SDPA, eager and
flash attention alike), so a token attends only to earlier tokens of its own example. The first
token of every example gets no label, so nothing is learned across a boundary. Padding at the
end of a batch is one more "example" (its own positions, no labels).
"""

from __future__ import annotations

import datasets
import torch


def pack(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    current: dict[str, list] = {k: [] for k in rows}

    def close() -> None:
        if current["input_ids"]:
            for k in rows:
                rows[k].append(current[k])
            for k in current:
                current[k] = []

    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        ids, labels = ids[:max_length], labels[:max_length]
        if len(current["input_ids"]) + len(ids) > max_length:
            close()
        current["input_ids"] += ids
        current["labels"] += [-100, *labels[1:]]
        current["position_ids"] += list(range(len(ids)))
    close()
    return datasets.Dataset.from_dict(rows)


class PackedCollator:
    """Pads packed rows to the batch's longest as a separate, unlabelled segment; no attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            extra = width - len(r["input_ids"])
            out["input_ids"].append(list(r["input_ids"]) + [self.pad] * extra)
            out["labels"].append(list(r["labels"]) + [-100] * extra)
            out["position_ids"].append(list(r["position_ids"]) + list(range(extra)))
        batch = {k: torch.tensor(v) for k, v in out.items()}
        batch["use_cache"] = False  # with a cache transformers ignores the packed position ids
        return batch
