"""Step time and peak memory of rankopt vs PEFT LoRA and PEFT AdaLoRA on the same model and batches.

Five runs on all-MiniLM-L6-v2 (the demo preset), batch 16, sequence 128 (synthetic token ids,
no padding), the same 36 target linears, the same seeded head (``rankopt.training.setup.load_base``), the
same AdamW + linear schedule + clipping (``rankopt.training.optim``):

* ``rankopt adaptive, budget 8``: SVD adapters from rank 8, controller on, budget kept at 8 per
  layer. Same rank as PEFT LoRA r=8 all run long, so this is the like-for-like row for the
  issue's target (at most 1.03x PEFT LoRA's time and 1.05x its memory);
* ``rankopt adaptive, budget 8->4``: the same, budget decaying to 4 per layer (what pruning buys);
* ``rankopt fixed r=8``: controller off (the adapter layer alone);
* ``PEFT LoRA r=8``: the baseline every ratio is taken against (alpha 16, like rankopt);
* ``PEFT AdaLoRA 12->8``: init_r 12, target_r 8, PEFT's usual 1.5x start, same warm-up / final
  fractions and interval as the rankopt schedule; ``update_and_allocate(step)`` after
  ``optimizer.step()``, before ``zero_grad()``.

rankopt keeps the preset's orthogonality penalty (0.1) and AdaLoRA its own (0.5, inside
forward): each method as it ships. Schedules: warm-up 10 %, final 20 %, a reallocation every
10 steps, over warm-up + timed steps.

Time: the runs alternate step by step in one process (who goes first rotates), so machine
noise hits all alike; median and mean over the timed steps.

Memory: peak resident memory, each run alone in a fresh subprocess (``--memory-steps`` steps on
the same batches, the schedule compressed to that length so reallocations happen). After the
model is built the child resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, mode 5)
and reads ``VmHWM`` after the steps: "peak RSS" is the whole process (Python, torch, the model)
at its highest, "training peak" is that minus the RSS just before the first step, i.e. what
training adds on top of the loaded model (activations, gradients, optimizer state, the
controller). Where the counter cannot be reset (not Linux), ``ru_maxrss`` is used and loading
peaks may hide in it; the output says so. torch has no allocator statistics on CPU, and
tracemalloc does not see torch's allocations.

    python benchmarks/overhead_vs_peft.py --steps 60 --warmup 5     # ~9 min on 2 CPU cores
    python benchmarks/overhead_vs_peft.py --steps 2 --warmup 1 --batch 2 --seq 16 --memory-steps 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RUNS = {  # key -> label
    "adaptive": "rankopt adaptive, budget {r}",
    "adaptive-prune": "rankopt adaptive, budget {r}->{half}",
    "fixed": "rankopt fixed r={r}",
    "lora": "PEFT LoRA r={r}",
    "adalora": "PEFT AdaLoRA {init}->{r}",
}
BASELINE = "lora"


def labels(rank: int) -> dict[str, str]:
    return {k: v.format(r=rank, half=rank // 2, init=adalora_init(rank)) for k, v in RUNS.items()}


def adalora_init(rank: int) -> int:
    return (3 * rank + 1) // 2


def make_batches(n: int, vocab: int, seq: int, batch: int, num_labels: int, seed: int = 0,
                 causal: bool = False) -> list[dict]:
    """Random token ids (above the special tokens) with full attention; the same for every run.

    ``causal``: a causal LM's batch, every token a target (labels = the ids, as a pretraining row)."""
    low = 1000 if vocab > 2000 else min(5, vocab - 1)  # MiniLM: as controller_overhead.py; tiny test vocabularies
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(low, vocab, (batch, seq), generator=g)
        labels = ids.clone() if causal else torch.randint(0, num_labels, (batch,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels})
    return batches


def is_causal(args: argparse.Namespace) -> bool:
    from rankopt.config import resolve_config

    return resolve_config(args.preset, {}).task.type == "causal_lm"


def run_config(args: argparse.Namespace, key: str, total: int):
    from rankopt.config import resolve_config
    from rankopt.config import parse_overrides

    r = args.rank
    over = {**parse_overrides(args.set), "training.steps": total, "training.batch_size": args.batch,
            "training.eval_every": total, "adapter.init_rank": r, "adapter.alpha": 2 * r,
            "controller.interval": 10, "controller.warmup": 0.1, "controller.final": 0.2}
    if key == "fixed":
        over["controller.enabled"] = False
    elif key == "adaptive":
        over["controller.target_rank"] = r
    elif key == "adaptive-prune":
        over["controller.target_rank"] = r // 2
    return resolve_config(args.preset, over)


def build_stepper(args: argparse.Namespace, key: str, total: int):
    """The run ``key`` ready to step: its model built from the same base weights and head."""
    from rankopt.training.setup import build_model, load_base
    from rankopt.training.trainer import Stepper

    cfg = run_config(args, key, total)
    if key in ("adaptive", "adaptive-prune", "fixed"):
        adapted = build_model(cfg, num_labels=2)
        adapted.model.train()
        return Stepper(cfg, adapted), adapted.model
    from peft_baselines import PeftStepper, peft_model

    method = "peft_lora" if key == "lora" else "peft_adalora"
    model = peft_model(cfg, load_base(cfg, 2), method, args.rank, adalora_init(args.rank))
    model.train()
    t = cfg.training
    return PeftStepper(model, t.lr, t.weight_decay, t.scheduler, t.steps, t.warmup_ratio, t.max_grad_norm,
                       adalora=key == "adalora"), model


