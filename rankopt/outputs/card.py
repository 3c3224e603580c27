"""The model card (README.md) of an exported folder: what the trial was, how good, how it was found.

The layout of the card is :func:`rankopt.adapters.peft_format.model_card`; this module fills it
from the export's source (study, trial, MLflow run) and the adapter's ``rankopt.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankopt.errors import RankoptError


def model_card_for(source, meta: dict[str, Any], adapter_config: dict[str, Any], ranks: dict[str, int],
                   num_labels: int | None, adapter_params: int | None, trainable: float | None, command: str,
                   merged: bool, out: Path, test_score: str | None = None) -> str:
    """The card of one export; ``source`` is a :class:`rankopt.outputs.export.Source`."""
    from rankopt.adapters.peft_format import model_card

    task = (meta.get("config") or {}).get("task", {}).get("name", "rankopt")
    origin = f"study {source.study}, trial {source.trial}" if source.study else f"run {source.run_id[:8]}"
    base = adapter_config.get("base_model_name_or_path", "?")
    return model_card(title=f"{task} ({origin})", base_model=base, base_lookup=_base_lookup(base),
                      ranks=ranks, metric_name=meta.get("metric_name"), metric=meta.get("metric"),
                      found_by=_card_rows(source, adapter_params, trainable), how=_provenance(source),
                      command=command, merged=merged, num_labels=num_labels, folder_name=str(out),
                      task_type=adapter_config.get("task_type") or "SEQ_CLS", labels=meta.get("id2label"),
                      problem_type=meta.get("problem_type"), test_score=test_score)


def _base_lookup(base: str) -> str | None:
    """How the card's code finds the base model: ``"package"`` (a folder inside a pip package, recorded by
    its package name, see :func:`rankopt.tasks.modeling.portable_model_name`), ``"gguf"`` (a GGUF file),
    or None (a hub id or a folder: transformers loads it as named)."""
    from rankopt.tasks.modeling import GGUF_SUFFIX, resolve_model_path

    try:
        found = resolve_model_path(base)
    except RankoptError:  # a name this machine cannot resolve is written as given
        return None
    if found.endswith(GGUF_SUFFIX):
        return "gguf"
    return "package" if found != base and not Path(base).expanduser().exists() else None


def _card_rows(source, adapter_params: int | None, trainable: float | None) -> list[tuple[str, str]]:
    rows = []
    if adapter_params is not None:
        rows.append(("adapter parameters", f"{adapter_params:,}"))
    if trainable is not None:
        rows.append(("trainable parameters (adapter + head)", f"{int(trainable):,}"))
    if source.study:
        rows.append(("Optuna study", f"`{source.study}`"))
    if source.trial is not None:
        rows.append(("trial", f"{source.trial} ({source.reason})"))
    if source.params:
        rows.append(("trial params", ", ".join(f"`{k}={_short(v)}`" for k, v in source.params.items())))
    rows.append(("MLflow run", f"`{source.run_id}`"))
    return rows


def _provenance(source) -> str:
    if source.study and source.trial is not None:
        return (f"The Optuna study `{source.study}` ran one fine-tune per trial, each logged as an MLflow run; "
                f"trial {source.trial} was taken ({source.reason}).")
    return f"One rankopt fine-tune, logged as MLflow run `{source.run_id}`."


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
