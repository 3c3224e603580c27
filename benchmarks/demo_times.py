"""Wall time and peak memory of the README's demo commands, as a user runs them (issue 12's limits).

Runs ``rankopt train demo`` and ``rankopt tune demo --trials N``, each in a fresh ``--out`` folder,
one after the other (so they do not share the cores), and appends one JSON row per command to
``--out-jsonl``: wall seconds, the peak RSS of its largest process, the result lines it prints, and
the commit it ran on. Limits the issue sets on 2 CPU cores: train under 2 min, tune under 12 min.

    python benchmarks/demo_times.py                                          # ~10 min on 2 cores
    python benchmarks/demo_times.py --trials 1 --set training.steps=2 --out-jsonl /tmp/t.jsonl   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality_vs_peft import CODE

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "demo_times.jsonl"


# runs the command in a child of its own, so that its peak RSS (ru_maxrss of its largest process, KiB on
# Linux) is this command's alone, not the largest of every command run so far
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def timed(command: list[str]) -> dict:
    """Run ``command`` to its end; its wall seconds, the peak RSS of its largest process, what it reports."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    # what it reports: train's closing line, tune's best-trial title and table row
    said = [line.strip() for line in proc.stdout.splitlines() if "accuracy" in line or "best trial" in line
            or line.startswith("│")]
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_kib / 2**20, 2), "result": said}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for both commands")
    ap.add_argument("--out-jsonl", type=Path, default=DEFAULT_OUT, help="JSONL the rows are appended to")
    args = ap.parse_args()
    sets = [arg for override in args.overrides for arg in ("--set", override)]
    rankopt = [sys.executable, "-m", "rankopt"]
    commands = {"train demo": [*rankopt, "train", "demo", *sets],
                f"tune demo --trials {args.trials}": [*rankopt, "tune", "demo", "--trials", str(args.trials), *sets]}
    args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, command in commands.items():
        with tempfile.TemporaryDirectory(prefix="demo_times.") as out:
            row = {"command": f"rankopt {name}", "overrides": args.overrides, **timed([*command, "--out", out]),
                   "code": CODE, "date": time.strftime("%Y-%m-%d")}
        with args.out_jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    print("| command | wall | peak RSS (GiB) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['command']} | {row['seconds'] // 60:.0f} min {row['seconds'] % 60:.0f} s | "
              f"{row['peak_rss_gib']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
