"""adapter.init: gradient — adapters start along each layer's weight-gradient top pairs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TARGETS, make_tiny_adapted, make_tiny_model
from rankopt.adapters.model import adapt
from rankopt.config import build_config
from rankopt.adapters.weight_gradient import WeightGradientProbe
from rankopt.training.gradient_init import gradient_start


def lam_gradients(adapted, batch) -> dict[str, torch.Tensor]:
    adapted.model.eval()
    adapted.model(**batch).loss.backward()
    grads = {n: layer.lora_lam.grad.detach().clone() for n, layer in adapted.adapters.items()}
    adapted.model.zero_grad(set_to_none=True)
    return grads


def init_batch(cfg, data):
    gen = torch.Generator().manual_seed(cfg.training.seed + 65537)
    rows = torch.randperm(len(data.train), generator=gen)[: cfg.adapter.init_examples].tolist()
    return data.collator([data.train[i] for i in rows])


def test_the_start_is_steeper_than_random_and_keeps_the_budget(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"adapter.init_examples": 32})
    random_start, gradient = make_tiny_adapted(0), make_tiny_adapted(0)
    batch = init_batch(cfg, tiny_task_data)
    ranks = gradient_start(cfg, gradient, tiny_task_data)
    assert sum(ranks.values()) == cfg.budget(len(ranks))[0]  # the initial budget, split by the gradient
    assert len(set(ranks.values())) > 1
    steep = lam_gradients(gradient, batch)
    flat = lam_gradients(random_start, batch)
    # dL/dlam_i = scale * sigma_i: the top pair of each layer beats every random direction
    wins = sum(steep[n].abs().max() > flat[n].abs().max() for n in steep)
    assert wins == len(steep)
    for layer in gradient.adapters.values():  # P, Q orthonormal, lam = 0: the function is unchanged
        assert torch.allclose(layer.lora_P.T @ layer.lora_P, torch.eye(layer.rank), atol=1e-4)
        assert torch.allclose(layer.lora_Q @ layer.lora_Q.T, torch.eye(layer.rank), atol=1e-4)
        assert torch.equal(layer.lora_lam.detach(), torch.zeros(layer.rank))


def test_without_the_controller_every_layer_keeps_init_rank_and_rslora_scales_by_sqrt(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"controller.enabled": False, "adapter.rslora": True})
    a = cfg.adapter
    adapted = adapt(make_tiny_model(0), TARGETS, rank=a.init_rank, alpha=a.alpha, seed=0, rslora=True)
    ranks = gradient_start(cfg, adapted, tiny_task_data)
    assert set(ranks.values()) == {cfg.adapter.init_rank}
    assert all(math.isclose(layer.scale, cfg.adapter.alpha / math.sqrt(cfg.adapter.init_rank))
               for layer in adapted.adapters.values())


def test_a_params_budget_start_spends_the_size_of_a_uniform_adapter(tiny_config, tiny_task_data):
    cfg = build_config(tiny_config.model_dump(), {"adapter.init_examples": 32, "controller.budget_unit": "params"})
    adapted = make_tiny_adapted(0)
    ranks = gradient_start(cfg, adapted, tiny_task_data)
    costs = {n: layer.in_features + layer.out_features + 1 for n, layer in adapted.adapters.items()}
    uniform = cfg.adapter.init_rank * sum(costs.values())
    spent = sum(ranks[n] * costs[n] for n in ranks)
    assert uniform - max(costs.values()) < spent <= uniform
    # the tiny BERT's feed-forward linears cost 1.5x its attention ones (97 vs 65 per component)
    assert len(set(costs.values())) > 1 and len(set(ranks.values())) > 1


def test_every_layer_keeps_one_scale_whatever_rank_the_split_gives_it(tiny_config, tiny_task_data):
    # each component's lam moves by about lr per Adam step, so a per-layer alpha / rank would make the
    # layers the gradient split favours learn the slowest; the scale stays alpha / init_rank for all
    cfg = build_config(tiny_config.model_dump(), {"adapter.init_examples": 32})
    adapted = make_tiny_adapted(0)
    ranks = gradient_start(cfg, adapted, tiny_task_data)
    assert len(set(ranks.values())) > 1
    assert {layer.scale for layer in adapted.adapters.values()} == {cfg.adapter.alpha / cfg.adapter.init_rank}


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama_adapted(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2,
                                         attention_dropout=0.1, pad_token_id=0))
    return adapt(model, LLAMA_TARGETS, rank=4, alpha=8, seed=0)


@pytest.fixture(scope="session")
def packed_lm_data(vocab_file):
    """Prompt/response token rows packed into rows of up to 48 tokens; evaluation rows padded, one per row."""
    import random

    import datasets
    from transformers import BertTokenizerFast, DataCollatorForSeq2Seq

    from rankopt.tasks.data import TaskData
    from rankopt.tasks.packing import PackedCollator, pack

    rng = random.Random(0)
    rows = {"input_ids": [], "labels": []}
    for _ in range(48):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(3, 10))]
        response = (prompt * 3)[:rng.randint(2, 10)]
        rows["input_ids"].append(prompt + response)
        rows["labels"].append([-100] * len(prompt) + response)
    plain = datasets.Dataset.from_dict(rows)
    collator = DataCollatorForSeq2Seq(BertTokenizerFast(vocab_file=str(vocab_file)), label_pad_token_id=-100,
                                      padding=True)
    return TaskData(train=pack(plain, 48), eval=plain, num_labels=0, label_names=None, collator=collator,
                    train_collator=PackedCollator(0))


def llama_config(**over):
    raw = {"task": {"name": "init", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss",
                    "packing": True, "max_length": 48},
           "model": {"name": "tiny-llama", "target_modules": LLAMA_TARGETS},
           "adapter": {"init_rank": 4, "alpha": 8, "init_examples": 6},
           "training": {"batch_size": 2, "gradient_checkpointing": True, "precision": "bf16"},
           "controller": {"target_rank": 2, "max_rank": 8, "probe_tokens": 16}}
    return build_config(raw, over)


def test_the_pass_on_packed_rows_is_a_training_step_in_micro_batches(packed_lm_data):
    """Packed rows go through the training collator (the padding one refuses their position ids), in
    micro-batches of training.batch_size with checkpointing on and bf16 autocast, and the LM head sees
    chunks of target tokens only: never (batch, seq, vocab) logits of the whole pass."""
    cfg = llama_config()
    adapted = tiny_llama_adapted()
    layer_calls, head_inputs = [], []
    adapted.model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, args, out: layer_calls.append((args[0].shape[0], torch.is_autocast_enabled("cpu"))))
    adapted.model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(tuple(args[0].shape)))
    rng_before = torch.get_rng_state()
    ranks = gradient_start(cfg, adapted, packed_lm_data)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the pass's dropout draws from its own stream
    assert len(set(ranks.values())) > 1  # the initial budget split by what the pass found
    # 6 rows in micro-batches of 2; attention runs twice per micro-batch (forward, then its recompute)
    assert [rows for rows, _ in layer_calls] == [2] * 6 and all(autocast for _, autocast in layer_calls)
    assert head_inputs and all(len(shape) == 2 for shape in head_inputs)  # target positions, not (batch, seq)
    assert adapted.model.is_gradient_checkpointing


class CountingProbe(WeightGradientProbe):
    """The real probe, noting the most rows it held for any layer."""

    most = 0

    def _record(self, layer, args, output):
        super()._record(layer, args, output)
        CountingProbe.most = max(CountingProbe.most, self.kept_rows(layer))


def test_the_pass_keeps_at_most_probe_tokens_rows_per_layer(packed_lm_data, monkeypatch):
    from rankopt.training import gradient_init

    monkeypatch.setattr(gradient_init, "WeightGradientProbe", CountingProbe)
    CountingProbe.most = 0
    gradient_start(llama_config(**{"training.gradient_checkpointing": False}), tiny_llama_adapted(), packed_lm_data)
    assert CountingProbe.most == 16  # 6 rows of ~40 tokens seen; controller.probe_tokens kept
