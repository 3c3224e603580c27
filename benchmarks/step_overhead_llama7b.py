"""Per-step cost of the controller's sensitivity update and the orthogonality penalty at Llama-7B scale.

224 adapters of Llama-7B's all-linear shapes (32 layers x q, k, v, o: 4096x4096; gate, up:
11008x4096; down: 4096x11008), each with random factors and random gradients, no base weights
(the base's matmuls are the same with or without rankopt). Per step, rankopt runs the penalty
forward + backward and, on tracking steps, the sensitivity EMA. Two implementations:

* ``per-layer`` (before, rankopt <= 7aafc6b): a Python loop, ~10 small ops per layer for each;
* ``grouped`` (after): factors stacked per group of same-shape layers, one ``bmm`` per group,
  ``torch._foreach`` EMA updates.

It reports wall time per step (median of ``--repeats``) and the number of aten ops dispatched,
which is what matters on a GPU: each op is a kernel launch of a few microseconds, so the op count
bounds the launch overhead however fast the device is. Ranks ``uniform`` (all at the initial rank)
and ``spread`` (after reallocations: 1..2r, so more groups).

    python benchmarks/step_overhead_llama7b.py                  # CPU, full shapes: ~1-2 min
    python benchmarks/step_overhead_llama7b.py --device cuda    # on a GPU
    python benchmarks/step_overhead_llama7b.py --scale 16 --repeats 2   # smoke: shapes / 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rankopt.adapters.groups import orthogonality_penalty as grouped_penalty  # noqa: E402
from rankopt.adapters.layer import SVDLinear  # noqa: E402
from rankopt.controller.importance import SensitivityTracker  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}


class PerLayerTracker(SensitivityTracker):
    """The EMA update as it was: a Python loop over layers."""

    @torch.no_grad()
    def update(self, layers):
        for layer in layers:
            p, lam, q = layer.lora_P, layer.lora_lam, layer.lora_Q
            inst = ((lam * lam.grad).abs() + (p * p.grad).abs().mean(dim=0) + (q * q.grad).abs().mean(dim=1)).float()
            if layer not in self.ema:
                self.ema[layer] = torch.zeros_like(inst)
                self.unc[layer] = torch.zeros_like(inst)
            ema, unc = self.ema[layer], self.unc[layer]
            ema.mul_(self.beta1).add_(inst, alpha=1 - self.beta1)
            unc.mul_(self.beta2).add_((inst - ema).abs(), alpha=1 - self.beta2)


def per_layer_penalty(layers):
    return torch.stack([layer.orthogonality_penalty() for layer in layers]).sum()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def build_layers(scale: int, rank: int, spread: bool, n_blocks: int, device: str) -> list[SVDLinear]:
    g = torch.Generator().manual_seed(0)
    layers = []
    for block in range(n_blocks):
        for i, (out_f, in_f) in enumerate(SHAPES.values()):
            out_f, in_f = out_f // scale, in_f // scale
            base = nn.Linear(1, 1, bias=False)
            base.weight = nn.Parameter(torch.zeros(()).expand(out_f, in_f), requires_grad=False)  # no memory
            base.in_features, base.out_features = in_f, out_f
            r = 1 + (block * 7 + i * 3) % (2 * rank) if spread else rank
            layer = SVDLinear(base, r, scale=2.0, generator=g).to(device)
            with torch.no_grad():
                layer.lora_lam.normal_(generator=None)
                for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
                    p.grad = torch.randn_like(p)
            layers.append(layer)
    return layers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(layers, params, tracker, penalty) -> None:
    grads = torch.autograd.grad(penalty(layers), params)  # forward + backward of the penalty
    del grads
    tracker.update(layers)


def measure(layers, impl: str, repeats: int, device: str) -> dict[str, float]:
    params = [p for l in layers for p in (l.lora_P, l.lora_Q)]
    tracker, penalty = (PerLayerTracker(0.85, 0.85), per_layer_penalty) if impl == "per-layer" else \
        (SensitivityTracker(0.85, 0.85), grouped_penalty)
    one_step(layers, params, tracker, penalty)  # warm-up
    with CountOps() as counter:
        one_step(layers, params, tracker, penalty)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        one_step(layers, params, tracker, penalty)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1000 * statistics.median(times), "aten_ops": counter.n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=8, help="initial rank (spread: 1..2 x rank)")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a smoke run)")
    ap.add_argument("--blocks", type=int, default=32, help="decoder layers (x 7 adapters)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spread in (False, True):
        layers = build_layers(args.scale, args.rank, spread, args.blocks, args.device)
        groups = len({(l.out_features, l.in_features, l.rank) for l in layers})
        for impl in ("per-layer", "grouped"):  # alternated per rank setting
            rows.append({"ranks": "spread" if spread else "uniform", "impl": impl, "adapters": len(layers),
                         "groups": groups, **measure(layers, impl, args.repeats, args.device)})
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# controller + penalty per step: {rows[0]['adapters']} adapters, Llama-7B shapes / {args.scale}, "
          f"rank {args.rank}; {name}, torch {torch.__version__}")
    print("| ranks | implementation | groups | median ms / step | aten ops / step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['impl']} | {r['groups']} | {r['median_ms']:.1f} | {r['aten_ops']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
