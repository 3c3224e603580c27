"""Run by ``test_data_parallel`` under torchrun (or not).

``python data_parallel_support.py PRESET OUT [--set k=v ...]``: one tiny fine-tune through
:func:`rankopt.train`; each process then writes what it saw (every step's loss, the ranks at
every reallocation, the final metrics) and its final adapter and head tensors to
``OUT/rank{R}of{W}/``, so the test can compare the processes with each other and with a
single-process run.

``python data_parallel_support.py hf OUT``: a ``transformers.Trainer`` with the rank controller's
callback, which must refuse to run data-parallel.

``python data_parallel_support.py tune-fail PRESET OUT``: a study whose first trial fails on rank 0
alone (an OSError at its first evaluation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import rankopt
from rankopt import distributed
from rankopt.training.events import Callback


class StepLosses(Callback):
    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_step(self, step: int, loss: float) -> None:
        self.values[step] = float(loss)


def main(preset: str, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    losses = StepLosses()
    result = rankopt.train(preset, overrides, track=False, callbacks=[losses])
    procs = distributed.current()
    dest = Path(out) / f"rank{procs.rank}of{procs.world}"
    dest.mkdir(parents=True)
    trained = {name: p.detach().contiguous() for name, p in result.adapted.model.named_parameters() if p.requires_grad}
    save_file(trained, str(dest / "trained.safetensors"))
    (dest / "result.json").write_text(json.dumps({
        "losses": losses.values, "metrics": result.metrics,
        "history": [[event.step, event.ranks] for event in result.rank_history],
        "rng_draw": torch.rand(4).tolist()}))  # where this process's dropout stream ended
    distributed.shutdown()


class DiskFullOnRank0(Callback):
    """Fails rank 0 alone at the first evaluation, as a full disk under its checkpoint would."""

    def on_eval(self, step: int, metrics: dict) -> None:
        if distributed.current().main:
            raise OSError(28, "No space left on device")


def tune_failing_on_rank_0(preset: str, out: str) -> None:
    torch.set_num_threads(1)
    rankopt.tune(preset, out=out, track=False, callbacks_for_trial=lambda trial, cfg: [DiskFullOnRank0()])


def trainer_with_callback(out: str) -> None:
    import datasets
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from rankopt.adapters import adapt
    from rankopt.training.hf_callback import RankControllerCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    adapted = adapt(model, ["query", "value"], rank=4, alpha=8)
    ids = torch.randint(1, 100, (32, 12), generator=torch.Generator().manual_seed(0))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 32,
                                     "labels": (ids[:, 0] > 50).long().tolist()})
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
    callback = RankControllerCallback(adapted, target_rank=2, max_rank=8, interval=2, warmup=0.1, final=0.2)
    Trainer(model=adapted.model, args=args, train_dataset=ds, callbacks=[callback]).train()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "hf":
        trainer_with_callback(args[1])
        sys.exit(0)
    if args[0] == "tune-fail":
        tune_failing_on_rank_0(args[1], args[2])
        sys.exit(0)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    main(args[0], args[1], overrides)
