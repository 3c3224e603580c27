"""The preset schema: one validated, fully resolved description of a job.

A preset is a YAML file (``search_spaces/NAME.yml`` or any path) with the sections
``task``, ``model``, ``adapter``, ``training``, ``controller`` and ``search``. Users change
single values with ``--set section.key=value``; every value is checked here, before
anything is loaded or written, so that bad input fails fast with one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rankopt.errors import RankoptError

PRESET_DIRS = (
    Path(__file__).resolve().parent / "search_spaces",  # installed wheel
    Path(__file__).resolve().parent.parent / "search_spaces",  # source checkout
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
CAUSAL_LM_METRICS = ("loss", "perplexity")


class TaskConfig(_Section):
    """What to learn, and where the data comes from (exactly one source).

    ``causal_lm`` tasks are instruction data: the model reads ``prompt_column`` and learns to
    continue with ``response_column``; the loss counts the response tokens only.
    """

    name: str = Field(description="short task name, used for MLflow experiments and studies")
    type: Literal["classification", "regression", "causal_lm"] = "classification"
    dataset: str | None = Field(None, description="hub dataset path, e.g. 'glue'")
    subset: str | None = Field(None, description="hub dataset config, e.g. 'sst2'")
    data_dir: str | None = Field(None, description="local folder of train/validation files")
    builtin: Literal["chatterbot", "chatterbot_dialogs", "chatterbot_chats"] | None = Field(
        None, description="data shipped by a dependency: topics (classification), reply pairs (causal_lm, "
        "prompt/response) or whole chats (causal_lm, a 'messages' column)")
    text_columns: list[str] = Field(default_factory=list, max_length=2, description="inputs of a classifier")
    label_column: str = "label"
    prompt_column: str = Field("prompt", description="causal_lm: the text the model is given")
    response_column: str = Field("response", description="causal_lm: the text it learns to write")
    messages_column: str | None = Field(None, description="causal_lm: a column of chats (lists of {role, "
                                        "content}) rendered with the tokenizer's chat template, loss on the "
                                        "assistant turns only; replaces prompt_column / response_column")
    packing: bool = Field(False, description="causal_lm: pack short training examples into max_length rows "
                          "(position ids restart per example, so no example attends to another)")
    num_labels: int | None = Field(None, ge=1, description="inferred from the data when unset")
    metric: Literal[CLASSIFICATION_METRICS + REGRESSION_METRICS + CAUSAL_LM_METRICS] = "accuracy"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = Field(
        "test", description="held-out split that scores the selected trial(s) once, after the study (never "
        "during it); the default 'test' is used when the data has a labelled one; null: none")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    max_test_samples: int | None = Field(None, ge=1, description="score on a seeded subsample (default: all)")
    max_length: int = Field(128, ge=8, le=4096)

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        sources = [s for s in (self.dataset, self.data_dir, self.builtin) if s]
        if len(sources) != 1:
            raise ValueError("set exactly one of task.dataset, task.data_dir, task.builtin")
        allowed = {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS,
                   "causal_lm": CAUSAL_LM_METRICS}[self.type]
        if self.metric not in allowed:
            raise ValueError(f"{self.type} tasks use metric {' or '.join(repr(m) for m in allowed)}")
        if self.type != "causal_lm" and not self.text_columns:
            raise ValueError(f"a {self.type} task needs task.text_columns (one or two input columns)")
        if self.type != "causal_lm" and (self.messages_column or self.packing):
            raise ValueError("task.messages_column and task.packing are for causal_lm tasks")
        return self

    def columns(self) -> list[str]:
        """The columns the data must have."""
        if self.type == "causal_lm":
            return [self.messages_column] if self.messages_column else [self.prompt_column, self.response_column]
        return [*self.text_columns, self.label_column]


class ModelConfig(_Section):
    """The pretrained model and which of its linear layers get adapters."""

    name: str = Field(description="hub id, local folder, or 'package/subfolder' shipped by a pip package")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["query", "key", "value", "attention.output.dense",
                                 "intermediate.dense", "output.dense"],
        description="module-name suffixes to adapt, or 'all-linear' (every linear but the head)",
    )
    trust_remote_code: bool = False
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base through bitsandbytes in nf4 (4bit) or int8 (8bit); "
        "needs the 'quant' extra. The adapters stay float32 over the dequantized matmul")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the frozen base weights; auto: as the checkpoint stores them. "
        "Adapters, head and optimizer state are float32 whatever this says")


class AdapterConfig(_Section):
    """Shape of each SVD adapter at the start of training."""

    init_rank: int = Field(16, ge=1, description="mean rank of the adapters at step 0 (the initial budget; 4x the "
                           "default target_rank: a wide start found where the rank was needed best)")
    alpha: float = Field(32.0, gt=0, description="scale = alpha / init_rank (alpha / sqrt(init_rank) with rslora), "
                         "the same for every layer whatever its rank becomes, fixed for the run")
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["gradient", "random"] = Field(
        "gradient", description="P, Q from the weight gradient's top pairs on the first batches (and the initial "
                                "budget split by them when the controller is on), or random directions")
    init_examples: int = Field(64, ge=1, description="training rows (packed rows with task.packing) in the gradient "
                               "pass of init: gradient, taken in micro-batches of training.batch_size")
    rslora: bool = Field(False, description="scale alpha / sqrt(init_rank) instead of alpha / init_rank")
    static_shapes: bool = Field(
        False, description="allocate every adapter at controller.max_rank once, with a mask of its live "
        "components: a reallocation changes values, never shapes, so torch.compile does not recompile (and CUDA "
        "graphs stay valid); same ranks and results as the default, at the memory of max_rank everywhere")


class TrainingConfig(_Section):
    """The optimisation loop."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, description="the micro-batch: examples per forward/backward")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (and per controller "
                                  "update and lr step): the batch is batch_size x grad_accum_steps")
    eval_batch_size: int | None = Field(None, ge=1, description="examples per evaluation forward; default 64, "
                                        "or batch_size for causal_lm (a decoder's eval must fit where training does)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward "
                                         "(non-reentrant): much less activation memory for ~30 % more compute")
    log_every: int = Field(10, ge=1, description="steps between reads of the training loss (each read makes "
                                  "the host wait for the device)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    orth_reg: float = Field(0.1, ge=0, description="weight of the orthogonality penalty on P and Q")
    eval_every: int = Field(50, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: forward and backward under autocast (fp16 with a loss scaler); "
        "the trained tensors stay float32")
    device: str = Field("cpu", pattern=r"^(cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$",
                        description="cpu, cuda, cuda:K (one GPU per worker), mps or xpu[:K]")


class ControllerConfig(_Section):
    """Rank reallocation: importance, budget schedule, per-layer bounds."""

    enabled: bool = True
    importance: Literal["sensitivity", "energy"] = Field(
        "energy", description="what decides which components stay: energy (the singular value |lam| |P| |Q| "
        "scale; it found where rank is needed on the planted-rank benchmark, BENCHMARKS.md) or sensitivity "
        "(AdaLoRA's)")
    target_rank: float = Field(4.0, gt=0, description="final mean rank per adapted layer (budget / layers)")
    budget_unit: Literal["rank", "params"] = Field(
        "params", description="what the budget counts: adapter parameters (the size of a uniform target_rank "
        "adapter, e.g. a LoRA of that rank; components compete by score per parameter), or total rank (every "
        "component alike, so the size follows where the rank goes)")
    min_rank: int = Field(0, ge=0, description="the fewest components a layer keeps; 0 lets a layer give up its "
                          "adapter (and grow one back later), so the controller also chooses where adapters go")
    max_rank: int = Field(32, ge=1)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps at the initial ranks")
    final: float = Field(0.2, ge=0, lt=1, description="fraction of steps at the final ranks")
    interval: int = Field(10, ge=1, description="steps between reallocations")
    max_grow: int = Field(2, ge=0, description="components a layer may gain per reallocation")
    min_age: int = Field(1, ge=0, description="reallocations a grown component survives before it can be pruned")
    growth: Literal["gradient", "random"] = Field(
        "gradient", description="new components along the weight gradient's top pairs off the span, or random")
    swap: float = Field(0.0, ge=0, lt=1, description="share of the budget moved at each reallocation to new "
                        "components where the weight gradient off each layer's span is steepest (RigL's grow "
                        "step, layers at rank 0 included), decaying to 0 by the final phase; 0: a layer grows "
                        "only when its weakest component beats the cut")
    probe_tokens: int = Field(512, ge=1, description="token rows per layer kept to find those pairs, for a whole "
                              "optimizer step (all its micro-batches) and for adapter.init: gradient's pass")
    beta1: float = Field(0.85, ge=0, lt=1, description="EMA of the sensitivity")
    beta2: float = Field(0.85, ge=0, lt=1, description="EMA of its uncertainty")

    @model_validator(mode="after")
    def _bounds(self) -> ControllerConfig:
        if self.min_rank > self.max_rank:
            raise ValueError("controller.min_rank must not exceed controller.max_rank")
        if not self.min_rank <= self.target_rank <= self.max_rank:
            raise ValueError(
                f"controller.target_rank={self.target_rank} must lie between min_rank={self.min_rank} "
                f"and max_rank={self.max_rank}")
        if self.warmup + self.final >= 1:
            raise ValueError("controller.warmup + controller.final must be below 1")
        return self


class Distribution(_Section):
    """One dimension of the search space, in Optuna's terms."""

    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs 'choices'")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} distribution needs low <= high")
        return self


