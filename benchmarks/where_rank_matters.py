"""Where adaptive rank pays: three rungs where the allocation, not the amount of rank, decides.

- ``planted``: a MiniLM teacher with low-rank updates planted in four modules (which ones, from the
  seed); students at equal adapter size reproduce its hidden states (``benchmarks/planted.py``).
  Reports the share of the teacher's shift left unexplained and the share of the final rank that
  sits on planted modules, at budgets below, at and above the planted total (uniform ranks 1, 2, 4;
  the planting costs a uniform rank 2).
- ``placement``: PEFT LoRA on q,v only, on attention only, on the MLP only and on all linears, each at
  the rank that gives the same adapter size, against rankopt over all linears (``placement.py``), on
  the GLUE copies with ``quality_vs_peft``'s data, steps and loop (its rankopt rows are reused).
- ``decoder``: SmolLM2-135M-Instruct fine-tuned on the ``chat`` preset's chats (``decoder.py``): PEFT
  LoRA's rank sweep (budgets 1, 4, 16, 64), then PEFT LoRA, AdaLoRA and rankopt at equal size;
  validation loss per assistant token. Sized for a GPU (``--device cuda``): on 2 CPU cores one run
  of the default size takes about an hour.

Every method gets its own learning rate: the first seed runs a log grid, widened x3 at an edge (at
most twice), and the other seeds run at the picked rate. Rows are appended to a JSONL file, so an
interrupted run resumes where it stopped. Methods are PEFT's (``peft_*``) or rankopt's; a rankopt
method may carry controller settings, ``rankopt:importance=energy,swap=0.3``.

    python benchmarks/where_rank_matters.py planted --budgets 2          # ~2 h of one core per budget
    python benchmarks/where_rank_matters.py planted --summary            # tables and paired tests
    python benchmarks/where_rank_matters.py placement --tasks sst2       # 4 placements + rankopt, 3 seeds
    python benchmarks/where_rank_matters.py decoder --methods peft_lora --device cuda   # the rank sweep
    python benchmarks/where_rank_matters.py decoder --budgets 4 --methods peft_lora peft_adalora rankopt --device cuda
    python benchmarks/where_rank_matters.py planted --seeds 0 --budgets 2 --steps 4 --train-samples 64 \\
        --eval-samples 16 --lrs 1e-2 --methods rankopt peft_lora --out /tmp/w.jsonl      # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_vs_peft import CODE, GLUE, RANKOPT_VARIANTS, load_results, next_rate, variant_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "where_rank_matters.jsonl"
PLANTED_METHODS = ("peft_lora", "peft_oracle", "peft_adalora", "peft_adalora_4x", "peft_eva", "rankopt_fixed",
                   "rankopt", "rankopt_rank", "rankopt_2x")
PLANTED_AT = 2  # the planting costs a uniform rank-2 adapter
PLACEMENT_METHODS = ("peft_qv", "peft_attention", "peft_mlp", "peft_all", "rankopt")
GLUE_GRID = RESULTS.parent / "glue_grid.jsonl"  # quality_vs_peft's rankopt rows, the same runs
# per rung: steps, train and eval samples, lr grid, budgets (placement: quality_vs_peft's grid)
RUNG_DEFAULTS = {"planted": (200, 1500, 300, [3e-3, 1e-2], [1, 2, 4]),
                 "placement": (150, 600, 400, [1e-3, 3e-3, 9e-3], [4]),
                 "decoder": (120, 450, 108, [1e-3, 3e-3], [1, 4, 16, 64])}  # 450 chats: ~4 epochs of 8 x 96
DECODER_METHODS = ("peft_lora",)  # the rank sweep; then the methods at one budget


# --- the planted rung ---------------------------------------------------------------------------

_TASKS: dict = {}


def planted_task(seed: int, args: argparse.Namespace):
    """The seed's planting and its task (built once per process: the teacher's outputs take a minute)."""
    import planted as P

    key = (seed, args.train_samples, args.eval_samples, args.strength)
    if key not in _TASKS:
        _TASKS.clear()  # one at a time: the targets hold every layer's outputs
        uniform1 = sum(sum(shape) for shape in P.target_shapes().values())
        planting = P.choose_planting(seed, PLANTED_AT * uniform1, args.strength)
        _TASKS[key] = planting, P.build_task(planting, seed, args.train_samples, args.eval_samples, 40)
    return _TASKS[key]


def run_planted(method: str, budget: int, lr: float, seed: int, args: argparse.Namespace) -> dict:
    import planted as P

    planting, task = planted_task(seed, args)
    started = time.perf_counter()
    if method.startswith("peft_"):
        cfg = P.run_config(budget, budget, lr, seed, args.steps, False, 1, 64)  # the data and loop only
        model, ranks = P.train_peft_student(task, cfg, method, budget, planting)
        shapes = P.target_shapes()
        params = sum(r * sum(shapes[name]) for name, r in ranks.items() if name in shapes)
    else:
        from rankopt.config import ControllerConfig, build_config

        # the method's start and what its budget counts, as on the GLUE grid; max_rank stays 64 here, so that
        # no cap sits below the planted ranks
        start, _, on, unit = RANKOPT_VARIANTS[method.partition(":")[0]]
        min_rank = ControllerConfig.model_fields["min_rank"].default  # the shipped default, as `rankopt` means
        cfg = P.run_config(budget, start * budget, lr, seed, args.steps, on, min_rank, 64, budget_unit=unit)
        if ":" in method:  # a variant: its own settings over the defaults
            cfg = build_config(cfg.model_dump(), variant_settings(method.partition(":")[2]))
        model, ranks, _, _ = P.train_rankopt(task, cfg)
        params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(ranks.values())
    return {"rung": "planted", "task": "planted", "method": method, "budget": budget, "lr": lr, "seed": seed,
            "steps": args.steps, "metric_name": "unexplained", "metric": P.unexplained(model, task),
            "planted_rank_share": sum(ranks.get(n, 0) for n in planting.ranks) / total if total else 0.0,
            "planted": {n: [r, ranks.get(n, 0)] for n, r in planting.ranks.items()}, "total_rank": total,
            "adapter_params": params, "seconds": round(time.perf_counter() - started, 1), "code": CODE}


def same_rankopt(code: str) -> bool:
    """Whether rankopt/ at commit ``code`` is rankopt/ now (a row measured there is a row measured here)."""
    import subprocess

    if code == CODE:
        return True
    if "+" in code or "+" in CODE or "unknown" in (code, CODE):
        return False
    diff = subprocess.run(["git", "diff", "--quiet", code, CODE, "--", ":/rankopt"], cwd=RESULTS.parent,
                          capture_output=True, timeout=30)
    return diff.returncode == 0


def run_placement(task: str, method: str, budget: int, lr: float, seed: int, args: argparse.Namespace) -> dict:
    """A placement run; a rankopt one quality_vs_peft already made (same settings and code) is reused."""
    import placement

    if method.startswith("rankopt"):
        for row in load_results(GLUE_GRID):
            if ((row["task"], row["method"], row["budget"], row["lr"], row["seed"], row["steps"],
                 row.get("train_samples")) == (task, method, budget, lr, seed, args.steps, args.train_samples)
                    and same_rankopt(row.get("code", "unknown"))):
                return {"rung": "placement", **row, "rank": None, "from": GLUE_GRID.name}
    return placement.run_placement(task, method, budget, lr, seed, args)


# --- the grid ---------------------------------------------------------------------------------


def _key(r: dict) -> tuple:
    return r["rung"], r["task"], r["budget"], r["method"], r["lr"], r["seed"], r["steps"]


def _score(r: dict, lower_is_better: bool) -> float:
    if not math.isfinite(r["metric"]):
        return -math.inf
    return -r["metric"] if lower_is_better else r["metric"]


def _cell(results, rung, task, budget, method, seed, steps):
    return [r for r in results if (r["rung"], r["task"], r["budget"], r["method"], r["seed"], r["steps"])
            == (rung, task, budget, method, seed, steps)]


def picked_lr(results, rung, task, budget, method, seed, steps, lower_is_better) -> float | None:
    runs = _cell(results, rung, task, budget, method, seed, steps)
    return max(runs, key=lambda r: _score(r, lower_is_better))["lr"] if runs else None


def run_grid(rung: str, tasks: list[str], methods: list[str], budgets: list[int], run, args,
             lower_is_better: bool, skip=lambda task, budget, method: False) -> None:
    """Each (task, budget, method): the lr grid on the first seed (widened at an edge), then the other seeds."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_results(args.out)}
    first, rest = args.seeds[0], args.seeds[1:]

    def ensure(task, budget, method, lr, seed):
        if (rung, task, budget, method, lr, seed, args.steps) in done:
            return
        row = run(method, budget, lr, seed, args) if rung == "planted" else run(task, method, budget, lr, seed, args)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.add(_key(row))
        print(f"{rung} {task} b={budget} {method} lr={lr:g} seed={seed}: {row['metric_name']}={row['metric']:.4f} "
              f"({row['seconds']} s)", flush=True)

    for seeds in ([first], rest):  # every cell's rate first, then the seeds: early rows already compare methods
        for task in tasks:
            for budget in budgets:
                for method in methods:
                    if skip(task, budget, method):
                        continue
                    if seeds == [first]:
                        for lr in args.lrs:
                            ensure(task, budget, method, lr, first)
                        for widened in range(2):
                            results = load_results(args.out)
                            runs = _cell(results, rung, task, budget, method, first, args.steps)
                            grid = sorted({r["lr"] for r in runs})
                            best = picked_lr(results, rung, task, budget, method, first, args.steps, lower_is_better)
                            wider = next_rate(grid, best, widened)
                            if wider is None:
                                break
                            ensure(task, budget, method, wider, first)
                        continue
                    lr = picked_lr(load_results(args.out), rung, task, budget, method, first, args.steps,
                                   lower_is_better)
                    for seed in seeds:
                        ensure(task, budget, method, lr, seed)


