"""Cost of the rank controller on one layer vs one forward + backward of that layer, up to 8192 x 28672.

For each shape (out x in) and rank r, one :class:`~rankopt.adapters.layer.SVDLinear` (fp32,
CPU) around an ``nn.Linear`` of that shape, with an AdamW that has taken one step (so Adam's
moments exist and must be carried), and random gradients on P, lam, Q. Through the real code
paths (a one-layer :class:`~rankopt.controller.RankController`, :func:`~rankopt.training.optim.apply_resizes`):

* ``update``: ``controller.after_backward``, the sensitivity EMA (every step until the last
  reallocation);
* ``prune``: one reallocation that halves the layer: scores of both kinds (sensitivity and
  energy), ``allocate``, ``resize`` (slicing), the optimizer-state and EMA remap;
* ``grow``: one reallocation that adds ``--grow`` components (the presets' ``max_grow``): the
  same, plus new directions orthogonal to the kept ones (QR of the kept P and Q^T,
  O(r^2 (m + n))). The controller never prunes and grows one layer in the same reallocation
  (a layer grows only when its weakest component beats the global cut), so these two are
  the per-layer cases;
* ``svd()``: the layer's exact thin SVD of ΔW (QR of P and Q^T plus an r x r SVD), not on the
  training path but the operation the issue bounds at O(r^2 (m + n)).

Against ``fwd+bwd``: one forward and backward of the layer at ``--tokens`` tokens (rank = the
smallest of ``--ranks``, measured once per shape), with the input requiring grad as it does
inside a network (the frozen weight is not differentiated, the input is). ``ctrl / step`` is
(update + the dearer of prune and grow) / fwd+bwd: one reallocation charged to a single step;
``amortized`` spreads the reallocation over the ``--interval`` steps between two (10 in the
presets), the update still every step. Each
figure is the median of ``--repeats`` runs (fwd+bwd: ``--fwd-repeats``) after one untimed run.
A last line times a dense ``torch.linalg.svd`` of the smallest shape's ΔW, for contrast.

    python benchmarks/controller_scaling.py                     # ~7 min on 2 CPU cores, ~3 GB RAM
    python benchmarks/controller_scaling.py --shapes 64x96 --ranks 2 4 --tokens 32 --repeats 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from rankopt.adapters.layer import SVDLinear
from rankopt.controller import BudgetSchedule, RankController
from rankopt.training.optim import apply_resizes, build_optimizer

SHAPES = ["768x768", "4096x4096", "8192x28672"]


def parse_shape(text: str) -> tuple[int, int]:
    out, _, inp = text.lower().partition("x")
    return int(out), int(inp)


def median_time(run: Callable[[], Callable[[], object]], repeats: int, warm: bool = True) -> float:
    """Median seconds of ``timed()`` where ``timed = run()`` (the setup in ``run`` is not timed)."""
    times = []
    for i in range(repeats + (1 if warm else 0)):
        timed = run()
        t0 = time.perf_counter()
        timed()
        if i or not warm:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh_layer(base: nn.Linear, rank: int, seed: int) -> tuple[SVDLinear, torch.optim.Optimizer]:
    """An adapter mid-training: nonzero lam, gradients on P, lam, Q, Adam's moments in place."""
    g = torch.Generator().manual_seed(seed)
    layer = SVDLinear(base, rank, scale=2.0, generator=g)
    params = [layer.lora_P, layer.lora_lam, layer.lora_Q]
    with torch.no_grad():
        layer.lora_lam.copy_(torch.randn(rank, generator=g))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer = build_optimizer(params, lr=1e-3, weight_decay=0.0)
    optimizer.step()
    return layer, optimizer


def one_layer_controller(layer: SVDLinear, new_rank: int, grow: int) -> RankController:
    """A controller over ``layer`` alone whose reallocation at step 1 takes it from its rank to ``new_rank``."""
    schedule = BudgetSchedule(initial=layer.rank, target=new_rank, total_steps=2, warmup_steps=0, final_steps=1,
                              interval=1)
    return RankController({"layer": layer}, schedule, "sensitivity", min_rank=1,
                          max_rank=max(layer.rank, new_rank), max_grow=grow)


