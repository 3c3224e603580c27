"""A model's architecture without its weights: its transformers config, and the model built on the meta device.

The memory plan needs only shapes. A local folder or GGUF file gives its config offline; a hub id
needs the hub, except for the few architectures bundled here (the dimensions of their published
``config.json``), so that ``rankopt plan llm_gpu`` works on a machine that has never downloaded
Llama-3.1-8B. ``config_json`` (a ``config.json`` copied from anywhere) covers every other model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from rankopt.config import ModelConfig
from rankopt.errors import RankoptError
from rankopt.tasks.modeling import gguf_parts, resolve_model_path

_LLAMA_3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "hidden_act": "silu", "tie_word_embeddings": False, "max_position_embeddings": 131072, "dtype": "bfloat16",
}
_SMOLLM2_135M = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "hidden_act": "silu", "tie_word_embeddings": True, "max_position_embeddings": 8192, "dtype": "bfloat16",
}
# hub id -> the dimensions of its published config.json (all a plan reads)
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA_3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA_3_8B, "max_position_embeddings": 8192},
    "meta-llama/Meta-Llama-3-8B": {**_LLAMA_3_8B, "max_position_embeddings": 8192},
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
}


def load_model_config(cfg: ModelConfig, config_json: str | Path | None = None) -> PretrainedConfig:
    """The transformers config of ``cfg.name`` (or of ``config_json``), read without any weights."""
    if config_json is not None:
        path = Path(config_json)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RankoptError(f"--config-json {path}: cannot read a JSON config ({type(exc).__name__}); pass the "
                               "model's config.json") from None
        return _from_dict(raw, str(path))
    if cfg.name in KNOWN_CONFIGS:
        return _from_dict(KNOWN_CONFIGS[cfg.name], cfg.name)
    folder, gguf = gguf_parts(resolve_model_path(cfg.name))
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **gguf)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RankoptError(f"cannot read the config of model '{cfg.name}' ({reason}); pass its config.json with "
                           "--config-json PATH") from None


def _from_dict(raw: dict, origin: str) -> PretrainedConfig:
    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise RankoptError(f"{origin}: the config has no 'model_type'; pass the model's own config.json")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except ValueError as exc:
        raise RankoptError(f"{origin}: {str(exc).splitlines()[0]}") from None


def meta_model(config: PretrainedConfig, task_type: str, num_labels: int = 2) -> nn.Module:
    """The model ``config`` describes, on the meta device: every parameter has its shape and dtype, no storage."""
    config = _copy(config)
    config._attn_implementation = "sdpa"
    auto = AutoModelForCausalLM
    if task_type != "causal_lm":
        auto = AutoModelForSequenceClassification
        config.num_labels = num_labels
    with torch.device("meta"):
        try:
            return auto.from_config(config)
        except ValueError as exc:
            kind = "causal language model" if task_type == "causal_lm" else "sequence classifier"
            raise RankoptError(f"model type '{config.model_type}' has no {kind} in transformers "
                               f"({str(exc).splitlines()[0][:120]})") from None


def _copy(config: PretrainedConfig) -> PretrainedConfig:
    return config.__class__.from_dict(config.to_dict())


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the checkpoint stores (what ``model.dtype: auto`` loads), float32 when the config does not say."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
