"""Search cost: rankopt tune's sampler + pruner vs random search vs the full grid, on one recorded grid.

Tuning the budget (``controller.target_rank``) and ``training.lr`` of one task costs many
fine-tunes, so the comparison is made tabular, as in HPO benchmarks:

1. **Record.** Every point of a grid (default 4 budgets x 4 learning rates on the ``demo``
   preset, 120 steps, an evaluation every 20) is trained once for real at a fixed seed, and
   its whole evaluation curve (step -> metric) and wall time go to a JSON file. Finished
   points are skipped, so an interrupted recording resumes.
2. **Replay.** Real Optuna studies search the same grid as a categorical space, with the
   sampler and pruner ``rankopt tune`` builds from the preset (``rankopt.search.trials.make_sampler``
   / ``make_pruner``: TPE + median pruner for demo), TPE without pruning, random sampling +
   the same pruner, and random without pruning. A trial reports its recorded curve point by
   point through ``trial.report`` / ``should_prune``, exactly as ``rankopt.search.trials.ReportToTrial``
   does during training (the final evaluation is reported but never pruned), and returns the final
   metric. Its compute is the training steps run: a pruned trial costs the steps up to the
   evaluation that stopped it. A point drawn twice is paid twice, as a real study would.

Training is deterministic at a fixed seed, so a replayed trial is what rerunning it would
give; ``--verify`` checks that by training the grid's best point again and comparing curves.
Each search is repeated over ``--reps`` sampler seeds. Reported: the mean best metric after
equal trial counts, and the compute to first get within ``--tolerance`` points of the grid's
best (median over repetitions, in steps and as a share of the full grid's compute, with the
share of repetitions that got there within ``--max-trials``). Metrics in [0, 1] count in points
(x 100); a minimised metric (loss, perplexity of a causal-LM preset) in its own unit, and the
studies then minimise.

    python benchmarks/search_cost.py --verify      # ~20 min on 2 CPU cores (the grid), then ~1 min of replay
    python benchmarks/search_cost.py --replay-only # the tables again from the JSON
    python benchmarks/search_cost.py --preset tiny.yml --budgets 1 2 --lrs 5e-3 1e-2 --steps 4 --eval-every 2 \\
        --reps 3 --trial-counts 2 4 --max-trials 6 --out /tmp/grid.json --verify   # smoke
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
from pathlib import Path

import optuna
import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "search_cost_grid.json"
KEYS = ("controller.target_rank", "training.lr", "controller.importance")


def higher_is_better(metric: str) -> bool:
    from rankopt.tasks.metrics import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric, True)


def display_scale(metric: str) -> float:
    """Scores in [0, 1] (accuracy, f1, ...) are shown and compared in points (x 100); losses as they are."""
    return 100.0 if higher_is_better(metric) else 1.0


def setup_of(args: argparse.Namespace) -> dict:
    """What the recorded curves depend on; a file recorded under another setup is not reused."""
    return {"preset": args.preset, "set": list(args.set), "data": args.data, "steps": args.steps,
            "eval_every": args.eval_every, "seed": args.seed}


def point_config(args: argparse.Namespace, budget: float, lr: float, importance: str | None = None):
    from rankopt.config import resolve_config
    from rankopt.config import parse_overrides

    over = {**parse_overrides(args.set), "training.steps": args.steps, "training.eval_every": args.eval_every,
            "training.seed": args.seed, KEYS[0]: budget, KEYS[1]: lr}
    if importance is not None:
        over[KEYS[2]] = importance
    return resolve_config(args.preset, over, data_dir=args.data)


def importances(args: argparse.Namespace) -> list[str]:
    """The importance kinds of the grid: ``--importances``, else the preset's own (one kind)."""
    return list(args.importances or [point_config(args, args.budgets[0], args.lrs[0]).controller.importance])


def key(point: dict) -> tuple:
    """(budget, lr, importance) of a recorded point; files from before the third dimension hold the preset's."""
    return point["budget"], point["lr"], point.get("importance", "sensitivity")


def train_point(args: argparse.Namespace, budget: float, lr: float, importance: str | None = None) -> dict:
    """One real fine-tune of a grid point, untracked: its evaluation curve, final rank and wall time."""
    from rankopt.api import train

    cfg = point_config(args, budget, lr, importance)
    kind = cfg.controller.importance
    try:
        result = train(cfg, track=False)
    except Exception as exc:  # a diverged run is a data point too: the worst metric
        print(f"  budget={budget:g} lr={lr:g} importance={kind} failed: {exc}", file=sys.stderr)
        return {"budget": budget, "lr": lr, "importance": kind, "metric_name": cfg.task.metric,
                "failed": str(exc)[:500],
                "curve": [[step, -math.inf if higher_is_better(cfg.task.metric) else math.inf]
                          for step in eval_steps(args.steps, args.eval_every)],
                "seconds": None, "total_rank": None}
    curve = [[step, metrics[cfg.task.metric]] for step, metrics in result.eval_history]
    return {"budget": budget, "lr": lr, "importance": kind, "metric_name": cfg.task.metric, "curve": curve,
            "seconds": round(result.seconds, 2), "total_rank": result.total_rank}