def time_controller(base: nn.Linear, rank: int, grow: int, repeats: int) -> dict[str, float]:
    """Median seconds of the sensitivity update, a halving reallocation and a growing one, and of svd()."""

    def update():
        layer, _ = fresh_layer(base, rank, seed=1)
        controller = one_layer_controller(layer, rank, grow)
        return lambda: controller.after_backward(0)

    def reallocate(new_rank: int):
        def setup():
            layer, optimizer = fresh_layer(base, rank, seed=2)
            controller = one_layer_controller(layer, new_rank, grow)
            controller.after_backward(0)

            def timed():
                change = controller.step(1)
                apply_resizes(optimizer, change.resizes)
                if layer.rank != new_rank:
                    raise RuntimeError(f"expected rank {new_rank} after the reallocation, got {layer.rank}")
            return timed
        return setup

    def svd():
        layer, _ = fresh_layer(base, rank, seed=3)
        return layer.svd

    return {"update_s": median_time(update, repeats), "prune_s": median_time(reallocate(max(1, rank // 2)), repeats),
            "grow_s": median_time(reallocate(rank + grow), repeats), "svd_s": median_time(svd, repeats)}


def time_step(base: nn.Linear, rank: int, tokens: int, repeats: int) -> float:
    """Median seconds of one forward + backward of the adapted layer at ``tokens`` tokens."""
    layer, _ = fresh_layer(base, rank, seed=4)
    for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
        p.grad = None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, base.in_features, generator=g).requires_grad_(True)
    grad_out = torch.randn(tokens, base.out_features, generator=g)

    def run():
        x.grad = None
        for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
            p.grad = None
        return lambda: layer(x).backward(grad_out)

    return median_time(run, repeats, warm=repeats > 1)


def dense_svd_time(base: nn.Linear, rank: int, repeats: int) -> float:
    layer, _ = fresh_layer(base, rank, seed=6)
    delta = layer.delta_weight().detach()
    return median_time(lambda: (lambda: torch.linalg.svd(delta, full_matrices=False)), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="OUTxIN of each layer")
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the forward + backward")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each controller operation")
    ap.add_argument("--fwd-repeats", type=int, default=3, help="timed runs of forward + backward per shape")
    ap.add_argument("--grow", type=int, default=2, help="components added by the growing reallocation")
    ap.add_argument("--interval", type=int, default=10, help="steps between reallocations, for the amortized ratio")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, contrast = [], None
    for text in args.shapes:
        out_f, in_f = parse_shape(text)
        base = nn.Linear(in_f, out_f, bias=False)
        base.weight.requires_grad_(False)
        step_s = time_step(base, min(args.ranks), args.tokens, args.fwd_repeats)
        for rank in args.ranks:
            c = time_controller(base, rank, args.grow, args.repeats)
            ctrl = c["update_s"] + max(c["prune_s"], c["grow_s"])
            amortized = c["update_s"] + max(c["prune_s"], c["grow_s"]) / args.interval
            rows.append({"shape": f"{out_f}x{in_f}", "rank": rank, **c, "ctrl_s": ctrl, "step_s": step_s,
                         "ctrl_ratio": ctrl / step_s, "amortized_ratio": amortized / step_s,
                         "svd_ratio": c["svd_s"] / step_s})
            print(f"{out_f}x{in_f} r={rank}: controller {1000 * ctrl:.2f} ms, svd() {1000 * c['svd_s']:.2f} ms, "
                  f"fwd+bwd {1000 * step_s:.1f} ms", flush=True)
        if contrast is None:
            contrast = (f"{out_f}x{in_f}", dense_svd_time(base, min(args.ranks), args.repeats),
                        rows[-len(args.ranks)]["svd_s"])
        del base
    print(f"\n# controller scaling: fp32, {args.tokens} tokens per fwd+bwd, grow {args.grow}, repeats "
          f"{args.repeats}/{args.fwd_repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| shape (out x in) | rank | update (ms) | prune (ms) | grow (ms) | svd() (ms) | fwd+bwd (ms) | ctrl / step "
          f"| amortized (every {args.interval}) | svd() / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['rank']} | {1000 * r['update_s']:.3f} | {1000 * r['prune_s']:.3f} | "
              f"{1000 * r['grow_s']:.3f} | {1000 * r['svd_s']:.3f} | {1000 * r['step_s']:.2f} | "
              f"{100 * r['ctrl_ratio']:.3f} % | {100 * r['amortized_ratio']:.3f} % | {100 * r['svd_ratio']:.3f} % |")
    shape, dense_s, thin_s = contrast
    print(f"\nFor contrast: a dense torch.linalg.svd of the {shape} ΔW takes {1000 * dense_s:.2f} ms, "
          f"svd() at rank {min(args.ranks)} {1000 * thin_s:.3f} ms ({dense_s / thin_s:.0f}x).")
    print(json.dumps({"rows": rows, "dense_svd": {"shape": shape, "seconds": dense_s}}))


if __name__ == "__main__":
    main()
