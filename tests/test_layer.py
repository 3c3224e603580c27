"""SVDLinear (one adapter in SVD form) and its injection into a model (rankopt.adapters)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import N_TINY_ADAPTERS, TARGETS, make_tiny_model
from rankopt.adapters.layer import SVDLinear, take_components
from rankopt.adapters.model import adapt, find_targets, orthogonality_penalty
from rankopt.errors import RankoptError

OUT_F, IN_F = 12, 10


def make_layer(rank: int = 5, seed: int = 0, scale: float = 2.0, skew: float = 0.0) -> SVDLinear:
    """A layer with random non-zero lam; ``skew`` > 0 makes P and Q non-orthonormal."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = SVDLinear(nn.Linear(IN_F, OUT_F), rank, scale=scale, generator=gen)
    with torch.no_grad():
        layer.lora_lam.copy_(torch.randn(rank, generator=gen))
        layer.lora_P.add_(skew * torch.randn(layer.lora_P.shape, generator=gen))
        layer.lora_Q.add_(skew * torch.randn(layer.lora_Q.shape, generator=gen))
    return layer


def inputs(n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, IN_F, generator=torch.Generator().manual_seed(seed))


def test_new_adapter_leaves_output_unchanged_and_freezes_base():
    torch.manual_seed(0)
    base = nn.Linear(IN_F, OUT_F)
    expected = base(inputs()).detach()
    layer = SVDLinear(base, rank=4, scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(inputs()), expected)  # lam starts at 0
    assert all(not p.requires_grad for p in layer.base.parameters())
    assert all(p.requires_grad for p in (layer.lora_P, layer.lora_lam, layer.lora_Q))
    assert layer.lora_P.shape == (OUT_F, 4) and layer.lora_Q.shape == (4, IN_F) and layer.rank == 4
    eye = torch.eye(4)
    assert torch.allclose(layer.lora_P.T @ layer.lora_P, eye, atol=1e-5)
    assert torch.allclose(layer.lora_Q @ layer.lora_Q.T, eye, atol=1e-5)


@pytest.mark.parametrize("rank", [-1, IN_F + 1])
def test_rank_outside_layer_size_is_rejected(rank):
    with pytest.raises(ValueError):
        SVDLinear(nn.Linear(IN_F, OUT_F), rank, scale=1.0)


def test_forward_is_base_plus_delta_weight():
    layer = make_layer(skew=0.3)
    x = inputs()
    expected = layer.base(x) + x @ layer.delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_prune_of_zero_importance_components_keeps_output():
    layer = make_layer(rank=6, skew=0.2)
    with torch.no_grad():
        layer.lora_lam[[1, 4]] = 0.0
    old = {n: getattr(layer, n).detach().clone() for n in ("lora_P", "lora_lam", "lora_Q")}
    x = inputs()
    before = layer(x).detach()
    keep = torch.tensor([0, 2, 3, 5])
    layer.resize(keep, n_new=0)
    assert layer.rank == 4
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-6)
    # survivors are exact copies of the old components, in order
    assert torch.equal(layer.lora_P, old["lora_P"][:, keep])
    assert torch.equal(layer.lora_lam, old["lora_lam"][keep])
    assert torch.equal(layer.lora_Q, old["lora_Q"][keep])