def summarize(path: Path, rung: str, seeds: list[int], methods: list[str], reference: str, lower_is_better: bool,
              extra: tuple[str, ...] = ()) -> str:
    """Markdown: mean ± std over seeds at each method's picked rate, and paired t-tests of ``reference`` vs each."""
    from scipy import stats

    results = [r for r in load_results(path) if r.get("rung") == rung and r["method"] in methods]
    steps = max((r["steps"] for r in results), default=0)
    results = [r for r in results if r["steps"] == steps]
    cells = {}
    for task, budget in sorted({(r["task"], r["budget"]) for r in results}):
        for method in methods:
            lr = picked_lr(results, rung, task, budget, method, seeds[0], steps, lower_is_better)
            grid = sorted({r["lr"] for r in _cell(results, rung, task, budget, method, seeds[0], steps)})
            runs = sorted((r for r in results if (r["task"], r["budget"], r["method"], r["lr"]) ==
                           (task, budget, method, lr) and r["seed"] in seeds), key=lambda r: r["seed"])
            if runs:
                cells[task, budget, method] = {"lr": lr, "runs": runs, "edge": len(grid) > 1 and lr in (grid[0], grid[-1])}

    def fmt(cell, key="metric", scale=1.0, digits=3):
        if cell is None:
            return "—"
        vals = [scale * r[key] for r in cell["runs"]]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.{digits}f} ± {std:.{digits}f}"

    lines = [f"| task | budget | method | {results[0]['metric_name'] if results else 'metric'} | "
             + " | ".join(extra) + (" | " if extra else "") + "adapter params (k) | lr | n |",
             "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|"]
    for (task, budget, method), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], methods.index(kv[0][2]))):
        params = statistics.fmean(r["adapter_params"] for r in cell["runs"]) / 1000
        edge = " (edge)" if cell["edge"] else ""
        lines.append(f"| {task} | {budget} | {method} | {fmt(cell)} | " + "".join(f"{fmt(cell, e, digits=2)} | " for e in extra)
                     + f"{params:.0f} | {cell['lr']:g}{edge} | {len(cell['runs'])} |")
    lines += ["", f"| task | budget | {reference} − method (p, pairs) |", "|---|---|---|"]
    for task, budget in sorted({(t, b) for t, b, _ in cells}):
        if (task, budget, reference) not in cells:
            continue
        mine = {r["seed"]: r["metric"] for r in cells[task, budget, reference]["runs"]}
        parts = []
        for method in methods:
            if method == reference or (task, budget, method) not in cells:
                continue
            theirs = {r["seed"]: r["metric"] for r in cells[task, budget, method]["runs"]}
            pairs = [(mine[s], theirs[s]) for s in sorted(set(mine) & set(theirs))]
            if not pairs:
                continue
            diff = statistics.fmean(a - b for a, b in pairs)
            p = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue if len(pairs) > 1 else float("nan")
            parts.append(f"{method} {diff:+.3f} (p {p:.2f}, {len(pairs)})")
        lines.append(f"| {task} | {budget} | " + "; ".join(parts) + " |")
    return "\n".join(lines)


