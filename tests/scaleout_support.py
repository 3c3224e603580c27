"""Helpers for the scale-out and fault tests: a throwaway PostgreSQL database, a real MLflow
server process, tiny study presets, and ``rankopt`` CLI subprocesses.

PostgreSQL is expected on 127.0.0.1:5432 (trust auth, user postgres or root, database
``test``); the tests that need it skip with the reason when it does not answer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

PG_HOST, PG_PORT = "127.0.0.1", 5432
SECRET = "pw-S3cr3t-do-not-show"  # trust auth ignores it; it must never appear in output or MLflow


def _admin():
    """A psycopg2 connection to the ``test`` database, or None when PostgreSQL does not answer."""
    try:
        import psycopg2
    except ImportError:
        return None, "psycopg2 is not installed (pip install psycopg2-binary)"
    last = ""
    for user in ("postgres", "root", os.environ.get("USER", "")):
        if not user:
            continue
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", connect_timeout=3)
            conn.autocommit = True
            return conn, user
        except Exception as exc:  # noqa: BLE001 - try the next user, then skip
            last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None, f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} ({last})"


@contextlib.contextmanager
def pg_databases(n: int = 1):
    """``n`` fresh databases ``rankopt_test_<random>[_k]``; yields their URLs (with a password), drops them after."""
    conn, user = _admin()
    if conn is None:
        pytest.skip(user)
    names = [f"rankopt_test_{secrets.token_hex(4)}_{k}" for k in range(n)]
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        yield [f"postgresql://{user}:{SECRET}@{PG_HOST}:{PG_PORT}/{name}" for name in names]
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` process that a test can stop and start again on the same port."""

    def __init__(self, backend: str, artifacts: Path, log: Path, port: int | None = None):
        self.backend, self.artifacts, self.log = backend, Path(artifacts), Path(log)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 180) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server and the processes it started (its own process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def study_preset(path: Path, model_dir: Path, data_dir: Path, *, n_trials: int, steps: int, eval_every: int,
                 heartbeat: int = 1, grace: int = 4, **search) -> Path:
    """A tiny study preset (random 2-layer BERT, synthetic task) written to ``path``."""
    preset = {
        "task": {"name": "tiny", "data_dir": str(data_dir), "text_columns": ["text"], "label_column": "label",
                 "metric": "accuracy", "max_length": 32},
        "model": {"name": str(model_dir)},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": steps, "batch_size": 8, "eval_batch_size": 64, "lr": 5e-3, "warmup_ratio": 0.0,
                     "eval_every": eval_every, "seed": 0},
        "controller": {"target_rank": 2, "min_rank": 1, "max_rank": 8, "warmup": 0.1, "final": 0.2,
                       "interval": 4, "max_grow": 2},
        "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "startup_trials": 0,
                   "heartbeat_interval": heartbeat, "grace_period": grace, "max_retry": 2, "checkpoint_every": 1,
                   "space": {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                             "controller.target_rank": {"type": "float", "low": 1.0, "high": 3.0}},
                   **search},
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def rankopt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankopt.cli", *args]


def spawn(args: list[str], log: Path, wrapper: Path | None = None) -> subprocess.Popen:
    """``rankopt ARGS`` as a separate process (optionally through a wrapper script), output to ``log``."""
    cmd = [sys.executable, str(wrapper), *args] if wrapper else rankopt_cmd(*args)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=cli_env())


SLOW_WORKER = '''\
"""rankopt, with every training step slowed down, so that a test can kill it mid-trial."""
import sys
import time

import rankopt.training.trainer as trainer

_step = trainer.Stepper.step


def slow_step(self, batch):
    time.sleep({delay})
    return _step(self, batch)


trainer.Stepper.step = slow_step
from rankopt.cli import main  # noqa: E402

sys.argv = ["rankopt", *sys.argv[1:]]
main()
'''


def slow_worker_script(path: Path, delay: float = 0.3) -> Path:
    path.write_text(SLOW_WORKER.replace("{delay}", str(delay)))
    return path
