"""One fine-tune on several processes: real torchrun, real gloo all-reduces, the tiny model.

Two processes must make the same rank decisions at every reallocation and end with bit-identical
adapters; both must equal a single-process run on the same global batches to float tolerance;
only rank 0 writes; a killed process ends the job in one line; trials of a study run
data-parallel too; the Trainer callback refuses DDP in one line.
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
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from conftest import FILLER, synthetic_rows, tiny_bert_config, write_jsonl

pytestmark = pytest.mark.integration
SUPPORT = Path(__file__).parent / "data_parallel_support.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "RANKOPT_COLLECTIVE_TIMEOUT": "60"}


# every reallocation grows and prunes; no token subsampling in the growth probe, so what is left
# to differ between one process and two is rounding
CONTROLLER = {"budget_unit": "rank", "importance": "sensitivity", "target_rank": 2, "min_rank": 1, "max_rank": 8,
              "warmup": 0.1, "final": 0.2, "interval": 4, "max_grow": 2, "probe_tokens": 100000}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> Path:
    """A dropout-free tiny BERT (so shards and the whole batch see the same function), data and presets."""
    root = tmp_path_factory.mktemp("data_parallel")
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", synthetic_rows(64, seed=1))
    write_jsonl(root / "validation.jsonl", synthetic_rows(48, seed=2))
    preset = {
        "task": {"name": "tiny", "data_dir": str(root), "text_columns": ["text"], "label_column": "label",
                 "metric": "accuracy", "max_length": 32},
        "model": {"name": str(root / "model")},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        # a global batch of 8 as 2 micro-batches of 4: each process takes 2 rows of every micro-batch
        "training": {"steps": 30, "batch_size": 4, "grad_accum_steps": 2, "eval_batch_size": 16, "lr": 5e-3,
                     "warmup_ratio": 0.0, "eval_every": 10, "seed": 0},
        "controller": CONTROLLER,
    }
    (root / "tiny.yml").write_text(yaml.safe_dump(preset))
    preset["training"]["steps"] = 20
    preset["search"] = {"n_trials": 2, "sampler": "random", "pruner": "median", "startup_trials": 2,
                        "space": {"controller.target_rank": {"type": "categorical", "choices": [1, 2]}}}
    (root / "tune.yml").write_text(yaml.safe_dump(preset))
    return root


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def rankopt(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankopt", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def seen(out: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / name / "result.json").read_text()), load_file(str(out / name / "trained.safetensors"))


def run_alone_and_on_two(preset: Path, out: Path) -> Path:
    """The support script's fine-tune of ``preset`` in one process, then on two (results under ``out``)."""
    single = subprocess.run([sys.executable, str(SUPPORT), str(preset), str(out)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(str(SUPPORT), str(preset), str(out))
    assert double.returncode == 0, double.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(setup) -> Path:
    return run_alone_and_on_two(setup / "tiny.yml", setup / "runs")


def test_both_processes_make_the_same_rank_decisions_and_end_identical(runs):
    (first, first_tensors), (second, second_tensors) = seen(runs, "rank0of2"), seen(runs, "rank1of2")
    history = first["history"]
    assert len(history) > 3  # the controller reallocated, and some layer grew
    assert any(after[1][name] > before[1][name] for before, after in zip(history, history[1:]) for name in after[1])
    assert history == second["history"]  # every reallocation, every layer
    assert first_tensors.keys() == second_tensors.keys()
    for name, tensor in first_tensors.items():
        assert torch.equal(tensor, second_tensors[name]), name
    assert first["metrics"] == second["metrics"]
    assert first["rng_draw"] != second["rng_draw"]  # each process's rows get their own dropout masks


def test_two_processes_train_like_one_on_the_same_global_batches(runs):
    (alone, alone_tensors), (shared, shared_tensors) = seen(runs, "rank0of1"), seen(runs, "rank0of2")
    assert shared["history"] == alone["history"]
    assert shared["losses"].keys() == alone["losses"].keys()
    for step, loss in alone["losses"].items():  # measured: within 1.1e-6 relative over 30 steps
        assert shared["losses"][step] == pytest.approx(loss, rel=1e-5), step
    for name, tensor in alone_tensors.items():  # measured: within 1e-4
        torch.testing.assert_close(shared_tensors[name], tensor, atol=1e-3, rtol=0)
    assert shared["metrics"]["loss"] == pytest.approx(alone["metrics"]["loss"], rel=1e-5)
    assert shared["metrics"]["accuracy"] == alone["metrics"]["accuracy"]


@pytest.fixture(scope="module")
def decoder_runs(setup, vocab_file) -> Path:
    """A random 2-layer Llama on prompt -> response rows whose responses differ in length, so the
    processes' shards hold different numbers of target tokens; once alone, once on 2 processes."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    root = setup / "decoder"
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), eos_token="[SEP]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                         initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for split, n, seed in (("train", 64, 1), ("validation", 24, 2)):
        rng = random.Random(seed)
        write_jsonl(root / f"{split}.jsonl", [{"prompt": "good " + " ".join(rng.sample(FILLER, 3)),
                                               "response": " ".join(rng.sample(FILLER, rng.randint(1, 5)))}
                                              for _ in range(n)])
    preset = {
        "task": {"name": "tiny-lm", "type": "causal_lm", "data_dir": str(root), "prompt_column": "prompt",
                 "response_column": "response", "metric": "loss", "max_length": 32},
        "model": {"name": str(root / "model"), "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": 16, "batch_size": 4, "grad_accum_steps": 2, "eval_batch_size": 8, "lr": 1e-2,
                     "warmup_ratio": 0.0, "eval_every": 8, "seed": 0},
        "controller": CONTROLLER,
    }
    (root / "lm.yml").write_text(yaml.safe_dump(preset))
    return run_alone_and_on_two(root / "lm.yml", root / "runs")


def test_a_causal_lm_trains_like_one_process(decoder_runs):
    """Per-token loss weights over the global batch's targets, and the sharded evaluation's token sums."""
    (alone, alone_tensors), (shared, shared_tensors) = seen(decoder_runs, "rank0of1"), seen(decoder_runs, "rank0of2")
    assert len(alone["history"]) > 2 and shared["history"] == alone["history"]
    for step, loss in alone["losses"].items():
        assert shared["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert shared["metrics"]["loss"] == pytest.approx(alone["metrics"]["loss"], rel=1e-5)
    for name, tensor in alone_tensors.items():
        torch.testing.assert_close(shared_tensors[name], tensor, atol=1e-3, rtol=0)


def mlflow_runs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, status from runs").fetchall()


def test_torchrun_train_logs_one_mlflow_run_from_rank_0(setup, tmp_path):
    proc = torchrun("-m", "rankopt", "train", str(setup / "tiny.yml"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("total rank") == 1  # one result line, from rank 0
    runs = mlflow_runs(tmp_path / "out" / "mlflow.db")
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    adapters = list((tmp_path / "out").rglob("adapter_config.json"))
    assert len(adapters) == 1


def test_a_batch_that_does_not_split_fails_in_one_line(setup, tmp_path):
    proc = rankopt("train", str(setup / "tiny.yml"), "--nproc-per-node", "2", "--set", "training.batch_size=5",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training.batch_size=5 (the global micro-batch) does not split over 2 processes; "
                      "make it a multiple of 2"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)


def logged_a_metric(db: Path) -> bool:
    """MLflow creates the file before its tables: a store still migrating has logged nothing yet."""
    try:
        with sqlite3.connect(db) as con:
            return bool(con.execute("select count(*) from metrics").fetchone()[0])
    except sqlite3.OperationalError:
        return False


def test_a_killed_process_ends_the_job_with_one_line_not_a_hang(setup, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rankopt", "train", str(setup / "tiny.yml"), "--nproc-per-node",
                             "2", "--set", "training.steps=100000", "--out", str(out)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until rank 0 trains: its MLflow run has logged a loss
            db = out / "mlflow.db"
            if db.is_file() and logged_a_metric(db):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the job never started training")
        victim = next(c for c in children(proc.pid) if rank_of(c) == 1)
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data-parallel process 1 of 2 was killed by SIGKILL" in errors[0], stderr[-3000:]
    assert mlflow_runs(out / "mlflow.db")[0][1] in {"KILLED", "FAILED"}  # recorded, not left RUNNING


def test_a_worker_runs_its_trials_data_parallel(setup, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = rankopt("worker", str(setup / "tune.yml"), "--study", "dp", "--storage", storage, "--nproc-per-node", "2",
                   "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("worker done") == 1
    study = optuna.load_study(study_name="dp", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["total_rank"] == 12 * t.params["controller.target_rank"] for t in study.trials)
    runs = mlflow_runs(tmp_path / "out" / "mlflow.db")
    assert len(runs) == 3 and {status for _, status in runs} == {"FINISHED"}  # the study's run and one per trial


def test_a_trial_failing_on_rank_0_alone_ends_the_study(setup, tmp_path):
    """Rank 0 must not go on to the next trial while the others are still in the failed one's collectives."""
    proc = torchrun(str(SUPPORT), "tune-fail", str(setup / "tune.yml"), str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    [study] = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=study.study_name, storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]  # no second trial was started


def test_trainer_callback_refuses_ddp_in_one_line(tmp_path):
    proc = torchrun(str(SUPPORT), "hf", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.count("RankoptError: RankControllerCallback runs in one process, not 2") == 2