def planted_targets(path: Path, seeds: list[int], methods: list[str]) -> str:
    """The issue's targets at the planted total: unexplained vs the oracle's and uniform LoRA's (mean ratio
    over paired seeds), and the share of the final rank on planted modules."""
    results = [r for r in load_results(path) if r.get("rung") == "planted" and r["budget"] == PLANTED_AT]
    steps = max((r["steps"] for r in results), default=0)
    results = [r for r in results if r["steps"] == steps]

    def at_picked(method):
        lr = picked_lr(results, "planted", "planted", PLANTED_AT, method, seeds[0], steps, True)
        return {r["seed"]: r for r in results if r["method"] == method and r["lr"] == lr and r["seed"] in seeds}

    oracle, uniform = at_picked("peft_oracle"), at_picked("peft_lora")
    lines = ["| method | unexplained / oracle's (target <= 1.5) | / uniform LoRA's (target <= 0.5) | "
             "rank on planted modules (target >= 80 %) | seeds |", "|---|---|---|---|---|"]
    for method in methods:
        mine = at_picked(method)
        common = sorted(set(mine) & set(oracle) & set(uniform))
        if not common:
            continue
        to_oracle = statistics.fmean(mine[s]["metric"] / oracle[s]["metric"] for s in common)
        to_uniform = statistics.fmean(mine[s]["metric"] / uniform[s]["metric"] for s in common)
        share = statistics.fmean(mine[s]["planted_rank_share"] for s in common)
        lines.append(f"| {method} | {to_oracle:.2f} | {to_uniform:.2f} | {100 * share:.0f} % | {len(common)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rung", choices=list(RUNG_DEFAULTS))
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--tasks", nargs="+", default=["sst2"], help="placement: GLUE tasks under --data")
    ap.add_argument("--data", type=Path, default=GLUE)
    ap.add_argument("--device", default="cpu", help="decoder: cpu, cuda or cuda:K")
    ap.add_argument("--model", default=None, help="decoder: another model than the chat preset's")
    ap.add_argument("--budgets", nargs="+", type=int, default=None, help="mean final rank (a uniform LoRA's)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one also picks the lr")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="log grid, widened x3 at an edge")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--eval-samples", type=int, default=None)
    ap.add_argument("--strength", type=float, default=1.0, help="planted: each component's size (see planted.py)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--reference", default="rankopt")
    args = ap.parse_args()
    steps, train, evals, lrs, budgets = RUNG_DEFAULTS[args.rung]
    args.steps, args.train_samples, args.eval_samples = (args.steps or steps, args.train_samples or train,
                                                         args.eval_samples or evals)
    args.lrs, args.budgets = args.lrs or lrs, args.budgets or budgets
    planted, lower_is_better = args.rung == "planted", args.rung in ("planted", "decoder")
    methods = args.methods or list({"planted": PLANTED_METHODS, "placement": PLACEMENT_METHODS,
                                    "decoder": DECODER_METHODS}[args.rung])
    extra = ("planted_rank_share",) if planted else ()
    if args.summary:
        print(summarize(args.out, args.rung, args.seeds, methods, args.reference, lower_is_better, extra=extra))
        if planted:
            print()
            print(planted_targets(args.out, args.seeds, methods))
        return
    torch.set_num_threads(args.threads)
    if args.rung == "placement":
        run_grid("placement", args.tasks, methods, args.budgets, run_placement, args, lower_is_better)
    elif args.rung == "decoder":
        from decoder import run_decoder

        run_grid("decoder", ["chat"], methods, args.budgets, run_decoder, args, lower_is_better)
    if not planted:
        print(summarize(args.out, args.rung, args.seeds, methods, args.reference, lower_is_better))
        return
    # the oracle's size is the planting's: it runs at the budget the planting costs only
    run_grid("planted", ["planted"], methods, args.budgets, run_planted, args, lower_is_better=True,
             skip=lambda task, budget, method: method == "peft_oracle" and budget != PLANTED_AT)
    print(summarize(args.out, args.rung, args.seeds, methods, args.reference, lower_is_better=True,
                    extra=("planted_rank_share",)))


if __name__ == "__main__":
    main()
