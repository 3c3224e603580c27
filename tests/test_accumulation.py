"""Gradient accumulation: K micro-batches of B are one step of K x B, ranks and weights included."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from rankopt.adapters import adapt
from rankopt.config import build_config
from rankopt.tasks.data import TaskData
from rankopt.training.accumulation import micro_batch_weights
from rankopt.training.trainer import train_adapted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0)
    return LlamaForCausalLM(config).train()


def pad_collate(rows: list[dict]) -> dict:
    """Right padding: pad id 0, label -100, attention mask 0."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        out["input_ids"].append(r["input_ids"] + [0] * pad)
        out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        out["labels"].append(r["labels"] + [-100] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


def lm_rows(n: int, seed: int) -> datasets.Dataset:
    """Prompts of 3-10 tokens, responses of 1-12 (a copy of the prompt's start): uneven targets per row."""
    rng = random.Random(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 10))]
        response = (prompt * 4)[:rng.randint(1, 12)]
        rows["input_ids"].append(prompt + response)
        rows["labels"].append([-100] * len(prompt) + response)
    return datasets.Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def lm_data() -> TaskData:
    return TaskData(train=lm_rows(64, 1), eval=lm_rows(24, 2), num_labels=0, label_names=None, collator=pad_collate)


def lm_config(**training):
    return build_config({
        "task": {"name": "accum", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss"},
        "model": {"name": "tiny-llama", "target_modules": LLAMA_TARGETS},
        "adapter": {"init_rank": 4, "alpha": 8},
        "training": {"steps": 24, "lr": 1e-2, "warmup_ratio": 0.0, "eval_every": 12, "seed": 0, **training},
        "controller": {"target_rank": 2, "max_rank": 8, "interval": 4, "warmup": 0.1, "final": 0.2},
    })


def run(cfg, data):
    adapted = adapt(tiny_llama(0), LLAMA_TARGETS, 4, 8, seed=0)
    return train_adapted(cfg, adapted, data), adapted


def first_step_gradients(data, batch_size, accum):
    from rankopt.training.trainer import Stepper, seeded_batches

    adapted = adapt(tiny_llama(0), LLAMA_TARGETS, 4, 8, seed=0)
    stepper = Stepper(lm_config(batch_size=batch_size, grad_accum_steps=accum, orth_reg=0.0), adapted)
    batches = seeded_batches(data, batch_size, 0)
    loss = stepper._accumulate([next(batches) for _ in range(accum)])
    lam_grads = [layer.lora_lam.grad.clone() for layer in adapted.adapters.values()]  # lam = 0: only lam moves
    return float(loss), lam_grads


def test_two_micro_batches_of_8_give_the_gradient_of_one_batch_of_16(lm_data):
    whole_loss, whole = first_step_gradients(lm_data, 16, 1)
    accum_loss, accum = first_step_gradients(lm_data, 8, 2)
    assert accum_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, w in zip(accum, whole):
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-5)


def exact(cfg):
    """No token subsampling in the gradient probe: what is left differs between 1 x 16 and 2 x 8
    only by float rounding. The orthogonality penalty stays on: it ignores rounding-sized
    deviations, so its gradient is not rounding noise that Adam would blow up into ~0.1 lr steps
    (before that threshold, these two runs drifted apart by ~1e-3)."""
    cfg.controller.probe_tokens = 10**6
    return cfg


def test_two_micro_batches_of_8_train_like_one_batch_of_16(lm_data):
    whole, whole_model = run(exact(lm_config(batch_size=16, grad_accum_steps=1)), lm_data)
    accum, accum_model = run(exact(lm_config(batch_size=8, grad_accum_steps=2)), lm_data)
    assert len(accum.rank_history) > 2  # the controller reallocated: same steps, same budgets, same layers
    assert [e.ranks for e in accum.rank_history] == [e.ranks for e in whole.rank_history]
    for name, layer in whole_model.adapters.items():  # measured: 5e-8 apart after 24 steps
        torch.testing.assert_close(accum_model.adapters[name].delta_weight(), layer.delta_weight(), atol=1e-6,
                                   rtol=0)
    assert accum.metrics["loss"] == pytest.approx(whole.metrics["loss"], rel=1e-4)


def test_causal_lm_weights_follow_target_tokens_not_micro_batches():
    short = {"labels": torch.tensor([[-100, 5, -100, -100]])}  # one target (t=1 predicted from t=0)
    long = {"labels": torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, 9]])}  # five targets
    assert micro_batch_weights([short, long], causal_lm=True) == pytest.approx([1 / 6, 5 / 6])
    assert micro_batch_weights([short, long], causal_lm=False) == pytest.approx([1 / 3, 2 / 3])
    assert micro_batch_weights([{"labels": torch.tensor([[-100, -100]])}], causal_lm=True) == [0.0]


def test_accumulation_is_one_optimizer_and_schedule_step_per_k_micro_batches(lm_data):
    cfg = lm_config(batch_size=4, grad_accum_steps=3, steps=5, eval_every=5)
    cfg.adapter.init = "random"  # the gradient start's one extra forward is not a training micro-batch
    adapted = adapt(tiny_llama(0), LLAMA_TARGETS, 4, 8, seed=0)
    calls = []
    model_forward = adapted.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return model_forward(*args, **kwargs)

    adapted.model.forward = counting_forward
    result = train_adapted(cfg, adapted, lm_data)
    assert result.steps == 5
    train_calls = calls[:15]
    assert train_calls == [4] * 15  # 5 steps x 3 micro-batches of 4


def test_targets_are_counted_where_the_batch_lies_never_copied_to_the_host():
    from rankopt.training.accumulation import target_count

    labels = torch.tensor([[-100, 5, -100, 7], [-100, -100, 8, 9]])
    host = target_count({"labels": labels}, causal_lm=True)
    assert host == 4 and type(host) is int  # a host batch: a plain int, no device involved
    on_device = {"labels": labels.to("meta")}  # a device batch (CUDA in the GPU benchmark); meta has no data
    count = target_count(on_device, causal_lm=True)
    assert torch.is_tensor(count) and count.device.type == "meta"
    weights = micro_batch_weights([on_device, on_device], causal_lm=True)
    assert all(torch.is_tensor(w) and w.device.type == "meta" for w in weights)
