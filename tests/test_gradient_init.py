"""adapter.init: gradient — adapters start along each layer's weight-gradient top pairs."""

from __future__ import annotations

import math

import torch

from conftest import TARGETS, make_tiny_adapted, make_tiny_model
from rankopt.adapters.model import adapt
from rankopt.config import build_config
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
