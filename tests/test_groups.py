"""Same-shape batching: the grouped penalty and sensitivity equal the per-layer formulas exactly."""

from __future__ import annotations

import torch
from torch import nn

from rankopt.adapters.groups import (add_penalty_gradient, instant_sensitivity, orthogonality_penalty,
                                     same_shape_groups)
from rankopt.adapters import groups as groups_module, layer as layer_module
from rankopt.adapters.layer import ROUNDING_TOLERANCE, SVDLinear
from rankopt.controller.importance import SensitivityTracker
from rankopt.testing.host_syncs import StepCounter


def mixed_layers() -> list[SVDLinear]:
    """Two shapes, three ranks, random factors (not orthonormal) and random gradients."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for out_f, in_f, rank in [(24, 16, 3), (24, 16, 3), (24, 16, 5), (16, 40, 3), (16, 40, 3), (24, 16, 3)]:
        layer = SVDLinear(nn.Linear(in_f, out_f), rank, scale=2.0, generator=g)
        with torch.no_grad():
            for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
                p.grad = torch.randn(p.shape, generator=g)
        layers.append(layer)
    return layers


def test_groups_are_by_shape_and_rank_in_order():
    layers = mixed_layers()
    assert [[layers.index(l) for l in group] for group in same_shape_groups(layers)] == [[0, 1, 5], [2], [3, 4]]


def test_grouped_penalty_and_its_gradient_equal_the_per_layer_sum():
    layers = mixed_layers()
    params = [p for l in layers for p in (l.lora_P, l.lora_Q)]
    reference = torch.stack([l.orthogonality_penalty() for l in layers]).sum()
    ref_grads = torch.autograd.grad(reference, params)
    grouped = orthogonality_penalty(layers)
    grads = torch.autograd.grad(grouped, params)
    torch.testing.assert_close(grouped, reference)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_the_penalty_without_the_thresholds_sign_is_the_signed_forms_bit_for_bit(monkeypatch):
    """Only the square of the soft-thresholded deviation enters, so its sign (two kernels forward, three
    backward per term) was dropped: value and gradients, per layer and grouped, must not move by a bit."""
    layers = mixed_layers()
    params = [p for l in layers for p in (l.lora_P, l.lora_Q)]

    def penalties():
        per_layer = torch.stack([l.orthogonality_penalty() for l in layers]).sum()
        grouped = orthogonality_penalty(layers)
        return [(value, torch.autograd.grad(value, params)) for value in (per_layer, grouped)]

    now = penalties()
    signed = lambda d: torch.sign(d) * (d.abs() - ROUNDING_TOLERANCE).clamp_min(0)  # noqa: E731
    monkeypatch.setattr(layer_module, "beyond_rounding", signed)
    monkeypatch.setattr(groups_module, "beyond_rounding", signed)
    for (value, grads), (signed_value, signed_grads) in zip(now, penalties()):
        assert torch.equal(value, signed_value)
        assert all(torch.equal(a, b) for a, b in zip(grads, signed_grads))


def test_added_penalty_gradient_equals_backward_bit_for_bit():
    """Onto task gradients, and alone where a factor has none yet."""
    by_backward, added = mixed_layers(), mixed_layers()
    for layers in (by_backward, added):
        layers[1].lora_P.grad = layers[3].lora_Q.grad = None
    (0.3 * orthogonality_penalty(by_backward)).backward()
    add_penalty_gradient(added, 0.3)
    for a, b in zip(added, by_backward):
        for name in ("lora_P", "lora_lam", "lora_Q"):
            assert torch.equal(getattr(a, name).grad, getattr(b, name).grad), name


def test_added_penalty_gradient_launches_a_few_kernels_per_group_not_per_layer():
    """backward() added each factor's share to its .grad apart: two kernels more per layer."""
    def ops(copies: int) -> int:
        layers = [layer for _ in range(copies) for layer in mixed_layers()]  # the same 3 groups, bigger
        counter = StepCounter()
        counter.place(t for layer in layers for p in (layer.lora_P, layer.lora_lam, layer.lora_Q) for t in (p, p.grad))
        with counter.counting():
            add_penalty_gradient(layers, 0.1)
        return counter.totals()["ops"]

    assert ops(4) == ops(1) > 0


def test_grouped_sensitivity_and_foreach_ema_equal_the_per_layer_update():
    layers = mixed_layers()
    tracker = SensitivityTracker(0.85, 0.9)
    expected_ema, expected_unc = {}, {}
    for _ in range(3):
        tracker.update(layers)
        for l in layers:
            inst = ((l.lora_lam * l.lora_lam.grad).abs() + (l.lora_P * l.lora_P.grad).abs().mean(0)
                    + (l.lora_Q * l.lora_Q.grad).abs().mean(1)).detach()
            ema = expected_ema.get(l, torch.zeros_like(inst)) * 0.85 + 0.15 * inst
            expected_unc[l] = expected_unc.get(l, torch.zeros_like(inst)) * 0.9 + 0.1 * (inst - ema).abs()
            expected_ema[l] = ema
    for l in layers:
        torch.testing.assert_close(tracker.ema[l], expected_ema[l])
        torch.testing.assert_close(tracker.unc[l], expected_unc[l])
    assert [s.shape[0] for s in instant_sensitivity(layers)] == [l.rank for l in layers]


def test_layers_without_gradients_are_left_out():
    layers = mixed_layers()
    layers[2].lora_lam.grad = None
    tracker = SensitivityTracker(0.85, 0.85)
    tracker.update(layers)
    assert layers[2] not in tracker.ema and len(tracker.ema) == 5


def test_penalty_gradient_is_exactly_zero_on_factors_orthonormal_up_to_rounding():
    """Rounding-noise gradients would become ~lr-sized Adam steps on components whose lam is ~0."""
    g = torch.Generator().manual_seed(1)
    layer = SVDLinear(nn.Linear(384, 384), 8, scale=2.0, generator=g)
    with torch.no_grad():
        layer.lora_P.copy_(torch.linalg.qr(torch.randn(384, 8, generator=g))[0])
        layer.lora_Q.copy_(torch.linalg.qr(torch.randn(384, 8, generator=g))[0].T)
    deviation = (layer.lora_P.T @ layer.lora_P - torch.eye(8)).abs().max()
    assert 0 < deviation < 1e-5  # orthonormal to float rounding, not exactly
    grads = torch.autograd.grad(orthogonality_penalty([layer]), [layer.lora_P, layer.lora_Q])
    assert all(torch.count_nonzero(grad) == 0 for grad in grads)
    with torch.no_grad():
        layer.lora_P[:, 0] += 0.05 * layer.lora_P[:, 1]  # real drift is still pulled back
    assert torch.autograd.grad(orthogonality_penalty([layer]), [layer.lora_P])[0].abs().max() > 1e-3
