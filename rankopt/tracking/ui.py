"""Serve the MLflow UI over the project's tracking store, on this machine only unless asked.

``rankopt ui`` runs ``mlflow server`` with the SQLite store and artifact folder that
``rankopt train`` / ``tune`` write under ``--out``. MLflow 3.17's UI opens every experiment
in its GenAI view unless the browser has switched to "Model training" (the
``mlflow.experimentKind`` tag that :func:`rankopt.tracking.mlflow_runs.ensure_experiment` sets is not
enough there), so the printed links carry ``?workflowType=machine_learning`` and open each
experiment's runs table, where a study is a parent run with its trials collapsed under it. Each
study gets a link of its own that lists its trials: the runs table keeps its search box in the
URL (``searchFilter``), set to ``tags.mlflow.parentRunId = '<the study's run>'``, and its sort
(``orderByKey``), set to the run name, since sorted by date it nests the trials under their
collapsed parent again.

MLflow's start-up chatter (the registry-store and security-middleware notices, a starlette
deprecation warning, uvicorn's INFO lines) is left out; its warnings and errors still show.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

from rankopt.errors import RankoptError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
VIEW = "workflowType=machine_learning"
# lines MLflow prints on every start that say nothing about this server (rankopt's own note covers exposure)
NOISE = ("[MLflow] Security middleware enabled", "Registry store URI not provided")
QUIET_WARNINGS = "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"


def server_command(out: str | Path = "runs", tracking_uri: str | None = None, host: str = "127.0.0.1",
                   port: int = 5000) -> list[str]:
    """The ``mlflow server`` command line for the store under ``out`` (or ``tracking_uri``)."""
    from rankopt.tracking.mlflow_runs import default_tracking_uri

    out = Path(out)
    if tracking_uri is None:
        if not (out / "mlflow.db").is_file():
            raise RankoptError(f"no MLflow store at {out / 'mlflow.db'}; run `rankopt train` or `rankopt tune` "
                               f"with --out {out} first, or pass --tracking-uri")
        tracking_uri = default_tracking_uri(out)
    elif tracking_uri.startswith(("http://", "https://", "databricks")):
        from rankopt.tracking.urls import mask_url

        raise RankoptError(f"{mask_url(tracking_uri)} is already a tracking server: open it in a browser instead")
    if not 0 < port < 65536:
        raise RankoptError(f"--port {port} is not a TCP port (1-65535)")
    from rankopt.tracking.urls import sqlalchemy_url

    # a plain postgresql:// as tune takes it: with the driver installed here, as every other command opens it
    backend = sqlalchemy_url(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--registry-store-uri", backend, "--artifacts-destination", str((out / "mlartifacts").resolve()),
               "--host", host, "--port", str(port), "--workers", "1"]
    if "uvicorn_opts" in _server_options():  # MLflow 3 serves with uvicorn: its warnings, not every request
        command += ["--uvicorn-opts", "--log-level warning"]
    return command


def _server_options() -> set[str]:
    """The options this MLflow's ``mlflow server`` takes."""
    from mlflow.cli import server

    return {param.name for param in server.params}


def exposure_note(host: str) -> str | None:
    """A warning when the UI would be reachable from other machines."""
    if host in LOCAL_HOSTS:
        return None
    return (f"note: serving on {host}: anyone who can reach this machine on the network can read and change "
            "the runs (no authentication); MLflow still checks the Host header (see `mlflow server "
            "--allowed-hosts`). Use --host 127.0.0.1 to keep it local.")


def url(host: str, port: int, experiment_id: str | None = None, parent_run_id: str | None = None) -> str:
    """The experiments list, one experiment's runs table, or the runs under one parent run (a study's
    trials), in the model-training view."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    search = ""
    if parent_run_id:  # sorted by date (the default) the table nests the trials, collapsed, under their study
        search = ("&searchFilter=" + quote(f"tags.mlflow.parentRunId = '{parent_run_id}'", safe="") +
                  "&orderByKey=" + quote("tags.`mlflow.runName`", safe="") + "&orderByAsc=true")
    return f"http://{shown}:{port}/#/{page}?{VIEW}{search}"


def experiment_links(out: str | Path, tracking_uri: str | None, host: str, port: int) -> list[tuple[str, str]]:
    """(label, link): each experiment in the store (the empty 'Default' one left out), then each of its
    studies, whose link shows the study's trials."""
    from rankopt.tracking.mlflow_runs import client_for, default_tracking_uri

    client = client_for(tracking_uri or default_tracking_uri(Path(out)))
    links: list[tuple[str, str]] = []
    try:
        for experiment in client.search_experiments():
            if experiment.name == "Default":
                continue
            links.append((f"experiment {experiment.name}", url(host, port, experiment.experiment_id)))
            studies = client.search_runs([experiment.experiment_id], "tags.`rankopt.kind` = 'study'")
            for study in sorted(studies, key=lambda run: run.info.start_time or 0):
                trials = client.search_runs([experiment.experiment_id],
                                            f"tags.mlflow.parentRunId = '{study.info.run_id}'", max_results=10_000)
                name = study.data.tags.get("optuna.study") or study.info.run_name
                links.append((f"  study {name}, its {len(trials)} trials",
                              url(host, port, experiment.experiment_id, study.info.run_id)))
    except Exception:  # noqa: BLE001 - links are a convenience; the server reports store problems itself
        return links
    return links


def check_port(host: str, port: int) -> None:
    """Fail with one line, before MLflow starts, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RankoptError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None


def serve(out: str | Path = "runs", tracking_uri: str | None = None, host: str = "127.0.0.1",
          port: int = 5000) -> int:
    """Run the MLflow UI until interrupted; returns its exit code.

    SIGTERM and Ctrl+C are passed on to the server, which stops its own workers.
    """
    command = server_command(out, tracking_uri, host, port)
    check_port(host, port)
    # rankopt uses no GenAI jobs: without them MLflow starts no job-runner processes
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": warnings}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
    relay = threading.Thread(target=_relay, args=(server.stdout,), daemon=True)
    relay.start()

    def forward(signum, _frame):
        if server.poll() is None:
            server.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return server.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        relay.join(timeout=5)  # the server's last lines


def _relay(stream) -> None:
    """Pass the server's output on to stderr, less the lines in :data:`NOISE`."""
    for line in stream:
        if not line.startswith(NOISE):
            sys.stderr.write(line)
            sys.stderr.flush()
