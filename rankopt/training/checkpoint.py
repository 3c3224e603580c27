"""Trial checkpoints: all a fine-tune needs to go on exactly where it stopped.

A retried trial (its worker was killed) resumes from its last checkpoint instead of step 0.
What is saved, after every ``search.checkpoint_every``-th evaluation:

* tensors, in ``state.safetensors``: adapter factors (P, lam, Q) at their *current* per-layer
  ranks (under ``adapter.static_shapes`` at their fixed capacity, the ranks naming the live slots),
  the task head, Adam's moments and step per parameter, the controller's sensitivity EMA /
  uncertainty and the birth step of grown components, its generator, and the torch RNG (dropout);
* the rest, in ``state.json``: step, per-layer ranks, optimizer hyper-parameters, scheduler
  state, the fp16 loss scaler's state, rank history, evaluation history, and a fingerprint of the trial's config.

Never pickle: the tensors are read back with ``safetensors`` and the rest is JSON, so a
checkpoint folder from anywhere cannot run code. ``state.json`` holds the SHA-256 of
``state.safetensors``: a checkpoint cut short or damaged on disk (a full disk, a copy that
stopped) is skipped with one warning, and the trial starts from the one before or from step 0.
The data order is not saved: the trainer replays the data loader's seeded shuffle up to the
checkpoint's step (cheap next to training).

Layout: ``ROOT/STUDY/trial-N/step-00000040/``, where N is the trial's original number (a
retry of trial 3 reads ``trial-3``). A step folder is written beside the others and renamed
into place, so a kill mid-write leaves the previous checkpoint intact; older ones are then
removed. Multi-machine workers need ROOT on shared storage (see README, "Scale-out").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rankopt.training.events import RankEvent
from rankopt.training.optim import apply_resizes

log = logging.getLogger(__name__)
FORMAT = 2  # 2: per-element Adam step counts, birth steps instead of growth floors
TENSORS, META = "state.safetensors", "state.json"


def fingerprint(config: dict[str, Any]) -> str:
    """What must match for a checkpoint to fit a trial: the config, less where it runs."""
    cfg = json.loads(json.dumps(config, default=str))
    cfg.get("training", {}).pop("device", None)
    cfg.pop("search", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def named_trainables(adapted) -> dict[str, torch.nn.Parameter]:
    """Stable names for the trainable tensors: ``LAYER.lora_P`` ..., ``HEAD.PARAM``."""
    named = {}
    for name, layer in adapted.adapters.items():
        for attr in ("lora_P", "lora_lam", "lora_Q"):
            named[f"{name}.{attr}"] = getattr(layer, attr)
    for head in adapted.head_names:
        for pname, p in adapted.model.get_submodule(head).named_parameters():
            named[f"{head}.{pname}"] = p
    return named


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def capture(stepper, evals: list[tuple[int, dict[str, float]]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stepper's whole state as (tensors, JSON-able meta)."""
    adapted, opt = stepper.adapted, stepper.optimizer
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, p in named_trainables(adapted).items():
        tensors[f"param/{name}"] = _cpu(p)
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"adam/{name}/{key}"] = _cpu(value)
            else:
                scalars.setdefault(name, {})[key] = value
    controller = stepper.controller
    if controller is not None:
        for name, layer in controller.layers.items():
            for kind, table in (("ema", controller.tracker.ema), ("unc", controller.tracker.unc),
                                ("born", controller.born)):
                if layer in table:
                    tensors[f"ctrl/{kind}/{name}"] = _cpu(table[layer])
        tensors["ctrl/generator"] = controller.generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    device = torch.device(stepper.device)
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    meta = {
        "format": FORMAT, "step": stepper.done, "ranks": adapted.ranks(), "param_groups": groups,
        "optimizer_scalars": scalars, "scheduler": stepper.scheduler.state_dict(),
        "grad_scaler": stepper.precision.state_dict(),
        "rank_history": [{"step": e.step, "budget": e.budget, "ranks": e.ranks, "scores": e.scores}
                         for e in stepper.history],
        "evals": [[step, metrics] for step, metrics in evals],
    }
    return tensors, meta


