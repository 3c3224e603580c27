"""One rankopt run on the planted rung, with the planted modules' ranks at every reallocation.

Where ``where_rank_matters.py planted`` reports the end of a run, this shows how the controller got
there: the ranks after the gradient start's split, then after each reallocation, the share of the
total rank on planted modules, and every layer's component energies (the score that decides).
Used to find out why the controller from 2x the budget fell short (BENCHMARKS.md, "Planted rank").

    python benchmarks/planted_trajectory.py --seed 1 --lr 0.03 --init 8            # the default start, ~3 min
    python benchmarks/planted_trajectory.py --seed 1 --init 4 --set controller.min_age=3 --name age3
    python benchmarks/planted_trajectory.py --seed 1 --init 8 --uniform            # no split at the start
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import planted as P
from where_rank_matters import planted_task

RESULTS = Path(__file__).resolve().parent / "results" / "planted_trajectory.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--budget", type=int, default=2, help="mean final rank (a uniform LoRA's; 2: the planted total)")
    ap.add_argument("--init", type=int, default=8, help="initial mean rank (8 = 4x the budget, the default start)")
    ap.add_argument("--uniform", action="store_true", help="start every layer at --init (no split by the gradient)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. controller.min_age=3")
    ap.add_argument("--name", default="default")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from types import SimpleNamespace

    from rankopt.config import build_config

    planting, task = planted_task(args.seed, SimpleNamespace(train_samples=1500, eval_samples=300, strength=1.0))
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = P.run_config(args.budget, args.init, args.lr, args.seed, 200, True, 0, 64)
    cfg = build_config(base.model_dump(), overrides)
    started = time.perf_counter()
    start_cfg = build_config(cfg.model_dump(), {"controller.enabled": False}) if args.uniform else None
    model, ranks, start, stepper = P.train_rankopt(task, cfg, start_cfg)

    def planted_ranks(ranks):
        return [ranks.get(name, 0) for name in planting.ranks]

    def share(ranks):
        return round(sum(planted_ranks(ranks)) / max(1, sum(ranks.values())), 3)

    short = lambda name: name.replace("encoder.encoder.layer.", "")  # noqa: E731
    trajectory = [{"step": "start", "total": sum(start.values()), "share": share(start),
                   "planted": planted_ranks(start)}]
    trajectory += [{"step": e.step, "total": e.budget, "share": share(e.ranks), "planted": planted_ranks(e.ranks)}
                   for e in stepper.history[1:]]
    row = {"name": args.name, "seed": args.seed, "lr": args.lr, "budget": args.budget, "init": args.init,
           "uniform": args.uniform, "set": overrides, "unexplained": P.unexplained(model, task),
           "planted": {short(n): [r, ranks.get(n, 0)] for n, r in planting.ranks.items()},
           "share": share(ranks), "trajectory": trajectory,
           "energies": [{"step": e.step, "energy": {short(n): [round(x, 4) for x in v]
                                                    for n, v in e.scores.get("energy", {}).items()}}
                        for e in stepper.history[1:]],
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({k: row[k] for k in ("name", "unexplained", "planted", "share", "seconds")}))
    for point in trajectory:
        print(point)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