def total_rank(key: str, stepper, rank: int) -> int | None:
    """Rank summed over the adapted layers at the end (AdaLoRA: components its mask kept)."""
    if hasattr(stepper, "adapted"):
        return stepper.adapted.total_rank()
    total = 0
    for module in stepper.model.modules():
        if key == "adalora" and "default" in getattr(module, "lora_E", {}):
            total += int((module.lora_E["default"] != 0).sum())
        elif key == "lora" and "default" in getattr(module, "lora_A", {}):
            total += rank
    return total


def time_runs(args: argparse.Namespace) -> dict[str, dict]:
    total = args.steps + args.warmup
    steppers, models = {}, {}
    for key in RUNS:
        steppers[key], models[key] = build_stepper(args, key, total)
    vocab = models["fixed"].config.vocab_size
    batches = make_batches(total, vocab, args.seq, args.batch, num_labels=2, causal=is_causal(args))
    times: dict[str, list[float]] = {key: [] for key in RUNS}
    keys = list(RUNS)
    for i, batch in enumerate(batches):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate who goes first
            t0 = time.perf_counter()
            steppers[key].step(batch)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    return {key: {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts),
                  "final_total_rank": total_rank(key, steppers[key], args.rank)} for key, ts in times.items()}


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_child(args: argparse.Namespace, key: str) -> dict:
    """In a fresh process: build one run, reset the peak-RSS counter, step, read the peak (MiB)."""
    stepper, model = build_stepper(args, key, args.memory_steps)
    batches = make_batches(args.memory_steps, model.config.vocab_size, args.seq, args.batch, num_labels=2,
                           causal=is_causal(args))
    linux = Path("/proc/self/status").is_file()
    before = _status_kib("VmRSS") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = linux and _reset_peak_rss()
    for batch in batches:
        stepper.step(batch)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"key": key, "rss_loaded_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "training_peak_mib": (peak - before) / 1024, "peak_reset": reset}


def measure_memory(args: argparse.Namespace, keys: list[str]) -> dict[str, dict]:
    """One subprocess per run, one after the other, so no run sees another's freed memory."""
    out = {}
    passthrough = ["--preset", args.preset, "--rank", str(args.rank), "--batch", str(args.batch), "--seq",
                   str(args.seq), "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
    for pair in args.set:
        passthrough += ["--set", pair]
    for key in keys:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", key, *passthrough],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run {key} failed:\n{proc.stderr[-3000:]}")
        out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def report(args: argparse.Namespace, timing: dict[str, dict], memory: dict[str, dict]) -> list[dict]:
    names = labels(args.rank)
    base_t, base_m = timing[BASELINE], memory.get(BASELINE)
    rows = []
    for key, t in timing.items():
        m = memory.get(key)
        row = {"run": names[key], "key": key, **t,
               "median_ratio": t["median_s"] / base_t["median_s"], "mean_ratio": t["mean_s"] / base_t["mean_s"]}
        if m:
            row.update({k: m[k] for k in ("rss_loaded_mib", "peak_rss_mib", "training_peak_mib")})
            if base_m:
                row["peak_rss_ratio"] = m["peak_rss_mib"] / base_m["peak_rss_mib"]
                row["training_peak_ratio"] = m["training_peak_mib"] / base_m["training_peak_mib"]
        rows.append(row)
    return rows


def print_table(args: argparse.Namespace, rows: list[dict], memory: dict[str, dict]) -> None:
    def num(row, key, fmt):
        return format(row[key], fmt) if key in row else "—"

    reset = all(m["peak_reset"] for m in memory.values()) if memory else None
    how = {True: "VmHWM reset after loading", False: "ru_maxrss, loading peaks included", None: "not measured"}
    print(f"# overhead vs PEFT: {args.preset}, batch {args.batch}, seq {args.seq}, rank {args.rank}, "
          f"{args.steps} timed steps (+{args.warmup} warm-up) interleaved; memory: {args.memory_steps} steps per "
          f"run alone ({how[reset]}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| run | median step (s) | mean step (s) | median / LoRA | mean / LoRA | peak RSS (MiB) | peak / LoRA "
          "| training peak (MiB) | training peak / LoRA | final total rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['median_s']:.4f} | {r['mean_s']:.4f} | {r['median_ratio']:.3f} | "
              f"{r['mean_ratio']:.3f} | {num(r, 'peak_rss_mib', '.0f')} | {num(r, 'peak_rss_ratio', '.3f')} | "
              f"{num(r, 'training_peak_mib', '.0f')} | {num(r, 'training_peak_ratio', '.3f')} | "
              f"{r['final_total_rank']} |")
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank = rankopt's initial rank; AdaLoRA starts at 1.5x")
    ap.add_argument("--memory-steps", type=int, default=20, help="steps per memory run (0: skip memory)")
    ap.add_argument("--memory-runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                    help="which runs get a memory measurement")
    ap.add_argument("--preset", default="demo", help="preset name or .yml (model and target modules)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--memory-child", choices=list(RUNS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps + args.warmup < 2 or args.memory_steps == 1:
        ap.error("runs need at least 2 steps (AdaLoRA fixes its budget at its last step)")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # peft_baselines
    if args.memory_child:
        print(json.dumps(measure_memory_child(args, args.memory_child)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    timing = time_runs(args)
    memory = measure_memory(args, args.memory_runs) if args.memory_steps > 0 else {}
    print_table(args, report(args, timing, memory), memory)


if __name__ == "__main__":
    main()
