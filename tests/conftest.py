"""Shared fixtures: a tiny random BERT, its tokenizer, a tiny learnable task and a tiny Config.

Everything here is built in code from random weights (no download, no pretrained files), so the
unit tests run in seconds on a CPU. The task is synthetic but learnable: every sentence holds
filler words plus one marker word, ``good`` (label 1) or ``bad`` (label 0).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding

from rankopt.adapters.model import AdaptedModel, adapt
from rankopt.config import Config
from rankopt.controller import counted_in
from rankopt.tasks.data import TaskData
from tiny_project_support import tune_tiny_project

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = [f"w{i}" for i in range(40)]
MARKERS = {0: "bad", 1: "good"}
VOCAB = SPECIAL + FILLER + list(MARKERS.values())
# the default target_modules of rankopt: 6 linears per BERT layer, 12 on the 2-layer tiny model
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
N_TINY_ADAPTERS = 12


def tiny_bert_config(num_labels: int = 2) -> BertConfig:
    # initializer_range 0.2 (BERT's default is 0.02): with weights that small a 2-layer random
    # encoder barely mixes the tokens into [CLS], and the synthetic task would not be learnable
    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                      initializer_range=0.2)


def make_tiny_model(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    """A randomly initialised 2-layer BERT classifier (hidden 32), in eval mode."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels)).eval()


def make_tiny_adapted(seed: int = 0, rank: int = 4, alpha: float = 8.0) -> AdaptedModel:
    return adapt(make_tiny_model(seed), TARGETS, rank=rank, alpha=alpha, seed=seed)


def assert_size_of_uniform_rank(layers, mean_rank: float) -> None:
    """The default parameter budget was met: the adapters hold what every layer at ``mean_rank`` would
    (a LoRA of that rank, plus one lam per component), short of it by less than one component."""
    layers = list(layers)
    costs = [layer.in_features + layer.out_features + 1 for layer in layers]
    budget = counted_in(round(mean_rank * len(layers)), costs)
    spent = sum(layer.rank * cost for layer, cost in zip(layers, costs))
    assert budget - max(costs) < spent <= budget, (spent, budget)


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """``n`` rows ``{'text', 'label'}``: 3-8 filler words with the label's marker word somewhere."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), MARKERS[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tokenize_rows(tokenizer, rows: list[dict]) -> datasets.Dataset:
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=32)
    return datasets.Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})


def pytest_configure(config):
    """Under xdist (CI: two workers on two cores) every worker, and every process a test starts,
    computes on one thread: two threads per process oversubscribe the cores and slow both workers."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two fighting.

    Modules that train use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    return BertTokenizerFast(vocab=str(vocab_file))


@pytest.fixture
def tiny_model() -> BertForSequenceClassification:
    return make_tiny_model(0)


@pytest.fixture
def tiny_adapted() -> AdaptedModel:
    """The tiny BERT with rank-4 SVD adapters on its 12 target linears, head trainable."""
    return make_tiny_adapted(0)


@pytest.fixture(scope="session")
def tiny_task_data(tokenizer) -> TaskData:
    """64 training and 48 evaluation rows of the synthetic task, tokenized, with a padding collator."""
    return TaskData(train=tokenize_rows(tokenizer, synthetic_rows(64, seed=1)),
                    eval=tokenize_rows(tokenizer, synthetic_rows(48, seed=2)),
                    num_labels=2, label_names=None, collator=DataCollatorWithPadding(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A local transformers folder (config, random weights, tokenizer) that model.name can point at."""
    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    make_tiny_model(0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A local data folder (train.jsonl, validation.jsonl) of the synthetic task."""
    folder = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(folder / "train.jsonl", synthetic_rows(64, seed=1))
    write_jsonl(folder / "validation.jsonl", synthetic_rows(48, seed=2))
    return folder


@pytest.fixture
def tiny_preset(tiny_model_dir, tiny_data_dir) -> dict:
    """A whole preset as plain data: 30 steps, 12 layers from rank 4 down to a mean rank of 2."""
    return {
        "task": {"name": "tiny", "data_dir": str(tiny_data_dir), "text_columns": ["text"], "label_column": "label",
                 "metric": "accuracy", "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": 30, "batch_size": 8, "eval_batch_size": 64, "lr": 5e-3, "warmup_ratio": 0.0,
                     "eval_every": 10, "seed": 0},
        # a rank budget, so tests can state exact totals per reallocation (the default parameter budget is
        # checked where the default path runs: test_controller, test_gradient_init, test_quantization, ...)
        "controller": {"budget_unit": "rank", "importance": "sensitivity", "target_rank": 2, "min_rank": 1,
                       "max_rank": 8, "warmup": 0.1, "final": 0.2, "interval": 4, "max_grow": 2},
    }


@pytest.fixture
def tiny_config(tiny_preset) -> Config:
    return Config.model_validate(tiny_preset)


@pytest.fixture
def tiny_preset_file(tmp_path, tiny_preset) -> Path:
    """The tiny preset written as a .yml file, the way a user passes one to ``rankopt train``."""
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(tiny_preset))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    """The tiny project of ``tiny_project_support`` tuned once per test module (3 trials, a few seconds):
    ``root``, ``preset``, ``out``, ``result``, ``study``, ``model``, ``storage``, ``tracking``, ``client``.

    Per module, not per session: the tests of one module score and export its trials, and a module
    must not see what another one recorded on the study."""
    return tune_tiny_project(tmp_path_factory.mktemp("tiny"))
