"""Quality at equal adapter size: rankopt vs PEFT's LoRA family, each at its own tuned learning rate.

MiniLM (the demo model) on the five GLUE tasks in ../shared/data/glue, a fixed training subsample
trained for several epochs so the methods separate. Every method ends at the same budget (mean
final rank per adapted layer, so the same adapter parameters within 1 %) over the same 36 linears:

- ``rankopt``: the adaptive controller with the presets' defaults, from 2 x budget down to it; the
  budget is counted in adapter parameters (``controller.budget_unit: params``, the default: the size
  of LoRA's adapter at that rank, spent by score per parameter);
- ``rankopt_rank``: the same, with the budget counted in rank (``controller.budget_unit: rank``: every
  component counts 1, so the size follows where the rank goes);
- ``rankopt_fixed``: the same SVD-form adapter and start at rank = budget, controller off
  (isolates what the controller adds);
- ``rankopt_at_budget``: the controller on, but starting at rank = budget: it moves rank between
  layers without the shrink from 2 x budget (isolates what the shrink costs or adds);
- ``peft_lora``, ``peft_rslora``, ``peft_eva``, ``peft_adalora``, ``peft_lora_trunc``: see
  ``peft_baselines.py``.

Same steps, batches, optimizer, schedule and seeded head for all. The learning rate is picked per
method, task and budget on the first seed from a log-spaced grid, widened by one rate (x3) while the
best sits at an edge (at most twice); the other seeds run at the picked rate. Each finished run is
appended to a JSONL file, so an interrupted benchmark resumes where it stopped.

    python benchmarks/quality_vs_peft.py                         # the whole grid (days on 2 cores; one H200: see BENCHMARKS.md)
    python benchmarks/quality_vs_peft.py --tasks rte --budgets 2 --seeds 0 --lrs 2e-3 --steps 4 \\
        --train-samples 64 --eval-samples 32 --methods rankopt peft_lora --out /tmp/q.jsonl   # smoke run
    python benchmarks/quality_vs_peft.py --summary               # table + paired tests from the JSONL
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

GLUE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "glue"
METHODS = ("rankopt", "rankopt_rank", "rankopt_fixed", "rankopt_at_budget", "peft_lora", "peft_adalora", "peft_eva",
           "peft_rslora", "peft_lora_trunc")
# each rankopt method: its initial rank and its max_rank as multiples of the budget, controller on, what the
# budget counts. `rankopt` is the presets' (init_rank 4x, max_rank 8x target_rank: the planted rung's evidence);
# `rankopt_2x` the start and cap they had before (2x, 4x), under which the older rows were run.
RANKOPT_VARIANTS = {"rankopt": (4, 8, True, "params"), "rankopt_rank": (4, 8, True, "rank"),
                    "rankopt_fixed": (1, 8, False, "params"), "rankopt_at_budget": (1, 8, True, "params"),
                    "rankopt_2x": (2, 4, True, "params")}
LABELS = {"rankopt": "rankopt", "rankopt_rank": "rankopt, rank budget", "rankopt_fixed": "rankopt, controller off",
          "rankopt_at_budget": "rankopt, no shrink", "rankopt_2x": "rankopt from 2x (the old start)",
          "peft_lora": "PEFT LoRA",
          "peft_adalora": "PEFT AdaLoRA", "peft_eva": "PEFT LoRA+EVA", "peft_rslora": "PEFT rsLoRA",
          "peft_lora_trunc": "PEFT LoRA 2r, SVD-truncated"}

def _commit() -> str:
    """The commit the rows were measured on (rankopt rows from different code are not comparable)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "rankopt"],
                               cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


CODE = _commit()
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "glue_grid.jsonl"  # the grid at the current defaults


def variant_settings(spec: str) -> dict:
    """``importance=energy,min_rank=0`` -> ``{"controller.importance": "energy", ...}`` (values read as YAML);
    a key with a section (``adapter.init_rank=16``) is taken as it is."""
    import yaml

    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    return {(key if "." in key else f"controller.{key}"): yaml.safe_load(value) for key, value in pairs}


def known_method(name: str) -> str:
    """argparse type: a method of :data:`METHODS`, or a rankopt variant ``rankopt[_...]:key=value,...``."""
    if name in METHODS or name.partition(":")[0] in RANKOPT_VARIANTS:
        return name
    raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, rankopt_2x, "
                                     "or rankopt:key=value")


def label(method: str) -> str:
    return LABELS.get(method, method)


