"""Causal-LM evaluation loss without full-vocabulary logits for the whole batch.

A decoder's forward with labels materialises (batch, seq, vocab) logits and transformers then
upcasts them to float32: Llama-3's 128k vocabulary x 64 x 1024 tokens is ~34 GB (review 2026-12,
finding 12). Here the decoder body runs once, and the LM head plus cross-entropy run on the
target positions only, ``chunk_tokens`` at a time, in float32: memory ~ chunk x vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 1024


def summed_target_loss(model, batch: dict, chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over the target tokens, their count) for one batch."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = (targets != -100).nonzero(as_tuple=True)  # where position t predicts labels[t + 1]
    count = int(positions[0].numel())
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None or count == 0:
        if count == 0:
            return torch.zeros(()), 0
        return model(**batch).loss.float() * count, count  # no separable head: the model's own loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs).last_hidden_state[:, :-1]
    chosen, wanted = hidden[positions], targets[positions]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        logits = head(chosen[start:start + chunk_tokens]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, wanted[start:start + chunk_tokens], reduction="sum")
    return total, count
