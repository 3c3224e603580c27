"""``adapter.init: gradient``: adapters that start where the task's gradient points.

SVD-form adapters start at lam = 0, so P and Q get no gradient until lam moves (dL/dP is
proportional to lam). Starting them at random directions makes dL/dlam_i = scale u_i^T G v_i
small (about ||G||_F / sqrt(mn) for random unit u, v). One forward and backward on the first
``adapter.init_examples`` training examples gives each layer's weight gradient G (through
:class:`~rankopt.adapters.weight_gradient.WeightGradientProbe`, never as an m x n matrix);
P and Q then start along its top singular pairs, so dL/dlam_i = scale sigma_i(G), the steepest
start there is (LoRA-GA's idea in SVD form). With the controller on, the same pass splits the
initial budget across layers by those sigmas (:func:`rankopt.controller.allocate` on them, as
GoRA and EVA split once before training), and the controller keeps adapting from there.

The scale stays the one :func:`~rankopt.adapters.model.adapt` gave every layer, alpha / init_rank:
in SVD form each component has its own lam, which Adam moves by about lr per step whatever the
layer's rank, so a scale of alpha / (that layer's rank) would make the layers this split favours
learn the slowest (a rank-16 layer 16x slower per component than a rank-1 one).
"""

from __future__ import annotations

import torch

from rankopt import distributed
from rankopt.adapters.model import AdaptedModel
from rankopt.adapters.weight_gradient import WeightGradientProbe
from rankopt.config import Config
from rankopt.controller import allocate, component_costs, counted_in
from rankopt.tasks.data import TaskData
from rankopt.training.accumulation import micro_batch_weights, to_device
from rankopt.training.precision import Precision


def gradient_start(cfg: Config, adapted: AdaptedModel, data: TaskData) -> dict[str, int]:
    """Restart every adapter along its layer's top weight-gradient pairs; returns the initial ranks."""
    layers = adapted.adapters
    c, a = cfg.controller, cfg.adapter
    initial, _ = cfg.budget(len(layers))
    most = c.max_rank if c.enabled else a.init_rank
    generator = torch.Generator().manual_seed(cfg.training.seed + 65537)
    n = min(len(data.train), a.init_examples)
    rows = torch.randperm(len(data.train), generator=generator)[:n].tolist()
    whole = data.collator([data.train[i] for i in rows])
    mine = distributed.shard(whole)  # data parallel: each process passes its rows, the probe sums over processes
    share = micro_batch_weights([whole], cfg.task.type == "causal_lm", [mine])[0]
    batch = to_device(mine, cfg.training.device)
    model = adapted.model
    was_training = model.training
    probe = WeightGradientProbe(layers, max_tokens=4096 // distributed.current().world, iters=4,
                                seed=cfg.training.seed)
    probe.arm(most, exclude_span=False)
    model.eval()  # no dropout: the pass draws nothing from the RNG, so runs and resumes stay seeded alike
    try:
        with Precision(cfg.training.precision, cfg.training.device).autocast():
            loss = model(**batch).loss * share
        loss.float().backward()  # no loss scaling needed: the probe normalises what it finds
    finally:
        probe.disarm()
        model.train(was_training)
        for p in adapted.trainable_parameters():
            p.grad = None
    found_pairs = probe.pairs
    pairs = [found_pairs.get(layer) for layer in layers.values()]
    if any(found is None for found in pairs):
        return adapted.ranks()  # a layer the loss does not reach: keep the random start
    if c.enabled:
        costs = component_costs(layers.values()) if c.budget_unit == "params" else None
        plan = allocate([found.sigma for found in pairs], counted_in(initial, costs), c.min_rank,
                        min(c.max_rank, most), 0, costs=costs)
        ranks = [alloc.rank for alloc in plan]
    else:
        ranks = [a.init_rank] * len(layers)
    for layer, found, rank in zip(layers.values(), pairs, ranks):
        rank = min(rank, found.sigma.numel())
        layer.restart(found.u[:, :rank], found.v[:, :rank])
    return adapted.ranks()
