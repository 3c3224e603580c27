"""Causal-LM evaluation in chunks: the model's own loss, without (batch, seq, vocab) logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rankopt.config import build_config
from rankopt.training.lm_loss import summed_target_loss

VOCAB = 96


class LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # the head's transposed weight is no logits
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.dim() and t.shape[-1] == VOCAB:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def llama_and_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_chunked_loss_is_the_models_loss(llama_and_batch):
    model, batch = llama_and_batch
    with torch.no_grad():
        reference = model(**batch).loss
        total, count = summed_target_loss(model, batch, chunk_tokens=3)
    assert count == int((batch["labels"][:, 1:] != -100).sum()) == 3 * 6 + 3
    assert float(total) / count == pytest.approx(float(reference), rel=1e-5)


def test_no_full_vocabulary_logits_for_the_batch(llama_and_batch):
    model, batch = llama_and_batch
    with torch.no_grad(), LargestOutput() as seen:
        summed_target_loss(model, batch, chunk_tokens=4)
    assert 0 < seen.largest <= 4 * VOCAB  # at most one chunk of logits at a time (the batch has 40 x VOCAB)


def test_causal_lm_eval_batch_defaults_to_the_micro_batch():
    raw = {"task": {"name": "t", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss"},
           "model": {"name": "m"}, "training": {"batch_size": 4}}
    assert build_config(raw).training.eval_batch_size == 4
    assert build_config(raw, {"training.eval_batch_size": 2}).training.eval_batch_size == 2
    classify = {"task": {"name": "t", "builtin": "chatterbot", "text_columns": ["text"]}, "model": {"name": "m"}}
    assert build_config(classify).training.eval_batch_size == 64