def eval_steps(steps: int, every: int) -> list[int]:
    return [s for s in range(1, steps + 1) if s % every == 0 or s == steps]


def load_grid(path: Path, setup: dict) -> list[dict]:
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved["setup"] != setup:
        raise SystemExit(f"error: {path} was recorded with {saved['setup']}, not {setup}; pass another --out")
    return saved["points"]


def save_grid(path: Path, setup: dict, points: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"setup": setup, "points": points}, indent=1))
    tmp.replace(path)


def record_grid(args: argparse.Namespace) -> list[dict]:
    setup = setup_of(args)
    points = load_grid(args.out, setup)
    done = {key(p) for p in points}
    kinds = importances(args)
    for kind in kinds:  # one importance kind after the other: a partial recording is a whole smaller grid
        for budget in args.budgets:
            for lr in args.lrs:
                if (budget, lr, kind) in done:
                    continue
                if args.replay_only:
                    raise SystemExit(f"error: {args.out} has no point budget={budget:g} lr={lr:g} importance={kind}; "
                                     "run without --replay-only to record it")
                point = train_point(args, budget, lr, kind if args.importances else None)
                points.append(point)
                save_grid(args.out, setup, points)
                print(f"budget={budget:g} lr={lr:g} importance={kind}: {point['metric_name']}="
                      f"{point['curve'][-1][1]:.4f} total rank {point['total_rank']} ({point['seconds']} s)", flush=True)
    wanted = {(b, lr, kind) for b in args.budgets for lr in args.lrs for kind in kinds}
    return [p for p in points if key(p) in wanted]


def verify(args: argparse.Namespace, best: dict) -> bool:
    """Train the grid's best point again; replay is sound only if the curve comes out the same."""
    again = train_point(args, best["budget"], best["lr"], key(best)[2] if args.importances else None)
    diff = max(abs(a[1] - b[1]) for a, b in zip(best["curve"], again["curve"]))
    same = [a[0] for a in best["curve"]] == [b[0] for b in again["curve"]] and diff == 0
    shown = diff * display_scale(best["metric_name"])
    print(f"verify: budget={best['budget']:g} lr={best['lr']:g} retrained: "
          f"{'identical curve' if same else f'curves differ (max |diff| {shown:.4g})'} "
          f"({again['seconds']} s)", flush=True)
    return same


def run_search(points: dict[tuple, list], args: argparse.Namespace, search, seed: int,
               higher: bool = True, enqueue: tuple = ()) -> list[dict]:
    """One Optuna study over the recorded grid; per trial: the steps it ran and the best metric so far.

    ``enqueue``: grid points (budget, lr, importance) the study tries first, before the sampler.
    """
    from rankopt.config import Distribution
    from rankopt.search.trials import make_pruner, make_sampler, suggest

    kinds = sorted({k[2] for k in points})
    space = {KEYS[0]: Distribution(type="categorical", choices=list(args.budgets)),
             KEYS[1]: Distribution(type="categorical", choices=list(args.lrs)),
             KEYS[2]: Distribution(type="categorical", choices=kinds)}
    study = optuna.create_study(direction="maximize" if higher else "minimize", sampler=make_sampler(search, seed, 1),
                                pruner=make_pruner(search, args.eval_every, args.steps))
    for point in enqueue:
        study.enqueue_trial(dict(zip(KEYS, point)))
    log: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        curve = points[values[KEYS[0]], values[KEYS[1]], values[KEYS[2]]]
        for step, metric in curve:
            trial.report(metric, step)
            if step != curve[-1][0] and trial.should_prune():
                log.append({"steps": step, "value": None})
                raise optuna.TrialPruned()
        log.append({"steps": curve[-1][0], "value": curve[-1][1]})
        return curve[-1][1]

    study.optimize(objective, n_trials=args.max_trials)
    sign = 1 if higher else -1
    best, spent = -sign * math.inf, 0
    for entry in log:
        spent += entry["steps"]
        if entry["value"] is not None and sign * entry["value"] > sign * best:
            best = entry["value"]
        entry.update(spent=spent, best=best)
    best_params = study.best_trial.params if any(e["value"] is not None for e in log) else {}
    log[-1]["best_point"] = tuple(best_params.get(k) for k in KEYS)
    return log


