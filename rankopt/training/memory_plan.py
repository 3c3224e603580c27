"""The memory plan: a run's peak memory by part, estimated before anything is loaded, and the refusal.

The model is built on the meta device (shapes, no weights), and each part is arithmetic on its
shapes and the preset: base weights, the trained tensors with AdamW's state at ``max_rank``,
activations (:mod:`.activations`), the training loss's full-vocabulary logits, the weight-gradient
probe, the gradient-init pass, evaluation. Parts live in phases (init pass, training step,
evaluation); the peak is the largest phase's sum. ``train``, ``tune`` and ``worker`` on a GPU
refuse, in one line, a run whose peak exceeds the GPU, naming the largest part and the knob
that lowers it; ``rankopt plan`` prints the whole table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from rankopt.config import Config
from rankopt.errors import RankoptError
from rankopt.tasks.architectures import config_dtype, load_model_config, meta_model
from rankopt.training import activations as act
from rankopt.training.memory_parts import EVAL, INIT, PHASES, TRAIN, GiB, Part, RunParts, gib
from rankopt.training.model_shapes import adapted_layers, block_of, weight_bytes

__all__ = ["EVAL", "INIT", "PHASES", "TRAIN", "GiB", "MemoryPlan", "Part", "check_memory", "estimate", "gib",
           "parse_size", "print_plan"]

RUNTIME_BYTES = GiB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack: a typical figure, not measured here
SKIP_ENV = "RANKOPT_SKIP_MEMORY_PLAN"


@dataclass
class MemoryPlan:
    """The estimate for one process of a run, against its device's memory when that is known."""

    model: str
    device: str
    processes: int
    parts: list[Part]
    device_memory: int | None
    memory_source: str

    def total(self, phase: str) -> int:
        return sum(p.bytes for p in self.parts if phase in p.phases)

    @property
    def peak_phase(self) -> str:
        return max((ph for ph in PHASES if any(ph in p.phases for p in self.parts)), key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def largest(self) -> Part:
        """The largest part of the peak phase that a preset knob can lower."""
        return max((p for p in self.parts if self.peak_phase in p.phases and p.knob), key=lambda p: p.bytes)

    def refusal(self) -> str:
        top = self.largest()
        return (f"the memory plan needs {gib(self.peak)} per process at its peak ({self.peak_phase}) but "
                f"{self.device} has {gib(self.device_memory or 0)} ({self.memory_source}); the largest part is "
                f"{top.name} ({gib(top.bytes)}): {top.knob}")


def estimate(cfg: Config, *, processes: int = 1, device_memory: str | int | None = None,
             config_json: str | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` for one of ``processes`` data-parallel processes; reads no weights."""
    if processes < 1:
        raise RankoptError("the number of processes must be 1 or more")
    t = cfg.training
    if t.batch_size % processes:
        raise RankoptError(f"training.batch_size={t.batch_size} (the global micro-batch) does not split over "
                           f"{processes} processes; make it a multiple of {processes}")
    config = load_model_config(cfg.model, config_json)
    labels = cfg.task.num_labels or (1 if cfg.task.type == "regression" else 2)
    model = meta_model(config, cfg.task.type, labels)
    dtype = getattr(torch, cfg.model.dtype) if cfg.model.dtype != "auto" else config_dtype(config)
    stream = torch.empty((), dtype=dtype).element_size()
    autocast = t.precision in ("bf16", "fp16")
    block = block_of(config, model, cfg.model.target_modules, cfg.task.type)
    layers = adapted_layers(model, cfg.model.target_modules, block)
    cfg.budget(len(layers))  # the checks build_model makes, so a plan that passes builds
    key, rank = ("controller.max_rank", cfg.controller.max_rank) if cfg.controller.enabled else \
        ("adapter.init_rank", cfg.adapter.init_rank)
    smallest = min(min(a.in_features, a.out_features) for a in layers)
    if rank > smallest:
        raise RankoptError(f"{key}={rank} exceeds the smallest adapted layer ({smallest}); lower it")
    num = act.Numerics(stream=stream, act=2 if autocast else stream, autocast=autocast,
                       on_cuda=torch.device(t.device).type == "cuda", adapter_dropout=cfg.adapter.dropout > 0,
                       rank=rank)
    weights, how = weight_bytes(model, cfg.model, dtype)
    parts = [Part("base weights", weights, frozenset(PHASES), how, _weights_knob(cfg))]
    parts += RunParts(cfg, model, config.num_hidden_layers, config.vocab_size, block, layers, num, processes).all()
    if num.on_cuda:
        parts.append(Part("CUDA runtime", RUNTIME_BYTES, frozenset(PHASES),
                          "context, workspaces, allocator slack (typical)"))
    memory, source = device_memory_of(t.device, device_memory)
    device = t.device if processes == 1 else f"each of {processes} x {t.device}"
    return MemoryPlan(cfg.model.name, device, processes, [p for p in parts if p.bytes > 0], memory, source)


def _weights_knob(cfg: Config) -> str:
    if cfg.model.quantization == "4bit":
        return "a smaller model or a device with more memory"
    return "set model.quantization=4bit (QLoRA: ~0.52 bytes per weight)"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in '80GB', '24 GiB', '512MB' (GB and GiB both mean 2**30, as GPU memory is quoted)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise RankoptError(f"--device-memory '{text}' is not a size; write e.g. 80GB or 24GiB")
    unit = (match.group(2) or "gb").lower()[0]
    return int(float(match.group(1)) * {"t": 1 << 40, "g": GiB, "m": 1 << 20}[unit])


def device_memory_of(device: str, given: str | int | None = None) -> tuple[int | None, str]:
    """(bytes, where the figure comes from) for ``device``: given, the GPU's own, host RAM for cpu, or unknown."""
    if given is not None:
        return (given, "given") if isinstance(given, int) else (parse_size(given), f"--device-memory {given}")
    dev = torch.device(device)
    if dev.type == "cpu":
        import psutil

        return psutil.virtual_memory().total, "host RAM"
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"{props.name}"
    return None, f"unknown: no {dev.type} device here; pass --device-memory, e.g. 80GB"


def check_memory(cfg: Config, processes: int = 1) -> MemoryPlan | None:
    """At the start of train / tune / worker on a CUDA GPU: refuse, in one line, a run that cannot fit.

    Skipped off CUDA, when ``RANKOPT_SKIP_MEMORY_PLAN`` is set, or when the model's config cannot be
    read here (the load that follows then says why).
    """
    if os.environ.get(SKIP_ENV) or torch.device(cfg.training.device).type != "cuda" or not torch.cuda.is_available():
        return None
    from rankopt.devices import check_device

    check_device(cfg.training.device)
    try:
        plan = estimate(cfg, processes=processes)
    except RankoptError:
        return None  # the same problem stops the run a moment later, with its own message
    if plan.fits is False:
        raise RankoptError(f"{plan.refusal()} (see `rankopt plan`; {SKIP_ENV}=1 skips this check)")
    return plan


def print_plan(plan: MemoryPlan, console=None) -> None:
    """The plan as a table (one column per phase) and a verdict line, on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)  # piped: one line per row
    phases = [ph for ph in PHASES if any(ph in p.phases for p in plan.parts)]
    table = Table(title=f"memory plan: {plan.model} on {plan.device}")
    table.add_column("part")
    for phase in phases:
        table.add_column(phase, justify="right")
    table.add_column("how it is counted")
    for i, p in enumerate(plan.parts):
        table.add_row(p.name, *[gib(p.bytes) if ph in p.phases else "" for ph in phases], p.detail,
                      end_section=i == len(plan.parts) - 1)
    table.add_row("total", *[gib(plan.total(ph)) for ph in phases], "the peak is the largest phase", style="bold")
    console.print(table)
    peak = f"peak {gib(plan.peak)} ({plan.peak_phase})"
    if plan.device_memory is None:
        console.print(f"{peak}; device memory {plan.memory_source}")
    elif plan.fits:
        console.print(f"{peak} of {gib(plan.device_memory)} ({plan.memory_source}): fits, "
                      f"{gib(plan.device_memory - plan.peak)} to spare")
    else:
        console.print(f"{peak} of {gib(plan.device_memory)} ({plan.memory_source}): does not fit")
