"""MLflow: where runs go, and a callback that logs a training run's events to one run.

Training code never imports this module; it only emits events (:mod:`rankopt.training.events`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rankopt.training.events import Callback, RankEvent, TrainResult

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens 'genai' experiments on traces otherwise


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def artifact_root(tracking_uri: str | None, out: Path) -> Path | None:
    """Where new experiments keep their artifacts (plots, adapters), for stores that do not decide it.

    A tracking server (http, databricks) and a file store choose for themselves: None. Without a
    server MLflow would put them in ``./mlruns`` of whatever folder the command was started from;
    instead they go beside the SQLite database (``runs/mlflow.db`` -> ``runs/mlartifacts``), or under
    ``--out`` for another database (PostgreSQL, MySQL) or an in-memory SQLite.
    """
    if tracking_uri is None:
        return (Path(out) / "mlartifacts").resolve()
    scheme = tracking_uri.split(":", 1)[0].split("+")[0].lower()
    if scheme in ("http", "https", "databricks", "file"):
        return None
    if scheme == "sqlite":
        path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            return (Path(path).parent / "mlartifacts").resolve()
    return (Path(out) / "mlartifacts").resolve()


def artifact_folder(client, experiment_id: str) -> str:
    """The experiment's artifact location as a user reads it: a path for local files, else the URI."""
    from urllib.parse import unquote, urlsplit

    location = client.get_experiment(experiment_id).artifact_location
    parts = urlsplit(location)
    return unquote(parts.path) if parts.scheme in ("file", "") else location


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``, the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def client_for(uri: str):
    """An MLflow client for ``uri`` that waits out server outages (:mod:`rankopt.tracking.resilient`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rankopt.tracking.resilient import ResilientClient

    # MLflow prints "View run at <tracking URI>" on every run end: noise, and it would show a password in the URI
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith(("http://", "https://")):
        # fail fast per request: the resilient layer does the retrying, with backoff and a warning
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from rankopt.tracking.urls import sqlalchemy_url

    from rankopt.tracking.store_lock import made_whole, opening

    mlflow.set_tracking_uri(sqlalchemy_url(uri))
    with opening(uri):  # MLflow creates and migrates a fresh database on first use: one process at a time
        made_whole(uri, lambda url: MlflowClient(tracking_uri=url).search_experiments(max_results=1))
        client = MlflowClient(tracking_uri=sqlalchemy_url(uri))
        if uri.startswith(("sqlite:", "postgresql:", "postgres:")):
            _check_schema(client, uri)
    return ResilientClient(client, uri)


def _check_schema(client, uri: str) -> None:
    """Open the store now; one made half by an interrupted first run is a one-line error saying how to finish it."""
    from mlflow.exceptions import MlflowException

    from rankopt.errors import RankoptError
    from rankopt.tracking.urls import mask_url

    try:
        client.search_experiments(max_results=1)
    except MlflowException as exc:
        if "out-of-date database schema" not in str(exc):
            raise
        raise RankoptError(f"the MLflow store '{mask_url(uri)}' has an older schema (made by an older MLflow, or "
                           f"left half made by a run killed while creating it); back it up, then run `mlflow db "
                           f"upgrade {mask_url(uri)}`") from None


def check_reachable(uri: str) -> None:
    """Check that ``uri`` is a tracking URI and, for a server or database, that it answers now (one try).

    Called when a job starts, before anything is written: a wrong or dead URI is the user's
    to fix (one-line error); an outage *later* is ridden out by the resilient client. Local
    stores (``sqlite:///``, ``file:///``) are created on first use, so only their syntax is checked.
    """
    from mlflow.tracking import MlflowClient

    from rankopt.errors import RankoptError
    from rankopt.tracking.urls import check_tracking_uri, mask_text, mask_url, sqlalchemy_url

    check_tracking_uri(uri)
    if uri.startswith(("sqlite:", "file:")):
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    from rankopt.tracking.store_lock import opening

    try:
        with opening(uri):  # a fresh database gets MLflow's tables here: one process at a time
            MlflowClient(tracking_uri=sqlalchemy_url(uri)).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means the URI does not work
        reason = mask_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
        raise RankoptError(f"cannot reach MLflow at '{mask_url(uri)}' ({reason}); start the tracking server "
                           "or fix --tracking-uri") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created (as a model-training experiment) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (Path(artifact_root).resolve() / name).as_uri() if artifact_root else None
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - another worker created it just now
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    if (exp is None) or exp.tags.get(EXPERIMENT_KIND_TAG) != "custom_model_development":
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return exp_id


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


class MLflowLogger(Callback):
    """Logs one training run: eval metrics, ranks per reallocation, heatmap, history, adapter."""

    def __init__(self, client, run_id: str, base_model: str, meta: dict[str, Any] | None = None,
                 log_history: bool = True):
        self.client, self.run_id = client, run_id
        self.base_model = base_model
        self.meta = meta or {}
        self.log_history = log_history  # False: a resumed run continues the run that logged them
        self._loss_sum, self._loss_n = 0.0, 0

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

    def on_train_start(self, info: dict[str, Any]) -> None:
        # a resumed trial: its run gets the evaluations made before the checkpoint, so its curves are whole
        for step, metrics in (info.get("eval_history") or []) if self.log_history else []:
            self._metrics({f"eval_{k}": v for k, v in metrics.items()}, step)

    def on_step(self, step: int, loss: float) -> None:
        self._loss_sum += loss
        self._loss_n += 1

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        values = {f"eval_{k}": v for k, v in metrics.items()}
        if self._loss_n:
            values["train_loss"] = self._loss_sum / self._loss_n
            self._loss_sum, self._loss_n = 0.0, 0
        self._metrics(values, step)

    def on_reallocation(self, event: RankEvent) -> None:
        values = {"total_rank": sum(event.ranks.values()), "budget": event.budget}
        values.update({f"rank/{name}": r for name, r in event.ranks.items()})
        self._metrics(values, event.step)

    def on_train_end(self, result: TrainResult) -> None:
        from rankopt.adapters.peft_format import write_adapter_files
        from rankopt.figures.rank_plots import rank_heatmap

        self._metrics({"final_metric": result.metric, "final_total_rank": result.total_rank,
                       "trainable_params": result.trainable_params, "adapter_params": result.adapter_params,
                       "train_seconds": result.seconds}, result.steps)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            rank_heatmap(result.rank_history, tmp_path / "rank_heatmap.png")
            history = [{"step": e.step, "budget": e.budget, "ranks": e.ranks, "scores": e.scores}
                       for e in result.rank_history]
            (tmp_path / "rank_history.json").write_text(json.dumps(history))
            self.client.log_artifact(self.run_id, str(tmp_path / "rank_heatmap.png"))
            self.client.log_artifact(self.run_id, str(tmp_path / "rank_history.json"))
            adapter = tmp_path / "adapter"
            adapter.mkdir()
            meta = {**self.meta, "metric_name": result.metric_name, "metric": result.metric,
                    "ranks": result.ranks, "mlflow_run_id": self.run_id}
            write_adapter_files(result.adapted, adapter, self.base_model, meta)
            self.client.log_artifacts(self.run_id, str(adapter), "adapter")


class StudyTracker:
    """MLflow side of a tuning job: one parent run per study, one nested run per trial.

    Each trial run carries ``optuna.study``, ``optuna.trial`` and ``optuna.state`` tags so the
    MLflow UI's run comparison lines trials up; the parent run gets the study's plots and
    the best trial's adapter.
    """

    def __init__(self, client, experiment_id: str, study_name: str, base_model: str):
        self.client, self.experiment_id = client, experiment_id
        self.study_name, self.base_model = study_name, base_model
        self.parent_run_id: str | None = None

    def start_study(self, existing_run_id: str | None, params: dict[str, Any]) -> str:
        """Reopen the study's parent run (on resume) or create it."""
        if existing_run_id:
            try:
                run = self.client.get_run(existing_run_id)
                if run.info.experiment_id == self.experiment_id:
                    self.client.update_run(existing_run_id, status="RUNNING")
                    self.parent_run_id = existing_run_id
                    return existing_run_id
            except Exception:  # noqa: BLE001 - a run from another store: start a new parent
                pass
        run = self.client.create_run(self.experiment_id, run_name=f"study {self.study_name}",
                                     tags={"rankopt.kind": "study", "optuna.study": self.study_name})
        self.parent_run_id = run.info.run_id
        log_params(self.client, self.parent_run_id, params)
        return self.parent_run_id

    def start_trial(self, number: int, params: dict[str, Any], suggested: dict[str, Any],
                    tags: dict[str, str] | None = None) -> str:
        tags = {"mlflow.parentRunId": self.parent_run_id, "rankopt.kind": "trial", "optuna.study": self.study_name,
                "optuna.trial": str(number), "optuna.state": "running", **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=f"trial {number}", tags=tags)
        log_params(self.client, run.info.run_id, params)
        self.client.set_tag(run.info.run_id, "optuna.params", json.dumps(suggested, default=str))
        return run.info.run_id

    def end_trial(self, run_id: str, state: str, reason: str | None = None, status: str | None = None) -> None:
        """``state``: complete, pruned, failed; interrupted runs end as KILLED (or pass ``status``)."""
        from rankopt.tracking.urls import mask_text

        self.client.set_tag(run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(run_id, "optuna.fail_reason", mask_text(reason)[:5000])
        status = status or {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status)

    def end_study(self, study, status: str = "FINISHED") -> None:
        from rankopt.figures.study_plots import study_figures

        run_id = self.parent_run_id
        if run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path in study_figures(study, Path(tmp)):
                self.client.log_artifact(run_id, str(path), "plots")
            best = _best_complete(study)
            if best is not None:
                values = {f"best_{name}": v for name, v in zip(_objective_names(study), best.values)}
                values["best_trial"] = best.number
                values["n_trials"] = len(study.trials)
                from mlflow.entities import Metric
                import time

                now = int(time.time() * 1000)
                self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
                self.client.set_tag(run_id, "best_trial", str(best.number))
                self.client.set_tag(run_id, "best_params", json.dumps(best.params, default=str))
                best_run = best.user_attrs.get("mlflow_run_id")
                if best_run:
                    self.client.set_tag(run_id, "best_run_id", best_run)
                    try:
                        local = self.client.download_artifacts(best_run, "adapter", tmp)
                        self.client.log_artifacts(run_id, local, "best_adapter")
                    except Exception:  # noqa: BLE001 - the best run's artifacts may be elsewhere
                        pass
        self.client.set_terminated(run_id, status)


def _objective_names(study) -> list[str]:
    return study.user_attrs.get("objectives", ["metric"])


def _best_complete(study):
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])
