"""Export one tuned adapter: pick the run, fetch its adapter from MLflow, write the folder atomically.

    study (or --run-id) -> trial -> MLflow run -> artifacts ``adapter/`` -> folder at ``out``:

* default: PEFT's LoRA format (``adapter_config.json`` with per-layer ``rank_pattern`` /
  ``alpha_pattern``, ``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained``;
* ``merge``: a plain transformers model with the adapter folded into its weights.

Both get the base model's tokenizer, a model card (``README.md``) and ``rankopt.json``. Every
check a user can fail runs before anything is written; the folder appears whole or not at all
(:func:`rankopt.adapters.peft_format.atomic_folder`). ``register`` also logs the folder on the source run and
makes it a version of a model in the MLflow Model Registry.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankopt.errors import RankoptError
from rankopt.outputs.card import model_card_for
from rankopt.search.selection import check_within, select_trial  # noqa: F401 - select_trial: also imported from here
from rankopt.tracking.urls import mask_url

ADAPTER_ARTIFACTS = ("adapter", "best_adapter")  # a trial's own adapter; a study parent's copy of the best


@dataclass
class Source:
    """Where the adapter comes from: one MLflow run, and the study trial behind it when there is one."""

    run_id: str
    tracking_uri: str
    study: str | None = None
    trial: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = "chosen by --run-id"
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    out: Path
    merged: bool
    source: Source
    metric_name: str | None
    metric: float | None
    ranks: dict[str, int]
    adapter_params: int | None
    registered: tuple[str, str] | None = None  # (model name, version)
    test_metric: float | None = None  # on the held-out test split (see rankopt.search.holdout)
    test_note: str = "not measured"  # the split and its size, or why there is no test score

    @property
    def notes(self) -> list[str]:
        return self.source.notes


def require_sqlite_file(url: str, what: str, flag: str) -> None:
    """Opening a missing SQLite file would create it: refuse instead, so bad input writes nothing."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:") and not path.is_file():
            raise RankoptError(f"no {what} at {path}; pass {flag} with the store `rankopt tune` wrote "
                               "(default: under runs/)")


def runs_folder(storage: str | None) -> Path:
    """The ``--out`` folder of the tuning job: beside a SQLite study storage, else ``runs``."""
    if storage and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):]).parent
    return Path("runs")


def load_study(name: str, storage: str):
    """Study ``name`` in ``storage``, opened as ``rankopt tune`` opens it (every URL form tune takes)."""
    import optuna

    from rankopt.search.studies import open_storage

    require_sqlite_file(storage, "Optuna storage", "--storage")
    storage_obj = open_storage(storage)  # a bad URL, a missing driver, a dead server: one line
    names = optuna.get_all_study_names(storage_obj)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise RankoptError(f"no study '{name}' in {mask_url(storage)} (studies: {known}); check --study and --storage")
    return optuna.load_study(study_name=name, storage=storage_obj)


def find_source(*, study: str | None = None, storage: str | None = None, tracking_uri: str | None = None,
                trial: int | None = None, run_id: str | None = None, max_params: int | None = None,
                within: float | None = None) -> Source:
    """Resolve the CLI's choice (study + trial, or a run id) to an MLflow run."""
    from rankopt.search.trials import default_storage
    from rankopt.tracking.mlflow_runs import default_tracking_uri

    check_within(within)
    if (study is None) == (run_id is None):
        raise RankoptError("pass --study NAME (its best trial, or --trial N) or --run-id ID, exactly one of them")
    if run_id is not None and (trial is not None or max_params is not None or within is not None):
        raise RankoptError("--trial, --max-params and --within choose within a study; they do not go with --run-id")
    chosen_by = [flag for flag, value in (("--trial", trial), ("--max-params", max_params), ("--within", within))
                 if value is not None]
    if len(chosen_by) > 1:
        raise RankoptError(f"pass {' or '.join(chosen_by)}, not both: each one chooses the trial")
    uri = tracking_uri or default_tracking_uri(runs_folder(storage))
    if run_id is not None:
        require_sqlite_file(uri, "MLflow tracking store", "--tracking-uri")
        return Source(run_id=run_id, tracking_uri=uri)
    found = load_study(study, storage or default_storage(runs_folder(None)))
    chosen, notes, reason = select_trial(found, trial, max_params, within)
    require_sqlite_file(uri, "MLflow tracking store", "--tracking-uri")
    mlflow_run = chosen.user_attrs.get("mlflow_run_id")
    if not mlflow_run:
        raise RankoptError(f"trial {chosen.number} of study '{study}' has no MLflow run (tracking was off); "
                           "its adapter was not saved")
    return Source(run_id=mlflow_run, tracking_uri=uri, study=study, trial=chosen.number, params=dict(chosen.params),
                  reason=reason, notes=notes)


