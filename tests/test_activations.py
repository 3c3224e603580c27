"""The activation formulas against what autograd really saves, on tiny blocks built in code.

One forward of a 1-block and a 2-block model; every tensor the graph keeps for backward
(``grad_fn._saved_*``, parameters excluded, each storage once) is summed; the difference is one
block's saved bytes, which :func:`saved_per_token` (x tokens) plus the per-block weight casts
must match. CPU only: dropout masks as float noise, SDPA's CPU kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rankopt.adapters.model import adapt
from rankopt.training.activations import Block, Numerics, adapter_weight_casts, saved_per_token

DECODER_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                   "down": "down_proj"}
ENCODER_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense", "up": "intermediate.dense",
                   "down": "output.dense"}
B, S, RANK = 2, 24, 4  # S != head_dim, so no two saved shapes coincide


def graph_saved_bytes(loss: torch.Tensor, params: set[int]) -> int:
    """Bytes of the distinct storages the graph behind ``loss`` saved for backward, parameters excluded."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        # built-in nodes expose each saved tensor as _saved_*; a custom autograd.Function's node (the
        # adapter's fused update) holds them as saved_tensors
        for attr in [a for a in dir(node) if a.startswith("_saved_")] + ["saved_tensors"]:
            try:
                value = getattr(node, attr)
            except (RuntimeError, AttributeError):
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in params:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def decoder_saved(layers: int, slots: list[str], dtype, autocast: bool, dropout: float) -> int:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=50, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype)
    adapt(model, [DECODER_TARGETS[s] for s in slots], RANK, 8.0, dropout)
    model.train()
    ids = torch.randint(0, 50, (B, S))
    packed = torch.cat([torch.arange(S // 2), torch.arange(S // 2)]).repeat(B, 1)  # two examples a row: a mask
    batch = {"input_ids": ids, "labels": ids, "position_ids": packed, "use_cache": False}
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        loss = model(**batch).loss
    return graph_saved_bytes(loss, {p.untyped_storage().data_ptr() for p in model.parameters()})


def encoder_saved(layers: int, slots: list[str], autocast: bool, dropout: float) -> int:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=layers,
                        vocab_size=50, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    adapt(model, [ENCODER_TARGETS[s] for s in slots], RANK, 8.0, dropout)
    model.train()
    batch = {"input_ids": torch.randint(0, 50, (B, S)), "attention_mask": torch.ones(B, S, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        loss = model(**batch).loss
    return graph_saved_bytes(loss, {p.untyped_storage().data_ptr() for p in model.parameters()})


def shapes(kind: str, slots: list[str]) -> list[tuple[int, int]]:
    sizes = {"q": (64, 64), "k": (64, 32 if kind == "decoder" else 64), "v": (64, 32 if kind == "decoder" else 64),
             "o": (64, 64), "gate": (64, 160), "up": (64, 160), "down": (160, 64)}
    return [sizes[s] for s in slots]


ALL_DECODER = list(DECODER_TARGETS)


@pytest.mark.parametrize("slots, dtype, autocast, dropout", [
    (ALL_DECODER, torch.float32, False, 0.0),  # shared float32 inputs
    (ALL_DECODER, torch.float32, False, 0.05),  # private dropout copies and masks
    (ALL_DECODER, torch.bfloat16, True, 0.05),  # llm_gpu: bf16 base under bf16 autocast, dropout
    (ALL_DECODER, torch.bfloat16, True, 0.0),
    (ALL_DECODER, torch.bfloat16, False, 0.0),  # a bf16 base without autocast: float32 adapter copies
    (["q", "v"], torch.float32, False, 0.0),  # LoRA's classic targets
    (["q", "v", "down"], torch.bfloat16, True, 0.1),
], ids=["fp32", "fp32-dropout", "bf16-autocast-dropout", "bf16-autocast", "bf16-base", "fp32-qv", "bf16-qv-down"])
def test_decoder_block_formula_is_what_autograd_saves(slots, dtype, autocast, dropout):
    block_bytes = decoder_saved(2, slots, dtype, autocast, dropout) - decoder_saved(1, slots, dtype, autocast, dropout)
    stream = torch.empty((), dtype=dtype).element_size()
    num = Numerics(stream=stream, act=2 if autocast else stream, autocast=autocast, on_cuda=False,
                   adapter_dropout=dropout > 0, rank=RANK)
    block = Block("decoder", 64, 4, 2, 16, 160, frozenset(slots))
    formula = saved_per_token(block, num, S, masked=True) * B * S
    formula += adapter_weight_casts(block, num, shapes("decoder", slots))
    assert formula == pytest.approx(block_bytes, rel=0.01)


@pytest.mark.parametrize("slots, autocast, dropout", [
    (list(ENCODER_TARGETS), False, 0.0),  # MiniLM presets: float32, BERT's own dropouts on
    (list(ENCODER_TARGETS), False, 0.1),
    (list(ENCODER_TARGETS), True, 0.0),  # float32 base under bf16 autocast: half copies of the base weights too
    (["q", "v"], False, 0.0),
], ids=["fp32", "fp32-dropout", "autocast", "fp32-qv"])
def test_encoder_block_formula_is_what_autograd_saves(slots, autocast, dropout):
    block_bytes = encoder_saved(2, slots, autocast, dropout) - encoder_saved(1, slots, autocast, dropout)
    num = Numerics(stream=4, act=2 if autocast else 4, autocast=autocast, on_cuda=False, adapter_dropout=dropout > 0,
                   rank=RANK)
    block = Block("encoder", 64, 4, 4, 16, 160, frozenset(slots), hidden_dropout=0.1, attention_dropout=0.1)
    formula = saved_per_token(block, num, S, masked=True) * B * S
    formula += adapter_weight_casts(block, num, shapes("encoder", slots))
    if autocast:  # the frozen float32 weights' bf16 copies (the memory plan adds these per block)
        formula += 2 * (4 * 64 * 64 + 2 * 64 * 160)
    assert formula == pytest.approx(block_bytes, rel=0.01)
