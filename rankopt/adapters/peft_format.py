"""Write an adapted model in PEFT's LoRA format, with per-layer ranks, atomically.

Each SVD adapter is written exactly, with no new SVD: A = diag(lam) Q, B = P * scale, and
alpha = r for that module so PEFT's scale alpha / r is 1 (``../shared/PEFT_FORMAT.md``).
The task head goes in as a whole module (PEFT's ``modules_to_save``). rankopt's own facts
(rank history, trial, metric) go to ``rankopt.json`` beside it, since PEFT drops unknown keys.

The way back needs no PEFT: :func:`read_adapter` loads such a folder and :func:`merge_adapter`
folds it into a plain model (W += alpha / r * B @ A, head weights copied), for ``--merge``.
Choosing which run to export and writing the whole folder is :mod:`rankopt.outputs.export`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rankopt.adapters.atomic import atomic_folder  # noqa: F401 - also imported from here
from rankopt.adapters.model import AdaptedModel
from rankopt.errors import RankoptError

PREFIX = "base_model.model."


def peft_state_dict(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> contiguous float tensors (A: (r, in), B: (out, r), head weights)."""
    state = {}
    for name, layer in adapted.adapters.items():
        if layer.rank == 0:
            continue  # PEFT refuses rank 0: a layer that gave up its adapter is left out (see peft_config)
        a, b = layer.lora_factors()
        state[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    for head in adapted.head_names:
        for pname, p in adapted.model.get_submodule(head).named_parameters():
            state[f"{PREFIX}{head}.{pname}"] = p.detach().contiguous().cpu()
    return state


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for a model: ``CAUSAL_LM`` for a language model, else ``SEQ_CLS``."""
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else "SEQ_CLS"


def peft_config(adapted: AdaptedModel, base_model: str, task_type: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` with full module paths in target_modules, rank_pattern, alpha_pattern.

    Layers at rank 0 (``controller.min_rank: 0``) are not targets at all: PEFT's LoRA layers refuse
    rank 0, and a module outside ``target_modules`` is loaded as the plain base layer it is.
    """
    ranks = {name: rank for name, rank in adapted.ranks().items() if rank > 0}
    if not ranks:
        raise RankoptError("every adapter was pruned to rank 0; nothing to export (raise controller.target_rank)")
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task_type or peft_task_type(adapted.model),
        "base_model_name_or_path": base_model,
        "r": default_r,
        "lora_alpha": default_r,
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_r},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != default_r},
        "target_modules": sorted(ranks),
        "modules_to_save": list(adapted.head_names) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter_files(adapted: AdaptedModel, folder: Path, base_model: str, meta: dict[str, Any] | None = None,
                        task_type: str | None = None) -> None:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``rankopt.json`` into ``folder``."""
    folder = Path(folder)
    meta = dict(meta or {})
    model_config = getattr(adapted.model, "config", None)
    num_labels = getattr(model_config, "num_labels", None)
    if num_labels is not None and adapted.head_names:
        meta.setdefault("num_labels", num_labels)  # what the base model's head needs on reload
        meta.update({k: v for k, v in label_meta(model_config).items() if k not in meta})
    save_file(peft_state_dict(adapted), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(adapted, base_model, task_type), indent=2))
    (folder / "rankopt.json").write_text(json.dumps(meta, indent=2, default=str))


def label_meta(model_config) -> dict[str, Any]:
    """``id2label`` / ``label2id`` (when the task named its labels) and ``problem_type`` of a head's config.

    PEFT's adapter_config.json has no place for them, so they travel in ``rankopt.json``; the
    export puts them back on the config of a merged model and into the model card's loading code.
    """
    out: dict[str, Any] = {}
    id2label = {int(i): str(n) for i, n in (getattr(model_config, "id2label", None) or {}).items()}
    if id2label and any(name != f"LABEL_{i}" for i, name in id2label.items()):
        out["id2label"] = {str(i): n for i, n in sorted(id2label.items())}
        out["label2id"] = {n: i for i, n in sorted(id2label.items())}
    if getattr(model_config, "problem_type", None):
        out["problem_type"] = model_config.problem_type
    return out


def save_adapter(adapted: AdaptedModel, out: Path, base_model: str, meta: dict[str, Any] | None = None,
                 force: bool = False) -> Path:
    """Atomically write a PEFT-loadable adapter folder at ``out``."""
    with atomic_folder(out, force=force) as tmp:
        write_adapter_files(adapted, tmp, base_model, meta)
    return Path(out)


def read_adapter(folder: Path, label: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(adapter_config, tensors, rankopt meta)`` of a PEFT LoRA folder; meta is {} without rankopt.json.

    A damaged file (cut short, not JSON) is a one-line RankoptError naming it; ``label`` names the
    folder in messages (say, the MLflow run it came from) instead of its path.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    label = label or str(folder)
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not (config_path.is_file() and weights.is_file()):
        raise RankoptError(f"{label} is not an adapter folder (needs adapter_config.json and "
                           "adapter_model.safetensors)")
    meta_path = folder / "rankopt.json"
    try:
        config = _json_object(config_path)
        meta = _json_object(meta_path) if meta_path.is_file() else {}
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, JSON errors: the file is damaged
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RankoptError(f"{label} is damaged ({reason}); write it again (rerun the trial) or use another") from None
    if config.get("peft_type") != "LORA":
        raise RankoptError(f"{label} holds a {config.get('peft_type')} adapter; only LoRA adapters can be exported")
    return config, tensors, meta


def _json_object(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def adapter_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module path -> rank, read off the shapes of the ``lora_A`` tensors."""
    suffix = ".lora_A.weight"
    return {k[len(PREFIX):-len(suffix)]: int(v.shape[0]) for k, v in state.items() if k.endswith(suffix)}


