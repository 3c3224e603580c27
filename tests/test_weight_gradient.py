"""The probe's gradient pairs equal the dense weight gradient's SVD (projected off the adapter's span)."""

from __future__ import annotations

import torch
from torch import nn

from rankopt.adapters.layer import SVDLinear
from rankopt.adapters.weight_gradient import WeightGradientProbe


def dense_projected_gradient(layer: SVDLinear, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    weight = layer.base.weight
    weight.requires_grad_(True)
    loss = ((layer(x) - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, weight)
    weight.requires_grad_(False)
    bp = torch.linalg.qr(layer.lora_P.detach())[0]
    bq = torch.linalg.qr(layer.lora_Q.detach().T)[0]
    eye_out, eye_in = torch.eye(grad.shape[0]), torch.eye(grad.shape[1])
    return (eye_out - bp @ bp.T) @ grad @ (eye_in - bq @ bq.T)


def test_probe_pairs_match_the_dense_gradient_svd():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(20, 16), rank=3, scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_lam.normal_()
    x, target = torch.randn(4, 7, 20), torch.randn(4, 7, 16)
    expected = torch.linalg.svdvals(dense_projected_gradient(layer, x, target))
    probe = WeightGradientProbe({"l": layer}, max_tokens=1000, iters=30)
    probe.arm(k=3)
    ((layer(x) - target) ** 2).sum().backward()
    probe.disarm()
    pairs = probe.pairs[layer]
    assert torch.allclose(pairs.sigma, expected[:3], rtol=1e-3)
    dense = dense_projected_gradient(layer, x, target)
    assert torch.allclose(pairs.u.T @ dense @ pairs.v, torch.diag(pairs.sigma), atol=1e-3 * expected[0])
    # the directions are off the adapter's span, so growing along them keeps the layer function-preserving
    assert (layer.lora_P.detach().T @ pairs.u).abs().max() < 1e-4
    assert (layer.lora_Q.detach() @ pairs.v).abs().max() < 1e-4


def test_probe_ignores_evaluation_passes_and_subsamples_tokens():
    layer = SVDLinear(nn.Linear(12, 10), rank=2, scale=1.0)
    probe = WeightGradientProbe({"l": layer}, max_tokens=5)
    probe.arm(k=2)
    with torch.no_grad():
        layer(torch.randn(3, 12))
    assert not probe.pairs  # an evaluation pass records nothing
    probe.arm(k=2)
    layer(torch.randn(4, 6, 12)).sum().backward()
    assert probe.pairs[layer].u.shape == (10, 2) and probe.pairs[layer].v.shape == (12, 2)


def test_micro_batches_of_one_step_give_the_whole_steps_gradient():
    torch.manual_seed(1)
    layer = SVDLinear(nn.Linear(20, 16), rank=2, scale=1.0, generator=torch.Generator().manual_seed(0))
    x, target = torch.randn(8, 20), torch.randn(8, 16)
    whole = WeightGradientProbe({"l": layer}, iters=30)
    whole.arm(k=2)
    ((layer(x) - target) ** 2).sum().backward()
    expected = whole.pairs[layer].sigma  # read before the next passes: reading disarms the probe
    split = WeightGradientProbe({"l": layer}, iters=30)
    split.arm(k=2)
    for part in (slice(0, 3), slice(3, 8)):
        ((layer(x[part]) - target[part]) ** 2).sum().backward()
    assert torch.allclose(split.pairs[layer].sigma, expected, rtol=1e-4)


def test_a_non_finite_step_gives_no_pairs():
    layer = SVDLinear(nn.Linear(12, 10), rank=2, scale=1.0)
    probe = WeightGradientProbe({"l": layer})
    probe.arm(k=2)
    (layer(torch.randn(4, 12)).sum() * float("inf")).backward()
    assert not probe.pairs


def test_the_rows_kept_are_bounded_per_step_not_per_micro_batch():
    torch.manual_seed(2)
    layer = SVDLinear(nn.Linear(12, 10), rank=2, scale=1.0, generator=torch.Generator().manual_seed(0))
    probe = WeightGradientProbe({"l": layer}, max_tokens=6)
    probe.arm(k=2)
    for _ in range(3):  # three micro-batches of 4 x 5 rows: 60 rows in the step
        layer(torch.randn(4, 5, 12)).sum().backward()
        assert probe.kept_rows(layer) == 6
    assert probe.pairs[layer].sigma.shape == (2,)


def test_all_rows_kept_when_they_fit_and_the_sample_is_a_subset_of_them():
    torch.manual_seed(3)
    layer = SVDLinear(nn.Linear(12, 10), rank=2, scale=1.0, generator=torch.Generator().manual_seed(0))
    xs = [torch.randn(7, 12) for _ in range(3)]
    probe = WeightGradientProbe({"l": layer}, max_tokens=21)
    probe.arm(k=2)
    for x in xs:
        layer(x).pow(2).sum().backward()
    assert probe.kept_rows(layer) == 21
    kept = torch.cat([f.x for f in probe._rows[layer]])
    assert torch.equal(kept, torch.cat(xs))  # nothing dropped, in order


def tiny_llama_adapted(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankopt.adapters import adapt

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2))
    return adapt(model.train(), ["q_proj", "v_proj", "down_proj"], rank=2, alpha=4, seed=0)


def probed_step(checkpointing: bool, max_tokens: int):
    from rankopt.training.memory import enable_gradient_checkpointing

    adapted = tiny_llama_adapted()
    if checkpointing:
        enable_gradient_checkpointing(adapted.model)
    probe = WeightGradientProbe(adapted.adapters, max_tokens=max_tokens, iters=10)
    probe.arm(k=2)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    adapted.model(input_ids=ids, labels=ids).loss.backward()
    kept = {name: probe.kept_rows(layer) for name, layer in adapted.adapters.items()}
    return kept, {name: probe.pairs[layer].sigma for name, layer in adapted.adapters.items()}


def test_gradient_checkpointing_recompute_records_nothing():
    """The recompute forward inside backward would add a second copy of every layer's rows (without a
    gradient) and draw sample keys the run without checkpointing never draws."""
    plain_kept, plain = probed_step(checkpointing=False, max_tokens=10)
    kept, pairs = probed_step(checkpointing=True, max_tokens=10)
    assert set(kept.values()) == {10} and kept == plain_kept
    for name, sigma in plain.items():
        torch.testing.assert_close(pairs[name], sigma, rtol=1e-4, atol=1e-6)
    all_kept, _ = probed_step(checkpointing=True, max_tokens=1000)
    assert set(all_kept.values()) == {16}  # 2 x 8 tokens, once each
