"""Activation memory of one transformer block, from what autograd saves for the backward.

Every figure is bytes per token of the micro-batch, read off the tensors each op of the block
saves (``grad_fn._saved_*``; ``tests/test_activations.py`` walks the graph of real blocks and
checks these sums). The frozen base saves nothing of its own inputs: a matmul whose weight needs
no gradient keeps only the weight (a parameter, already counted), and bitsandbytes' 4-bit matmul
does the same. What remains, with h the hidden size, q/kv the query/key-value widths, i the MLP
width, a the bytes of the matmul outputs (2 under bf16/fp16 autocast or a half base, else 4):

* a Llama-style decoder block: two RMSNorms keep their float32 input (4h each); SDPA keeps q, k,
  v, its output, the log-sum-exp and its own copy of the mask (k and v repeated to q's width when a
  mask is passed with grouped-query heads, as transformers does for packed or padded rows); the
  gated MLP keeps the gate output, its activation and the up output (3ai);
* a BERT-style encoder block: two LayerNorms (float32 input, mean, rstd), the hidden dropouts'
  masks, GELU's input; attention as above on CUDA (flash / memory-efficient kernels), but on the
  CPU math path (taken whenever attention dropout is on) float32 q, k, v plus three
  (heads x seq) maps per token: the softmax, its dropout noise and the dropped probabilities;
* each adapter keeps its input for the gradient of Q: the same tensor for all adapters of one
  input when it is float32 and nothing casts it, else a private copy per adapter (``x.to(float32)``
  then autocast's cast to half: 2n bytes; float32 without autocast: 4n), plus the dropout mask
  (a bool on CUDA, float32 noise on the CPU), plus (token x rank) products of 8r bytes (4r under
  autocast).

The working set of one block's backward above its saved tensors is a calibration, not a
derivation: 4(i + h) bytes per token (the float32 gradient of one MLP-wide and one hidden-wide
tensor). Scratch measurements of peak RSS on SmolLM2-sized stacks of 2-6 blocks (512 tokens, each
precision and dropout setting) put it at 2.1k-8.8k bytes per token against the 8.4k taken; the
whole plan is held against measured peaks in ``tests/test_memory_plan_measured.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# the linears of a block, by role; the input they read and what else keeps that input
ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_ACT = "attention input", "attention output", "MLP input", "MLP activation"
SLOTS = {"q": ATTENTION_IN, "k": ATTENTION_IN, "v": ATTENTION_IN, "o": ATTENTION_OUT,
         "gate": MLP_IN, "up": MLP_IN, "down": MLP_ACT}


@dataclass(frozen=True)
class Block:
    """One transformer block's sizes, and which of its linears carry an adapter (by slot)."""

    kind: Literal["decoder", "encoder"]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    adapted: frozenset[str]  # slots of SLOTS ("gate" only in gated decoders)
    hidden_dropout: float = 0.0  # an encoder's own dropout after attention and MLP
    attention_dropout: float = 0.0

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def width(self, slot: str) -> int:
        """The input width of the linear in ``slot``."""
        return {ATTENTION_IN: self.hidden, ATTENTION_OUT: self.q_width, MLP_IN: self.hidden,
                MLP_ACT: self.intermediate}[SLOTS[slot]]


@dataclass(frozen=True)
class Numerics:
    """How a run computes: dtype sizes, autocast, device, adapter dropout and rank."""

    stream: int  # bytes of the residual stream: the base's dtype (the compute dtype of a 4-bit base)
    act: int  # bytes of matmul outputs: 2 under autocast, else the stream's
    autocast: bool
    on_cuda: bool
    adapter_dropout: bool
    rank: int
    training: bool = True  # dropouts active (False for the init pass, which runs in eval mode)

    @property
    def dropout_mask(self) -> int:
        """Bytes per element of a dropout mask: native_dropout's bool on CUDA, float noise in mul elsewhere."""
        return 1 if self.on_cuda else 4


def saved_per_token(block: Block, num: Numerics, seq_len: int, masked: bool) -> float:
    """Bytes autograd keeps per token for ``block`` until its backward (no checkpointing)."""
    h, i, a = block.hidden, block.intermediate, num.act
    if block.kind == "decoder":
        kept = 2 * (4 * h + 4)  # RMSNorm: float32 input, rsqrt
        kept += _attention(block, num, seq_len, masked)
        kept += 3 * a * i  # gate output (activation's input), activation, up output
    else:
        kept = 2 * (4 * h + 8)  # LayerNorm: float32 input, mean, rstd
        kept += _attention(block, num, seq_len, masked)
        if block.hidden_dropout > 0 and num.training:
            kept += 2 * h * (1 if num.on_cuda else a)
        kept += a * i  # GELU's input
    return kept + _adapter_inputs(block, num)


def _attention(block: Block, num: Numerics, seq_len: int, masked: bool) -> float:
    if block.kind == "encoder" and not num.on_cuda and block.attention_dropout > 0 and num.training:
        return 3 * 4 * block.hidden + 3 * 4 * block.heads * seq_len  # CPU math path, float32
    kv = block.q_width if masked and block.kv_width < block.q_width else block.kv_width
    mask = num.act * seq_len if masked else 0  # each block's SDPA keeps its own copy of the (seq x seq) mask
    return num.act * (2 * block.q_width + 2 * kv) + 4 * block.heads + mask  # q, out, k, v, log-sum-exp


def _adapter_inputs(block: Block, num: Numerics) -> float:
    """What the adapters keep: their inputs (shared or private copies), dropout masks, rank-wide products."""
    dropout = num.adapter_dropout and num.training
    kept = 0.0
    for role in (ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_ACT):
        slots = [s for s in block.adapted if SLOTS[s] == role]
        if not slots:
            continue
        n = block.width(slots[0])
        dtype = num.stream if role in (ATTENTION_IN, MLP_IN) else num.act
        if num.autocast or dropout or dtype != 4:
            copy = 2 if num.autocast else 4
            kept += len(slots) * n * (copy + (num.dropout_mask if dropout else 0))
        elif not _kept_elsewhere(block, role, num):
            kept += 4 * n  # the float32 input itself, once for the adapters that share it
    return kept + len(block.adapted) * num.rank * (4 if num.autocast else 8)


def _kept_elsewhere(block: Block, role: str, num: Numerics) -> bool:
    """Whether another op already keeps this input: SDPA keeps its output (not on the CPU math path)."""
    math_path = block.kind == "encoder" and not num.on_cuda and block.attention_dropout > 0 and num.training
    return role == ATTENTION_OUT and not math_path


def checkpointed_per_token(block: Block, num: Numerics) -> float:
    """With gradient checkpointing a block keeps only its input hidden states until its backward."""
    return num.stream * block.hidden


def backward_working_set(block: Block) -> float:
    """Bytes per token one block's backward needs above its saved tensors (measured, see the module doc)."""
    return 4 * (block.intermediate + block.hidden)


def forward_working_set(block: Block, num: Numerics) -> float:
    """Bytes per token of one block's forward without a graph (evaluation): the MLP's live intermediates.

    Gate and up outputs and the activation (3ai), and the adapters' float32 copy of the down input (4i).
    """
    return (3 * num.act + 4) * block.intermediate + 4 * block.hidden


def adapter_weight_casts(block: Block, num: Numerics, adapted_shapes: list[tuple[int, int]]) -> float:
    """Bytes per block (not per token) of the half copies autocast makes of P and Q and keeps for backward."""
    if not num.autocast:
        return 0.0
    return sum(2 * num.rank * (n_in + n_out) for n_in, n_out in adapted_shapes)