@torch.no_grad()
def restore(stepper, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """Put a captured state back into a freshly built stepper; returns the evaluation history.

    Layers are first resized to the saved ranks (the optimizer follows through
    :func:`rankopt.training.optim.apply_resizes`), then every tensor is copied in.
    """
    adapted, opt = stepper.adapted, stepper.optimizer
    scratch = torch.Generator().manual_seed(0)  # new components are overwritten below
    resizes = []
    for name, layer in adapted.adapters.items():
        rank = int(meta["ranks"][name])
        if rank != layer.rank:
            keep = torch.arange(min(rank, layer.rank))
            resizes.extend(layer.resize(keep, max(0, rank - layer.rank), scratch))
    apply_resizes(opt, resizes)
    stepper.params = adapted.trainable_parameters()
    for name, p in named_trainables(adapted).items():
        p.copy_(tensors[f"param/{name}"].to(p.device, p.dtype))
        state = optimizer_state_on(p.device, {key.rsplit("/", 1)[1]: value for key, value in tensors.items()
                                              if key.startswith(f"adam/{name}/")
                                              and key.count("/") == name.count("/") + 2})
        state.update(meta["optimizer_scalars"].get(name, {}))
        if state:
            opt.state[p] = state
    for group, saved in zip(opt.param_groups, meta["param_groups"]):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    stepper.scheduler.load_state_dict(dict(meta["scheduler"]))
    stepper.precision.load_state_dict(meta.get("grad_scaler") or {})
    controller = stepper.controller
    if controller is not None:
        device = torch.device(stepper.device)
        for name, layer in controller.layers.items():
            for kind, table in (("ema", controller.tracker.ema), ("unc", controller.tracker.unc),
                                ("born", controller.born)):
                key = f"ctrl/{kind}/{name}"
                if key in tensors:
                    table[layer] = tensors[key].to(device if kind != "born" else "cpu")
                else:
                    table.pop(layer, None)
        controller.generator.set_state(tensors["ctrl/generator"])
    stepper.history = [RankEvent(**e) for e in meta["rank_history"]]
    stepper.done = int(meta["step"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.device(stepper.device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], torch.device(stepper.device))
    return [(int(step), dict(metrics)) for step, metrics in meta["evals"]]


def optimizer_state_on(device: torch.device | str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One parameter's Adam state where its optimizer keeps it: tensors on ``device``, a scalar ``step`` on the CPU.

    Off the CPU torch's scalar ``step`` makes (non-capturable) Adam call ``.item()`` on it for every
    parameter at every step: a host sync each (review 2026-12, finding 7). ComponentAdamW's
    per-element step counts are tensors like the moments and live beside them.
    """
    return {key: value if key == "step" and value.dim() == 0 else value.to(device) for key, value in state.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_complete(path: Path, meta: dict[str, Any]) -> None:
    """Raise ValueError when ``state.safetensors`` is not the file ``state.json`` was written with."""
    expected = meta.get("sha256")
    if expected is not None and file_sha256(path / TENSORS) != expected:
        raise ValueError(f"{TENSORS} does not match its checksum (truncated or changed)")


@dataclass
class Snapshot:
    """A checkpoint read from disk, not yet applied."""

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path

    def restore(self, stepper) -> list[tuple[int, dict[str, float]]]:
        return restore(stepper, self.tensors, self.meta)


class TrialCheckpoint:
    """The checkpoints of one trial (and of its retries), in one folder."""

    def __init__(self, folder: str | Path, every: int, config_fingerprint: str):
        self.folder = Path(folder)
        self.every = every
        self.fingerprint = config_fingerprint
        self.saved_step: int | None = None

    def _steps(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name)

    def load(self) -> Snapshot | None:
        """The newest complete checkpoint that fits this trial's config, or None.

        A damaged one (truncated, bytes changed, a file missing) is skipped with one warning line:
        whatever the damage, the trial goes on from an older checkpoint or from step 0.
        """
        for path in reversed(self._steps()):
            try:
                meta = json.loads((path / META).read_text())
                if meta.get("format") != FORMAT:
                    continue
                if meta.get("fingerprint") != self.fingerprint:
                    log.warning("checkpoint %s belongs to another config; starting from step 0", path)
                    return None
                check_complete(path, meta)
                tensors = load_file(str(path / TENSORS))
                step = int(meta["step"])
            except Exception as exc:  # noqa: BLE001 - SafetensorError, JSON, missing keys: any damage
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.warning("skipping damaged checkpoint %s (%s); the run goes on from an earlier one or "
                            "from step 0", path, reason)
                continue
            return Snapshot(step=step, tensors=tensors, meta=meta, path=path)
        return None

    def after_eval(self, stepper, evals: list[tuple[int, dict[str, float]]]) -> None:
        """Save after every ``every``-th evaluation (not after the last step: the trial ends there)."""
        if self.every <= 0 or len(evals) % self.every or stepper.done >= stepper.cfg.training.steps:
            return
        self.save(stepper, evals)

    def save(self, stepper, evals: list[tuple[int, dict[str, float]]]) -> Path:
        tensors, meta = capture(stepper, evals)
        meta["fingerprint"] = self.fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{stepper.done:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt", "step": str(stepper.done)})
            meta["sha256"] = file_sha256(tmp / TENSORS)
            (tmp / META).write_text(json.dumps(meta, default=float))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._steps():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        self.saved_step = stepper.done
        return final

    def clear(self) -> None:
        """The trial is over: its checkpoints are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def folder_name(name: str) -> str:
    """``name`` as one folder name: other characters replaced (plus a hash of the name), never '.' or '..'."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if not safe.strip("."):  # '', '.', '..': a folder name that would not be a folder of its own
        safe = safe.replace(".", "_") or "_"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


class CheckpointStore:
    """Where a study's trials keep their checkpoints: ``ROOT/STUDY/trial-N``."""

    def __init__(self, root: str | Path, study_name: str, every: int):
        self.root = Path(root) / folder_name(study_name)
        self.every = every

    def for_trial(self, number: int, config: dict[str, Any]) -> TrialCheckpoint:
        return TrialCheckpoint(self.root / f"trial-{number}", self.every, fingerprint(config))


def train_checkpoint(out: str | Path, name: str, every: int, config: dict[str, Any]) -> TrialCheckpoint:
    """The checkpoints of one ``rankopt train`` run: ``OUT/checkpoints/train/NAME`` (NAME: the task's, or the run's)."""
    return TrialCheckpoint(Path(out) / "checkpoints" / "train" / folder_name(name), every, fingerprint(config))