class SearchConfig(_Section):
    """How Optuna searches: sampler, pruner, objectives, space (dotted config keys)."""

    sampler: Literal["tpe", "random", "nsga2", "cmaes", "gp"] = "tpe"
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    objectives: list[Literal["metric", "params"]] = Field(default_factory=lambda: ["metric"],
                                                          min_length=1, max_length=2)
    n_trials: int = Field(20, ge=0)
    startup_trials: int = Field(2, ge=0, description="trials before the pruner may stop one")
    prune_after: float = Field(0.25, ge=0, lt=1, description="fraction of a trial's steps before it may be "
                               "pruned: earlier evaluations fall in the learning-rate warmup and say little")
    space: dict[str, Distribution] = Field(default_factory=dict)
    heartbeat_interval: int = Field(60, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(180, ge=2, description="seconds without heartbeat before a trial counts as lost")
    max_retry: int = Field(2, ge=0, description="times a lost trial is retried (from its last checkpoint)")
    checkpoint_every: int = Field(1, ge=0, description="save a trial checkpoint every K evaluations (0: never)")

    @model_validator(mode="after")
    def _heartbeat(self) -> SearchConfig:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"search.grace_period={self.grace_period} must exceed "
                             f"search.heartbeat_interval={self.heartbeat_interval} (a few intervals is safe)")
        return self


