"""The rank controller attached to a plain transformers Trainer."""

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from rankopt.adapters import adapt
from rankopt.hf_callback import RankControllerCallback


def test_trainer_callback_reallocates_to_budget_and_keeps_optimizer_consistent(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    adapted = adapt(model, ["query", "value", "intermediate.dense"], rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (64, 12), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 64,
                                     "labels": (ids[:, 0] > 50).long().tolist()})
    callback = RankControllerCallback(adapted, target_rank=2, max_rank=8, interval=2, warmup=0.1, final=0.2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()

    assert adapted.total_rank() == 2 * len(adapted.adapters)  # the final budget, exactly
    assert len(callback.history) > 2 and len({tuple(e.ranks.values()) for e in callback.history}) > 1
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in adapted.adapter_parameters())
    for p in adapted.adapter_parameters():
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