def searches(own, levers: bool = False, start: tuple | None = None) -> dict[str, tuple]:
    """name -> (search config, enqueued points): the preset's sampler + pruner (built as rankopt tune builds
    them), then without pruning, then random; with ``levers`` the variations the issue asks to measure."""
    combos = dict.fromkeys([(own.sampler, own.pruner), (own.sampler, "none"), ("random", own.pruner),
                            ("random", "none")])
    out = {}
    for i, (sampler, pruner) in enumerate(combos):
        name = f"{sampler} + {pruner} pruner" if pruner != "none" else f"{sampler}, no pruner"
        out["rankopt tune: " + name if i == 0 else name] = (own.model_copy(update={"sampler": sampler,
                                                                                  "pruner": pruner}), ())
    if not levers:
        return out
    tpe = own.model_copy(update={"sampler": "tpe"})
    for pruner in ("successive_halving", "hyperband"):
        out[f"tpe + {pruner}"] = (tpe.model_copy(update={"pruner": pruner}), ())
        out[f"random + {pruner}"] = (tpe.model_copy(update={"sampler": "random", "pruner": pruner}), ())
    for after in (0.0, 0.5):
        out[f"tpe + {own.pruner}, prune_after {after:g}"] = (tpe.model_copy(update={"prune_after": after}), ())
    for startup in (4, 8):
        out[f"tpe + {own.pruner}, {startup} startup trials"] = (tpe.model_copy(update={"startup_trials": startup}), ())
    if start is not None:
        out[f"tpe + {own.pruner}, preset's point enqueued"] = (tpe, (start,))
        out["tpe, no pruner, preset's point enqueued"] = (tpe.model_copy(update={"pruner": "none"}), (start,))
    return out


def _preset_point(args: argparse.Namespace) -> tuple:
    """The grid point nearest the preset's own values (budget; lr on a log scale; its importance kind)."""
    from rankopt.config import parse_overrides, resolve_config

    preset = resolve_config(args.preset, parse_overrides(args.set), data_dir=args.data)
    budget = min(args.budgets, key=lambda b: abs(b - preset.controller.target_rank))
    lr = min(args.lrs, key=lambda v: abs(math.log(v / preset.training.lr)))
    kinds = importances(args)
    return budget, lr, preset.controller.importance if preset.controller.importance in kinds else kinds[0]


def summarize(args: argparse.Namespace, grid: list[dict]) -> tuple[list[dict], dict]:
    """One row per search (plus the full grid): best after equal trial counts, compute to the target."""
    metric = grid[0]["metric_name"]
    higher, scale = higher_is_better(metric), display_scale(metric)
    sign = 1 if higher else -1
    curves = {key(p): p["curve"] for p in grid}
    best_point = max(grid, key=lambda p: sign * p["curve"][-1][1])
    grid_best = best_point["curve"][-1][1]
    grid_steps = sum(p["curve"][-1][0] for p in grid)
    goal = grid_best - sign * args.tolerance / scale
    preset = point_config(args, args.budgets[0], args.lrs[0])
    start = _preset_point(args)
    rows = []
    for name, (search, enqueue) in searches(preset.search, args.levers, start).items():
        logs = [run_search(curves, args, search, seed, higher, enqueue) for seed in range(args.reps)]
        row = {"search": name, "reps": args.reps}
        for k in args.trial_counts:
            finite = [scale * b for b in (log[min(k, len(log)) - 1]["best"] for log in logs) if math.isfinite(b)]
            row[f"best@{k}"] = statistics.fmean(finite) if finite else None
            row[f"sd@{k}"] = statistics.stdev(finite) if len(finite) > 1 else 0.0
        reach = [next((e["spent"] for e in log if sign * e["best"] >= sign * goal), math.inf) for log in logs]
        row["reached"] = sum(math.isfinite(r) for r in reach) / len(reach)
        row["median_steps"] = statistics.median(reach)
        row["share_of_grid"] = row["median_steps"] / grid_steps
        row["on_target"] = sum(r <= args.target_share * grid_steps for r in reach) / len(reach)
        row["modal_best_point"] = collections.Counter(log[-1]["best_point"] for log in logs).most_common(1)[0][0]
        rows.append(row)
    grid_row = {"search": f"full grid ({len(grid)} runs)", "reps": 1, "reached": 1.0, "median_steps": grid_steps,
                "share_of_grid": 1.0, "on_target": float(args.target_share >= 1), "modal_best_point": key(best_point),
                **{f"best@{k}": scale * grid_best for k in args.trial_counts},
                **{f"sd@{k}": 0.0 for k in args.trial_counts}}
    info = {"grid_best": grid_best, "grid_steps": grid_steps, "best_point": best_point, "scale": scale,
            "grid_seconds": sum(p["seconds"] or 0 for p in grid), "metric": metric}
    return [grid_row, *rows], info