def test_prune_of_a_live_component_removes_exactly_its_contribution():
    """The control for the test above: pruning is not a no-op, it drops one rank-one term."""
    layer = make_layer(rank=5, skew=0.2)
    x = inputs()
    before = layer(x).detach()
    with torch.no_grad():
        term = layer.scale * layer.lora_lam[2] * (x @ layer.lora_Q[2])[:, None] * layer.lora_P[:, 2]
    layer.resize(torch.tensor([0, 1, 3, 4]), n_new=0)
    assert torch.allclose(layer(x), before - term, atol=1e-5)
    assert (layer(x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("skew", [0.0, 0.3])
def test_grow_keeps_output_with_new_directions_orthogonal_to_kept(skew):
    layer = make_layer(rank=4, skew=skew)
    x = inputs()
    before = layer(x).detach()
    kept_p, kept_q = layer.lora_P.detach().clone(), layer.lora_Q.detach().clone()
    changes = layer.resize(torch.arange(4), n_new=3, generator=torch.Generator().manual_seed(5))
    assert layer.rank == 7
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-6)
    assert torch.equal(layer.lora_lam[4:], torch.zeros(3))
    new_p, new_q = layer.lora_P[:, 4:].detach(), layer.lora_Q[4:].detach()
    assert torch.equal(layer.lora_P[:, :4], kept_p) and torch.equal(layer.lora_Q[:4], kept_q)
    # orthogonal to the span of the kept directions, and orthonormal among themselves
    assert (kept_p.T @ new_p).abs().max() < 1e-5
    assert (kept_q @ new_q.T).abs().max() < 1e-5
    assert torch.allclose(new_p.T @ new_p, torch.eye(3), atol=1e-5)
    assert torch.allclose(new_q @ new_q.T, torch.eye(3), atol=1e-5)
    assert [c.source.tolist() for c in changes] == [[0, 1, 2, 3, -1, -1, -1]] * 3


def test_resize_replaces_parameters_and_reports_the_mapping():
    layer = make_layer(rank=5)
    old = [layer.lora_P, layer.lora_lam, layer.lora_Q]
    keep = torch.tensor([4, 0, 2])
    changes = layer.resize(keep, n_new=2)
    new = [layer.lora_P, layer.lora_lam, layer.lora_Q]
    assert [c.old for c in changes] == old and [c.new for c in changes] == new
    assert all(o is not n for o, n in zip(old, new))
    assert [c.dim for c in changes] == [1, 0, 0]
    assert changes[0].source.tolist() == [4, 0, 2, -1, -1]
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in new)
    assert {id(p) for p in layer.parameters() if p.requires_grad} == {id(p) for p in new}
    assert torch.equal(layer.lora_lam[:3], old[1].detach()[keep])


def test_a_layer_can_give_up_its_adapter_and_grow_one_back():
    layer = make_layer(rank=3)
    with torch.no_grad():
        layer.lora_lam.copy_(torch.tensor([0.5, -0.2, 0.1]))
    x = torch.randn(4, IN_F)
    layer.resize(torch.tensor([], dtype=torch.long), n_new=0)  # rank 0: the base layer alone
    assert layer.rank == 0 and layer.lora_P.shape == (layer.out_features, 0)
    out = layer(x)
    assert torch.allclose(out, layer.base(x)) and out.requires_grad  # the probe still sees its output gradient
    out.sum().backward()
    assert layer.lora_lam.grad.shape == (0,)
    assert float(layer.orthogonality_penalty()) == 0.0
    layer.resize(torch.tensor([], dtype=torch.long), n_new=2)  # grows back from nothing, output unchanged
    assert layer.rank == 2 and torch.allclose(layer(x), layer.base(x))
    assert torch.allclose(layer.lora_Q @ layer.lora_Q.T, torch.eye(2), atol=1e-5)


def test_resize_limits():
    layer = make_layer(rank=3)
    with pytest.raises(ValueError):  # Q lives in R^10: at most 10 components
        layer.resize(torch.arange(3), n_new=IN_F - 3 + 1)
    assert layer.rank == 3  # a refused resize changes nothing


def test_svd_reproduces_delta_weight_and_its_spectrum():
    layer = make_layer(rank=5, skew=0.4)  # P, Q far from orthonormal: the QR path matters
    delta = layer.delta_weight().detach()
    u, s, vt = layer.svd()
    assert u.shape == (OUT_F, 5) and s.shape == (5,) and vt.shape == (5, IN_F)
    assert torch.allclose(u @ torch.diag(s) @ vt, delta, atol=1e-5)
    assert torch.allclose(s, torch.linalg.svdvals(delta)[:5], atol=1e-5)
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(u.T @ u, torch.eye(5), atol=1e-5)
    assert torch.allclose(vt @ vt.T, torch.eye(5), atol=1e-5)


def test_lora_factors_multiply_to_delta_weight():
    layer = make_layer(rank=4, skew=0.3, scale=3.0)
    a, b = layer.lora_factors()
    assert a.shape == (4, IN_F) and b.shape == (OUT_F, 4)
    assert not a.requires_grad and not b.requires_grad
    assert torch.allclose(b @ a, layer.delta_weight().detach(), atol=1e-6)


