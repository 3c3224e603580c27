"""Fault campaign (issue 25): kill, damage, race and feed bad data to rankopt as a user would; count what survives.

Everything runs on a tiny random 2-layer BERT and a synthetic two-word task built here, through
the real CLI (separate processes for kills and races), real SQLite / PostgreSQL and real MLflow
stores. One JSON row per case goes to ``--out-jsonl``; the table printed at the end counts, per
group, the cases tried and survived. A case survives when nothing is lost and nothing is wrong
in silence:

Kill moments are drawn uniformly between a third of the command's uninterrupted wall time (Python's
imports are done by then) and its end.

* ``kill-train``: SIGKILL ``rankopt train`` at a random moment, rerun with ``--resume`` (plain when
  no checkpoint was left): exit 0, no traceback, the same final metric as an uninterrupted run, no
  MLflow run left RUNNING, no checkpoint left behind.
* ``kill-tune``: SIGKILL ``rankopt tune --trials 2`` at a random moment, rerun it: exit 0, no trial
  left RUNNING or FAIL without a retry, every trial's MLflow run closed, no parameters trained twice.
* ``kill-export``: SIGKILL ``rankopt export`` (half of them replacing an earlier export with
  ``--force``) at a random moment: right after the kill the folder is absent or complete, never
  half; the rerun completes it and leaves no hidden temporary folder.
* ``checkpoint``: a trial checkpoint truncated, bytes changed, files emptied or deleted: the retried
  trial completes, from step 0 when damaged (one warning), from the checkpoint when not.
* ``artifact``: an adapter artifact damaged in the tracking store: ``export`` says so in one line
  (exit 2) and writes nothing; a damaged ``rank_history.json``: ``report`` still writes, with a note.
* ``workers``: 2-4 ``rankopt worker`` (and 2 ``rankopt tune``) processes started together on a
  fresh SQLite / PostgreSQL study and MLflow store: all exit 0, the study ends at its limit, no
  parameters drawn twice, one parent run, no run left RUNNING.
* ``data``: 30+ malformed (and a few odd but valid) data files, named cases plus random byte
  mutations: exit 0, or exit 2 with one line ``error: ...`` naming the file, and nothing written
  (no ``--out`` folder, no MLflow run).

    python benchmarks/faults.py                                              # all groups, ~1 h on 2 busy cores
    python benchmarks/faults.py --groups checkpoint data --max-cases 2 --out-jsonl /tmp/f.jsonl   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's rankopt, in this process and (PYTHONPATH) in every CLI process
from quality_vs_peft import CODE  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "faults.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
GROUPS = ("data", "checkpoint", "artifact", "kill-train", "kill-tune", "kill-export", "workers")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = [f"w{i}" for i in range(40)]


# ------------------------------------------------------------------------------------------------
# the tiny project: model, data, presets


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), ("bad", "good")[label])
        out.append({"text": " ".join(words), "label": label})
    return out


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in items).encode()


def csv_bytes(items: list[dict]) -> bytes:
    return ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in items)).encode()


def build_project(root: Path) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    model = root / "model"
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + FILLER + ["bad", "good"]) + "\n")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(SPECIAL) + 42, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                             initializer_range=0.2)).save_pretrained(model)
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(model)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(jsonl(rows(64, 1)))
    (data / "validation.jsonl").write_bytes(jsonl(rows(32, 2)))
    return {"model": model, "data": data, "root": root}


def preset(project: dict, path: Path, *, steps: int = 20, eval_every: int = 5, n_trials: int = 2,
           data: Path | None = None, task_type: str = "classification", **search) -> Path:
    import yaml

    body = {
        "task": {"name": "tiny", "data_dir": str(data or project["data"]), "text_columns": ["text"],
                 "label_column": "label", "type": task_type,
                 "metric": "pearson" if task_type == "regression" else "accuracy", "max_length": 32},
        "model": {"name": str(project["model"])},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": steps, "batch_size": 8, "eval_batch_size": 64, "lr": 5e-3, "warmup_ratio": 0.0,
                     "eval_every": eval_every, "seed": 0},
        "controller": {"target_rank": 2, "min_rank": 1, "max_rank": 8, "warmup": 0.1, "final": 0.2, "interval": 4,
                       "max_grow": 2},
        "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "startup_trials": 0,
                   "heartbeat_interval": 1, "grace_period": 20, "max_retry": 2, "checkpoint_every": 1,
                   "space": {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                             "controller.target_rank": {"type": "float", "low": 1.0, "high": 3.0}}, **search},
    }
    path.write_text(yaml.safe_dump(body))
    return path


# ------------------------------------------------------------------------------------------------
# processes


def cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankopt", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def spawn(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rankopt", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=ENV)


def kill_after(args: list[str], delay: float, log: Path) -> bool:
    """Start ``rankopt ARGS``, SIGKILL it after ``delay`` seconds; True when it was still running then."""
    proc = spawn(*args, log=log)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = cli(*args)
    if done.returncode != 0:
        sys.exit(f"error: baseline `rankopt {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def clean_exit(done: subprocess.CompletedProcess) -> str | None:
    """Why a finished command is not a clean success, or None."""
    text = done.stdout + done.stderr
    if "Traceback" in text:
        return "traceback: " + text[text.index("Traceback"):][-600:]
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip()[-400:]}"
    return None


def metric_line(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith("accuracy ")), "").split("|")[0].strip()


def runs_in(uri: str):
    from mlflow.tracking import MlflowClient

    from rankopt.tracking.urls import sqlalchemy_url

    client = MlflowClient(sqlalchemy_url(uri))
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000) if exps else []


# ------------------------------------------------------------------------------------------------
# groups: each yields (case, survived, detail)


def kill_train(project: dict, work: Path, kills: int, rng: random.Random):
    tiny = preset(project, work / "train.yml", steps=300, eval_every=25)  # training, not start-up, most of the time
    seconds, base = timed("train", str(tiny), "--out", str(work / "train-base"))
    expected = metric_line(base.stdout)
    for k in range(kills):
        out = work / f"train-{k}"
        delay = rng.uniform(seconds / 3, seconds)
        killed = kill_after(["train", str(tiny), "--out", str(out)], delay, work / f"train-{k}.log")
        done = cli("train", str(tiny), "--out", str(out), "--resume")
        how = "resumed"
        if done.returncode == 2 and "--resume: no checkpoint" in done.stderr:
            done, how = cli("train", str(tiny), "--out", str(out)), "started over (no checkpoint yet)"
        problem = clean_exit(done)
        if problem is None and metric_line(done.stdout) != expected:
            problem = f"final {metric_line(done.stdout)!r}, uninterrupted {expected!r}"
        if problem is None:
            running = [r.info.run_id for r in runs_in(f"sqlite:///{out / 'mlflow.db'}") if r.info.status == "RUNNING"]
            left = list((out / "checkpoints").rglob("step-*")) if (out / "checkpoints").exists() else []
            problem = f"runs left RUNNING: {running}" if running else (f"checkpoints left: {left}" if left else None)
        yield f"kill at {delay:.1f}s of {seconds:.0f}s{'' if killed else ' (had finished)'}, {how}", \
            problem is None, problem or f"{how}: {metric_line(done.stdout)}"


def check_study(url: str, name: str, tracking: str | None) -> str | None:
    """Why a study that should be settled is not: trials left running, a loss without a retry, a point trained twice,
    MLflow runs left RUNNING or missing."""
    import optuna

    from rankopt.search.studies import tally
    from rankopt.tracking.urls import sqlalchemy_url

    study = optuna.load_study(study_name=name, storage=sqlalchemy_url(url))
    t = tally(study)
    if t.running or t.waiting:
        return f"{t.running} running, {t.waiting} waiting trials left"
    if t.failed:
        return f"{t.failed} failed trial(s) without a retry"
    fresh = [json.dumps(tr.params, sort_keys=True) for tr in study.trials if "failed_trial" not in tr.system_attrs]
    if len(set(fresh)) != len(fresh):
        return f"parameters trained twice: {fresh}"
    if tracking is None:
        return None
    runs = runs_in(tracking)
    running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    if running:
        return f"MLflow runs left RUNNING: {running}"
    ids = {r.info.run_id for r in runs}
    lost = [tr.number for tr in study.trials if tr.user_attrs.get("mlflow_run_id") not in ids]
    return f"trials without their MLflow run: {lost}" if lost else None


def kill_tune(project: dict, work: Path, kills: int, rng: random.Random):
    tiny = preset(project, work / "tune.yml", steps=80, eval_every=10)
    seconds, _ = timed("tune", str(tiny), "--trials", "2", "--out", str(work / "tune-base"))
    for k in range(kills):
        out = work / f"tune-{k}"
        delay = rng.uniform(seconds / 3, seconds)
        killed = kill_after(["tune", str(tiny), "--trials", "2", "--out", str(out)], delay, work / f"tune-{k}.log")
        done = cli("tune", str(tiny), "--trials", "2", "--out", str(out))
        problem = clean_exit(done) or check_study(f"sqlite:///{out / 'optuna.db'}", "tiny",
                                                  f"sqlite:///{out / 'mlflow.db'}")
        retried = "retried at once" if "lost its worker" in done.stderr else "nothing to retry"
        yield f"kill at {delay:.1f}s of {seconds:.0f}s{'' if killed else ' (had finished)'}", problem is None, \
            problem or retried


def folder_state(folder: Path) -> str:
    from rankopt.adapters.peft_format import read_adapter

    if not folder.exists():
        return "absent"
    try:
        read_adapter(folder)
    except Exception as exc:  # noqa: BLE001 - reported as the finding
        return f"broken ({exc})"
    names = {p.name for p in folder.iterdir()}
    missing = {"README.md", "rankopt.json", ".rankopt", "tokenizer_config.json"} - names
    return f"incomplete (no {sorted(missing)})" if missing else "complete"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def kill_export(project: dict, work: Path, kills: int, rng: random.Random):
    base = work / "tune-base"
    common = ["--study", "tiny", "--storage", f"sqlite:///{base / 'optuna.db'}"]
    seconds, _ = timed("export", *common, "--out", str(work / "export-base"))
    for k in range(kills):
        out = work / f"export-{k}"
        replacing = k % 2 == 1
        if replacing:
            shutil.copytree(work / "export-base", out)
        delay = rng.uniform(seconds / 3, seconds)
        killed = kill_after(["export", *common, "--out", str(out), "--force"], delay, work / f"export-{k}.log")
        after_kill = folder_state(out)
        done = cli("export", *common, "--out", str(out), "--force")
        final = folder_state(out)
        problem = clean_exit(done)
        if problem is None and after_kill not in ("absent", "complete"):
            problem = f"after the kill the folder was {after_kill}"
        if problem is None and final != "complete":
            problem = f"after the rerun the folder is {final}"
        if problem is None and leftovers(out):
            problem = f"hidden folders left: {leftovers(out)}"
        what = "replacing an export" if replacing else "to a new folder"
        yield f"kill at {delay:.1f}s of {seconds:.0f}s, {what}{'' if killed else ' (had finished)'}", \
            problem is None, problem or f"after the kill: {after_kill}"


def stop_at(step: int):
    """A training callback that interrupts the run (as a signal would) once ``step`` is done."""
    from rankopt.training.events import Callback

    class StopAt(Callback):
        def on_step(self, done: int, loss: float) -> None:
            if done == step:
                raise KeyboardInterrupt

    return StopAt()


def checkpoint_damage(project: dict, work: Path, rng: random.Random):
    import logging

    import optuna

    from rankopt.config import Config, resolve_config
    from rankopt.search.studies import StaleTrialHandler
    from rankopt.search.tuner import Objective
    from rankopt.training.checkpoint import CheckpointStore

    cfg: Config = resolve_config(str(preset(project, work / "ckpt.yml", steps=15, eval_every=5)), None, None)
    study = optuna.create_study(storage=f"sqlite:///{work / 'ckpt.db'}", direction="maximize")
    store = CheckpointStore(work / "ckpt", study.study_name, every=1)
    with contextlib.suppress(KeyboardInterrupt):
        study.optimize(Objective(cfg, callbacks_for_trial=lambda t, c: [stop_at(12)], checkpoints=store), n_trials=1)
    [folder] = (work / "ckpt" / study.study_name / "trial-0").glob("step-*")
    pristine = work / "pristine"
    shutil.copytree(folder, pristine)
    size = (pristine / "state.safetensors").stat().st_size

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))

    damages = {"none (control)": lambda f: None}
    for cut in sorted(rng.sample(range(1, size), 3)):
        damages[f"tensors cut at byte {cut} of {size}"] = lambda f, cut=cut: (f / "state.safetensors").write_bytes(
            (f / "state.safetensors").read_bytes()[:cut])
    for n in range(3):
        damages[f"one bit flipped in the tensors ({n + 1})"] = lambda f: flip(f / "state.safetensors")
    damages.update({
        "tensors file empty": lambda f: (f / "state.safetensors").write_bytes(b""),
        "tensors file deleted": lambda f: (f / "state.safetensors").unlink(),
        "state.json empty": lambda f: (f / "state.json").write_text(""),
        "state.json cut in half": lambda f: (f / "state.json").write_text((f / "state.json").read_text()[:200]),
        "state.json deleted": lambda f: (f / "state.json").unlink(),
    })
    lost = study.trials[0]
    handler = StaleTrialHandler(cfg.search)
    for name, damage in damages.items():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, folder)
        damage(folder)
        handler.queue_retry(study, lost)
        warnings = []
        catcher = logging.Handler(logging.WARNING)
        catcher.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("rankopt").addHandler(catcher)
        try:
            study.optimize(Objective(cfg, checkpoints=store), n_trials=1, catch=())
            problem = None
        except Exception as exc:  # noqa: BLE001 - the finding
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            logging.getLogger("rankopt").removeHandler(catcher)
        retry = study.trials[-1]
        step = retry.user_attrs.get("resumed_from_step", 0)
        if problem is None and retry.state != optuna.trial.TrialState.COMPLETE:
            problem = f"the retry ended {retry.state.name}: {retry.user_attrs.get('fail_reason')}"
        if problem is None and (step == 10) != (name == "none (control)"):
            problem = f"resumed from step {step}"
        if problem is None and len(warnings) > (name != "none (control)"):
            problem = f"{len(warnings)} warnings: {warnings}"
        yield name, problem is None, problem or (f"resumed from step {step}" if step else f"restarted clean: "
                                                  f"{warnings[0] if warnings else ''}")


def artifact_damage(project: dict, work: Path, rng: random.Random):
    from mlflow.tracking import MlflowClient

    base = work / "tune-base"
    tracking = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(tracking)
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{base / 'optuna.db'}")
    best = study.best_trial.user_attrs["mlflow_run_id"]
    pristine = Path(client.download_artifacts(best, "adapter", str(work / "artifact-pristine")))
    weights = (pristine / "adapter_model.safetensors").read_bytes()
    header = 8 + int.from_bytes(weights[:8], "little")
    damages = {
        **{f"weights cut at byte {c} of {len(weights)}": ("adapter_model.safetensors", weights[:c])
           for c in sorted(rng.sample(range(1, len(weights)), 3))},
        "a header byte of the weights changed": ("adapter_model.safetensors",
                                                  weights[:header - 3] + b"\x00" + weights[header - 2:]),
        "weights empty": ("adapter_model.safetensors", b""),
        "adapter_config.json cut": ("adapter_config.json", (pristine / "adapter_config.json").read_bytes()[:40]),
        "adapter_config.json a list": ("adapter_config.json", b"[]"),
        "adapter_config.json deleted": ("adapter_config.json", None),
        "rankopt.json not JSON": ("rankopt.json", b"\x00\x01garbage"),
    }
    for name, (file, content) in damages.items():
        copy = work / f"artifact-{len(list(work.glob('artifact-*')))}"
        shutil.copytree(pristine, copy)
        if content is None:
            (copy / file).unlink()
        else:
            (copy / file).write_bytes(content)
        run = client.create_run(client.get_run(best).info.experiment_id, run_name=f"damaged: {name}")
        client.log_artifacts(run.info.run_id, str(copy), "adapter")
        client.set_terminated(run.info.run_id)
        out = work / f"artifact-export-{run.info.run_id}"
        done = cli("export", "--run-id", run.info.run_id, "--tracking-uri", tracking, "--out", str(out))
        lines = done.stderr.strip().splitlines()
        problem = None
        if "Traceback" in done.stdout + done.stderr or done.returncode != 2 or len(lines) != 1:
            problem = f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
        elif out.exists() or leftovers(out):
            problem = "it wrote a folder"
        yield f"export: {name}", problem is None, problem or lines[0]
    # the report of a study whose best trial's rank history is damaged
    history = Path(client.get_run(best).info.artifact_uri.removeprefix("file://")) / "rank_history.json"
    kept = history.read_bytes()
    try:
        history.write_bytes(kept[: len(kept) // 3])
        out = work / "report-damaged"
        done = cli("report", "--study", "tiny", "--storage", f"sqlite:///{base / 'optuna.db'}", "--out", str(out))
        problem = clean_exit(done)
        if problem is None and not ((out / "report.html").is_file() and "rank_history" in done.stderr):
            problem = f"no report or no note: {done.stderr[-300:]}"
        yield "report: rank_history.json cut short", problem is None, problem or done.stderr.strip().splitlines()[0]
    finally:
        history.write_bytes(kept)


@contextlib.contextmanager
def pg_databases(n: int):
    import secrets

    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5)
    conn.autocommit = True
    names = [f"rankopt_faults_{secrets.token_hex(4)}_{k}" for k in range(n)]
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        yield [f"postgresql://postgres@127.0.0.1:5432/{name}" for name in names]
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def together(project: dict, work: Path, kind: str, n: int, backend: str, stores: tuple[str, str]):
    """``n`` workers (or ``tune`` processes) started at once on a fresh study and MLflow store."""
    storage, tracking = stores
    name = f"{kind}-{backend}-{n}"
    tiny = preset(project, work / f"{name}.yml", steps=12, eval_every=4, n_trials=n + 2)
    common = ["--study", "shared", "--storage", storage, "--tracking-uri", tracking]
    logs = [work / f"{name}-{k}.log" for k in range(n)]
    if kind == "worker":
        procs = [spawn("worker", str(tiny), *common, "--out", str(work / f"{name}-{k}"), log=logs[k]) for k in range(n)]
    else:
        procs = [spawn("tune", str(tiny), *common, "--trials", "2", "--out", str(work / f"{name}-{k}"), log=logs[k])
                 for k in range(n)]
    codes = [p.wait(timeout=1800) for p in procs]
    texts = [log.read_text() for log in logs]
    problem = None
    if codes != [0] * n or any("Traceback" in t for t in texts):
        bad = next(i for i, (c, t) in enumerate(zip(codes, texts)) if c or "Traceback" in t)
        problem = f"process {bad} exited {codes[bad]}: {texts[bad][-600:]}"
    problem = problem or check_study(storage, "shared", tracking)
    if problem is None:
        import optuna

        from rankopt.tracking.urls import sqlalchemy_url

        trials = optuna.load_study(study_name="shared", storage=sqlalchemy_url(storage)).trials
        wanted = n + 2 if kind == "worker" else 2 * n
        parents = [r for r in runs_in(tracking) if r.data.tags.get("rankopt.kind") == "study"]
        if len(trials) != wanted:
            problem = f"{len(trials)} trials, wanted {wanted}"
        elif len(parents) != 1:
            problem = f"{len(parents)} study parent runs in MLflow"
    label = f"{n} {'workers' if kind == 'worker' else 'tune processes'} on {backend}"
    return label, problem is None, problem or "all settled, no point twice, one parent run"


def workers(project: dict, work: Path):
    for n in (2, 3, 4):
        base = work / f"sqlite-{n}"
        base.mkdir()
        yield together(project, base, "worker", n, "SQLite",
                       (f"sqlite:///{base / 'optuna.db'}", f"sqlite:///{base / 'mlflow.db'}"))
    base = work / "sqlite-tune"
    base.mkdir()
    yield together(project, base, "tune", 2, "SQLite", (f"sqlite:///{base / 'optuna.db'}",
                                                         f"sqlite:///{base / 'mlflow.db'}"))
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        yield "PostgreSQL", False, "psycopg2 is not installed: not run"
        return
    for kind, n in (("worker", 2), ("worker", 3), ("worker", 4), ("tune", 2)):
        base = work / f"pg-{kind}-{n}"
        base.mkdir()
        with pg_databases(2) as urls:
            yield together(project, base, kind, n, "PostgreSQL", tuple(urls))


# the data fuzzer: (file, content, task type) per case; None content deletes the file
def data_cases(rng: random.Random, n_random: int) -> dict[str, tuple[str, bytes | None, str]]:
    good = rows(24, 5)
    train, csv = jsonl(good), csv_bytes(good)
    lines = train.splitlines(keepends=True)
    cases = {
        "empty train.jsonl": ("train.jsonl", b"", "classification"),
        "blank lines only": ("train.jsonl", b"\n \n\n", "classification"),
        "CSV header only": ("train.csv", b"text,label\n", "classification"),
        "empty validation file": ("validation.jsonl", b"", "classification"),
        "a 0xff byte in a JSON line": ("train.jsonl", train[:50] + b"\xff" + train[50:], "classification"),
        "Latin-1 CSV": ("train.csv", csv.replace(b"w1 ", "w1 caf\u00e9 ".encode("latin-1")), "classification"),
        "a JSON line cut short": ("train.jsonl", train[:len(lines[0]) + 20] + b"\n" + b"".join(lines[2:]),
                                  "classification"),
        "a JSON list line": ("train.jsonl", lines[0] + b"[1, 2]\n" + b"".join(lines[1:]), "classification"),
        "a JSON number line": ("train.jsonl", lines[0] + b"7\n" + b"".join(lines[1:]), "classification"),
        "a null label": ("train.jsonl", lines[0] + b'{"text": "w1 good", "label": null}\n', "classification"),
        "a row without its label": ("train.jsonl", lines[0] + b'{"text": "w1 good"}\n', "classification"),
        "a row without its text": ("train.jsonl", lines[0] + b'{"label": 1}\n', "classification"),
        "an empty CSV label": ("train.csv", csv + b"w3 good,\n", "classification"),
        "a nan CSV label": ("train.csv", csv + b"w3 good,nan\n", "classification"),
        "a NaN JSON label": ("train.jsonl", train + b'{"text": "w3 good", "label": NaN}\n', "classification"),
        "labels mixing numbers and words": ("train.csv", csv + b"w3 good,positive\n", "classification"),
        "a class only in validation": ("validation.jsonl", jsonl(rows(8, 6)) + b'{"text": "w2", "label": 2}\n',
                                       "classification"),
        "a label 0.5 for classification": ("train.jsonl", train + b'{"text": "w3", "label": 0.5}\n', "classification"),
        "a label -1": ("train.jsonl", train + b'{"text": "w3", "label": -1}\n', "classification"),
        "a label true": ("train.jsonl", train + b'{"text": "w3", "label": true}\n', "classification"),
        "a NaN regression label": ("train.jsonl", train + b'{"text": "w3", "label": NaN}\n', "regression"),
        "an Infinity regression label": ("train.jsonl", train + b'{"text": "w3", "label": Infinity}\n', "regression"),
        "a word as regression label": ("train.csv", csv + b"w3 good,high\n", "regression"),
        "a CSV row with an extra field": ("train.csv", csv + b"w3 good,1,extra\n", "classification"),
        "a CSV quote never closed": ("train.csv", csv + b'"w3 good,1\n', "classification"),
        "random bytes": ("train.jsonl", bytes(rng.randrange(256) for _ in range(300)), "classification"),
        "gzip bytes in a .jsonl": ("train.jsonl", gzip.compress(train), "classification"),
        "a .json object, not a list": ("train.json", b'{"text": "w1 good", "label": 1}', "classification"),
        "an empty .json list": ("train.json", b"[]", "classification"),
        "no label column at all": ("train.jsonl", b"".join(json.dumps({"text": r["text"]}).encode() + b"\n"
                                                           for r in good), "classification"),
        "text column named otherwise": ("train.jsonl", train.replace(b'"text"', b'"sentence"'), "classification"),
        # odd but valid: must train
        "valid: UTF-8 byte order mark": ("train.jsonl", b"\xef\xbb\xbf" + train, "classification"),
        "valid: CRLF line ends": ("train.csv", csv.replace(b"\n", b"\r\n"), "classification"),
        "valid: emoji and accents in the text": ("train.jsonl", train.replace(b"w1 ", "w1 \u00e9t\u00e9 \U0001f600 "
                                                                               .encode()), "classification"),
        "valid: extra columns": ("train.jsonl", b"".join(json.dumps({**r, "id": i}).encode() + b"\n"
                                                         for i, r in enumerate(good)), "classification"),
    }
    for k in range(n_random):  # byte-level mutations of a good file: each must be trained on or refused cleanly
        data = bytearray(train)
        what = rng.choice(["cut", "delete", "insert", "flip"])
        at = rng.randrange(len(data))
        if what == "cut":
            data = data[:at]
        elif what == "delete":
            del data[at:at + rng.randint(1, 5)]
        elif what == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            data[at] ^= 1 << rng.randrange(8)
        cases[f"random {what} at byte {at} ({k + 1})"] = ("train.jsonl", bytes(data), "classification")
    return cases


def bad_data(project: dict, work: Path, rng: random.Random, n_random: int):
    from typer.testing import CliRunner

    from rankopt.cli import app

    tracking = f"sqlite:///{work / 'data-mlflow.db'}"
    for k, (name, (file, content, task_type)) in enumerate(data_cases(rng, n_random).items()):
        folder = work / f"data-{k}"
        folder.mkdir()
        (folder / "validation.jsonl").write_bytes(jsonl(rows(16, 2)))
        if file != "validation.jsonl":
            (folder / file).write_bytes(content)
        else:
            (folder / "train.jsonl").write_bytes(jsonl(rows(24, 5)))
            (folder / file).write_bytes(content)
        if task_type == "regression":  # scores, not classes
            (folder / "validation.jsonl").write_bytes(jsonl([{**r, "label": r["label"] + 0.5} for r in rows(16, 2)]))
        tiny = preset(project, work / f"data-{k}.yml", steps=2, eval_every=2, data=folder, task_type=task_type)
        before = len(runs_in(tracking)) if (work / "data-mlflow.db").exists() else 0
        out = work / f"data-out-{k}"
        result = CliRunner().invoke(app, ["train", str(tiny), "--out", str(out), "--tracking-uri", tracking])
        lines = result.stderr.strip().splitlines()
        after = len(runs_in(tracking)) if (work / "data-mlflow.db").exists() else 0
        problem = None
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problem = f"{type(result.exception).__name__}: {result.exception}"
        elif result.exit_code == 0:
            if not name.startswith(("valid:", "random")):
                problem = "trained on it without a word"
        elif result.exit_code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            problem = f"exit {result.exit_code}: {result.stderr[-500:]}"
        elif str(folder) not in lines[0]:
            problem = f"the message does not name the file: {lines[0]}"
        elif out.exists() or after != before:
            problem = "it wrote something (an --out folder or an MLflow run)"
        if name.startswith("valid:") and result.exit_code != 0:
            problem = problem or f"refused a valid file: {lines}"
        said = lines[0].replace(str(folder) + "/", "") if lines else "trained"
        yield name, problem is None, problem or said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--kills", type=int, default=10, help="random kill moments per killed command")
    ap.add_argument("--random-files", type=int, default=10, help="random byte mutations on top of the named files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cases", type=int, default=None, help="stop each group after this many cases (smoke runs)")
    ap.add_argument("--out-jsonl", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, list[int]] = {}
    failures = []
    with tempfile.TemporaryDirectory(prefix="faults.") as tmp:
        work = Path(tmp)
        project = build_project(work)
        if {"artifact", "kill-export"} & set(args.groups) and "kill-tune" not in args.groups:
            timed("tune", str(preset(project, work / "tune.yml", steps=80, eval_every=10)), "--trials", "2", "--out",
                  str(work / "tune-base"))
        plan = {  # in this order; the data fuzzer runs the CLI in this process (typer's CliRunner): last
            "checkpoint": lambda: checkpoint_damage(project, work, rng),
            "kill-train": lambda: kill_train(project, work, args.kills, rng),
            "kill-tune": lambda: kill_tune(project, work, args.kills, rng),
            "kill-export": lambda: kill_export(project, work, args.kills, rng),
            "artifact": lambda: artifact_damage(project, work, rng),
            "workers": lambda: workers(project, work),
            "data": lambda: bad_data(project, work, rng, args.random_files),
        }
        for group in sorted(args.groups, key=lambda g: list(plan).index(g)):
            started = time.perf_counter()
            for number, (case, survived, detail) in enumerate(plan[group](), 1):
                row = {"group": group, "case": case, "survived": survived, "detail": detail[:1000],
                       "seconds": round(time.perf_counter() - started, 1), "code": CODE,
                       "date": time.strftime("%Y-%m-%d")}
                started = time.perf_counter()
                with args.out_jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                counts.setdefault(group, [0, 0])
                counts[group][0] += 1
                counts[group][1] += survived
                print(f"{'ok  ' if survived else 'FAIL'} {group}: {case}: {detail[:200]}", flush=True)
                if not survived:
                    failures.append(row)
                if args.max_cases is not None and number >= args.max_cases:
                    break
    print("\n| group | cases tried | survived |\n|---|---:|---:|")
    for group, (tried, survived) in counts.items():
        print(f"| {group} | {tried} | {survived} |")
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    print(f"| **all** | **{total[0]}** | **{total[1]}** |")
    print(json.dumps({"tried": total[0], "survived": total[1], "failures": failures}))


if __name__ == "__main__":
    main()
