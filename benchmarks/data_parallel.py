"""Data-parallel step time: N processes against one on the same global batches (issue 14).

MiniLM with rankopt's adapters and rank controller (the demo preset: 36 linears, init rank 8,
budget 4, a reallocation every 10 steps, so resizes and their broadcasts are in the timed
steps), training on the demo task's seeded global batches of ``--batch`` rows. One process uses
all the cores as threads; N processes (``torch.distributed.run``, gloo on CPU, NCCL with
``--device cuda``) each take cores / N threads and their shard of every global batch, and sum
gradients once per step. The runs alternate (1, N, N, 1, ...) so that machine noise hits both
alike. Every run also records its per-step losses: the table shows the mean of the last ten, which
agree across process counts up to dropout noise (the processes draw their own masks; without
dropout the runs are equal to float tolerance, as ``tests/test_data_parallel.py`` checks).

    python benchmarks/data_parallel.py                        # 1 vs 2 processes, 3 repeats each (~6 min on 2 cores)
    python benchmarks/data_parallel.py --device cuda --nprocs 1 8 --batch 256   # one process per GPU
    python benchmarks/data_parallel.py --summary              # the table from benchmarks/results/data_parallel.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "data_parallel.jsonl"


def worker(args: argparse.Namespace) -> None:
    """One process of a run: train ``warmup + steps`` steps, rank 0 writes the step times and losses."""
    import torch

    from rankopt import distributed
    from rankopt.config import parse_overrides, resolve_config
    from rankopt.training.setup import build_model, prepare_data
    from rankopt.training.trainer import Stepper, seeded_batches

    procs = distributed.init_from_environment(args.device)
    device = f"cuda:{procs.local_rank}" if args.device.startswith("cuda") else "cpu"
    total = args.warmup + args.steps
    overrides = {"training.steps": total, "training.batch_size": args.batch, "training.device": device,
                 "training.eval_every": total, "controller.interval": 10, "controller.warmup": 0.1,
                 "controller.final": 0.2, **parse_overrides(args.set)}
    cfg = resolve_config(args.preset, overrides)
    distributed.check_divisible(cfg.training.batch_size)
    data = prepare_data(cfg)
    adapted = build_model(cfg, data.num_labels, data.label_names, data.label_mean)
    adapted.model.to(device).train()
    torch.manual_seed(cfg.training.seed)
    stepper = Stepper(cfg, adapted)
    batches = seeded_batches(data, cfg.training.batch_size, cfg.training.seed)
    times, losses = [], []
    for _ in range(total):
        batch = next(batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = stepper.step([batch])
        losses.append(float(loss))  # a host read: the step is over on every process (the sum waited for all)
        times.append(time.perf_counter() - started)
    if procs.main:
        Path(args.result).write_text(json.dumps({"times": times[args.warmup:], "losses": losses,
                                                 "total_rank": adapted.total_rank()}))
    distributed.shutdown()


def launch(args: argparse.Namespace, nproc: int, result: Path) -> dict:
    """One run with ``nproc`` processes, each with its share of the threads; its rank 0's result."""
    cores = args.cores or os.cpu_count() or 1
    threads = max(1, cores // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    script = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--preset", args.preset,
              "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--device", args.device, *[f"--set={item}" for item in args.set]]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "--max-restarts=0", *script]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {nproc}-process run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out.update(nproc=nproc, threads_per_process=threads, wall_s=round(time.perf_counter() - started, 1))
    return out


def run_all(args: argparse.Namespace) -> None:
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    order = list(args.nprocs)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for nproc in order if repeat % 2 == 0 else order[::-1]:  # 1, N, N, 1, ...: drift hits both
                out = launch(args, nproc, Path(tmp) / f"r{repeat}-n{nproc}.json")
                row = {"preset": args.preset, "device": args.device, "global_batch": args.batch,
                       "steps": args.steps, "warmup": args.warmup, "repeat": repeat, "nproc": nproc,
                       "threads_per_process": out["threads_per_process"],
                       "median_step_s": statistics.median(out["times"]), "mean_step_s": statistics.fmean(out["times"]),
                       "losses": out["losses"], "total_rank": out["total_rank"], "wall_s": out["wall_s"],
                       "host": platform.processor() or platform.machine(), "cores": args.cores or os.cpu_count(),
                       "torch": torch.__version__, "set": args.set}
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"repeat {repeat}, {nproc} process(es) x {row['threads_per_process']} thread(s): median step "
                      f"{row['median_step_s']:.3f} s, final rank {row['total_rank']}", flush=True)
    print(summarize(args.out))


def summarize(path: Path) -> str:
    """Markdown: median step per process count (median over repeats), speed-up, and loss agreement."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["device"], r["global_batch"], r["steps"]), []).append(r)
    lines = ["| preset | device | global batch | processes x threads | median step (s) | speed-up vs 1 | "
             "mean loss, last 10 steps | final total rank | repeats |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (preset, device, batch, _), runs in groups.items():
        by_n: dict[int, list[dict]] = {}
        for r in runs:
            by_n.setdefault(r["nproc"], []).append(r)
        one = by_n.get(1)
        base = statistics.median(r["median_step_s"] for r in one) if one else None
        for n, rs in sorted(by_n.items()):
            median = statistics.median(r["median_step_s"] for r in rs)
            speedup = f"{base / median:.2f}x" if base else "—"
            late = statistics.fmean(statistics.fmean(r["losses"][-10:]) for r in rs)
            ranks = sorted({r["total_rank"] for r in rs})
            lines.append(f"| {preset} | {device} | {batch} | {n} x {rs[0]['threads_per_process']} | {median:.3f} | "
                         f"{speedup} | {late:.3f} | {'/'.join(map(str, ranks))} | {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides (repeatable)")
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows per optimizer step, all processes)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to compare (1 first)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=None, help="threads to share among a run's processes (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per process")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL of finished runs (appended)")
    ap.add_argument("--summary", action="store_true", help="print the table from --out and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.summary:
        print(summarize(args.out))
    else:
        if args.nprocs[0] != 1:
            ap.error("--nprocs must start with 1 (the baseline every speed-up is against)")
        run_all(args)


if __name__ == "__main__":
    main()