class Config(_Section):
    """A whole job."""

    task: TaskConfig
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    training: TrainingConfig = TrainingConfig()
    controller: ControllerConfig = ControllerConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _ranks(self) -> Config:
        c = self.controller
        if not c.min_rank <= self.adapter.init_rank <= c.max_rank:
            raise ValueError(f"adapter.init_rank={self.adapter.init_rank} must lie between "
                             f"controller.min_rank={c.min_rank} and controller.max_rank={c.max_rank}")
        for key in self.search.space:
            _check_key(self.model_dump(), key)
        if self.training.eval_batch_size is None:
            self.training.eval_batch_size = self.training.batch_size if self.task.type == "causal_lm" else 64
        return self

    def budget(self, n_layers: int) -> tuple[int, int]:
        """Initial and final total rank for a model with ``n_layers`` adapters."""
        initial = self.adapter.init_rank * n_layers
        if not self.controller.enabled:
            return initial, initial
        target = round(self.controller.target_rank * n_layers)
        if target < n_layers * self.controller.min_rank:
            raise RankoptError(
                f"rank budget {target} is below {n_layers} layers x min_rank {self.controller.min_rank}; "
                "raise controller.target_rank or lower controller.min_rank")
        return initial, target


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    names: set[str] = set()
    for folder in PRESET_DIRS:
        names.update(p.stem for p in folder.glob("*.yml"))
    return sorted(names)


def find_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yml", ".yaml"):
        if not path.is_file():
            raise RankoptError(f"preset file '{name_or_path}' does not exist; check the path")
        return path
    for folder in PRESET_DIRS:
        candidate = folder / f"{name_or_path}.yml"
        if candidate.is_file():
            return candidate
    raise RankoptError(
        f"unknown preset '{name_or_path}'; use one of {', '.join(preset_names())} or a path to a .yml file")