def run_config(task: str, budget: int, lr: float, seed: int, args: argparse.Namespace, method: str = "rankopt"):
    """The run's config: a rankopt method's own settings, or the data, steps and budget a PEFT baseline shares."""
    from rankopt.config import resolve_config

    base, _, spec = method.partition(":")  # "rankopt:importance=energy,min_rank=0": a variant's settings
    start, most, controller_on, unit = RANKOPT_VARIANTS.get(base, RANKOPT_VARIANTS["rankopt"])
    init = start * budget
    overrides = {
        "task.max_train_samples": args.train_samples, "task.max_eval_samples": args.eval_samples,
        "task.eval_split": args.eval_split,
        "training.steps": args.steps, "training.eval_every": args.steps, "training.lr": lr, "training.seed": seed,
        "adapter.init_rank": init, "adapter.alpha": 2 * init,
        "controller.target_rank": budget, "controller.max_rank": most * budget,
        "controller.warmup": 0.1, "controller.final": 0.2, "controller.interval": 10,
        "controller.enabled": controller_on, "controller.budget_unit": unit, "training.device": args.device,
        **variant_settings(spec),
    }
    return resolve_config(task, overrides, data_dir=str(args.data / task))


def run_one(method: str, task: str, budget: int, lr: float, seed: int, args: argparse.Namespace) -> dict:
    from rankopt.training.setup import build_model, load_base, prepare_data
    from rankopt.training.trainer import train_adapted

    cfg = run_config(task, budget, lr, seed, args, method)
    data = prepare_data(cfg)
    started = time.perf_counter()
    if method.startswith("rankopt"):
        result = train_adapted(cfg, build_model(cfg, data.num_labels, label_mean=data.label_mean), data)
        metrics, params, total_rank = result.metrics, result.adapter_params, result.total_rank
    else:
        from peft_baselines import effective_adapter_params, peft_model, train_peft

        base = load_base(cfg, data.num_labels, label_mean=data.label_mean).to(cfg.training.device)
        model = peft_model(cfg, base, method, budget, 2 * budget)
        metrics = train_peft(cfg, model, data, method, budget)
        params, total_rank = effective_adapter_params(model, method), None
    return {"task": task, "metric_name": cfg.task.metric, "metric": metrics[cfg.task.metric], "method": method,
            "budget": budget, "lr": lr, "seed": seed, "steps": args.steps, "train_samples": args.train_samples,
            "adapter_params": params, "total_rank": total_rank, "seconds": round(time.perf_counter() - started, 1),
            "code": CODE, "device": args.device, "eval_split": args.eval_split}


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple:
    return r["task"], r["budget"], r["method"], r["lr"], r["seed"], r["steps"]


def _score(r: dict) -> float:
    return r["metric"] if math.isfinite(r["metric"]) else -math.inf


def picked_lr(results: list[dict], task: str, budget: int, method: str, seed: int, steps: int) -> float | None:
    grid = [r for r in results if (r["task"], r["budget"], r["method"], r["seed"], r["steps"])
            == (task, budget, method, seed, steps)]
    return max(grid, key=_score)["lr"] if grid else None


def lr_grid(results: list[dict], task: str, budget: int, method: str, seed: int, steps: int) -> list[float]:
    return sorted({r["lr"] for r in results if (r["task"], r["budget"], r["method"], r["seed"], r["steps"])
                   == (task, budget, method, seed, steps)})


def next_rate(grid: list[float], best: float, widened: int, max_widen: int = 2) -> float | None:
    """The rate beyond the grid's edge when the best sits there (x3 or / 3), else None."""
    if widened >= max_widen or len(grid) < 2:
        return None
    if best == grid[0]:
        return round(grid[0] / 3, 8)
    if best == grid[-1]:
        return round(grid[-1] * 3, 8)
    return None


def run_all(args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_results(args.out)}
    first, rest = args.seeds[0], args.seeds[1:]

    def ensure(method, task, budget, lr, seed):
        if (task, budget, method, lr, seed, args.steps) in done:
            return
        row = run_one(method, task, budget, lr, seed, args)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.add(_key(row))
        print(f"{row['task']:>5} b={budget} {method:<15} lr={lr:g} seed={seed}: {row['metric_name']}="
              f"{row['metric']:.4f} params={row['adapter_params']} ({row['seconds']} s)", flush=True)

    for budget in args.budgets:
        for task in args.tasks:
            for method in args.methods:  # the first seed over the grid, widened at an edge
                for lr in args.lrs:
                    ensure(method, task, budget, lr, first)
                for widened in range(2):
                    results = load_results(args.out)
                    grid = lr_grid(results, task, budget, method, first, args.steps)
                    wider = next_rate(grid, picked_lr(results, task, budget, method, first, args.steps), widened)
                    if wider is None:
                        break
                    ensure(method, task, budget, wider, first)
            for method in args.methods:  # then the other seeds at each method's picked rate
                lr = picked_lr(load_results(args.out), task, budget, method, first, args.steps)
                for seed in rest:
                    ensure(method, task, budget, lr, seed)


