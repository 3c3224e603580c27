"""rankopt.tracking.mlflow_runs: where a run's artifacts land when the tracking store is a database, not a server.

MLflow's default for a SQLite store is ``./mlruns`` of whatever folder the command was started
from; rankopt puts them beside the database instead, and says where.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rankopt.cli import app
from rankopt.tracking.mlflow_runs import artifact_root
from tiny_project_support import make_tiny_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_artifact_root_is_beside_a_sqlite_database_or_under_out(tmp_path):
    out = tmp_path / "runs"
    assert artifact_root(None, out) == (out / "mlartifacts").resolve()
    assert artifact_root(f"sqlite:///{tmp_path}/store/track.db", out) == (tmp_path / "store" / "mlartifacts")
    assert artifact_root("sqlite:///relative/track.db", out) == (Path("relative") / "mlartifacts").resolve()
    assert artifact_root("sqlite:///:memory:", out) == (out / "mlartifacts").resolve()
    assert artifact_root("postgresql://u@localhost/mlflow", out) == (out / "mlartifacts").resolve()
    for server in ("http://mlflow.example:5000", "https://h", "databricks", "file:///tmp/store"):
        assert artifact_root(server, out) is None  # the server (or the file store) decides


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


def test_train_with_a_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, tiny_preset_file, monkeypatch):
    cwd, store = tmp_path / "started_here", tmp_path / "store"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{store / 'track.db'}"
    result = CliRunner().invoke(app, ["train", str(tiny_preset_file), "--tracking-uri", uri, "--out",
                                      str(tmp_path / "out"), "--set", "training.steps=4",
                                      "--set", "training.eval_every=4"])
    assert result.exit_code == 0, result.output
    assert not (cwd / "mlruns").exists() and list(cwd.iterdir()) == []
    artifacts = store / "mlartifacts"
    assert {"adapter_config.json", "adapter_model.safetensors", "rank_heatmap.png"} <= _files(artifacts)
    assert f"artifacts (adapter, plots): {artifacts / 'tiny'}" in result.stdout
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tiny").experiment_id])[0]
    assert run.info.artifact_uri.startswith((artifacts / "tiny").as_uri())


def test_tune_with_a_sqlite_uri_keeps_trial_artifacts_beside_the_database(tmp_path, monkeypatch):
    preset = make_tiny_project(tmp_path / "project", trials=1)
    cwd, store = tmp_path / "started_here", tmp_path / "store"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["tune", str(preset), "--tracking-uri", f"sqlite:///{store / 'track.db'}",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert list(cwd.iterdir()) == []
    assert {"adapter_config.json", "rank_history.json"} <= _files(store / "mlartifacts")
    assert f"trial artifacts (adapters, plots): {store / 'mlartifacts' / 'tiny'}" in result.stdout
