"""The parts of a run's memory, one process's share, as arithmetic on the model's shapes and the preset.

Each part is resident in some of three phases: the gradient-init pass, a training step,
evaluation. The trained tensors and the base live through all three; activations, logits and
the weight-gradient probe only while their phase runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn

from rankopt.adapters.model import find_head
from rankopt.config import Config
from rankopt.training import activations as act
from rankopt.training.lm_loss import CHUNK_TOKENS
from rankopt.training.model_shapes import AdaptedLayer, block_linear_weights, input_bytes

GiB = 1 << 30
INIT, TRAIN, EVAL = "init pass", "training step", "evaluation"
PHASES = (INIT, TRAIN, EVAL)
# the training loss's float32 log-softmax output, its gradient and the logits' gradient, alive at once
LOSS_BYTES_PER_LOGIT = 12
SMALLER_MICRO_BATCH = ("lower training.batch_size (raise training.grad_accum_steps to keep the batch) "
                       "or task.max_length")


@dataclass(frozen=True)
class Part:
    """One consumer of memory: its size, the phases it is resident in, how it was counted, what lowers it."""

    name: str
    bytes: int
    phases: frozenset[str]
    detail: str
    knob: str = ""


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) < GiB else f"{n / GiB:.1f} GiB"


class RunParts:
    """The parts of one run that follow from the model's shapes and the preset (one process's share)."""

    def __init__(self, cfg: Config, model: nn.Module, blocks: int, vocab: int, block: act.Block,
                 layers: list[AdaptedLayer], num: act.Numerics, processes: int):
        self.cfg, self.model, self.block, self.layers, self.num = cfg, model, block, layers, num
        self.blocks, self.processes, self.seq = blocks, processes, cfg.task.max_length
        self.vocab = vocab if cfg.task.type == "causal_lm" else 0
        self.rows = cfg.training.batch_size // processes  # of every micro-batch, on this process
        self.block_linears = block_linear_weights(model)

    def all(self) -> list[Part]:
        return self.trainable() + self.training() + self.init_pass() + self.evaluation()

    def trainable(self) -> list[Part]:
        """Adapters at max_rank and the task head, float32: value, gradient, AdamW's two moments and step counts."""
        r = self.num.rank
        adapters = sum(r * (a.in_features + a.out_features + 1) for a in self.layers)
        head = sum(p.numel() for name in find_head(self.model) for p in self.model.get_submodule(name).parameters())
        what = f"{adapters / 1e6:.1f}M params at rank {r}" + (f" + {head / 1e3:.0f}k head" if head else "")
        return [Part("adapters + AdamW", 20 * (adapters + head), frozenset(PHASES),
                     f"{what} x 20 B (value, grad, Adam m, v, step)", "lower controller.max_rank")]

    def training(self) -> list[Part]:
        t = self.cfg.training
        tokens, ckpt = self.rows * self.seq, t.gradient_checkpointing
        chosen, other = (self._activations(tokens, c) for c in (ckpt, not ckpt))
        micro = f"{self.rows} x {self.seq} tokens"
        parts = [Part("activations", chosen, frozenset({TRAIN}),
                      f"{micro}, {self.blocks} blocks, checkpointing {'on' if ckpt else 'off'} "
                      f"({'off' if ckpt else 'on'}: {gib(other)})",
                      SMALLER_MICRO_BATCH if ckpt else "set training.gradient_checkpointing=true")]
        if self.vocab:
            parts.append(Part("logits + loss", LOSS_BYTES_PER_LOGIT * tokens * self.vocab, frozenset({TRAIN}),
                              f"{micro} x {self.vocab} vocab x {LOSS_BYTES_PER_LOGIT} B (float32)",
                              SMALLER_MICRO_BATCH))
        c = self.cfg.controller
        if c.enabled and c.growth == "gradient":
            parts.append(self._probe(TRAIN, tokens * t.grad_accum_steps, t.grad_accum_steps))
        return parts

    def init_pass(self) -> list[Part]:
        """``adapter.init: gradient``: a training-sized pass before step 1 (gradient_init as of issue 23).

        Micro-batches of ``training.batch_size`` rows with dropout and checkpointing as in training,
        the causal-LM loss in chunks of target tokens (each chunk's float32 log-softmax kept for the
        backward: 4 bytes per target and vocab entry, plus one chunk's working set), the probe
        keeping ``controller.probe_tokens`` rows per layer for the whole pass.
        """
        if self.cfg.adapter.init != "gradient":
            return []
        tokens, ckpt = self.rows * self.seq, self.cfg.training.gradient_checkpointing
        parts = [Part("init pass: activations", self._activations(tokens, ckpt), frozenset({INIT}),
                      "as a training micro-batch",
                      SMALLER_MICRO_BATCH if ckpt else "set training.gradient_checkpointing=true")]
        if self.vocab:
            chunk = min(CHUNK_TOKENS, tokens)
            parts.append(Part("init pass: chunked loss", (4 * tokens + 8 * chunk) * self.vocab, frozenset({INIT}),
                              f"float32 log-softmax of the targets, {chunk}-token chunks",
                              SMALLER_MICRO_BATCH))
        micro_batches = math.ceil(self.cfg.adapter.init_examples / self.cfg.training.batch_size)
        parts.append(self._probe(INIT, tokens * micro_batches, micro_batches))
        return parts

    def evaluation(self) -> list[Part]:
        """One evaluation batch without a graph (no autocast: evaluate() runs the base's dtype), logits in chunks."""
        t = self.cfg.training
        tokens = t.eval_batch_size * self.seq
        num = replace(self.num, autocast=False, act=self.num.stream, training=False)
        forward = act.forward_working_set(self.block, num) * tokens + 2 * tokens * self.block.hidden * num.act
        detail = f"{t.eval_batch_size} x {self.seq} tokens, no graph"
        if self.vocab:
            chunk = min(CHUNK_TOKENS, tokens)
            per_logit = num.stream + 4 + (4 if num.stream < 4 else 0)  # head output, float32 copy, log-softmax
            forward += chunk * self.vocab * per_logit
            detail += f", logits in {chunk}-token chunks"
        return [Part("evaluation forward", int(forward), frozenset({EVAL}), detail, "lower training.eval_batch_size")]

    def _activations(self, tokens: int, checkpointing: bool) -> int:
        """Saved tensors of every block (or, checkpointed, every block's input and one block's), the rest, and
        one block's backward working set."""
        b, num = self.block, self.num
        one = act.saved_per_token(b, num, self.seq, masked=True) * tokens + self._casts()
        # after the blocks: the final norm's float32 input; once per forward: RoPE's cos and sin, the mask
        rest = tokens * (4 * b.hidden + 2 * b.head_dim * num.act + self.seq * num.act) if b.kind == "decoder" else 0
        work = act.backward_working_set(b) * tokens + self._dequantized()
        if checkpointing:
            return int(self.blocks * act.checkpointed_per_token(b, num) * tokens + one + rest + work)
        return int(self.blocks * one + rest + work)

    def _casts(self) -> float:
        """Per block: autocast's half copies of P and Q, and of a float32 frozen base, kept for the backward."""
        casts = act.adapter_weight_casts(self.block, self.num, [(a.in_features, a.out_features) for a in self.layers])
        casts /= self.blocks
        if self.num.autocast and self.num.stream == 4 and not self.cfg.model.quantization:
            casts += 2 * self.block_linears
        return casts

    def _dequantized(self) -> int:
        """A quantized base's largest weight, dequantized for a matmul of the backward."""
        if not self.cfg.model.quantization:
            return 0
        return max(a.in_features * a.out_features for a in self.layers) * self.num.act

    def _probe(self, phase: str, tokens: int, micro_batches: int) -> Part:
        """The weight-gradient probe's rows at the peak: inputs, and output gradients of the earlier micro-batches.

        At most ``probe_tokens`` rows per layer for a whole step (or the init pass); at the peak
        (the last micro-batch's backward starting) the output gradients of its own rows are not
        in yet: they arrive as the backward frees activations.
        """
        rows = min(max(1, self.cfg.controller.probe_tokens // self.processes), tokens)
        inputs = sum(a.in_features * input_bytes(a.slot, self.num.stream, self.num.act) for a in self.layers)
        grads = sum(a.out_features * self.num.act for a in self.layers)
        when = "growth steps" if phase == TRAIN else "whole pass"
        return Part(f"{'init pass: ' if phase == INIT else ''}gradient probe",
                    rows * inputs + rows * (micro_batches - 1) // micro_batches * grads, frozenset({phase}),
                    f"{rows} rows per layer ({when})",
                    "lower controller.probe_tokens")
