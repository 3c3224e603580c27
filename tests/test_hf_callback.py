"""The rank controller attached to a plain transformers Trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from conftest import assert_size_of_uniform_rank
from rankopt.adapters import adapt
from rankopt.training.hf_callback import RankControllerCallback


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

    assert_size_of_uniform_rank(adapted.adapters.values(), 2)  # the final (parameter) budget
    assert len(callback.history) > 2 and len({tuple(e.ranks.values()) for e in callback.history}) > 1
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in adapted.adapter_parameters())
    for p in adapted.adapter_parameters():
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape


def _train_tiny(tmp_path, steps: int, lr: float, max_grad_norm: float, **callback_args):
    """The tiny BERT (no dropout) in a Trainer with the controller; returns (callback, adapted, args)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    adapted = adapt(model, ["query", "value", "intermediate.dense"], rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lam starts at 0, where no gradient reaches P and Q: start as if trained a while
        for layer in adapted.adapters.values():
            layer.lora_lam.normal_(generator=g)
    ids = torch.randint(1, 100, (64, 12), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 64,
                                     "labels": (ids[:, 0] > 50).long().tolist()})
    callback = RankControllerCallback(adapted, target_rank=2, max_rank=8, interval=2, warmup=0.5, final=0.2,
                                      **callback_args)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=lr, max_grad_norm=max_grad_norm, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, warmup_steps=0, lr_scheduler_type="constant")
    Trainer(model=adapted.model, args=args, train_dataset=ds, callbacks=[callback]).train()
    return callback, adapted, args


def test_the_controller_reads_the_gradient_before_the_trainer_clips_it(tmp_path):
    """With lr 0 nothing moves, so clipping (max_grad_norm tiny: every step clipped) must not change
    what the sensitivity saw; the Trainer clips before on_pre_optimizer_step, so the callback clips."""
    clipped, _, args = _train_tiny(tmp_path / "a", steps=4, lr=0.0, max_grad_norm=1e-4, orth_reg=0.0)
    unclipped, _, _ = _train_tiny(tmp_path / "b", steps=4, lr=0.0, max_grad_norm=0.0, orth_reg=0.0)
    assert args.max_grad_norm == 1e-4  # the user's value is back after training
    seen = [torch.cat(list(cb.controller.tracker.ema.values())) for cb in (clipped, unclipped)]
    assert seen[1].abs().max() > 0
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-5, atol=0)


def test_the_orthogonality_penalty_is_applied(tmp_path):
    from rankopt.adapters.model import orthogonality_penalty

    _, plain, _ = _train_tiny(tmp_path / "a", steps=12, lr=1e-2, max_grad_norm=1.0, orth_reg=0.0)
    _, penalised, _ = _train_tiny(tmp_path / "b", steps=12, lr=1e-2, max_grad_norm=1.0, orth_reg=10.0)
    assert orthogonality_penalty(penalised) < 0.5 * orthogonality_penalty(plain)


@pytest.mark.integration
def test_example_script_trains_in_a_trainer_and_peft_reloads_its_adapter(tmp_path):
    """examples/trainer_callback.py on the real MiniLM: final budget met, PEFT reproduces the logits."""
    script = Path(__file__).resolve().parents[1] / "examples" / "trainer_callback.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per xdist worker: two oversubscribe the 2 cores
    proc = subprocess.run([sys.executable, str(script), "--steps", "20", "--target-rank", "3", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    # the default parameter budget: a uniform rank-3 adapter's size, within one (feed-forward) component;
    # per MiniLM block 4 attention linears of 384 + 384 + 1 and 2 feed-forward ones of 384 + 1536 + 1
    assert figures["layers"] == 36
    uniform = 3 * 6 * (4 * 769 + 2 * 1921)
    assert uniform - 1921 < figures["adapter_params"] <= uniform
    assert figures["reallocations"] >= 1
    assert figures["peft_max_abs_logit_gap"] < 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["modules_to_save"] == ["classifier"]
