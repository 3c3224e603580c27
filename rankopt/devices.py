"""Which accelerator a job runs on: check the name and that this machine has it, before any work.

Workers on a machine with several GPUs pin one each with ``--device cuda:K`` (or by starting
each with its own ``CUDA_VISIBLE_DEVICES=K`` and ``--device cuda``).
"""

from __future__ import annotations

import os
import re

from rankopt.errors import RankoptError

DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$")


def check_device(name: str) -> str:
    """``name`` if it is a device torch can use here, else a one-line :class:`RankoptError`."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise RankoptError(f"device '{name}' is not one of cpu, cuda, cuda:K, mps, xpu, xpu:K; "
                           "pick a GPU with --device cuda:K")
    kind, _, index = name.partition(":")
    if kind == "cpu":
        return name
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RankoptError(f"device '{name}' asked for, but torch sees no CUDA GPU on this machine; "
                               "use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise RankoptError(f"device '{name}' does not exist: {count} CUDA GPU(s) visible{shown}; "
                               f"use cuda:0..cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise RankoptError("device 'mps' asked for, but this machine has no Apple GPU torch can use; use --device cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise RankoptError(f"device '{name}' asked for, but torch sees no XPU on this machine; use --device cpu")
    return name
