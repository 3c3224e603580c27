"""Write an adapted model in PEFT's LoRA format, with per-layer ranks, atomically.

Each SVD adapter is written exactly, with no new SVD: A = diag(lam) Q, B = P * scale, and
alpha = r for that module so PEFT's scale alpha / r is 1 (``../shared/PEFT_FORMAT.md``).
The task head goes in as a whole module (PEFT's ``modules_to_save``). rankopt's own facts
(rank history, trial, metric) go to ``rankopt.json`` beside it, since PEFT drops unknown keys.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rankopt.adapters.model import AdaptedModel
from rankopt.errors import RankoptError

PREFIX = "base_model.model."


def peft_state_dict(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> contiguous float tensors (A: (r, in), B: (out, r), head weights)."""
    state = {}
    for name, layer in adapted.adapters.items():
        a, b = layer.lora_factors()
        state[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    for head in adapted.head_names:
        for pname, p in adapted.model.get_submodule(head).named_parameters():
            state[f"{PREFIX}{head}.{pname}"] = p.detach().contiguous().cpu()
    return state


def peft_config(adapted: AdaptedModel, base_model: str, task_type: str = "SEQ_CLS") -> dict[str, Any]:
    """``adapter_config.json`` with full module paths in target_modules, rank_pattern, alpha_pattern."""
    ranks = adapted.ranks()
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
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


@contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yield a temporary folder beside ``out``; rename it into place only if the block succeeds.

    An existing ``out`` is replaced only with ``force``; an interrupted write leaves nothing.
    """
    out = Path(out)
    if out.exists() and not force:
        raise RankoptError(f"{out} already exists; choose another folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter_files(adapted: AdaptedModel, folder: Path, base_model: str, meta: dict[str, Any] | None = None,
                        task_type: str = "SEQ_CLS") -> None:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``rankopt.json`` into ``folder``."""
    folder = Path(folder)
    save_file(peft_state_dict(adapted), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(adapted, base_model, task_type), indent=2))
    (folder / "rankopt.json").write_text(json.dumps(meta or {}, indent=2, default=str))


def save_adapter(adapted: AdaptedModel, out: Path, base_model: str, meta: dict[str, Any] | None = None,
                 force: bool = False) -> Path:
    """Atomically write a PEFT-loadable adapter folder at ``out``."""
    with atomic_folder(out, force=force) as tmp:
        write_adapter_files(adapted, tmp, base_model, meta)
    return Path(out)
