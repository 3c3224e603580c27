"""Ablation of the adapter start and the growth directions on the demo preset (MiniLM, offline).

Four variants, the controller's fixes of issue 12 in all of them: ``adapter.init`` random or
gradient x ``controller.growth`` random or gradient, at the preset's learning rate (not tuned per
variant: a first look, the per-method-tuned comparison is ``quality_vs_peft.py``). Each finished
run is appended to a JSONL file, so an interrupted run resumes; variants interleave per seed.

    python benchmarks/start_and_growth.py                      # 4 variants x 2 seeds, ~25 min on 2 cores
    python benchmarks/start_and_growth.py --summary            # the table from the JSONL
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

VARIANTS = {
    "random start, random growth": {"adapter.init": "random", "controller.growth": "random"},
    "gradient start, random growth": {"adapter.init": "gradient", "controller.growth": "random"},
    "random start, gradient growth": {"adapter.init": "random", "controller.growth": "gradient"},
    "gradient start, gradient growth": {"adapter.init": "gradient", "controller.growth": "gradient"},
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "start_and_growth.jsonl"


def run(variant: str, seed: int, steps: int, eval_samples: int | None = None) -> dict:
    import rankopt

    started = time.perf_counter()
    overrides = {**VARIANTS[variant], "training.seed": seed, "training.steps": steps, "training.eval_every": steps // 3}
    if eval_samples:  # a quick look (the smoke test): the preset's whole evaluation split otherwise
        overrides["task.max_eval_samples"] = eval_samples
    result = rankopt.train("demo", overrides, track=False)
    return {"variant": variant, "seed": seed, "steps": steps, "eval_samples": eval_samples,
            "evals": [(s, round(m["loss"], 4), round(m["accuracy"], 4)) for s, m in result.eval_history],
            "seconds": round(time.perf_counter() - started)}


def summarize(rows: list[dict]) -> str:
    lines = ["| variant | eval loss by seed (step " + str(rows[0]["steps"]) + ") | mean loss | mean accuracy |",
             "|---|---|---|---|"] if rows else []
    for variant in VARIANTS:
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        losses = [r["evals"][-1][1] for r in mine]
        accs = [r["evals"][-1][2] for r in mine]
        lines.append(f"| {variant} | {' / '.join(f'{x:.3f}' for x in losses)} | {statistics.fmean(losses):.3f} | "
                     f"{statistics.fmean(accs):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--eval-samples", type=int, default=None, help="evaluate on this many rows (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    if not args.summary:
        torch.set_num_threads(args.threads)
        done = {(r["variant"], r["seed"], r["steps"], r.get("eval_samples")) for r in rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for variant in VARIANTS:
                if (variant, seed, args.steps, args.eval_samples) in done:
                    continue
                row = run(variant, seed, args.steps, args.eval_samples)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(summarize([r for r in rows if r["steps"] == args.steps]))


if __name__ == "__main__":
    main()
