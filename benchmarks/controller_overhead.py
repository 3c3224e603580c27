"""Step time of an adaptive-rank fine-tune vs the same model with fixed ranks, interleaved.

Both runs use the same MiniLM weights, the same batches (batch 16, sequence 128, padded)
and the same initial rank; they alternate step by step in one process, so machine noise
hits both alike. The adaptive run keeps its total budget at the initial total (target
rank = initial rank), so the two do the same matrix work and the difference is the
controller alone: the sensitivity EMA every step plus a reallocation (scores, allocation,
resizing, optimizer-state remap) every ``interval`` steps. A third run, with the budget
decaying to mean rank 4, shows what pruning buys.

    python benchmarks/controller_overhead.py            # ~4 min on 2 CPU cores
    python benchmarks/controller_overhead.py --steps 8  # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from rankopt.training.setup import build_model
from rankopt.config import resolve_config
from rankopt.training.trainer import Stepper


def make_batches(n: int, vocab: int, seq: int, batch: int, num_labels: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long),
             "labels": torch.randint(0, num_labels, (batch,), generator=g)} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    total = args.steps + args.warmup
    common = {"training.steps": total, "training.batch_size": args.batch, "training.eval_every": total,
              "controller.interval": 10, "controller.warmup": 0.1, "controller.final": 0.2,
              "controller.budget_unit": "rank"}  # a rank budget: the same total rank is the same matrix work
    runs = {
        "fixed r=8": {**common, "controller.enabled": False},
        "adaptive, budget 8/layer": {**common, "controller.target_rank": 8},
        "adaptive, budget 8->4/layer": {**common, "controller.target_rank": 4},
    }
    steppers = {}
    for name, over in runs.items():
        cfg = resolve_config("demo", over)
        adapted = build_model(cfg, num_labels=2)
        adapted.model.train()
        steppers[name] = Stepper(cfg, adapted)
    vocab = next(iter(steppers.values())).adapted.model.config.vocab_size
    batches = make_batches(total, vocab, args.seq, args.batch, num_labels=2)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            steppers[name].step(batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = times["fixed r=8"]
    rows = []
    for name, ts in times.items():
        rows.append({"run": name, "median_s": statistics.median(ts), "mean_s": statistics.fmean(ts),
                     "median_ratio": statistics.median(ts) / statistics.median(base),
                     "mean_ratio": statistics.fmean(ts) / statistics.fmean(base),
                     "final_total_rank": steppers[name].adapted.total_rank()})
    print(f"# controller overhead: MiniLM-L6, batch {args.batch}, seq {args.seq}, {args.steps} timed steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| run | median step (s) | mean step (s) | median / fixed | mean / fixed | final total rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['median_s']:.4f} | {r['mean_s']:.4f} | {r['median_ratio']:.3f} | "
              f"{r['mean_ratio']:.3f} | {r['final_total_rank']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
