"""Mixed precision: a low-precision frozen base, float32 trained tensors, autocast and loss scaling.

Why float32 for everything that is trained: in float16, Adam's eps (1e-8) rounds to 0 and the
first steps overflow; in bfloat16, ``exp_avg_sq * 0.999`` rounds back to itself and most small
updates round away (review 2026-12, finding 1). So adapters, the task head and Adam's state are
float32 (the adapters cast their input, as PEFT does), and speed comes from ``training.precision``:
``bf16`` / ``fp16`` run forward and backward under ``torch.autocast``; ``fp16`` also scales the
loss (``torch.amp.GradScaler``), and a step whose gradients overflowed is skipped by the optimizer
*and* by the controller (no sensitivity is read from inf/NaN gradients).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rankopt.errors import RankoptError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_trainable_dtypes(adapted) -> None:
    """Refuse trained tensors that are not float32 (a model cast with ``.half()`` after ``adapt``)."""
    for p in adapted.trainable_parameters():
        if p.dtype != torch.float32:
            name = str(p.dtype).removeprefix("torch.")
            raise RankoptError(f"adapters and head are {name}; rankopt trains them in float32 only (a {name} "
                               "Adam diverges or stalls): keep them float32 and set training.precision: bf16 or "
                               "fp16 to run the base under autocast")


def keep_head_float32(model: nn.Module, heads: list[str]) -> None:
    """Cast the task head to float32 and its input with it, so a bf16/fp16 base can feed it."""
    for name in heads:
        head = model.get_submodule(name)
        head.float()
        head.register_forward_pre_hook(_cast_inputs_to_float32)


def _cast_inputs_to_float32(module: nn.Module, args: tuple):
    if torch.is_autocast_enabled():
        return None
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class Precision:
    """Autocast and, for fp16, a loss scaler for one run on ``device``."""

    def __init__(self, mode: str, device: str):
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_and_check(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
        """Gradients back at their true scale; False when they overflowed (fp16 only, one host sync).

        Without a scaler nothing is read from the device and every step counts as finite.
        """
        if self.scaler is None:
            return True
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        return bool(torch.nn.utils.get_total_norm(grads).isfinite())

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips the step when unscale_ found inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
