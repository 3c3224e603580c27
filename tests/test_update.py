"""The adapter's update as one autograd node (rankopt.adapters.update): the plain expression's values, fewer kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankopt.adapters.layer import SVDLinear
from rankopt.adapters.update import LowRankUpdate, add_update, plain_update
from rankopt.testing.host_syncs import StepCounter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def update_and_grads(fn, x_shape: tuple, rank: int, scale: float, out_dtype=torch.float32):
    """fn's output and the gradients of a weighted sum of it to (out, x, q, lam, p), all from seed 0."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 24, 16
    out = torch.randn(*x_shape, out_f, generator=g).to(out_dtype).requires_grad_()
    x = torch.randn(*x_shape, in_f, generator=g).requires_grad_()
    q, lam, p = (torch.randn(*s, generator=g).requires_grad_() for s in ((rank, in_f), (rank,), (out_f, rank)))
    y = fn(out, x, q, lam, p, scale)
    weights = torch.randn(y.shape, generator=g).to(y.dtype)
    return y, torch.autograd.grad((y * weights).sum(), [out, x, q, lam, p])


@pytest.mark.parametrize("x_shape", [(7,), (2, 5)])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_the_update_is_the_plain_expression_bit_for_bit_at_a_power_of_two_scale(x_shape, rank, scale):
    fused, fused_grads = update_and_grads(LowRankUpdate.apply, x_shape, rank, scale)
    plain, plain_grads = update_and_grads(plain_update, x_shape, rank, scale)
    assert torch.equal(fused, plain)
    for name, a, b in zip(["out", "x", "q", "lam", "p"], fused_grads, plain_grads):
        assert torch.equal(a, b), name


def test_any_other_scale_differs_by_float_rounding_only():
    fused, fused_grads = update_and_grads(LowRankUpdate.apply, (2, 5), 3, 16 / 12)
    plain, plain_grads = update_and_grads(plain_update, (2, 5), 3, 16 / 12)
    for a, b in zip([fused, *fused_grads], [plain, *plain_grads]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["bf16 base output", "autocast"])
def test_mixed_dtypes_and_autocast_take_the_plain_expression(case):
    out_dtype = torch.bfloat16 if case == "bf16 base output" else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got, got_grads = update_and_grads(add_update, (2, 5), 3, 2.0, out_dtype)
        want, want_grads = update_and_grads(plain_update, (2, 5), 3, 2.0, out_dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


@pytest.mark.parametrize("input_grad", [True, False], ids=["inner layer", "first layer (input needs no gradient)"])
def test_an_adapter_launches_one_kernel_more_than_plain_lora(input_grad):
    """Before: lam * scale and its gradient, a separate add and the broadcast product's reduction: 6 more.
    The one left is the reduction that gives lam its gradient. Where the input needs no gradient (the
    first adapted layer, on frozen embeddings) autograd skips that product for LoRA, and so does the node."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    adapter = SVDLinear(base, 4, scale=2.0)
    lora_a, lora_b = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(24, 4))

    def lora(x):  # PEFT's LoRA forward: base, then + B(A(x)) * scaling
        return base(x) + (x @ lora_a.T @ lora_b.T) * 2.0

    def ops(forward) -> int:
        x, grad = torch.randn(2, 5, 16, requires_grad=input_grad), torch.ones(2, 5, 24)
        counter = StepCounter()
        counter.place([*adapter.parameters(), lora_a, lora_b, x, grad])
        with counter.counting():
            forward(x).backward(grad)
        return counter.totals()["ops"]

    assert ops(adapter) == ops(lora) + 1
