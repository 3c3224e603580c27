"""``rankopt train`` as a user runs it: a real subprocess, a tiny local model and data folder.

Bad input must end with exit code 2, one ``error:`` line on stderr, no traceback, and nothing
written. A good run must leave a complete MLflow run in the SQLite store under ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import N_TINY_ADAPTERS, write_jsonl
from rankopt.controller import BudgetSchedule


def run_cli(*args: str, cwd: Path, entry_point: bool = False) -> subprocess.CompletedProcess:
    exe = shutil.which("rankopt") if entry_point else None
    command = [exe] if exe else [sys.executable, "-m", "rankopt.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*command, "train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def bad_data_dir(tmp_path) -> Path:
    """Train and validation files whose text column is 'sentence', not the preset's 'text'."""
    folder = tmp_path / "bad_data"
    folder.mkdir()
    for split in ("train", "validation"):
        write_jsonl(folder / f"{split}.jsonl", [{"sentence": "w1 good", "label": 1}, {"sentence": "w2 bad", "label": 0}])
    return folder


BAD_INPUT = {
    "unknown preset": (lambda p, d, t: ["no_such_preset"], "unknown preset 'no_such_preset'"),
    "unknown key": (lambda p, d, t: [p, "--set", "training.lrr=0.1"], "unknown config key 'training.lrr'"),
    "wrong type": (lambda p, d, t: [p, "--set", "training.steps=many"], "training.steps"),
    "missing column": (lambda p, d, t: [p, "--data", d], "no column 'text'"),
    "missing model": (lambda p, d, t: [p, "--set", f"model.name={t / 'no_such_model'}"], "does not exist"),
    "budget too low": (lambda p, d, t: [p, "--set", "controller.target_rank=0.5"], "target_rank=0.5"),
    "max_rank above layer size": (lambda p, d, t: [p, "--set", "controller.max_rank=40"], "max_rank=40"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_cleanly_and_writes_nothing(case, tiny_preset_file, bad_data_dir, tmp_path):
    make_args, fragment = BAD_INPUT[case]
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    proc = run_cli(*make_args(str(tiny_preset_file), str(bad_data_dir), tmp_path), "--out", str(out), cwd=cwd)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
    assert list(cwd.iterdir()) == []


def test_train_writes_a_complete_mlflow_run(tiny_preset_file, tiny_preset, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc = run_cli(str(tiny_preset_file), "--out", str(out), cwd=tmp_path / "cwd", entry_point=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "mlflow.db").is_file()
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("accuracy ") and f"total rank {2 * N_TINY_ADAPTERS} over {N_TINY_ADAPTERS} layers" \
        in summary
    # output captured, not a terminal (a log, CI, nohup): plain progress lines, not a silent live bar;
    # every 3 steps (a tenth of 30) and at each evaluation, with the metric
    steps = re.findall(r"^train tiny: step (\d+)/30 \(\d+%, \d:\d\d:\d\d(?:, ~\d:\d\d:\d\d left)?\)  loss \d",
                       proc.stderr, re.M)
    assert [int(s) for s in steps] == list(range(3, 31, 3)), proc.stderr
    evals = re.findall(r"^train tiny: eval at step (\d+): accuracy 0\.\d{4}, loss \d", proc.stderr, re.M)
    assert [int(s) for s in evals] == [10, 20, 30], proc.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in summary
    assert run.data.tags["rankopt.kind"] == "train"

    params = run.data.params
    assert params["training.steps"] == "30" and params["adapter.init_rank"] == "4"
    assert params["model.name"] == tiny_preset["model"]["name"]
    assert params["controller.importance"] == "sensitivity"

    evals = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert sorted(m.step for m in evals) == [10, 20, 30]
    assert all(0.0 <= m.value <= 1.0 for m in evals)
    assert {"eval_loss", "eval_f1", "train_loss", "final_metric"} <= set(run.data.metrics)
    assert run.data.metrics["final_metric"] == pytest.approx(max(evals, key=lambda m: m.step).value)

    c = tiny_preset["controller"]
    sched = BudgetSchedule.from_fractions(4 * N_TINY_ADAPTERS, 2 * N_TINY_ADAPTERS, 30, c["warmup"], c["final"],
                                          c["interval"])
    totals = client.get_metric_history(run.info.run_id, "total_rank")
    assert sorted((m.step, m.value) for m in totals) == [
        (t, float(sched.budget_at(t))) for t in range(1, 31) if sched.is_reallocation_step(t)]
    rank_keys = [k for k in run.data.metrics if k.startswith("rank/")]
    assert len(rank_keys) == N_TINY_ADAPTERS
    final_ranks = {k.removeprefix("rank/"): int(run.data.metrics[k]) for k in rank_keys}
    assert sum(final_ranks.values()) == run.data.metrics["final_total_rank"] == 2 * N_TINY_ADAPTERS

    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"rank_heatmap.png", "rank_history.json", "adapter"} <= listed
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/rankopt.json"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert (local / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((local / "rank_history.json").read_text())
    assert history[-1]["ranks"] == final_ranks and history[0]["step"] == 0

    # the adapter holds every layer at its final rank
    config = json.loads((local / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(final_ranks)
    tensors = load_file(str(local / "adapter" / "adapter_model.safetensors"))
    for name, rank in final_ranks.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == rank == config["rank_pattern"].get(name, config["r"])
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert "base_model.model.classifier.weight" in tensors