def print_tables(args: argparse.Namespace, grid: list[dict], rows: list[dict], info: dict) -> None:
    metric, scale = info["metric"], info["scale"]
    shown = f"{metric} x 100" if scale == 100 else metric
    unit = "points" if scale == 100 else metric
    print(f"\n# grid: {args.preset}, {args.steps} steps, eval every {args.eval_every}, seed {args.seed}; "
          f"{shown} (final evaluation)")
    final = {key(p): scale * p["curve"][-1][1] for p in grid}
    for kind in sorted({k[2] for k in final}):
        print(f"\nimportance {kind}:\n")
        print("| budget \\ lr | " + " | ".join(f"{lr:g}" for lr in args.lrs) + " |")
        print("|---|" + "---|" * len(args.lrs))
        for b in args.budgets:
            cells = (final.get((b, lr, kind)) for lr in args.lrs)
            print(f"| {b:g} | " + " | ".join("—" if c is None else f"{c:.1f}" for c in cells) + " |")
    bp = info["best_point"]
    best = scale * info["grid_best"]
    print(f"\nGrid best: budget {bp['budget']:g}, lr {bp['lr']:g}, importance {key(bp)[2]}: {best:.1f}; full grid "
          f"{info['grid_steps']} steps, {info['grid_seconds'] / 60:.1f} min of training.")
    print(f"\n# search cost: {args.reps} sampler seeds per search, up to {args.max_trials} trials each; target: within "
          f"{args.tolerance:g} {unit} of the grid's best ({best:.1f}); torch {torch.__version__}, "
          f"optuna {optuna.__version__}")
    head = " | ".join(f"best after {k} trials" for k in args.trial_counts)
    print(f"| search | {head} | steps to target (median) | % of grid | reached | reached in <= "
          f"{100 * args.target_share:.0f} % | best point found most often |")
    print("|---|" + "---|" * len(args.trial_counts) + "---|---|---|---|---|")
    for r in rows:
        bests = " | ".join("—" if r[f"best@{k}"] is None else f"{r[f'best@{k}']:.1f} ± {r[f'sd@{k}']:.1f}"
                           for k in args.trial_counts)
        steps = "not reached" if math.isinf(r["median_steps"]) else f"{r['median_steps']:.0f}"
        share = "—" if math.isinf(r["median_steps"]) else f"{100 * r['share_of_grid']:.0f} %"
        budget, lr, kind = r["modal_best_point"]
        point = "—" if budget is None else f"{budget:g} / {lr:g} / {kind}"
        print(f"| {r['search']} | {bests} | {steps} | {share} | {100 * r['reached']:.0f} % | "
              f"{100 * r['on_target']:.0f} % | {point} |")
    print(json.dumps({"rows": rows, "grid_best": info["grid_best"], "grid_steps": info["grid_steps"]},
                     default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", help="preset name or .yml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    ap.add_argument("--data", default=None, help="data folder for the preset (as rankopt train --data)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0], help="controller.target_rank")
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3, 4e-3], help="training.lr")
    ap.add_argument("--importances", nargs="+", default=None, choices=["sensitivity", "energy"],
                    help="controller.importance kinds (a third grid dimension; default: the preset's only)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="training seed of every grid point")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON of recorded curves (resumable)")
    ap.add_argument("--replay-only", action="store_true", help="train nothing; the grid must be recorded")
    ap.add_argument("--verify", action="store_true", help="retrain the best point and compare its curve")
    ap.add_argument("--reps", type=int, default=30, help="sampler seeds per search")
    ap.add_argument("--trial-counts", nargs="+", type=int, default=[8, 16], help="report the best after these")
    ap.add_argument("--max-trials", type=int, default=32, help="trials per search (points may repeat)")
    ap.add_argument("--tolerance", type=float, default=0.5, help="points below the grid's best that count")
    ap.add_argument("--target-share", type=float, default=0.4, help="share of the grid's compute the target allows")
    ap.add_argument("--levers", action="store_true", help="also replay the pruner / prune_after / TPE startup / "
                    "enqueued-start variations")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = record_grid(args)
    rows, info = summarize(args, grid)
    print_tables(args, grid, rows, info)
    if args.verify and not verify(args, info["best_point"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
