"""What one training step costs a GPU at Llama-3-8B's adapter count, counted on the CPU: ops and host syncs.

A GPU step pays a kernel launch per op and a stall per host sync (a value read, a device-to-host
copy, a blocking host-to-device copy, a data-dependent shape). Neither depends on the width of
the layers, so a Llama decoder with Llama-3-8B's 32 layers, its 7 adapted linears per layer (224
adapters) and its shape ratios, at ``--scale`` times smaller widths, drawn at random, counts what
the 8B model would. Counting is :class:`rankopt.testing.host_syncs.StepCounter` (a shadow device
on the CPU). Rows, per step kind:

* ``rankopt ordinary``: a tracking step (sensitivity EMA, orthogonality penalty, optimizer);
* ``rankopt reallocation``: the step before which the gradient probe is armed, and after which the
  controller reallocates: its ``probe`` share is its forward/backward beyond an ordinary one's,
  ``reallocate`` the controller's scores, gradient pairs, decision and resizes, ``optimizer remap``
  the Adam state carried to the resized tensors;
* ``PEFT LoRA``: PEFT's LoRA at the same rank on the same model, torch's AdamW(foreach=True).

Also printed, by arithmetic from the probe's own sizes: the probe's memory at Llama-3-8B
(bf16 activations) for a step of 8 micro-batches x 2048 tokens. Rows are appended to
``benchmarks/results/step_cost.jsonl``.

    python benchmarks/step_cost.py                 # ~1 min on one CPU thread
    python benchmarks/step_cost.py --scale 64      # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this checkout's rankopt
from peft_baselines import PeftStepper  # noqa: E402
from rankopt.testing.host_syncs import DEVICE, StepCounter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_8B = {"hidden": 4096, "layers": 32, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "step_cost.jsonl"
INTERVAL, WARMUP_STEPS, TOTAL = 4, 4, 40  # reallocations at steps 8, 12, ...


def llama(scale: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = LLAMA3_8B
    config = LlamaConfig(hidden_size=s["hidden"] // scale, num_hidden_layers=s["layers"],
                         intermediate_size=s["intermediate"] // scale, num_attention_heads=s["heads"] // 4,
                         num_key_value_heads=s["kv_heads"] // 4, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def linear_shapes() -> list[tuple[int, int]]:
    """(in, out) of the 224 adapted linears of Llama-3-8B."""
    s = LLAMA3_8B
    h, kv, ffn = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"], s["intermediate"]
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, ffn), (h, ffn), (ffn, h)]
    return per_layer * s["layers"]


def batches(n: int, batch: int, seq: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def rankopt_stepper(rank: int, scale: int):
    from rankopt.adapters.model import adapt
    from rankopt.config import build_config
    from rankopt.training.trainer import Stepper

    raw = {"task": {"name": "step-cost", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss"},
           "model": {"name": "random-llama", "target_modules": TARGETS},
           "adapter": {"init_rank": rank, "alpha": 2 * rank},
           "training": {"steps": TOTAL, "batch_size": 2, "eval_every": TOTAL, "log_every": TOTAL, "seed": 0},
           "controller": {"enabled": True, "target_rank": rank * 3 // 4, "min_rank": 1, "max_rank": 2 * rank,
                          "warmup": WARMUP_STEPS / TOTAL, "final": 0.2, "interval": INTERVAL}}
    cfg = build_config(raw)
    cfg.training.__dict__["device"] = str(DEVICE)  # the shadow device: the config's pattern knows only real ones
    adapted = adapt(llama(scale), TARGETS, rank, 2 * rank, seed=0)
    return Stepper(cfg, adapted), adapted.model


def peft_stepper(rank: int, scale: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(llama(scale), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    stepper = PeftStepper(model, 1e-4, 0.0, "linear", TOTAL, 0.06, 1.0, adalora=False, device=str(DEVICE))
    return stepper, model


def counted_step(counter: StepCounter, stepper, batch: dict, phases: dict[str, object]) -> dict[str, dict]:
    """One step under ``counter``, with the methods in ``phases`` ({label: (owner, name)}) counted apart."""
    counter.counts = {}
    counter.where = Counter()
    wrapped = []
    for label, (owner, name) in phases.items():
        original = getattr(owner, name)
        wrapped.append((owner, name, owner.__dict__.get(name)))  # an instance's own (a scheduler's wrapper)

        def labelled(*a, _original=original, _label=label, **k):
            outer, counter.phase = counter.phase, _label
            try:
                return _original(*a, **k)
            finally:
                counter.phase = outer
        setattr(owner, name, labelled)
    try:
        counter.phase = "forward/backward"
        with counter.counting():
            stepper.step(batch)
    finally:
        for owner, name, own in wrapped:
            if own is None:
                delattr(owner, name)  # the class's method again
            else:
                setattr(owner, name, own)
    return {"total": counter.totals(), **{phase: counter.totals(phase) for phase in counter.counts}}


def place(counter: StepCounter, model: torch.nn.Module) -> None:
    counter.place(list(model.parameters()) + list(model.buffers()))


def measure_rankopt(rank: int, scale: int, data: list[dict]) -> dict[str, dict]:
    from rankopt.training import trainer

    stepper, model = rankopt_stepper(rank, scale)
    counter = StepCounter()
    place(counter, model)
    out = {}
    realloc = next(s for s in range(1, TOTAL) if stepper.controller.schedule.is_reallocation_step(s))
    for step in range(1, realloc + 1):
        batch = data[step % len(data)]
        if step == realloc - 2:
            out["ordinary"] = counted_step(counter, stepper, batch, {"optimizer": (stepper.optimizer, "step")})
            out["ordinary"]["where"] = dict(counter.where.most_common(12))
        elif step == realloc:
            out["reallocation"] = counted_step(counter, stepper, batch,
                                               {"optimizer": (stepper.optimizer, "step"),
                                                "reallocate": (stepper.controller, "step"),
                                                "optimizer remap": (trainer, "apply_resizes")})
            out["reallocation"]["where"] = dict(counter.where.most_common(12))
        else:
            stepper.step(batch)
        for p in stepper.adapted.trainable_parameters():  # tensors a reallocation made are device tensors too
            counter.place([p] + [v for v in stepper.optimizer.state.get(p, {}).values() if torch.is_tensor(v)])
    return out


def measure_peft(rank: int, scale: int, data: list[dict]) -> dict[str, dict]:
    stepper, model = peft_stepper(rank, scale)
    counter = StepCounter()
    place(counter, model)
    stepper.step(data[0])  # builds AdamW's state
    for p in stepper.params:
        counter.place(v for k, v in stepper.optimizer.state[p].items() if k != "step")  # torch keeps step on the host
    counter.place(data[1].values())  # as rankopt's non-blocking copy of its batch: no stall either way
    row = counted_step(counter, stepper, data[1], {"optimizer": (stepper.optimizer, "step")})
    return {"ordinary": {**row, "where": dict(counter.where.most_common(12))}}


def probe_memory_gb(probe_tokens: int, micro_batches: int = 8, tokens: int = 2048, act_bytes: int = 2) -> dict:
    """The probe's extra memory at Llama-3-8B by its own sizes (see WeightGradientProbe's docstring): per
    layer ``probe_tokens`` kept rows of input and output gradient in the activations' dtype, plus one
    forward's rows again while they are sorted in, plus float64 sampling keys of every row seen (host)."""
    shapes = linear_shapes()
    kept = sum(probe_tokens * (i + o) * act_bytes for i, o in shapes)
    sorting = max(min(probe_tokens, tokens) * (i + o) * act_bytes for i, o in shapes)
    keys = len(shapes) * (probe_tokens + tokens) * 8
    return {"probe_tokens": probe_tokens, "micro_batches": micro_batches, "tokens_per_micro_batch": tokens,
            "kept_rows_gb": kept / 1e9, "peak_gb": (kept + sorting + keys) / 1e9}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=16, help="widths of Llama-3-8B divided by this (counts do not depend on it)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out-jsonl", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.scale < 1 or 4096 % args.scale or 32 * 4 % args.scale:
        sys.exit(f"--scale {args.scale} must divide 128 (so heads and widths stay whole); try 16")
    torch.set_num_threads(1)
    data = batches(4, 2, args.seq)
    started = time.perf_counter()
    rows = {f"rankopt {kind}": value for kind, value in measure_rankopt(args.rank, args.scale, data).items()}
    rows["PEFT LoRA + AdamW(foreach)"] = measure_peft(args.rank, args.scale, data)["ordinary"]
    ordinary = rows["rankopt ordinary"]["total"]
    realloc = rows["rankopt reallocation"]
    realloc["probe"] = {k: realloc["forward/backward"][k] - rows["rankopt ordinary"]["forward/backward"][k]
                        for k in realloc["forward/backward"]}
    peft = rows["PEFT LoRA + AdamW(foreach)"]["total"]
    print(f"224 adapters (Llama-3-8B's 32 layers x 7 linears, widths / {args.scale}), rank {args.rank}, "
          f"batch 2 x {args.seq} tokens, one CPU thread; counted in {time.perf_counter() - started:.0f} s\n")
    print("| step | ops (launches) | of which optimizer | reallocate | host syncs | read / to host / to device / data-dep. |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        t = row["total"]
        print(f"| {name} | {t['ops']} | {row.get('optimizer', {}).get('ops', 0)} | "
              f"{row.get('reallocate', {}).get('ops', 0)} | {t['syncs']} | {t['read']} / {t['to_host']} / "
              f"{t['to_device_blocking']} / {t['data_dependent']} |")
    remap = realloc.get("optimizer remap", {})
    print(f"\nrankopt ordinary / PEFT ops: {ordinary['ops'] / peft['ops']:.2f}x; probe adds {realloc['probe']['ops']} ops, "
          f"{realloc['probe']['syncs']} syncs; reallocate: {realloc.get('reallocate', {}).get('ops', 0)} ops, "
          f"{realloc.get('reallocate', {}).get('syncs', 0)} syncs; optimizer remap: {remap.get('ops', 0)} ops, "
          f"{remap.get('syncs', 0)} syncs")
    for name, row in rows.items():
        if row.get("where"):
            print(f"where {name} syncs:", json.dumps(row["where"]))
    memory = probe_memory_gb(512)
    print(f"probe memory at Llama-3-8B, 8 x 2048 tokens, bf16, probe_tokens 512: kept rows "
          f"{memory['kept_rows_gb']:.2f} GB, peak {memory['peak_gb']:.2f} GB")
    stamp = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
             "torch": torch.__version__, "scale": args.scale, "rank": args.rank, "adapters": 224}
    args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with args.out_jsonl.open("a") as f:
        for name, row in rows.items():
            f.write(json.dumps({**stamp, "run": name, **row}) + "\n")
        f.write(json.dumps({**stamp, "run": "probe memory, Llama-3-8B", **memory}) + "\n")


if __name__ == "__main__":
    main()