def head_num_labels(state: dict[str, torch.Tensor], heads: list[str]) -> int | None:
    """Output size of the task head: the smallest first dimension among its 2-D weights."""
    sizes = [v.shape[0] for k, v in state.items()
             if v.dim() == 2 and any(k.startswith(f"{PREFIX}{h}.") for h in heads) and ".lora_" not in k]
    return int(min(sizes)) if sizes else None


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module path it equals or ends (after a dot)."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if name.endswith("." + key):
            return value
    return default


@torch.no_grad()
def merge_adapter(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Fold a PEFT LoRA adapter into ``model`` in place: W += s * B @ A per module, head weights copied.

    s = alpha / r (alpha / sqrt(r) with rsLoRA), alpha from ``alpha_pattern`` else ``lora_alpha``.
    The product is formed in float64 so the merged weights match the adapted model to float precision.
    """
    if config.get("fan_in_fan_out"):
        raise RankoptError("adapters with fan_in_fan_out (Conv1D layers) cannot be merged by rankopt")
    alphas = config.get("alpha_pattern") or {}
    for name, rank in adapter_ranks(state).items():
        a, b = state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise RankoptError(f"the adapter targets '{name}', which the base model does not have") from None
        weight = getattr(layer, "weight", None)
        if weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise RankoptError(f"the adapter for '{name}' does not fit the base model's layer; "
                               "was it trained on another model?")
        alpha = float(_pattern_value(alphas, name, config.get("lora_alpha", rank)))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        delta = (b.double() @ a.double()) * scale
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    params = dict(model.named_parameters())
    for key, value in state.items():
        if ".lora_" in key:
            continue
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if path not in params:
            raise RankoptError(f"the adapter has weights for '{path}', which the base model does not have")
        if tuple(params[path].shape) != tuple(value.shape):
            raise RankoptError(f"the adapter's '{path}' has shape {tuple(value.shape)}, the base model's "
                               f"{tuple(params[path].shape)}; check the number of labels")
        params[path].copy_(value.to(params[path].dtype))
    return model


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM (0.14) accepts for max_lora_rank


def serving_rank(largest: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that covers an adapter whose largest layer rank is ``largest``."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= largest), None)


def model_card(*, title: str, base_model: str, ranks: dict[str, int], metric_name: str | None,
               metric: float | None, found_by: list[tuple[str, str]], how: str, command: str, merged: bool,
               num_labels: int | None = None, folder_name: str = "DIR", task_type: str = "SEQ_CLS",
               labels: dict[str, str] | None = None, problem_type: str | None = None,
               test_score: str | None = None, base_lookup: str | None = None) -> str:
    """README.md for an exported folder: what it is, how good, how it was found, rank per layer, how to load.

    ``labels`` is ``id2label`` (from rankopt.json); ``test_score`` the held-out score as shown
    (or why there is none): the validation metric chose the trial, so only the test score is unbiased.
    ``base_lookup``: how the loading code finds ``base_model`` when transformers alone cannot:
    ``"package"``, a folder inside a pip package (found with rankopt where pip put it); ``"gguf"``,
    a GGUF file (a path, or in a package), loaded through ``gguf_file=``.
    """
    total = sum(ranks.values())
    largest = max(ranks.values(), default=0)
    lines = ["---", f"library_name: {'transformers' if merged else 'peft'}", f"base_model: {base_model}",
             f"pipeline_tag: {'text-generation' if task_type == 'CAUSAL_LM' else 'text-classification'}", "tags: [rankopt, lora, adaptive-rank]", "---", "",
             f"# {title}", ""]
    kind = ("A fine-tuned model: a LoRA adapter with a different rank per layer, folded into the weights "
            "of") if merged else "A LoRA adapter with a different rank per layer for"
    lines += [f"{kind} `{base_model}`. rankopt's controller moved rank between layers during training "
              f"(total rank {total} over {len(ranks)} layers, largest {largest}).", ""]
    lines += ["## Result", "", "| | |", "|---|---|"]
    if metric_name is not None and metric is not None:
        lines.append(f"| {metric_name} (validation, chose this trial) | {metric:.4f} |")
    if metric_name is not None and test_score is not None:
        lines.append(f"| {metric_name} (test, held out) | {test_score} |")
    lines.append(f"| largest per-layer rank (`max_lora_rank`) | {largest} |")
    lines += [f"| {label} | {value} |" for label, value in found_by]
    if labels:
        lines += ["", "## Labels", "", "| id | label |", "|---:|---|"]
        lines += [f"| {i} | {name} |" for i, name in labels.items()]
    lines += ["", "## How it was made", "", how, "", "This folder was written by:", "", "```", command, "```", "",
              "The full resolved training config of the run is in `rankopt.json` (key `config`).", ""]
    lines += ["## Rank allocation", "", "| layer | rank |", "|---|---:|"]
    lines += [f"| `{name}` | {rank} |" for name, rank in ranks.items()]
    lines += [f"| **total** | **{total}** |", "", "## Use", "", "```python"]
    causal = task_type == "CAUSAL_LM"
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    if merged:
        lines += [f"from transformers import {auto}, AutoTokenizer",
                  f'model = {auto}.from_pretrained("{folder_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")']
    else:
        head = ""
        if not causal:
            head += f", num_labels={num_labels}" if num_labels else ""
            head += f', problem_type="{problem_type}"' if problem_type == "regression" else ""
            head += ", id2label=labels, label2id={name: i for i, name in labels.items()}" if labels else ""
        lines += ["from peft import PeftModel",
                  f"from transformers import {auto}, AutoTokenizer"]
        if labels and not causal:
            lines.append(f"labels = {{{', '.join(f'{int(i)}: {name!r}' for i, name in labels.items())}}}")
        if base_lookup == "gguf":
            lines += ["from rankopt.tasks.modeling import gguf_parts, resolve_model_path",
                      f'folder, gguf = gguf_parts(resolve_model_path("{base_model}"))  # a GGUF checkpoint',
                      f"base = {auto}.from_pretrained(folder, **gguf{head})"]
        elif base_lookup == "package":
            lines += ["from rankopt.tasks.modeling import resolve_model_path",
                      f'base = {auto}.from_pretrained(resolve_model_path("{base_model}"){head})  # in its pip package']
        else:
            lines.append(f'base = {auto}.from_pretrained("{base_model}"{head})')
        lines += [f'model = PeftModel.from_pretrained(base, "{folder_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")']
    lines += ["```", ""]
    vllm = serving_rank(largest)
    if vllm is not None and not merged:
        lines += [f"Serving engines size their LoRA slots by the largest rank: with vLLM pass "
                  f"`--max-lora-rank {vllm}` (the smallest value it accepts that covers rank {largest}).", ""]
    return "\n".join(lines)