def _check_key(tree: dict, dotted: str) -> None:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"unknown config key '{dotted}'")
        node = node[part]


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; the section path must exist (keys are checked by pydantic)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RankoptError(f"unknown config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``['training.lr=1e-3', ...]`` -> ``{'training.lr': 0.001}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RankoptError(f"--set '{pair}' is not KEY=VALUE; write e.g. --set training.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(raw.strip()):
            value = float(value)  # YAML 1.1 reads '1e-3' (no dot) as a string
        out[key.strip()] = value
    return out


def build_config(raw: dict, overrides: dict[str, Any] | None = None, origin: str = "preset") -> Config:
    """Validate a raw preset dict plus dotted overrides into a :class:`Config`."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise RankoptError(f"{origin}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{where}'; check the spelling against the preset's sections"
    if err["type"] == "missing":
        return f"missing config key '{where}'; add it to the preset or pass --set {where}=..."
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    if err["type"] == "string_pattern_mismatch" and where.endswith(".device"):
        return f"{where} must be cpu, cuda, cuda:K, mps, xpu or xpu:K{shown}"
    return f"{where}: {msg}{shown}" if where else msg


def load_config(preset: str, overrides: dict[str, Any] | list[str] | None = None,
                data_dir: str | None = None) -> Config:
    """Read a preset by name or path, apply overrides and ``--data``, and validate it."""
    path = find_preset(preset)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise RankoptError(f"preset {path} is not a UTF-8 text file; pass a YAML preset") from None
    except yaml.YAMLError as exc:
        where = ""
        if getattr(exc, "problem_mark", None) is not None:
            lines = text.splitlines()
            number = yaml_mistake_line(exc, lines)
            shown = lines[number].strip()[:80] if number < len(lines) else ""
            where = f" at line {number + 1}" + (f" ({shown})" if shown else "")
        problem = getattr(exc, "problem", None)
        raise RankoptError(f"preset {path} is not valid YAML{where}{f': {problem}' if problem else ''}; "
                           "fix the syntax") from None
    if not isinstance(raw, dict):
        raise RankoptError(f"preset {path} must be a mapping of sections (task, model, ...)")
    return build_config(raw, combine_overrides(overrides, data_dir), origin=f"preset '{preset}'")


def yaml_mistake_line(exc: yaml.MarkedYAMLError, lines: list[str]) -> int:
    """The line (0-based) a YAML syntax error most likely comes from.

    PyYAML marks where it noticed the problem, which is often the line after the mistake: a key
    missing its colon, or a stray dash, parses fine on its own line and breaks the next one.
    An unclosed quote, bracket or key is named where it opened. Otherwise the line (of the last
    content line before the mark, and the mark's own) whose removal lets the whole file parse
    is the mistake; when neither does, the mark's line.
    """
    mark, opened = exc.problem_mark, getattr(exc, "context_mark", None)
    if opened is not None and (getattr(exc, "context", None) or "").startswith("while scanning"):
        return opened.line
    before = next((i for i in range(min(mark.line, len(lines)) - 1, -1, -1)
                   if lines[i].strip() and not lines[i].lstrip().startswith("#")), None)
    for candidate in (before, mark.line):
        if candidate is not None and candidate < len(lines):
            try:
                yaml.safe_load("\n".join(lines[:candidate] + lines[candidate + 1:]))
                return candidate
            except yaml.YAMLError:
                continue
    return mark.line


def combine_overrides(overrides: dict[str, Any] | list[str] | None, data_dir: str | None) -> dict[str, Any]:
    """``--set`` pairs (parsed if given as strings) plus what ``--data DIR`` means: read that folder instead."""
    combined = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise RankoptError(f"--data '{data_dir}' is not a folder; point it at a folder of train/validation files")
        combined.update({"task.data_dir": str(Path(data_dir).resolve()), "task.dataset": None,
                         "task.subset": None, "task.builtin": None})
    return combined


def resolve_config(preset: str | Config, overrides: dict[str, Any] | list[str] | None = None,
                   data_dir: str | None = None) -> Config:
    """A validated config from a preset name/path or a Config, with ``--set`` overrides and ``--data``."""
    if not isinstance(preset, Config):
        return load_config(preset, overrides, data_dir)
    if not overrides and not data_dir:
        return preset
    return build_config(preset.model_dump(), combine_overrides(overrides, data_dir))
