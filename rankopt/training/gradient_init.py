"""``adapter.init: gradient``: adapters that start where the task's gradient points.

SVD-form adapters start at lam = 0, so P and Q get no gradient until lam moves (dL/dP is
proportional to lam). Starting them at random directions makes dL/dlam_i = scale u_i^T G v_i
small (about ||G||_F / sqrt(mn) for random unit u, v). A forward and backward over
``adapter.init_examples`` training rows gives each layer's weight gradient G (through
:class:`~rankopt.adapters.weight_gradient.WeightGradientProbe`, never as an m x n matrix);
P and Q then start along its top singular pairs, so dL/dlam_i = scale sigma_i(G), the steepest
start there is (LoRA-GA's idea in SVD form). With the controller on, the same pass splits the
initial budget across layers by those sigmas (:func:`rankopt.controller.allocate` on them, as
GoRA and EVA split once before training), and the controller keeps adapting from there.

The scale stays the one :func:`~rankopt.adapters.model.adapt` gave every layer, alpha / init_rank:
in SVD form each component has its own lam, which Adam moves by about lr per step whatever the
layer's rank, so a scale of alpha / (that layer's rank) would make the layers this split favours
learn the slowest (a rank-16 layer 16x slower per component than a rank-1 one).

The pass is sized like a training step, so that it fits wherever training fits: a seeded draw of
``adapter.init_examples`` training rows (packed rows under ``task.packing``, through the training collator), in
micro-batches of ``training.batch_size`` rows weighted as one batch, under the run's precision,
with gradient checkpointing on when the run has it, a causal LM's loss taken in chunks of target
tokens (:mod:`rankopt.training.lm_loss`: no full-vocabulary logits of a whole batch), and the
probe keeping at most ``controller.probe_tokens`` rows per layer for the whole pass. Dropout is
on, as in training, drawn from its own seeded stream so the run's random state is untouched.
"""

from __future__ import annotations

import torch

from rankopt import distributed
from rankopt.adapters.model import AdaptedModel
from rankopt.adapters.weight_gradient import WeightGradientProbe
from rankopt.config import Config
from rankopt.controller import allocate, component_costs, counted_in
from rankopt.tasks.data import TaskData
from rankopt.training.accumulation import target_count, to_device
from rankopt.training.lm_loss import summed_target_loss
from rankopt.training.memory import enable_gradient_checkpointing
from rankopt.training.precision import Precision


def init_micro_batches(cfg: Config, data: TaskData) -> list[dict]:
    """The pass's rows, seeded, collated for training in micro-batches of ``training.batch_size`` rows."""
    t = cfg.training
    world = distributed.current().world
    generator = torch.Generator().manual_seed(t.seed + 65537)
    n = min(len(data.train), cfg.adapter.init_examples)
    n = max(n - n % world, min(n, world))  # every micro-batch splits evenly over the processes
    rows = torch.randperm(len(data.train), generator=generator)[:n].tolist()
    return [data.training_collator([data.train[i] for i in rows[start:start + t.batch_size]])
            for start in range(0, n, t.batch_size)]


def gradient_start(cfg: Config, adapted: AdaptedModel, data: TaskData) -> dict[str, int]:
    """Restart every adapter along its layer's top weight-gradient pairs; returns the initial ranks."""
    layers = adapted.adapters
    c, a, t = cfg.controller, cfg.adapter, cfg.training
    initial, _ = cfg.budget(len(layers))
    most = c.max_rank if c.enabled else a.init_rank
    procs = distributed.current()
    model = adapted.model
    if t.gradient_checkpointing:  # before the pass, as the trainer runs: the pass fits where a step fits
        enable_gradient_checkpointing(model)
    probe = WeightGradientProbe(layers, max_tokens=max(1, c.probe_tokens // procs.world), iters=4, seed=t.seed)
    was_training = model.training
    device = torch.device(t.device)
    probe.arm(most, exclude_span=False)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(t.seed + 65537)  # the pass's dropout: seeded, and the run's stream untouched
        model.train()  # checkpointing (transformers') runs in training mode only
        try:
            _backward_pass(cfg, model, init_micro_batches(cfg, data), procs)
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


def _backward_pass(cfg: Config, model, micro_batches: list[dict], procs: distributed.Processes) -> None:
    """Backward of the mean loss over all ``micro_batches`` (their targets, or their rows), one at a time.

    Under data parallelism each process passes its shard of every micro-batch; the probe sums
    what the processes found. No loss scaling under fp16: the probe normalises what it finds.
    """
    causal = cfg.task.type == "causal_lm"
    total = sum(target_count(micro, causal) for micro in micro_batches)
    if not total:
        return
    precision = Precision(cfg.training.precision, cfg.training.device)
    for micro in micro_batches:
        mine = to_device(distributed.shard(micro, procs), cfg.training.device)
        with precision.autocast():
            if causal:
                loss_sum, count = summed_target_loss(model, mine)
                if not count:
                    continue
                loss = loss_sum / total
            else:
                loss = model(**mine).loss * (mine["labels"].shape[0] / total)
        loss.float().backward()
