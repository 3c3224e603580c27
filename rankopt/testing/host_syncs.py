"""Count a step's operations and the host syncs a GPU would pay for it, on a CPU-only machine.

On a GPU every op is a kernel launch, and a step stalls whenever the host waits for the device:
reading a value (``item``, ``bool``, ``tolist``), a device-to-host copy, a blocking host-to-device
copy, or an op whose output shape depends on the data (``nonzero``, boolean indexing). On the
CPU none of that is visible, since host and device are one. :class:`StepCounter` makes them
visible with a *shadow device*: tensors on the training device (the model's parameters and
buffers, and everything computed from them) are tagged, the training device is named ``cpu:0``
(a CPU tensor on it still reports ``cpu`` to torch, so the counter answers ``cpu:0`` for tagged
tensors), and every crossing between tagged and untagged tensors is counted by kind. A plain
``cpu`` target means the host, except in torch's own code (see ``TORCH``). Ops are counted through a ``TorchDispatchMode`` (views apart:
they launch nothing, ``_unsafe_view`` included; nor do ops on host tensors, such as torch AdamW's CPU step counts).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

DEVICE = torch.device("cpu", 0)  # the shadow training device
# torch's own code moves tensors to devices it got from C++ (``clip_grad_norm_``'s groups): those name the
# real device, ``cpu``, never the shadow one, so a move to ``cpu`` made there is no trip to the host
TORCH = str(Path(torch.__file__).parent)
aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
SYNC_KINDS = ("read", "to_host", "to_device_blocking", "data_dependent")
# views that torch does not flag as views (``matmul`` folds a batch through this one): they launch nothing either
UNFLAGGED_VIEWS = {aten._unsafe_view.default}


class StepCounter(TorchDispatchMode):
    """Counts ops (``ops`` on the device: launches; ``views``; ``host_ops``) and host round-trips by kind
    (``syncs``) while active.

    ``phase`` labels what is counted now (``counts[phase]``); the caller switches it around the
    parts of a step it wants apart (optimizer, reallocation).
    """

    def __init__(self):
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        self.phase = "step"
        self.counts: dict[str, Counter] = {}
        self.where: Counter = Counter()  # sync kind and op name, for finding them

    def place(self, tensors) -> None:
        """Put ``tensors`` (a module's, a batch's) on the shadow device."""
        for t in tensors:
            self.on_device[t] = True

    def is_on_device(self, t: torch.Tensor) -> bool:
        return t in self.on_device

    def count(self, key: str, n: int = 1, op: str = "") -> None:
        self.counts.setdefault(self.phase, Counter())[key] += n
        if key in SYNC_KINDS:
            self.where[f"{self.phase}: {key}: {op}"] += n

    def totals(self, phase: str | None = None) -> dict[str, int]:
        """ops, views, syncs (all kinds) and each kind, for one phase or all."""
        chosen = [self.counts.get(phase, Counter())] if phase else list(self.counts.values())
        total = sum(chosen, Counter())
        out = {"ops": total["ops"], "views": total["views"], "host_ops": total["host_ops"], "syncs": sum(total[k] for k in SYNC_KINDS)}
        out.update({k: total[k] for k in SYNC_KINDS})
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tagged = any(t in self.on_device for t in tensors)
        target = kwargs.get("device")
        on_device = tagged or (target is not None and torch.device(target) == DEVICE)
        self.count("views" if func.is_view or func in UNFLAGGED_VIEWS else "ops" if on_device else "host_ops")
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        if func is aten._local_scalar_dense.default and tagged:
            self.count("read", op=name)
        elif func in DATA_DEPENDENT and tagged:
            self.count("data_dependent", op=name)
        elif func is aten.index.Tensor and tagged and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.count("data_dependent", op="index by mask")
        elif func is aten._to_copy.default and target is not None:
            to_device = torch.device(target) == DEVICE
            if to_device and not tagged:
                if not kwargs.get("non_blocking"):
                    self.count("to_device_blocking", op=name)
            elif not to_device and tagged:
                self.count("to_host", op=name)
                return out  # now a host tensor
            if to_device:
                self.on_device[out] = True
            return out
        elif func is aten.copy_.default and (args[0] in self.on_device) != (args[1] in self.on_device):
            if args[0] in self.on_device:
                if not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                    self.count("to_device_blocking", op=name)
            else:
                self.count("to_host", op=name)
            return out
        if on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out

    @contextmanager
    def counting(self):
        """Active as a dispatch mode, with the Python-level reads and moves that bypass dispatch on the CPU."""
        counter = self
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}
        real_device = torch._C.TensorBase.device.__get__

        def device(t):
            return DEVICE if t in counter.on_device else real_device(t)

        def reading(name):
            def read(t, *a, **k):
                if t in counter.on_device:
                    counter.count("read", op=name)
                return originals[name](t, *a, **k)
            return read

        def to_host(t, move):  # a copy, so that the host's tensor is not the device's
            counter.count("to_host", op="cpu")
            with _disable_current_modes():
                return move().clone()

        def cpu(t, *a, **k):
            if t in counter.on_device:
                return to_host(t, lambda: originals["cpu"](t, *a, **k))
            return originals["cpu"](t, *a, **k)

        def to(t, *a, **k):
            target = k.get("device", next((x for x in a if isinstance(x, (str, torch.device))), None))
            if target is not None and t in counter.on_device and torch.device(target) == torch.device("cpu") \
                    and not sys._getframe(1).f_code.co_filename.startswith(TORCH):
                return to_host(t, lambda: originals["to"](t, *a, **k))
            if target is not None and t in counter.on_device and torch.device(target) == DEVICE:
                # already there: the move is dropped, as torch drops a GPU tensor's move to its own device (to
                # torch cpu:0 is not cpu, so the real call would copy: one op per tensor a GPU never launches)
                a = tuple(x for x in a if x is not target)
                k = {key: v for key, v in k.items() if key != "device"}
            return originals["to"](t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.numpy = reading("tolist"), reading("numpy")
        torch.Tensor.cpu, torch.Tensor.to = cpu, to
        torch.Tensor.device = property(device)
        try:
            with self:
                yield self
        finally:
            for name, value in originals.items():
                setattr(torch.Tensor, name, value)
            del torch.Tensor.device  # torch's own, from TensorBase, again
