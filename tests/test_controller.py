"""The rank controller: budget schedule, allocation on plain score tensors, sensitivity EMA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankopt.adapters.layer import SVDLinear
from rankopt.controller import BudgetSchedule, RankController, SensitivityTracker, allocate

# --- the schedule ------------------------------------------------------------------------------


def schedule(initial=48, target=24, total=100, warmup=10, final=20, interval=5) -> BudgetSchedule:
    return BudgetSchedule(initial, target, total, warmup, final, interval)


def test_schedule_is_flat_then_cubic_then_flat():
    s = schedule()
    assert s.decay_end == 80
    assert all(s.budget_at(t) == 48 for t in range(0, 11))
    assert all(s.budget_at(t) == 24 for t in range(80, 101))
    # halfway through the decay: (1 - 1/2)^3 of the excess is left
    assert s.budget_at(45) == 24 + round(24 / 8)
    # cubic, not linear: a quarter in, (3/4)^3 = 42% of the excess is left, well below 75%
    assert s.budget_at(10 + 70 // 4) < 24 + 0.5 * 24
    assert all(24 <= s.budget_at(t) <= 48 for t in range(11, 80))


@pytest.mark.parametrize("initial,target", [(48, 24), (12, 30), (20, 20), (100, 3)])
def test_schedule_is_monotone_between_its_ends(initial, target):
    s = schedule(initial, target, total=60, warmup=6, final=12, interval=4)
    budgets = [s.budget_at(t) for t in range(61)]
    steps = list(zip(budgets, budgets[1:]))
    if initial >= target:
        assert all(a >= b for a, b in steps)
    else:
        assert all(a <= b for a, b in steps)
    assert budgets[0] == initial and budgets[-1] == target
    assert min(budgets) == min(initial, target) and max(budgets) == max(initial, target)


def test_from_fractions_rounds_the_phases():
    s = BudgetSchedule.from_fractions(40, 20, total_steps=30, warmup=0.1, final=0.25, interval=4)
    assert (s.warmup_steps, s.final_steps, s.decay_end) == (3, 8, 22)


def test_reallocation_steps_lie_in_the_decay_and_include_its_end():
    s = schedule(total=100, warmup=10, final=23, interval=5)  # decay ends at 77, not on the grid
    steps = [t for t in range(101) if s.is_reallocation_step(t)]
    assert steps[0] == 15 and steps[-1] == 77
    assert all(10 < t <= 77 for t in steps)
    assert all((t - 10) % 5 == 0 for t in steps[:-1])
    flat = schedule(initial=20, target=20, total=100, warmup=10, final=23, interval=5)
    assert not flat.is_reallocation_step(77)
    assert all(s.is_tracking_step(t) for t in range(77)) and not s.is_tracking_step(77)


# --- allocation ------------------------------------------------------------------------------


def random_scores(ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(r, generator=gen) for r in ranks]


@pytest.mark.parametrize("seed", range(6))
def test_allocate_meets_the_budget_within_bounds(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    ranks = torch.randint(1, 9, (7,), generator=gen).tolist()
    min_rank, max_rank = 1 + seed % 2, 8
    budget = int(torch.randint(7 * min_rank, 7 * max_rank + 1, (1,), generator=gen))
    plan = allocate(random_scores(ranks, seed), budget, min_rank, max_rank, max_grow=2)
    assert sum(a.rank for a in plan) == budget
    for alloc, r in zip(plan, ranks):
        assert min_rank <= alloc.rank <= max_rank
        keep = alloc.keep.tolist()
        assert keep == sorted(set(keep)) and all(0 <= k < r for k in keep)
        assert alloc.grow == 0 or len(keep) == r  # a layer grows only after keeping all it has


def test_allocate_respects_bounds_for_layers_outside_them():
    """A layer above max_rank must shrink to it; one below min_rank grows to it, and not past max."""
    plan = allocate([torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor([0.1, 0.2])], budget=6,
                    min_rank=1, max_rank=3, max_grow=2)
    assert [a.rank for a in plan] == [3, 3]
    assert plan[0].keep.tolist() == [0, 1, 2]  # its three best
    plan = allocate([torch.tensor([10.0]), torch.tensor([0.0, 0.0, 0.0])], budget=6,
                    min_rank=2, max_rank=3, max_grow=2)
    assert [a.rank for a in plan] == [3, 3]


def test_allocate_prunes_the_lowest_scores():
    ranks = [6, 4, 8, 5]
    scores = random_scores(ranks, seed=3)
    budget = 12
    plan = allocate(scores, budget, min_rank=1, max_rank=8, max_grow=0)
    assert sum(a.rank for a in plan) == budget and all(a.grow == 0 for a in plan)
    kept, dropped = [], []
    for s, alloc in zip(scores, plan):
        best = int(s.argmax())
        assert best in alloc.keep.tolist()  # min_rank keeps each layer's best
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[alloc.keep] = True
        mask_free = mask.clone()
        mask_free[best] = False
        kept += s[mask_free].tolist()
        dropped += s[~mask].tolist()
    assert len(dropped) == sum(ranks) - budget
    assert min(kept) > max(dropped)


def test_a_layer_whose_weakest_component_beats_the_cut_grows():
    strong = torch.tensor([10.0, 9.0])
    weak = torch.tensor([1.0, 0.5, 0.2, 0.1])
    plan = allocate([strong, weak], budget=6, min_rank=1, max_rank=8, max_grow=2)
    assert plan[0].keep.tolist() == [0, 1] and plan[0].grow == 2  # capped by max_grow
    assert plan[1].keep.tolist() == [0, 1] and plan[1].grow == 0  # its two lowest went
    # the same layer with a weak component below the cut does not grow, it loses that one
    plan = allocate([torch.tensor([10.0, 0.01]), weak], budget=6, min_rank=1, max_rank=8, max_grow=2)
    assert plan[0].grow == 0 and plan[0].keep.tolist() == [0]


@pytest.mark.parametrize("seed", range(4))
def test_allocate_grows_at_most_max_grow_when_the_budget_allows(seed):
    ranks = [3, 5, 2, 6]
    budget = sum(ranks) - 2
    plan = allocate(random_scores(ranks, seed), budget, min_rank=1, max_rank=10, max_grow=1)
    assert all(a.grow <= 1 for a in plan)
    assert sum(a.rank for a in plan) == budget


def test_allocate_grows_past_max_grow_only_to_meet_the_budget():
    plan = allocate([torch.tensor([1.0, 2.0])], budget=6, min_rank=1, max_rank=8, max_grow=1)
    assert plan[0].rank == 6 and plan[0].keep.tolist() == [0, 1] and plan[0].grow == 4


def test_ties_favour_real_components():
    # one slot to give: layer 1's second component (1.0) ties with layer 0's growth slot, scored
    # at layer 0's weakest component (1.0); the real component wins
    plan = allocate([torch.tensor([1.0]), torch.tensor([3.0, 1.0])], budget=3, min_rank=1, max_rank=4,
                    max_grow=2)
    assert [a.rank for a in plan] == [1, 2] and plan[0].grow == 0


def test_allocate_rejects_an_impossible_budget():
    scores = random_scores([3, 3], seed=0)
    with pytest.raises(ValueError):
        allocate(scores, budget=3, min_rank=2, max_rank=4, max_grow=1)
    with pytest.raises(ValueError):
        allocate(scores, budget=9, min_rank=1, max_rank=4, max_grow=1)


# --- a budget of parameters (controller.budget_unit: params) ------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_a_cost_budget_is_spent_within_one_component_and_within_bounds(seed):
    gen = torch.Generator().manual_seed(300 + seed)
    ranks = torch.randint(1, 9, (5,), generator=gen).tolist()
    costs = torch.randint(10, 60, (5,), generator=gen).tolist()
    budget = int(torch.randint(2 * sum(costs), 6 * sum(costs), (1,), generator=gen))
    plan = allocate(random_scores(ranks, seed), budget, min_rank=1, max_rank=8, max_grow=2, costs=costs)
    spent = sum(a.rank * c for a, c in zip(plan, costs))
    assert budget - max(costs) < spent <= budget
    assert all(1 <= a.rank <= 8 for a in plan)
    if any(a.grow > 2 for a in plan):  # growth past max_grow only where keeping everything falls short
        assert all(a.keep.numel() == min(r, 8) for a, r in zip(plan, ranks))


def test_a_cost_budget_ranks_components_by_score_per_cost():
    # the wide layer's components score higher but cost 4x: per parameter the narrow one's are worth more
    scores = [torch.tensor([3.0, 2.0, 1.0, 0.5]), torch.tensor([6.0, 5.0, 4.0, 3.0])]
    by_rank = allocate(scores, budget=5, min_rank=1, max_rank=4, max_grow=0)
    by_cost = allocate(scores, budget=1 * 3 + 4 * 2, min_rank=1, max_rank=4, max_grow=0, costs=[1, 4])
    assert [a.rank for a in by_rank] == [1, 4]
    assert [a.rank for a in by_cost] == [3, 2]  # 3 x 1 + 2 x 4 = 11, everything the budget buys


def test_unit_costs_change_nothing():
    for seed in range(4):
        scores = random_scores([3, 5, 2, 4], seed)
        plain = allocate(scores, 12, min_rank=1, max_rank=6, max_grow=2)
        costed = allocate(scores, 12, min_rank=1, max_rank=6, max_grow=2, costs=[1, 1, 1, 1])
        assert [(a.keep.tolist(), a.grow) for a in plain] == [(a.keep.tolist(), a.grow) for a in costed]


def test_a_cost_budget_grows_no_slot_it_only_has_to_fill_rounding():
    # after every real component is kept, 3 units are left: less than the costliest component (4),
    # so no growth slot beyond max_grow (here 0: the final phase) is forced to fill them
    scores = [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    plan = allocate(scores, budget=2 * 1 + 4 * 1 + 3, min_rank=1, max_rank=4, max_grow=0, costs=[1, 4])
    assert [(a.rank, a.grow) for a in plan] == [(2, 0), (1, 0)]


def test_a_params_budget_controller_spends_the_size_of_a_uniform_adapter():
    layers = make_layers(4, rank=6)  # in + out + 1: 29, 29, 41, 33 parameters per component
    sched = BudgetSchedule.from_fractions(24, 12, total_steps=60, warmup=0.1, final=0.2, interval=5)
    controller = RankController(layers, sched, "sensitivity", min_rank=1, max_rank=10, max_grow=2, seed=0,
                                budget_unit="params")
    costs = [layer.in_features + layer.out_features + 1 for layer in layers.values()]
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 61):
        put_random_grads(layers.values(), gen)
        controller.after_backward(step - 1)
        change = controller.step(step)
        if change is None:
            continue
        uniform = sched.budget_at(step) / len(layers) * sum(costs)
        spent = sum(layer.rank * c for layer, c in zip(layers.values(), costs))
        assert uniform - max(costs) < spent <= uniform
        assert change.budget == sum(layer.rank for layer in layers.values())


# --- the sensitivity EMA ------------------------------------------------------------------------


def make_layers(n=3, rank=4, seed=0) -> dict[str, SVDLinear]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [(16, 12), (12, 16), (20, 20), (16, 16)]
    return {f"l{i}": SVDLinear(nn.Linear(*sizes[i % 4]), rank, scale=1.0, generator=gen) for i in range(n)}


def put_random_grads(layers, gen) -> None:
    for layer in layers:
        with torch.no_grad():
            layer.lora_lam.copy_(torch.randn(layer.rank, generator=gen))
        for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
            p.grad = torch.randn(p.shape, generator=gen)


def instant_sensitivity(layer: SVDLinear) -> torch.Tensor:
    p, lam, q = layer.lora_P, layer.lora_lam, layer.lora_Q
    return ((lam * lam.grad).abs() + (p * p.grad).abs().mean(0) + (q * q.grad).abs().mean(1)).detach()


def test_tracker_ema_and_uncertainty_update():
    layers = list(make_layers(2).values())
    tracker = SensitivityTracker(beta1=0.8, beta2=0.6)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(tracker.scores(layers[0]), torch.zeros(4))
    ema, unc = torch.zeros(4), torch.zeros(4)
    for _ in range(3):
        put_random_grads(layers, gen)
        layers[1].lora_lam.grad = None  # no gradient this step: the layer is skipped
        inst = instant_sensitivity(layers[0])
        tracker.update(layers)
        ema = 0.8 * ema + 0.2 * inst
        unc = 0.6 * unc + 0.4 * (inst - ema).abs()
        assert torch.allclose(tracker.ema[layers[0]], ema, atol=1e-6)
        assert torch.allclose(tracker.unc[layers[0]], unc, atol=1e-6)
    assert torch.allclose(tracker.scores(layers[0]), ema * unc, atol=1e-7)
    assert layers[1] not in tracker.ema and torch.equal(tracker.scores(layers[1]), torch.zeros(4))


def test_tracker_follows_a_resize():
    layer = make_layers(1, rank=5)["l0"]
    tracker = SensitivityTracker(0.85, 0.85)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        put_random_grads([layer], gen)
        tracker.update([layer])
    ema, unc = tracker.ema[layer].clone(), tracker.unc[layer].clone()
    keep = torch.tensor([1, 3, 4])
    source = layer.resize(keep, n_new=2)[0].source
    tracker.remap(layer, source)
    assert tracker.scores(layer).shape == (5,)
    assert torch.equal(tracker.ema[layer][:3], ema[keep]) and torch.equal(tracker.unc[layer][:3], unc[keep])
    assert torch.equal(tracker.ema[layer][3:], torch.zeros(2)) and torch.equal(tracker.unc[layer][3:], torch.zeros(2))
    put_random_grads([layer], gen)
    tracker.update([layer])  # the resized layer keeps being tracked with its new shape
    assert tracker.ema[layer].shape == (5,)


# --- the controller on real layers ---------------------------------------------------------------


@pytest.mark.parametrize("importance", ["sensitivity", "energy"])
def test_budget_is_met_at_every_reallocation(importance):
    layers = make_layers(4, rank=6)
    sched = BudgetSchedule.from_fractions(24, 10, total_steps=80, warmup=0.1, final=0.2, interval=5)
    controller = RankController(layers, sched, importance, min_rank=1, max_rank=10, max_grow=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(1, 81):
        put_random_grads(layers.values(), gen)
        controller.after_backward(step - 1)
        change = controller.step(step)
        assert (change is not None) == sched.is_reallocation_step(step)
        if change is None:
            continue
        seen.append(step)
        total = sum(layer.rank for layer in layers.values())
        assert total == sched.budget_at(step) == change.budget
        assert change.ranks == {n: layer.rank for n, layer in layers.items()}
        assert all(1 <= layer.rank <= 10 for layer in layers.values())
        assert set(change.scores) == {"sensitivity", "energy"}
        for layer in layers.values():  # parameters and tracker state follow the new ranks
            assert layer.lora_P.shape[1] == layer.lora_lam.shape[0] == layer.lora_Q.shape[0] == layer.rank
            if layer in controller.tracker.ema:
                assert controller.tracker.ema[layer].shape == (layer.rank,)
    assert seen and sum(layer.rank for layer in layers.values()) == 10
    assert len({sched.budget_at(s) for s in seen}) > 2  # the budget really moved through the decay


def test_controller_prunes_by_the_chosen_importance():
    layers = make_layers(2, rank=4)
    a, b = layers["l0"], layers["l1"]
    with torch.no_grad():
        a.lora_lam.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        b.lora_lam.copy_(torch.tensor([0.1, 5.0, 0.2, 0.3]))
    sched = BudgetSchedule(initial=8, target=5, total_steps=10, warmup_steps=0, final_steps=9, interval=1)
    controller = RankController(layers, sched, "energy", min_rank=1, max_rank=4, max_grow=0)
    change = controller.step(1)
    assert change is not None and change.budget == 5
    # the three smallest |lam| (0.1, 0.2, 0.3, all in b) are the ones pruned
    assert a.lora_lam.tolist() == [4.0, 3.0, 2.0, 1.0]
    assert b.lora_lam.tolist() == [5.0]
    # only b was resized: P (out 16, r), lam (r,), Q (r, in 12), from rank 4 to 1
    assert [(tuple(r.old.shape), tuple(r.new.shape)) for r in change.resizes] == [
        ((16, 4), (16, 1)), ((4,), (1,)), ((4, 12), (1, 12))]


# --- review findings (2026-12): each fails on c9221d3 -------------------------------------------


def test_the_target_is_reached_when_rounding_merges_warmup_and_decay_end():
    sched = BudgetSchedule.from_fractions(100, 50, total_steps=7, warmup=0.5, final=0.45, interval=1)
    assert sched.warmup_steps == sched.decay_end == 4
    steps = [s for s in range(1, 8) if sched.is_reallocation_step(s)]
    assert steps == [4] and sched.budget_at(4) == 50
    assert sched.budget_at(3) == 100


def test_one_non_finite_step_does_not_poison_the_scores():
    layers = list(make_layers(1).values())
    clean, poisoned = SensitivityTracker(0.85, 0.85), SensitivityTracker(0.85, 0.85)
    gen = torch.Generator().manual_seed(3)
    put_random_grads(layers, gen)
    layers[0].lora_P.grad[0, 0] = float("inf")
    poisoned.update(layers)  # an fp16 overflow step: skipped
    for _ in range(2):
        put_random_grads(layers, gen)
        clean.update(layers)
        poisoned.update(layers)
    assert torch.isfinite(poisoned.scores(layers[0])).all()
    assert torch.allclose(poisoned.scores(layers[0]), clean.scores(layers[0]))


def test_a_non_finite_score_is_never_rewarded():
    nan = torch.full((4,), float("nan"))
    healthy = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([3.5, 2.5, 1.5, 0.5])]
    plan = allocate([nan, *healthy], budget=8, min_rank=1, max_rank=6, max_grow=2)
    assert plan[0].rank == 1  # its min_rank, nothing more
    assert plan[1].rank + plan[2].rank == 7


def test_growth_beyond_max_grow_goes_to_the_best_layers_first():
    scores = [torch.tensor([0.1]), torch.tensor([0.9]), torch.tensor([0.5])]
    plan = allocate(scores, budget=5, min_rank=1, max_rank=3, max_grow=0)
    assert [a.grow for a in plan] == [0, 2, 0]


def test_a_protected_component_is_kept_whatever_its_score():
    scores = [torch.tensor([5.0, 4.0, 0.0]), torch.tensor([3.0, 2.0, 1.0])]
    plan = allocate(scores, budget=4, min_rank=1, max_rank=4, max_grow=0,
                    protect=[torch.tensor([False, False, True]), None])
    assert 2 in plan[0].keep.tolist()
    assert sum(a.rank for a in plan) == 4


def grow_then_reallocate(min_age: int) -> torch.Tensor:
    """Two layers at a fixed budget: the first reallocation grows l1, the second scores the new
    component at 0 and l0 asks to grow; returns l1's birth steps afterwards."""
    layers = make_layers(2, rank=2)
    a, b = layers["l0"], layers["l1"]
    sched = BudgetSchedule(initial=4, target=4, total_steps=100, warmup_steps=0, final_steps=10, interval=5)
    controller = RankController(layers, sched, "sensitivity", min_rank=1, max_rank=4, max_grow=1, min_age=min_age)
    controller.tracker.ema = {a: torch.tensor([1.0, 0.01]), b: torch.tensor([2.0, 1.5])}
    controller.tracker.unc = {a: torch.ones(2), b: torch.ones(2)}
    controller.step(5)
    assert b.rank == 3 and a.rank == 1 and controller.born[b].tolist() == [-1, -1, 5]
    controller.tracker.ema = {a: torch.tensor([3.0]), b: torch.tensor([2.0, 1.5, 0.0])}
    controller.tracker.unc = {a: torch.ones(1), b: torch.ones(3)}
    controller.step(10)
    return controller.born[b]


