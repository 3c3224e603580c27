"""What the memory plan reads off a model built on the meta device: weight bytes, block sizes, adapted layers.

Nothing here has storage: shapes and dtypes only, so an 8B model is read in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankopt.adapters.model import HEAD_NAMES, find_head, find_targets
from rankopt.config import ModelConfig
from rankopt.errors import RankoptError
from rankopt.training.activations import ATTENTION_IN, MLP_IN, SLOTS, Block

# bitsandbytes' storage per weight: nf4 packs two per byte, plus one 8-bit absmax per 64-weight block and
# (double quantization) one float32 per 256 absmax; LLM.int8 keeps one int8 per weight and a float32 scale per row
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_WEIGHT = 1.0

# module-name endings -> the slot of activations.SLOTS they fill (attention.output.dense is tried before output.dense)
_SLOT_NAMES = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
               "o_proj": "o", "attention.output.dense": "o", "gate_proj": "gate", "up_proj": "up",
               "intermediate.dense": "up", "down_proj": "down", "output.dense": "down"}


@dataclass(frozen=True)
class AdaptedLayer:
    """One linear that gets an adapter: its path, sizes and slot in its block."""

    name: str
    in_features: int
    out_features: int
    slot: str


def weight_bytes(model: nn.Module, cfg: ModelConfig, dtype: torch.dtype) -> tuple[int, str]:
    """Bytes of the frozen base (and the task head, float32) as ``load_pretrained`` would hold them, and how."""
    heads = set(find_head(model))
    itemsize = torch.empty((), dtype=dtype).element_size()
    quantized, rows, plain, head = 0, 0, 0, 0
    seen: set[int] = set()  # tied weights (embeddings and LM head) are one tensor
    for module_name, module in model.named_modules():
        top = module_name.split(".")[0]
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if top in heads:
                head += p.numel() * 4  # keep_head_float32
            elif cfg.quantization and isinstance(module, nn.Linear) and name == "weight" and top not in HEAD_NAMES:
                quantized += p.numel()
                rows += module.out_features
            else:
                plain += p.numel() * itemsize
    plain += sum(b.numel() * b.element_size() for b in model.buffers())
    per = {"4bit": NF4_BYTES_PER_WEIGHT, "8bit": INT8_BYTES_PER_WEIGHT}.get(cfg.quantization or "", 0.0)
    scales = 4 * rows if cfg.quantization == "8bit" else 0
    total = int(plain + head + quantized * per + scales)
    name = str(dtype).removeprefix("torch.")
    how = (f"{quantized / 1e9:.2f}B weights in {cfg.quantization} (bitsandbytes), the rest {name}"
           if cfg.quantization else f"{_count(model) / 1e9:.2f}B params in {name}")
    return total, how


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adapted_layers(model: nn.Module, targets: list[str] | str, block: Block | None = None) -> list[AdaptedLayer]:
    """Every linear ``adapt`` would wrap, with the slot it fills in its block."""
    names = find_targets(model, targets)
    if not names:
        raise RankoptError(f"model.target_modules {targets!r} match no linear layer of this model; "
                           "list module-name suffixes such as 'query' or use 'all-linear'")
    layers = []
    for name in names:
        module = model.get_submodule(name)
        layers.append(AdaptedLayer(name, module.in_features, module.out_features,
                                   _slot(name, module, block)))
    return layers


def _slot(name: str, module: nn.Linear, block: Block | None) -> str:
    for ending, slot in _SLOT_NAMES.items():
        if name == ending or name.endswith("." + ending):
            return slot
    if block is not None and module.in_features == block.intermediate:
        return "down"
    return "q"  # an unknown linear reading the hidden states: counted as one more private input copy


def block_of(config, model: nn.Module, targets: list[str] | str, task_type: str) -> Block:
    """The sizes of one of ``model``'s transformer blocks and which of its linears carry adapters."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    decoder = task_type == "causal_lm" or hasattr(config, "num_key_value_heads")
    rough = Block("decoder" if decoder else "encoder", hidden, heads, kv_heads, head_dim, intermediate, frozenset())
    first = [layer for layer in adapted_layers(model, targets, rough) if _block_index(layer.name) == 0]
    slots = frozenset(layer.slot for layer in first)
    return Block(rough.kind, hidden, heads, kv_heads, head_dim, intermediate, slots,
                 hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
                 attention_dropout=float(getattr(config, "attention_probs_dropout_prob", None)
                                         or getattr(config, "attention_dropout", 0.0) or 0.0))


def block_linear_weights(model: nn.Module) -> int:
    """Weights of the linears in one transformer block (the first)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and _block_index(name) == 0)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "layer", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def input_bytes(slot: str, stream: int, act: int) -> int:
    """Bytes per element of the input an adapter in ``slot`` reads (the residual stream's or a matmul's)."""
    return stream if SLOTS[slot] in (ATTENTION_IN, MLP_IN) else act
