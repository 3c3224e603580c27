"""``adapter.static_shapes``: factors allocated at max_rank once, a mask of live components.

A reallocation then rewrites values in place, so the parameters (and torch.compile's guards) never
change, while the ranks, the outputs and the export stay those of the default, dynamic mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import make_tiny_adapted
from torch import nn
from torch._dynamo.testing import CompileCounter
from transformers import DataCollatorWithPadding

from rankopt.adapters.layer import SVDLinear
from rankopt.adapters.peft_format import peft_config, peft_state_dict, save_adapter
from rankopt.config import Config
from rankopt.tasks.data import TaskData
from rankopt.training.optim import ComponentAdamW, apply_resizes
from rankopt.training.trainer import Stepper, seeded_batches, train_adapted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTORS = ("lora_P", "lora_lam", "lora_Q")


def static_config(cfg: Config, static: bool = True, **controller) -> Config:
    return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"static_shapes": static}),
                                  "controller": cfg.controller.model_copy(update=controller)})


def layer_pair(rank: int = 3, capacity: int = 6) -> tuple[SVDLinear, SVDLinear]:
    """Two copies of one layer with non-zero lam, the second made static at ``capacity`` slots."""
    torch.manual_seed(0)
    dynamic = SVDLinear(nn.Linear(10, 12), rank, scale=2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dynamic.lora_lam.copy_(torch.tensor([0.5, -0.3, 0.2])[:rank])
    static = copy.deepcopy(dynamic)
    static.make_static(capacity)
    return dynamic, static


def test_a_static_layer_prunes_and_grows_in_place_like_the_dynamic_one():
    dynamic, static = layer_pair()
    params = [getattr(static, name) for name in FACTORS]
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(1))
    assert static.capacity == 6 and static.rank == 3 and static.lora_mask.tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.allclose(static(x), dynamic(x), rtol=0, atol=1e-6)  # padded products: summed in another order
    for keep, grow in (([2, 0], 3), ([], 0), ([], 2), ([0, 1], 4)):
        source = torch.tensor(keep, dtype=torch.long)
        dynamic.resize(source, grow, torch.Generator().manual_seed(len(keep) + grow))
        changes = static.resize(source, grow, torch.Generator().manual_seed(len(keep) + grow))
        rank = len(keep) + grow
        assert static.rank == dynamic.rank == rank
        assert all(getattr(static, name) is p for name, p in zip(FACTORS, params))
        assert all(c.new is c.old for c in changes)
        assert changes[0].source.tolist() == keep + [-1] * (6 - len(keep))
        assert static.lora_mask.tolist() == [1.0] * rank + [0.0] * (6 - rank)
        assert all(torch.equal(live, getattr(dynamic, name)) for live, name in zip(static.factors(), FACTORS))
        assert not static.lora_P[:, rank:].any() and not static.lora_lam[rank:].any() and not static.lora_Q[rank:].any()
        assert torch.allclose(static(x), dynamic(x), rtol=0, atol=1e-6)
        assert torch.equal(static.delta_weight(), dynamic.delta_weight())
        assert torch.equal(static.orthogonality_penalty(), dynamic.orthogonality_penalty())
    with pytest.raises(ValueError):  # no room beyond the capacity, and a refused resize changes nothing
        static.resize(torch.arange(6), 1)
    assert static.rank == 6


def test_masked_slots_add_nothing_to_the_forward():
    _, static = layer_pair()
    with torch.no_grad():  # junk in the unused slots: the mask alone keeps it out
        static.lora_P[:, 3:] = 1.0
        static.lora_lam[3:] = 7.0
        static.lora_Q[3:] = 1.0
    x = torch.randn(5, 10)
    p, lam, q = (t.detach() for t in static.factors())
    assert torch.allclose(static(x), static.base(x) + x @ ((p * (lam * 2.0)) @ q).T, rtol=0, atol=1e-6)


def test_freed_slots_get_no_gradient_and_no_update():
    """After a prune, with weight decay and the penalty on, the freed slots stay exactly zero."""
    _, static = layer_pair()
    static.resize(torch.tensor([0, 2]), 0)
    opt = ComponentAdamW([static.lora_P, static.lora_lam, static.lora_Q], lr=0.1, weight_decay=0.1)
    before = [t.detach().clone() for t in (static.lora_P, static.lora_lam, static.lora_Q)]
    for _ in range(3):
        (static(torch.randn(5, 10)).square().sum() + static.orthogonality_penalty()).backward()
        assert not static.lora_lam.grad[2:].any() and not static.lora_P.grad[:, 2:].any() and \
            not static.lora_Q.grad[2:].any()
        opt.step()
        opt.zero_grad()
    assert not static.lora_lam[2:].any() and not static.lora_P[:, 2:].any() and not static.lora_Q[2:].any()
    assert not opt.state[static.lora_lam]["exp_avg"][2:].any() and not opt.state[static.lora_Q]["exp_avg_sq"][2:].any()
    assert not torch.equal(static.lora_lam[:2], before[1][:2])  # the live ones did move


def test_apply_resizes_keeps_the_optimizers_tensors_and_zeroes_freed_state():
    _, static = layer_pair()
    params = [static.lora_P, static.lora_lam, static.lora_Q]
    opt = ComponentAdamW(params, lr=0.01)
    static(torch.randn(4, 10)).sum().backward()
    opt.step()
    state = {id(p): dict(opt.state[p]) for p in params}
    exp_avg = opt.state[static.lora_lam]["exp_avg"].clone()
    apply_resizes(opt, static.resize(torch.tensor([2, 0]), 1, torch.Generator().manual_seed(0)))
    assert all(held is p for held, p in zip(opt.param_groups[0]["params"], params))
    for p in params:
        assert all(opt.state[p][key] is value for key, value in state[id(p)].items())  # same tensors, new values
    assert torch.equal(opt.state[static.lora_lam]["exp_avg"][:2], exp_avg[[2, 0]])
    assert not opt.state[static.lora_lam]["exp_avg"][2:].any() and not opt.state[static.lora_lam]["step"][2:].any()
    assert not opt.state[static.lora_P]["exp_avg_sq"][:, 2:].any()


def train_pair(cfg: Config, data: TaskData):
    """The same run in both modes: (dynamic adapted, its result), (static adapted, its result)."""
    runs = []
    for static in (False, True):
        adapted = make_tiny_adapted(0)
        runs.append((adapted, train_adapted(static_config(cfg, static), adapted, data)))
    return runs


@pytest.mark.parametrize("controller", [
    {},
    {"min_rank": 0, "swap": 0.5, "target_rank": 1.0, "importance": "energy"},  # rank-0 layers, gradient swaps
], ids=["sensitivity", "rank-zero-and-swap"])
def test_static_training_follows_the_dynamic_run(tiny_config, tiny_task_data, controller):
    """Same ranks at every reallocation, same adapters to float rounding.

    Not bit for bit: the padded products (x Q^T over capacity columns, then over capacity terms)
    let the matmul kernels sum in another order, so the two runs part at the last bit from the
    first step on (measured: ΔW within 7e-8 of each other, |ΔW| up to 2e-2, after 30 steps).
    """
    cfg = static_config(tiny_config, False, **controller)
    (dynamic, run_d), (static, run_s) = train_pair(cfg, tiny_task_data)
    ranks = [(e.step, e.ranks) for e in run_d.rank_history]
    assert len(ranks) >= 6 and len({tuple(r.values()) for _, r in ranks}) >= 4  # the ranks did move
    assert [(e.step, e.ranks) for e in run_s.rank_history] == ranks
    if controller:
        assert any(0 in r.values() for _, r in ranks)
    for name, layer in static.adapters.items():
        assert layer.static and layer.capacity == cfg.controller.max_rank
        assert torch.allclose(layer.delta_weight(), dynamic.adapters[name].delta_weight(), rtol=0, atol=1e-6), name
        assert not layer.lora_lam[layer.rank:].any() and not layer.lora_P[:, layer.rank:].any()
    for (step_d, m_d), (step_s, m_s) in zip(run_d.eval_history, run_s.eval_history):
        assert step_d == step_s and m_d["loss"] == pytest.approx(m_s["loss"], abs=1e-5)
    assert run_s.adapter_params == run_d.adapter_params and run_s.trainable_params == run_d.trainable_params


def test_static_export_writes_what_the_dynamic_mode_writes(tiny_config, tiny_task_data, tmp_path):
    """Only live components, the same rank_pattern; on equal weights the same files byte for byte."""
    (dynamic, _), (static, _) = train_pair(static_config(tiny_config, False), tiny_task_data)
    assert peft_config(static, "base") == peft_config(dynamic, "base")
    written_d, written_s = peft_state_dict(dynamic), peft_state_dict(static)
    assert {k: v.shape for k, v in written_s.items()} == {k: v.shape for k, v in written_d.items()}
    # the factors of a component with lam near 0 drift apart at ~1e-5 (Adam scales its rounding-size
    # gradients up), while each product B A, the adapter's ΔW, agrees to ~1e-7 (see above)
    for key in (k for k in written_d if k.endswith("lora_A.weight")):
        b = key.replace("lora_A", "lora_B")
        assert torch.allclose(written_s[b] @ written_s[key], written_d[b] @ written_d[key], rtol=0, atol=1e-6), key
    padded = copy.deepcopy(dynamic)  # the dynamic run's own weights, padded: the export is exact
    padded.make_static(tiny_config.controller.max_rank)
    assert any(layer.rank < layer.capacity for layer in padded.adapters.values())
    folders = [save_adapter(adapted, tmp_path / name, "base") for name, adapted in (("d", dynamic), ("s", padded))]
    for file in ("adapter_model.safetensors", "adapter_config.json", "rankopt.json"):
        assert (folders[0] / file).read_bytes() == (folders[1] / file).read_bytes(), file


def fixed_length_data(data: TaskData, tokenizer) -> TaskData:
    """The tiny task padded to one length: only the adapters could change a compiled graph's shapes."""
    pad = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=32)
    return TaskData(train=data.train, eval=data.eval, num_labels=2, label_names=None, collator=pad)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_torch_compile_never_recompiles_across_30_reallocations(tiny_config, tiny_task_data, tokenizer, static):
    """Static shapes: no recompile in 30 reallocations; the dynamic mode (the control) recompiles.

    Counted with dynamo's CompileCounter backend (it captures graphs and runs them eagerly: cheap on
    a CPU). Two steps come first: the tiny BERT sets ``config.problem_type`` at its first forward,
    a recompile of its own. Growth is random here: under torch.compile the gradient probe's forward
    hooks, added after compiling, are not run (dynamo skips hook guards), so gradient growth is not
    what this test is about.
    """
    cfg = static_config(tiny_config, static, warmup=0.03, final=0.05, interval=2, growth="random")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": 66})})
    cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"init": "random"})})
    data = fixed_length_data(tiny_task_data, tokenizer)
    adapted = make_tiny_adapted(0)
    adapted.model.train()
    stepper = Stepper(cfg, adapted)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        adapted.model.compile(backend=counter)
        batches = seeded_batches(data, cfg.training.batch_size, cfg.training.seed)
        for _ in range(2):
            stepper.step(next(batches))
        compiled = counter.frame_count
        for _ in range(cfg.training.steps - 2):
            stepper.step(next(batches))
    finally:
        torch._dynamo.reset()
    changes = [b for a, b in zip(stepper.history, stepper.history[1:]) if a.ranks != b.ranks]
    assert len(stepper.history) - 1 >= 30 and len(changes) >= 30
    if static:
        assert counter.frame_count == compiled, "a reallocation recompiled the static adapters"
    else:
        assert counter.frame_count > compiled