def fetch_adapter(client, run_id: str, dest: Path) -> tuple[Path, Any]:
    """Download the run's adapter folder into ``dest``; returns (folder, the MLflow run)."""
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException for an unknown or malformed id
        raise RankoptError(f"no MLflow run '{run_id}' in this tracking store; "
                           "check --run-id and --tracking-uri") from None
    for path in ADAPTER_ARTIFACTS:
        names = {Path(f.path).name for f in client.list_artifacts(run_id, path)}
        if {"adapter_config.json", "adapter_model.safetensors"} <= names:
            return Path(client.download_artifacts(run_id, path, str(dest))), run
    raise RankoptError(f"run '{run_id}' ({run.info.run_name}) has no adapter artifact; only runs that finished "
                       "training log one (pruned or failed trials do not)")


def _describe(source: Source, run) -> None:
    """Fill study, trial and params from the run's tags when the user gave a run id."""
    tags = run.data.tags
    if source.study is None and tags.get("rankopt.kind") == "study":
        source.study = tags.get("optuna.study")
        best = tags.get("best_trial")
        source.trial = int(best) if best and best.isdigit() else None
        source.params = json.loads(tags.get("best_params", "{}"))
        source.reason = "the study's best, copied to its parent run"
        source.notes.append(f"run '{source.run_id}' is a study's parent run: exporting its best trial's adapter")
    elif source.study is None:
        source.study = tags.get("optuna.study")
        number = tags.get("optuna.trial")
        source.trial = int(number) if number and number.isdigit() else None
        source.params = json.loads(tags.get("optuna.params", "{}"))


