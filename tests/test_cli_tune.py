"""``rankopt tune`` as a user runs it: a subprocess on a tiny random BERT and a preset .yml.

Covers the results table, one-line errors (exit 2, no traceback) and Ctrl-C (exit 130, the
running trial recorded as failed, the same command resumes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bad", "good"] + [f"w{i}" for i in range(40)]
# one thread per process: the box has 2 shared cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory) -> Path:
    """A tiny preset .yml over a random 2-layer BERT and a 'good' / 'bad' task, both local folders."""
    root = tmp_path_factory.mktemp("cli_tune")
    model_dir, data_dir = root / "model", root / "data"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    BertTokenizerFast(vocab=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    data_dir.mkdir()
    for split, n, seed in (("train", 64, 1), ("validation", 32, 2)):
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = ["good" if label else "bad"] + ([f"w{rng.randrange(40)}"] if rng.random() < 0.5 else [])
            rows.append({"text": " ".join(rng.sample(words, len(words))), "label": label})
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = {
        "task": {"name": "tiny", "data_dir": str(data_dir), "text_columns": ["text"], "metric": "accuracy",
                 "max_length": 16},
        "model": {"name": str(model_dir)},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": 20, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0, "eval_every": 5, "seed": 0},
        "controller": {"budget_unit": "rank", "target_rank": 2, "min_rank": 1, "max_rank": 8, "warmup": 0.1,
                       "final": 0.2, "interval": 4},
        "search": {"sampler": "random", "pruner": "none", "n_trials": 2, "startup_trials": 0,
                   "space": {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0},
                             "training.lr": {"type": "float", "low": 1e-2, "high": 1e-1, "log": True}}},
    }
    path = root / "tiny.yml"
    path.write_text(yaml.safe_dump(preset))
    return path


def rankopt(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankopt.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def storage(out: Path) -> str:
    return f"sqlite:///{(out / 'optuna.db').resolve()}"


def test_tune_prints_the_best_trial_table(preset_file, tmp_path):
    """Two trials, the first of which diverges: it is reported in one line, and the table shows the other."""
    preset = yaml.safe_load(preset_file.read_text())
    preset["search"]["space"]["training.lr"] = {"type": "categorical", "choices": [5e-2, 1e6]}
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "runs"
    out.mkdir()
    pinned = optuna.create_study(storage=storage(out), study_name="cli", direction="maximize")
    pinned.enqueue_trial({"controller.target_rank": 2.0, "training.lr": 1e6})  # loss NaN at step 2
    pinned.enqueue_trial({"controller.target_rank": 3.0, "training.lr": 5e-2})
    proc = rankopt("tune", "tiny.yml", "--trials", "2", "--study", "cli", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout  # a diverged trial is the user's to fix: one line
    study = optuna.load_study(study_name="cli", storage=storage(out))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    best = study.best_trial
    assert best.number == 1 and best.user_attrs["total_rank"] == 36
    table = proc.stdout
    assert "study cli: best trial" in table and "1 complete, 0 pruned, 1 failed" in table
    for column in ("trial", "metric", "final total rank", "mlflow run"):
        assert column in table
    row = next(line for line in table.splitlines() if best.user_attrs["mlflow_run_id"] in line)
    cells = [c.strip() for c in row.strip("│┃| ").split("│")]
    assert cells[:4] == [str(best.number), f"{best.value:.4f}", "no test split", "36"]  # validation, test, total rank
    # one line per finished trial on stderr, while it runs
    assert "trial 0: fail" in proc.stderr and "TrainingDiverged" in proc.stderr
    assert "trial 1: complete" in proc.stderr
    # the run id in the table is a real MLflow run of that trial
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run = client.get_run(best.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.trial"] == "1" and run.data.tags["optuna.state"] == "complete"


def _two_objective_study(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    optuna.create_study(storage=storage(out), study_name="pareto", directions=["maximize", "minimize"])
    return ["--study", "pareto"]


BAD_INPUT = {
    "unknown preset": (lambda preset, out: ["tune", "no_such_preset", "--out", str(out)], "unknown preset"),
    "negative trials": (lambda preset, out: ["tune", str(preset), "--trials", "-1", "--out", str(out)],
                        "--trials must be 0 or more"),
    "bad storage URL": (lambda preset, out: ["tune", str(preset), "--storage", "foo://x", "--out", str(out)],
                        "foo://x"),
    "other objectives": (lambda preset, out: ["tune", str(preset), "--trials", "1", "--out", str(out),
                                              *_two_objective_study(out)], "exists with 2 objective(s)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(preset_file, tmp_path, case):
    make_args, expected = BAD_INPUT[case]
    out = tmp_path / "runs"
    proc = rankopt(*make_args(preset_file, out), cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""
    assert not (out / "mlflow.db").exists()  # nothing was logged


def _trials(db: Path, study: str) -> list[tuple[int, str, dict]]:
    """(number, state, user attrs) of each trial, read straight from the SQLite file (read-only)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return []
    try:
        rows = con.execute(
            "SELECT t.trial_id, t.number, t.state FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? ORDER BY t.number", (study,)).fetchall()
        out = []
        for trial_id, number, state in rows:
            attrs = dict(con.execute("SELECT key, value_json FROM trial_user_attributes WHERE trial_id = ?",
                                     (trial_id,)).fetchall())
            out.append((number, state, {k: json.loads(v) for k, v in attrs.items()}))
        return out
    except sqlite3.OperationalError:  # not created yet, or locked by the writer
        return []
    finally:
        con.close()


def test_ctrl_c_fails_the_running_trial_and_the_same_command_resumes(preset_file, tmp_path):
    out = tmp_path / "runs"
    # long enough trials that the interrupt surely lands inside one (a few seconds each)
    args = ["tune", str(preset_file), "--trials", "1", "--study", "ctrlc", "--out", str(out),
            "--set", "training.steps=400", "--set", "training.eval_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "rankopt.cli", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # Python turns SIGINT into KeyboardInterrupt only if it is not ignored at start
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        running = []
        while time.monotonic() < deadline and proc.poll() is None:
            running = [t for t in _trials(out / "optuna.db", "ctrlc")
                       if t[1] == "RUNNING" and "mlflow_run_id" in t[2]]
            if running:
                break
            time.sleep(0.2)
        assert running, f"no trial started training (exit {proc.poll()})"
        time.sleep(1.0)  # well inside the trial's training loop
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert "study ctrlc" not in stdout  # no results table after an interrupt

    [(number, state, attrs)] = _trials(out / "optuna.db", "ctrlc")
    assert (number, state) == (0, "FAIL")  # not left RUNNING
    assert attrs["fail_reason"] == "interrupted"
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run = client.get_run(attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] in ("interrupted", "failed")
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"

    again = rankopt(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = _trials(out / "optuna.db", "ctrlc")
    assert [(n, s) for n, s, _ in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert "1 complete, 0 pruned, 1 failed" in again.stdout
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert trials[1][2]["mlflow_run_id"] != attrs["mlflow_run_id"]
    assert client.get_run(trials[1][2]["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent.info.run_id