def test_component_energy_is_the_singular_value_while_orthonormal():
    layer = make_layer(rank=4)
    energy = layer.component_energy()
    s = torch.linalg.svdvals(layer.delta_weight().detach())[:4]
    assert torch.allclose(energy.sort(descending=True).values, s, atol=1e-5)
    assert layer.orthogonality_penalty().item() < 1e-8
    assert make_layer(rank=4, skew=0.3).orthogonality_penalty().item() > 1e-2


def test_orthogonality_penalty_has_gradients_on_p_and_q_only():
    layer = make_layer(rank=4, skew=0.3)
    layer.orthogonality_penalty().backward()
    assert layer.lora_P.grad.abs().sum() > 0 and layer.lora_Q.grad.abs().sum() > 0
    assert layer.lora_lam.grad is None


def test_take_components_copies_by_source_and_zeroes_new_slots():
    t = torch.arange(12.0).reshape(3, 4)
    src = torch.tensor([2, -1, 0])
    rows = take_components(t, src, dim=0)
    assert torch.equal(rows[0], t[2]) and torch.equal(rows[2], t[0]) and torch.equal(rows[1], torch.zeros(4))
    cols = take_components(t, torch.tensor([3, 1, -1, -1, 0]), dim=1)
    assert cols.shape == (3, 5)
    assert torch.equal(cols[:, 0], t[:, 3]) and torch.equal(cols[:, 4], t[:, 0])
    assert torch.equal(cols[:, 2:4], torch.zeros(3, 2))


# --- injection into a model ------------------------------------------------------------------


def test_adapt_wraps_the_targets_freezes_the_rest_and_keeps_the_output():
    model = make_tiny_model(0)
    ids = torch.randint(5, 47, (3, 9), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits.detach()
    adapted = adapt(model, TARGETS, rank=4, alpha=8.0, seed=0)
    assert len(adapted.adapters) == N_TINY_ADAPTERS
    assert all(isinstance(model.get_submodule(n), SVDLinear) for n in adapted.adapters)
    assert not any("pooler" in n or "classifier" in n for n in adapted.adapters)
    assert adapted.head_names == ["classifier"]
    assert all(layer.scale == 2.0 for layer in adapted.adapters.values())
    assert torch.equal(model(input_ids=ids).logits, before)  # every lam is 0 at the start
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapted.trainable_parameters()}
    assert adapted.total_rank() == 4 * N_TINY_ADAPTERS


def test_parameter_counts_follow_the_ranks():
    adapted = adapt(make_tiny_model(0), TARGETS, rank=4, alpha=8.0, seed=0)
    head = sum(p.numel() for p in adapted.model.classifier.parameters())

    def expected_adapter() -> int:
        return sum(l.rank * (l.in_features + l.out_features + 1) for l in adapted.adapters.values())

    assert adapted.count_adapter() == expected_adapter()
    for i, layer in enumerate(adapted.adapters.values()):
        layer.resize(torch.arange(1 + i % 3), n_new=i % 2)
    assert adapted.ranks() == {n: 1 + i % 3 + i % 2 for i, n in enumerate(adapted.adapters)}
    assert adapted.count_adapter() == expected_adapter()
    assert adapted.count_trainable() == expected_adapter() + head
    assert orthogonality_penalty(adapted).item() < 1e-6  # survivors and new directions stay orthonormal


def test_all_linear_skips_pooler_and_head():
    names = find_targets(make_tiny_model(0), "all-linear")
    assert len(names) == N_TINY_ADAPTERS
    assert not any("pooler" in n or n == "classifier" for n in names)


def test_adapt_rejects_targets_that_match_nothing_and_ranks_too_large():
    with pytest.raises(RankoptError, match="match no linear"):
        adapt(make_tiny_model(0), ["no_such_layer"], rank=2, alpha=4.0)
    with pytest.raises(RankoptError, match="init_rank=33"):
        adapt(make_tiny_model(0), TARGETS, rank=33, alpha=4.0)
