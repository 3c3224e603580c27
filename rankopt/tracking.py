"""MLflow: where runs go, and a callback that logs a training run's events to one run.

Training code never imports this module; it only emits events (:mod:`rankopt.events`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from rankopt.events import Callback, RankEvent, TrainResult

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens 'genai' experiments on traces otherwise


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


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
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created (as a model-training experiment) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (Path(artifact_root).resolve() / name).as_uri() if artifact_root else None
        exp_id = client.create_experiment(name, artifact_location=location)
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

    def __init__(self, client, run_id: str, base_model: str, meta: dict[str, Any] | None = None):
        self.client, self.run_id = client, run_id
        self.base_model = base_model
        self.meta = meta or {}
        self._loss_sum, self._loss_n = 0.0, 0

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

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
        from rankopt.export import write_adapter_files
        from rankopt.plots import rank_heatmap

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