def _command(out: Path, **opts: Any) -> str:
    """The export command as a user would type it (passwords in URLs masked)."""
    parts = ["rankopt", "export"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:  # 0 is a value (--within 0), False is an unset flag
            parts += [flag, mask_url(str(value))]
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def _model_source(meta: dict[str, Any], adapter_config: dict[str, Any]):
    """(ModelConfig, task type) of the base model the adapter was trained on."""
    from rankopt.config import Config, ModelConfig

    if isinstance(meta.get("config"), dict):
        try:
            cfg = Config.model_validate(meta["config"])
            return cfg.model, cfg.task.type
        except Exception:  # noqa: BLE001 - a config from another rankopt version: use the adapter's base
            pass
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise RankoptError("the adapter names no base model (base_model_name_or_path); cannot export it")
    return ModelConfig(name=base), "causal_lm" if adapter_config.get("task_type") == "CAUSAL_LM" else "classification"


def check_remote_code(model_cfg, allowed: bool, where: str) -> None:
    """A stored ``trust_remote_code`` alone (an artifact, a shared study) must not make this process run code."""
    if model_cfg.trust_remote_code and not allowed:
        raise RankoptError(f"{where} sets model.trust_remote_code (base model '{model_cfg.name}' would run code "
                           "from its files); pass --trust-remote-code to export if you trust that model's code")


def check_mergeable(model_cfg) -> None:
    """A quantized base has no full weights to fold the adapter into: say how to merge instead."""
    if model_cfg.quantization:
        raise RankoptError(f"this adapter was trained on a {model_cfg.quantization} base; --merge needs full "
                           f"weights: export without --merge, then merge it onto {model_cfg.name} loaded in "
                           "bfloat16 (peft.PeftModel.from_pretrained(base, DIR).merge_and_unload())")


def default_out(*, study: str | None, run_id: str | None, storage: str | None, trial: int | None = None,
                max_params: int | None = None, within: float | None = None, merge: bool = False) -> Path:
    """Where an export goes without ``--out``: ``exports/NAME`` in the tuning job's runs folder.

    Beside the study storage, as reports are (``runs/exports/demo`` by default), so an export
    never lands in the checkout the command was started from; the name says what was chosen:
    ``demo``, ``demo-trial-3``, ``demo-within-0.01``, ``demo-max-params-50000``, ``run-1a2b3c4d``,
    each with ``-merged`` for ``--merge``.
    """
    from rankopt.outputs.report import _folder_name

    name = _folder_name(study) if study is not None else f"run-{_folder_name(run_id or 'unknown')[:8]}"
    for label, value in (("trial", trial), ("max-params", max_params), ("within", within)):
        if value is not None:
            name += f"-{label}-{value:g}" if isinstance(value, float) else f"-{label}-{value}"
    return runs_folder(storage) / "exports" / (name + ("-merged" if merge else ""))


def export(out: str | Path | None = None, *, study: str | None = None, storage: str | None = None,
           tracking_uri: str | None = None, trial: int | None = None, run_id: str | None = None,
           merge: bool = False, force: bool = False, max_params: int | None = None,
           register: str | None = None, command: str | None = None, within: float | None = None,
           trust_remote_code: bool = False) -> ExportResult:
    """Write the chosen trial's adapter (or merged model) to ``out``, with tokenizer, card and rankopt.json.

    Without ``out``, the folder is :func:`default_out` (``runs/exports/STUDY`` for a study in the
    default storage).
    The base model is loaded as the adapter's ``rankopt.json`` names it; a ``model.trust_remote_code``
    written there (or in the study) is honoured only with ``trust_remote_code``: an artifact alone
    cannot make this process run a model's code.

    Example:
        >>> from rankopt.outputs.export import export
        >>> export(study="sst2")  # runs/exports/sst2  # doctest: +SKIP
        >>> export("best-sst2", study="sst2")  # doctest: +SKIP
        >>> export("sst2-merged", study="sst2", trial=3, merge=True, register="sst2-lora")  # doctest: +SKIP
        >>> export("sst2-small", study="sst2", within=0.01)  # the smallest within 1 point  # doctest: +SKIP
    """
    from rankopt.tracking import mlflow_runs
    from rankopt.adapters.atomic import check_target
    from rankopt.adapters.peft_format import atomic_folder, head_num_labels, read_adapter
    from rankopt.tasks.modeling import load_tokenizer

    out = Path(out) if out is not None else default_out(study=study, run_id=run_id, storage=storage, trial=trial,
                                                         max_params=max_params, within=within, merge=merge)
    check_target(out, force)  # a folder rankopt did not write is refused before anything is done
    if register is not None and not register.strip():
        raise RankoptError("--register needs a model name")
    command = command or _command(out, study=study, storage=storage, tracking_uri=tracking_uri, trial=trial,
                                  run_id=run_id, max_params=max_params, within=within, merge=merge, force=force,
                                  register=register, trust_remote_code=trust_remote_code)
    source = find_source(study=study, storage=storage, tracking_uri=tracking_uri, trial=trial, run_id=run_id,
                         max_params=max_params, within=within)
    client = mlflow_runs.client_for(source.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder, run = fetch_adapter(client, source.run_id, Path(tmp))
        _describe(source, run)
        adapter_config, state, meta = read_adapter(folder, f"the adapter artifact of MLflow run '{source.run_id}'")
        model_cfg, task_type = _model_source(meta, adapter_config)
        check_remote_code(model_cfg, trust_remote_code, "the adapter's rankopt.json")
        if merge:
            check_mergeable(model_cfg)
        num_labels = meta.get("num_labels") or head_num_labels(state, adapter_config.get("modules_to_save") or [])
        tokenizer = load_tokenizer(model_cfg.name, model_cfg.trust_remote_code)
        model = _merged_model(model_cfg, task_type, num_labels, adapter_config, state, meta) if merge else None
        ranks = _ranks_in_model_order(state, meta)
        metrics = run.data.metrics
        adapter_params = int(metrics["adapter_params"]) if "adapter_params" in metrics else None
        test_metric, test_note = _test_score(source, run, meta, client, storage, from_study=study is not None,
                                             trust_remote_code=trust_remote_code)
        shown = f"{test_metric:.4f} ({test_note})" if test_metric is not None else test_note
        card = model_card_for(source, meta, adapter_config, ranks, num_labels, adapter_params,
                     metrics.get("trainable_params"), command, merge, out, shown)
        meta["test"] = {"metric": test_metric, "note": test_note}
        meta["export"] = {"source_run_id": source.run_id, "tracking_uri": mask_url(source.tracking_uri),
                          "study": source.study, "trial": source.trial, "params": source.params, "merged": merge,
                          "command": command, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        registered = None
        with atomic_folder(out, force=force) as dest:
            if model is not None:
                model.save_pretrained(str(dest))
            else:
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copyfile(folder / name, dest / name)
            tokenizer.save_pretrained(str(dest))
            (dest / "rankopt.json").write_text(json.dumps(meta, indent=2, default=str))
            (dest / "README.md").write_text(card)
            if register:
                registered = register_folder(client, source, dest, register.strip(), card, merge)
    return ExportResult(out=out, merged=merge, source=source, metric_name=meta.get("metric_name"),
                        metric=meta.get("metric"), ranks=ranks, adapter_params=adapter_params, registered=registered,
                        test_metric=test_metric, test_note=test_note)


def _test_score(source: Source, run, meta: dict[str, Any], client, storage: str | None,
                from_study: bool, trust_remote_code: bool = False) -> tuple[float | None, str]:
    """The exported trial's held-out score, and where it comes from (or why there is none).

    A study's trial is scored once (:mod:`rankopt.search.holdout`): if tuning did not score it
    (it was not the best, or the study predates test scores), it is scored now and recorded.
    A run exported by id keeps the ``test_<metric>`` its run logged, if any.
    """
    from rankopt.search import holdout
    from rankopt.search.trials import default_storage

    metric = meta.get("metric_name")
    if metric is None:
        return None, "not measured"
    if not from_study or source.trial is None:
        value = run.data.metrics.get(f"test_{metric}")
        split = run.data.tags.get("rankopt.test_split")
        return (value, f"split '{split}'") if value is not None else (None, "not measured (export from a study "
                                                                               "to score it on its test split)")
    study = load_study(source.study, storage or default_storage(runs_folder(None)))
    if source.trial not in holdout.recorded(study):
        cfg = _study_config(study, meta)
        trial = next(t for t in study.trials if t.number == source.trial)
        if cfg is not None:
            try:
                check_remote_code(cfg.model, trust_remote_code, f"study '{source.study}'")
                holdout.score_trials(study, cfg, [trial], client)
            except RankoptError as exc:  # the data moved or went away: the export itself still stands
                return None, f"not measured ({exc})"
    entry = holdout.recorded(study).get(source.trial)
    if entry is None:
        return None, holdout.note(study) or "not measured"
    return entry["metrics"].get(metric), f"{entry['examples']:,} examples of split '{entry['split']}'"


def _study_config(study, meta: dict[str, Any]):
    """The config a study was tuned with (stored on it), else the one in the adapter's rankopt.json."""
    from rankopt.config import Config
    from rankopt.search.studies import CONFIG_ATTR

    for raw in (study.user_attrs.get(CONFIG_ATTR), meta.get("config")):
        if isinstance(raw, dict):
            try:
                return Config.model_validate(raw)
            except Exception:  # noqa: BLE001 - a config from another rankopt version
                continue
    return None


def _merged_model(model_cfg, task_type: str, num_labels: int | None, adapter_config: dict[str, Any],
                  state: dict, meta: dict[str, Any]):
    """The base model (loaded by rankopt.tasks.modeling) with the adapter folded into its weights.

    The task's label names and problem type (from rankopt.json) go on its config, so the saved
    model predicts ``topic names``, not ``LABEL_0``.
    """
    from rankopt.adapters.peft_format import merge_adapter
    from rankopt.tasks.modeling import load_pretrained, name_labels

    if num_labels is None and task_type != "causal_lm":
        raise RankoptError("cannot tell the number of labels of this adapter's head; export without --merge")
    model = load_pretrained(model_cfg, num_labels or 0, task_type)
    if task_type != "causal_lm":
        name_labels(model, meta.get("id2label"))
        if meta.get("problem_type"):
            model.config.problem_type = meta["problem_type"]
    return merge_adapter(model, adapter_config, state)


def _ranks_in_model_order(state: dict, meta: dict[str, Any]) -> dict[str, int]:
    from rankopt.adapters.peft_format import adapter_ranks

    ranks = adapter_ranks(state)
    order = [n for n in (meta.get("ranks") or {}) if n in ranks]  # rankopt wrote them in the model's order
    return {n: ranks[n] for n in order} | ranks


def register_folder(client, source: Source, folder: Path, name: str, description: str,
                    merged: bool = False) -> tuple[str, str]:
    """Log ``folder`` on the source run (``registered/NAME/vK``) and make it version K of model ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description=f"rankopt adapters ({source.study or 'runs'})")
        versions = client.search_model_versions("name = '{}'".format(name.replace("'", "''")))
        next_version = 1 + max((int(v.version) for v in versions), default=0)
        path = f"registered/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}/v{next_version}"
        client.log_artifacts(source.run_id, str(folder), path)
        tags = {"rankopt.study": source.study, "rankopt.trial": source.trial,
                "rankopt.format": "merged" if merged else "peft"}
        version = client.create_model_version(name, source=f"runs:/{source.run_id}/{path}", run_id=source.run_id,
                                              tags={k: str(v) for k, v in tags.items() if v is not None},
                                              description=description[:5000])
    except MlflowException as exc:
        raise RankoptError(f"cannot register model '{name}': {exc.message.splitlines()[0]}") from None
    return name, str(version.version)
