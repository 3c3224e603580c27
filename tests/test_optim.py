"""The optimizer follows the adapters when they change shape; the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_adapted
from rankopt.adapters.model import orthogonality_penalty
from rankopt.training.optim import ComponentAdamW, apply_resizes, build_optimizer, build_scheduler


def batch(seed: int = 0, n: int = 6, length: int = 10) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 47, (n, length), generator=gen),
            "labels": torch.randint(0, 2, (n,), generator=gen)}


def train_steps(adapted, optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        loss = adapted.model(**batch(seed + i)).loss + 0.1 * orthogonality_penalty(adapted)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot_state(optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}


def resize_some(adapted):
    """Prune one layer, grow another, do both to a third; returns {layer name: (layer, Resize list)}."""
    names = list(adapted.adapters)
    plans = {names[0]: (torch.tensor([0, 2]), 0), names[3]: (torch.arange(4), 3), names[7]: (torch.tensor([3, 1]), 2)}
    gen = torch.Generator().manual_seed(0)
    return {n: (adapted.adapters[n], adapted.adapters[n].resize(keep, grow, gen)) for n, (keep, grow) in plans.items()}


def test_resize_carries_adam_state_by_component():
    adapted = make_tiny_adapted()
    adapted.model.train()
    optimizer = build_optimizer(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    train_steps(adapted, optimizer, 3)
    before = snapshot_state(optimizer)
    changed = resize_some(adapted)
    resizes = [r for _, rs in changed.values() for r in rs]
    apply_resizes(optimizer, resizes)

    group_params = [p for g in optimizer.param_groups for p in g["params"]]
    group_ids = {id(p) for p in group_params}
    assert len(group_params) == len(adapted.trainable_parameters())
    assert group_ids == {id(p) for p in adapted.trainable_parameters()}
    for change in resizes:
        assert id(change.old) not in group_ids and id(change.new) in group_ids
        assert change.old not in optimizer.state
        state, old = optimizer.state[change.new], before[id(change.old)]
        for key in ("exp_avg", "exp_avg_sq", "step"):  # step counts too: new components start at 0
            value = state[key]
            assert value.shape == change.new.shape
            for k, src in enumerate(change.source.tolist()):
                now = value.select(change.dim, k)
                if src >= 0:
                    assert torch.equal(now, old[key].select(change.dim, src))
                else:
                    assert torch.equal(now, torch.zeros_like(now))
    # untouched parameters keep their state object and values
    untouched = [p for p in adapted.trainable_parameters() if id(p) in before]
    assert len(untouched) == len(group_params) - len(resizes)
    for p in untouched:
        assert torch.equal(optimizer.state[p]["exp_avg"], before[id(p)]["exp_avg"])


def test_a_step_after_a_resize_updates_the_new_parameters():
    adapted = make_tiny_adapted()
    adapted.model.train()
    optimizer = build_optimizer(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    train_steps(adapted, optimizer, 2)
    changed = resize_some(adapted)
    apply_resizes(optimizer, [r for _, rs in changed.values() for r in rs])
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    new_values = {id(p): p.detach().clone() for p in adapted.adapter_parameters()}
    train_steps(adapted, optimizer, 1, seed=10)
    for name, (layer, _) in changed.items():
        for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
            assert not torch.equal(p.detach(), new_values[id(p)]), name
            assert optimizer.state[p]["exp_avg"].abs().sum() > 0
        grown = layer.rank - int((changed[name][1][0].source >= 0).sum())
        if grown:  # new components start at lam = 0 and move off it
            assert (layer.lora_lam[-grown:].detach() != 0).all()
    for n, p in adapted.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_resize_before_any_step_just_swaps_parameters():
    adapted = make_tiny_adapted()
    optimizer = build_optimizer(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    changed = resize_some(adapted)
    resizes = [r for _, rs in changed.values() for r in rs]
    apply_resizes(optimizer, resizes)
    assert not optimizer.state
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for p in adapted.trainable_parameters()}
    train_steps(adapted, optimizer, 1)
    assert all(optimizer.state[r.new]["exp_avg"].shape == r.new.shape for r in resizes)


def test_resize_of_a_parameter_outside_the_optimizer_is_an_error():
    adapted = make_tiny_adapted()
    optimizer = build_optimizer(adapted.head_parameters(), lr=1e-2, weight_decay=0.0)
    layer = next(iter(adapted.adapters.values()))
    with pytest.raises(KeyError):
        apply_resizes(optimizer, layer.resize(torch.arange(2), 0))


def lrs(kind: str, total: int = 20, warmup: float = 0.1) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], lr=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind, total, warmup)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_follows_its_kind(kind):
    values = lrs(kind, total=20, warmup=0.1)  # 2 warm-up steps
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    after = values[2:]
    if kind == "constant":
        assert all(v == 1.0 for v in after)
    else:
        assert all(a > b for a, b in zip(after, after[1:]))
        assert after[-1] < 0.1
    if kind == "cosine":
        mid = values[2 + 9]
        assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    if kind == "linear":
        assert values[2 + 9] == pytest.approx(1 - 9 / 18)


def test_component_adamw_is_torch_adamw_when_nothing_is_resized():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(5, 3))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_ours = ComponentAdamW([ours], lr=1e-2, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.01)
    for _ in range(40):
        grad = torch.randn(5, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("grown_at", [3, 30, 300])
def test_a_grown_component_takes_the_steps_of_a_fresh_adam(grown_at):
    """Constant gradient on lam: the grown component's first steps equal a brand-new Adam's."""
    layer = next(iter(make_tiny_adapted().adapters.values()))
    optimizer = ComponentAdamW([layer.lora_lam], lr=1e-2, weight_decay=0.0)
    for _ in range(grown_at):
        layer.lora_lam.grad = torch.ones_like(layer.lora_lam)
        optimizer.step()
    changes = layer.resize(torch.arange(layer.rank), 1, torch.Generator().manual_seed(0))
    apply_resizes(optimizer, [c for c in changes if c.dim == 0 and c.new.dim() == 1])  # lam only
    fresh = torch.nn.Parameter(torch.zeros(1))
    fresh_opt = torch.optim.AdamW([fresh], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        layer.lora_lam.grad = torch.full_like(layer.lora_lam, 0.3)
        fresh.grad = torch.full_like(fresh, 0.3)
        optimizer.step()
        fresh_opt.step()
        assert torch.allclose(layer.lora_lam[-1:].detach(), fresh.detach(), rtol=1e-5, atol=1e-7)


@torch.no_grad()
def per_tensor_step(optimizer: ComponentAdamW) -> None:
    """The update as ComponentAdamW computed it before its ``_foreach`` form: one tensor at a time."""
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if not state:
                state.update(step=torch.zeros_like(p, dtype=torch.float32), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            step.add_(1)
            p.mul_(1 - lr * decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / (1 - torch.pow(beta2, step)).sqrt()).add_(eps)
            p.addcdiv_(m / (1 - torch.pow(beta1, step)), denom, value=-lr)


def test_foreach_step_equals_the_per_tensor_step_bit_for_bit_across_a_resize():
    """Two identical models, one stepped by ComponentAdamW, one by the per-tensor loop, with a prune and
    a birth (new components at step 0) in the middle and a parameter without gradient: same bits."""
    runs = []
    for stepper in (ComponentAdamW.step, per_tensor_step):
        adapted = make_tiny_adapted()
        adapted.model.train()
        optimizer = ComponentAdamW(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.05)
        optimizer.param_groups[0]["lr"] = 3e-3  # as a scheduler would set it
        for phase, steps in enumerate((3, 4)):
            for i in range(steps):
                loss = adapted.model(**batch(10 * phase + i)).loss + 0.1 * orthogonality_penalty(adapted)
                loss.backward()
                next(iter(adapted.adapters.values())).lora_Q.grad = None  # a parameter left out this step
                stepper(optimizer)
                optimizer.zero_grad(set_to_none=True)
            if phase == 0:
                apply_resizes(optimizer, [r for _, rs in resize_some(adapted).values() for r in rs])
        runs.append((adapted, optimizer))
    (ours, opt_ours), (ref, opt_ref) = runs
    born = [s["step"] for s in opt_ours.state.values() if (s["step"] == 4).any()]
    assert born, "the resize should have started some components at step 0"
    for p, q in zip(ours.trainable_parameters(), ref.trainable_parameters(), strict=True):
        assert torch.equal(p, q)
        assert (p in opt_ours.state) == (q in opt_ref.state)  # the parameter never given a gradient has none
        for key in opt_ref.state.get(q, {}):
            assert torch.equal(opt_ours.state[p][key], opt_ref.state[q][key]), key


def test_parameters_of_different_dtypes_are_stepped_in_their_own_dtype():
    torch.manual_seed(0)
    single = torch.nn.Parameter(torch.randn(4, 3))
    double = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    optimizer = ComponentAdamW([single, double], lr=1e-2)
    reference = [torch.nn.Parameter(single.detach().clone()), torch.nn.Parameter(double.detach().clone())]
    ref_opt = ComponentAdamW(reference, lr=1e-2)
    for _ in range(3):
        for p, q in zip((single, double), reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        per_tensor_step(ref_opt)
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    assert torch.equal(single, reference[0]) and torch.equal(double, reference[1])