def summarize(path: Path, seeds: list[int], tasks: list[str], methods: list[str], reference: str = "rankopt",
              budgets: list[int] | None = None) -> str:
    """Markdown: mean +- std over seeds at each method's picked rate; paired t-tests of ``reference`` vs each,
    one row per task and budget (pooling budgets would mix two comparisons in one test)."""
    from scipy import stats

    results = [r for r in load_results(path) if r["task"] in tasks and r["method"] in methods
               and (budgets is None or r["budget"] in budgets)]
    steps = max((r["steps"] for r in results), default=0)
    results = [r for r in results if r["steps"] == steps]
    cells: dict[tuple, dict] = {}
    for task, budget in sorted({(r["task"], r["budget"]) for r in results}):
        for method in methods:
            lr = picked_lr(results, task, budget, method, seeds[0], steps)
            grid = lr_grid(results, task, budget, method, seeds[0], steps)
            runs = sorted((r for r in results if (r["task"], r["budget"], r["method"], r["lr"]) ==
                           (task, budget, method, lr) and r["seed"] in seeds), key=lambda r: r["seed"])
            if runs:
                cells[task, budget, method] = {"lr": lr, "runs": runs, "edge": lr in (grid[0], grid[-1])}

    def fmt(cell):
        if cell is None:
            return "—"
        vals = [100 * r["metric"] for r in cell["runs"]]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        edge = ", edge" if cell["edge"] else ""
        return f"{statistics.fmean(vals):.1f} ± {std:.1f} (lr {cell['lr']:g}{edge}, n={len(vals)})"

    lines = ["| task (metric) | budget | " + " | ".join(label(m) for m in methods) + " | params (k) |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for task, budget in sorted({(t, b) for t, b, _ in cells}):
        row = [cells.get((task, budget, m)) for m in methods]
        metric = next(c for c in row if c)["runs"][0]["metric_name"]
        params = "/".join(f"{round(statistics.fmean(r['adapter_params'] for r in c['runs']) / 1000)}" if c else "—"
                          for c in row)
        lines.append(f"| {task} ({metric}) | {budget} | " + " | ".join(fmt(c) for c in row) + f" | {params} |")
    others = [m for m in methods if m != reference]
    lines += ["", "| task | budget | " + " | ".join(f"{label(reference)} − {label(m)} (p)" for m in others)
              + " | pairs |", "|---|---|" + "---|" * len(others) + "---|"]
    for task, budget in sorted({(t, b) for t, b, _ in cells}):
        out, pairs = [task, str(budget)], 0
        for other in others:
            a, b = [], []
            if (task, budget, reference) in cells and (task, budget, other) in cells:
                theirs = {r["seed"]: r["metric"] for r in cells[task, budget, other]["runs"]}
                for r in cells[task, budget, reference]["runs"]:
                    if r["seed"] in theirs:
                        a.append(100 * r["metric"])
                        b.append(100 * theirs[r["seed"]])
            pairs = max(pairs, len(a))
            if not a:
                out.append("—")
                continue
            diff = statistics.fmean(x - y for x, y in zip(a, b))
            p = stats.ttest_rel(a, b).pvalue if len(a) > 1 and any(x != y for x, y in zip(a, b)) else float("nan")
            out.append(f"{diff:+.1f} ({p:.2f})")
        lines.append("| " + " | ".join(out) + f" | {pairs} |")
    return "\n".join(lines)


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """What :func:`run_config` reads from the command line, for every script that runs the grid's runs."""
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--train-samples", type=int, default=600, help="fixed training subsample (150 x 16 = 4 epochs)")
    ap.add_argument("--eval-samples", type=int, default=400, help="validation subsample per task")
    ap.add_argument("--eval-split", default="validation",
                    help="the split scored (RTE's labelled test has 1384 rows, its validation 139); write rows "
                         "of another split to their own --out")
    ap.add_argument("--data", type=Path, default=GLUE, help="folder with one subfolder per GLUE task")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (write GPU rows to their own --out)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "cola", "rte", "mrpc", "stsb"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), type=known_method)
    ap.add_argument("--budgets", nargs="+", type=int, default=[4], help="mean final rank per layer")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one also picks the lr")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 9e-3],
                    help="log-spaced learning-rate grid per method (widened x3 at an edge)")
    add_run_arguments(ap)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL of finished runs (appended, resumable)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--summary", action="store_true", help="print the table from --out and exit")
    ap.add_argument("--reference", default="rankopt", type=known_method, help="the method the paired tests compare")
    args = ap.parse_args()
    if args.summary:
        print(summarize(args.out, args.seeds, args.tasks, args.methods, args.reference, args.budgets))
        return
    from rankopt.devices import check_device
    from rankopt.errors import RankoptError

    try:
        check_device(args.device)  # before any run: a missing GPU is one line, not a traceback per task
    except RankoptError as err:
        ap.exit(2, f"error: {err}\n")
    torch.set_num_threads(args.threads)
    run_all(args)
    print(summarize(args.out, args.seeds, args.tasks, args.methods, args.reference, args.budgets))


if __name__ == "__main__":
    main()