def test_a_grown_component_survives_its_first_reallocation():
    assert 5 in grow_then_reallocate(min_age=1).tolist()
    assert 5 not in grow_then_reallocate(min_age=0).tolist()  # without protection it is pruned at once


def test_nothing_grows_in_the_final_phase():
    layers = make_layers(2, rank=3)
    a, b = layers["l0"], layers["l1"]
    sched = BudgetSchedule(initial=6, target=6, total_steps=20, warmup_steps=0, final_steps=10, interval=5)
    controller = RankController(layers, sched, "sensitivity", min_rank=1, max_rank=5, max_grow=2)
    controller.tracker.ema = {a: torch.tensor([9.0, 8.0, 7.0]), b: torch.tensor([3.0, 0.1, 0.01])}
    controller.tracker.unc = {a: torch.ones(3), b: torch.ones(3)}
    change = controller.step(sched.decay_end)
    assert sched.is_reallocation_step(sched.decay_end)
    grown = [] if change is None else [r for r in change.resizes if bool((r.source < 0).any())]
    assert not grown and a.rank == 3 and b.rank == 3


def test_gradient_growth_starts_new_components_along_the_gradient_and_preserves_the_output():
    torch.manual_seed(0)
    layers = make_layers(2, rank=2)
    a, b = layers["l0"], layers["l1"]
    with torch.no_grad():
        for layer in (a, b):
            layer.lora_lam.normal_()
    sched = BudgetSchedule(initial=4, target=4, total_steps=100, warmup_steps=0, final_steps=10, interval=5)
    controller = RankController(layers, sched, "sensitivity", min_rank=1, max_rank=4, max_grow=1, growth="gradient")
    controller.tracker.ema = {a: torch.tensor([1.0, 0.01]), b: torch.tensor([2.0, 1.5])}
    controller.tracker.unc = {a: torch.ones(2), b: torch.ones(2)}
    x, target = torch.randn(9, 12), torch.randn(9, 16)
    controller.before_step(5)
    (b(x) - target).pow(2).sum().backward()
    found = controller.probe.pairs[b]
    before = b(x).detach()
    controller.step(5)
    assert b.rank == 3 and not controller.probe.pairs  # grew; the probe let go of its data
    cosine = (b.lora_P[:, 2].detach() @ found.u[:, 0]).abs()
    assert cosine > 0.999
    assert (b.lora_Q[2].detach() @ found.v[:, 0]).abs() > 0.999
    assert torch.allclose(b(x), before, atol=1e-6)  # lam = 0: the layer computes what it did


def test_random_growth_arms_no_probe():
    layers = make_layers(1, rank=2)
    sched = BudgetSchedule(initial=2, target=2, total_steps=100, warmup_steps=0, final_steps=10, interval=5)
    controller = RankController(layers, sched, "sensitivity", min_rank=1, max_rank=4, max_grow=1, growth="random")
    controller.before_step(5)
    assert controller.probe is None
