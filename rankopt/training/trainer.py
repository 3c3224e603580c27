"""The training loop: one fine-tune of an adapted model, with the rank controller in the loop.

Order of one step: forward/backward of the task loss per micro-batch (under autocast for
bf16/fp16) -> unscale (fp16) -> controller reads the gradients (the task's alone) -> backward of
the orthogonality penalty -> clip -> optimizer step -> lr step -> zero grad -> reallocate (resize
layers, rebuild optimizer state) -> evaluate when due. No step reads a value back from the device
unless it has to (losses are read every ``training.log_every`` steps, see :mod:`.loss_log`).
Everything else listens through callbacks.

Data parallel (several processes under ``torchrun``, see :mod:`rankopt.distributed`): every
process draws the same global micro-batches and trains on its rows of each; the trainable
gradients (and the loss) are summed over processes right after the backward, before anything
reads them, so the controller, clipping and the optimizer see the global batch's gradient on
every process. Evaluation is sharded by batch and gathered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from rankopt import distributed
from rankopt.tasks import metrics as task_metrics
from rankopt.adapters.model import AdaptedModel, add_orthogonality_gradient
from rankopt.config import Config
from rankopt.controller import BudgetSchedule, RankController
from rankopt.tasks.data import TaskData
from rankopt.training.accumulation import as_micro_batches, micro_batch_weights, to_device
from rankopt.training.events import Callback, CallbackList, RankEvent, TrainResult, tensor_lists
from rankopt.training.gradient_init import gradient_start
from rankopt.training.lm_loss import summed_target_loss
from rankopt.training.loss_log import LossLog
from rankopt.training.memory import enable_gradient_checkpointing
from rankopt.training.optim import apply_resizes, build_optimizer, build_scheduler
from rankopt.training.precision import Precision, check_trainable_dtypes


def seeded_batches(data: TaskData, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless training batches, reshuffled each epoch in an order fixed by ``seed``."""
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, collate_fn=data.training_collator,
                        generator=torch.Generator().manual_seed(seed), drop_last=len(data.train) > batch_size)
    while True:
        yield from loader


def build_controller(cfg: Config, adapted: AdaptedModel) -> RankController | None:
    if not cfg.controller.enabled:
        return None
    c = cfg.controller
    initial, target = cfg.budget(len(adapted.adapters))
    schedule = BudgetSchedule.from_fractions(initial, target, cfg.training.steps, c.warmup, c.final, c.interval)
    return RankController(adapted.adapters, schedule, c.importance, c.min_rank, c.max_rank, c.max_grow,
                          c.beta1, c.beta2, seed=cfg.training.seed, min_age=c.min_age,
                          growth=c.growth, probe_tokens=c.probe_tokens, budget_unit=c.budget_unit, swap=c.swap)


@torch.no_grad()
def evaluate(adapted: AdaptedModel, data: TaskData, task_type: str, batch_size: int,
             device: str = "cpu", procs: distributed.Processes | None = None) -> dict[str, float]:
    """Loss and every task metric on the evaluation split.

    With ``procs`` of several processes each evaluates every world-th batch and the results are
    gathered (all of them must call it); without, this process evaluates the whole split alone.
    """
    model = adapted.model
    was_training = model.training
    model.eval()
    loader = DataLoader(data.eval, batch_size=batch_size, shuffle=False, collate_fn=data.collator)
    procs = procs or distributed.Processes()
    try:
        if task_type == "causal_lm":
            return _language_model_metrics(model, loader, device, procs)
        return _prediction_metrics(model, loader, task_type, device, procs)
    finally:
        model.train(was_training)


def _prediction_metrics(model, loader: DataLoader, task_type: str, device: str,
                        procs: distributed.Processes) -> dict[str, float]:
    outputs, labels, losses, count = [], [], 0.0, 0
    for i, batch in enumerate(loader):
        if i % procs.world != procs.rank:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        n = batch["labels"].shape[0]
        losses += float(out.loss) * n
        count += n
        outputs.append(out.logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    if procs.parallel:  # the metrics need every prediction (MCC, correlations are not means)
        parts = distributed.gather_objects((outputs, labels, losses, count))
        outputs = [o for part in parts for o in part[0]]
        labels = [y for part in parts for y in part[1]]
        losses, count = sum(part[2] for part in parts), sum(part[3] for part in parts)
    result = task_metrics.compute(task_type, np.concatenate(outputs), np.concatenate(labels))
    result["loss"] = losses / max(count, 1)
    return result


def _language_model_metrics(model, loader: DataLoader, device: str, procs: distributed.Processes) -> dict[str, float]:
    """Mean loss per response token over the whole split (not per batch), and its perplexity.

    Logits are never collected, nor computed for the whole batch at once (see :mod:`.lm_loss`).
    """
    total, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if i % procs.world != procs.rank:
            continue
        loss_sum, n = summed_target_loss(model, to_device(batch, device))
        if n:
            total += float(loss_sum)
            tokens += n
    if procs.parallel:
        total, tokens = distributed.all_sum(torch.tensor([total, float(tokens)], dtype=torch.float64)).tolist()
    return task_metrics.language_model_metrics(total / tokens if tokens else float("nan"))


def reseed_for_process(seed: int, step: int, procs: distributed.Processes) -> None:
    """Dropout masks of one process's rows its own, from (seed, step, rank).

    All processes start from the same seed, so without this each would draw the same masks for
    its shard as the others for theirs (row i of every shard dropped alike). Derived from the step,
    the stream needs nothing in a checkpoint to resume the same way; one process never reseeds.
    """
    torch.manual_seed((seed * 1_000_003 + step) * procs.world + procs.rank)


class Stepper:
    """One optimisation step at a time: the state a fine-tune carries between steps.

    ``train_adapted`` loops over it; benchmarks drive two of them side by side.
    """

    def __init__(self, cfg: Config, adapted: AdaptedModel, events: Callback | None = None):
        t = cfg.training
        self.cfg, self.adapted = cfg, adapted
        self.events = events or CallbackList()
        self.device = t.device
        self.procs = distributed.current()
        check_trainable_dtypes(adapted)
        if cfg.adapter.static_shapes:  # before the optimizer holds the factors: they keep these shapes for good
            adapted.make_static(cfg.controller.max_rank if cfg.controller.enabled else cfg.adapter.init_rank)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(adapted.model)
        self.precision = Precision(t.precision, t.device)
        self.optimizer = build_optimizer(adapted.trainable_parameters(), t.lr, t.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, t.scheduler, t.steps, t.warmup_ratio)
        self.controller = build_controller(cfg, adapted)
        self.params = adapted.trainable_parameters()
        if self.procs.parallel:  # every process starts from rank 0's adapters and head, as DDP does
            distributed.check_same(adapted.ranks(), "the adapters' ranks")
            distributed.broadcast_tensors(self.params)
        self.history = [RankEvent(step=0, budget=adapted.total_rank(), ranks=adapted.ranks())]
        self.losses = LossLog()
        self.skipped_steps = 0  # fp16 steps whose gradients overflowed
        self.done = 0

    def step(self, batch: dict | list[dict]) -> torch.Tensor:
        """One optimizer step from one batch or a list of micro-batches; returns the task loss (on the device).

        Order: forward/backward per micro-batch -> unscale (fp16) -> controller reads the task's
        gradients -> orthogonality penalty backward -> clip -> optimizer -> lr -> zero grad -> reallocate.
        """
        t = self.cfg.training
        step = self.done + 1
        if self.procs.parallel:
            reseed_for_process(t.seed, step, self.procs)
        if self.controller is not None:
            self.controller.before_step(step)  # arms the gradient probe before a growing reallocation
        loss = self._accumulate(as_micro_batches(batch))
        loss = distributed.sum_gradients(self.params, loss)  # before anything reads them (one process: no-op)
        finite = self.precision.unscale_and_check(self.optimizer, self.params)
        if not finite:
            self.skipped_steps += 1
        if self.controller is not None and finite:
            self.controller.after_backward(step - 1)
        if t.orth_reg:  # after the tracker: same summed gradient; fp32 factors, already at true scale
            add_orthogonality_gradient(self.adapted, t.orth_reg)
        torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.precision.optimizer_step(self.optimizer)
        if finite:  # an overflow step changed nothing, so the lr schedule waits too (as accelerate does)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done = step
        self.losses.add(step, loss)
        reallocating = self.controller is not None and self.controller.schedule.is_reallocation_step(step)
        if reallocating or step % t.log_every == 0 or step % t.eval_every == 0 or step >= t.steps:
            self.report_losses()  # one host sync; a diverged loss stops the run here
        if reallocating and (change := self.controller.step(step)) is not None:
            apply_resizes(self.optimizer, change.resizes)
            self.params = self.adapted.trainable_parameters()
            distributed.broadcast_tensors(self.params)  # new components: rank 0's directions on every process
            event = RankEvent(step=step, budget=change.budget, ranks=change.ranks,
                              scores={k: tensor_lists(v) for k, v in change.scores.items()})
            self.history.append(event)
            self.events.on_reallocation(event)
        return loss

    def _accumulate(self, micro_batches: list[dict]) -> torch.Tensor:
        """Backward every micro-batch, weighted so the gradient is that of the whole batch's mean loss.

        Under data parallelism each process backwards its shard of every micro-batch, weighted by
        the shard's share of the global batch's targets: the sum over processes is the global gradient.
        """
        model = self.adapted.model
        shards = [distributed.shard(micro, self.procs) for micro in micro_batches] if self.procs.parallel else None
        weights = micro_batch_weights(micro_batches, self.cfg.task.type == "causal_lm", shards)
        total = torch.zeros((), device=self.device)
        for micro, weight in zip(shards or micro_batches, weights):
            if not torch.is_tensor(weight) and not weight:
                continue  # no targets in it: nothing to learn, and its mean loss would be 0/0
            with self.precision.autocast():
                loss = model(**to_device(micro, self.device)).loss
                if torch.is_tensor(weight):  # counted on the device: a batch without targets adds 0, not 0/0
                    loss = torch.where(weight > 0, loss, 0.0)
                loss = loss * weight
            self.precision.backward(loss)
            total += loss.detach().float()
        return total

    def report_losses(self) -> None:
        """Read the pending losses (one transfer) and hand each step's to the callbacks."""
        for step, value in self.losses.read():
            self.events.on_step(step, value)


def train_adapted(cfg: Config, adapted: AdaptedModel, data: TaskData,
                  callbacks: list[Callback] | None = None, checkpointer=None) -> TrainResult:
    """Fine-tune ``adapted`` on ``data`` for ``cfg.training.steps`` steps; returns the final evaluation.

    ``checkpointer`` (a :class:`rankopt.training.checkpoint.TrialCheckpoint`) resumes from its last
    checkpoint when it has one, and saves a new one after evaluations; the resumed run then
    goes on exactly as the uninterrupted one would have.
    """
    t = cfg.training
    distributed.check_divisible(t.batch_size)
    events = CallbackList(callbacks)
    adapted.model.to(t.device).train()
    torch.manual_seed(t.seed)
    batches = seeded_batches(data, t.batch_size, t.seed)
    if cfg.adapter.init == "gradient":  # also on resume: the same seeded pass gives the same per-layer scales
        gradient_start(cfg, adapted, data)
    stepper = Stepper(cfg, adapted, events)
    accum = t.grad_accum_steps
    evals: list[tuple[int, dict[str, float]]] = []
    snapshot = checkpointer.load() if checkpointer is not None else None
    if snapshot is not None:
        for _ in range(snapshot.step * accum):  # replay the seeded shuffle: the data order goes on where it stopped
            next(batches)
        evals = snapshot.restore(stepper)  # ranks, tensors, optimizer, scheduler, controller, RNG
    events.on_train_start({"adapted_layers": len(adapted.adapters), "trainable_params": adapted.count_trainable(),
                           "schedule": stepper.controller.schedule if stepper.controller else None,
                           "resumed_step": stepper.done, "eval_history": list(evals)})
    started = time.perf_counter()
    for step in range(stepper.done + 1, t.steps + 1):
        stepper.step([next(batches) for _ in range(accum)])
        if step % t.eval_every == 0 or step == t.steps:
            metrics = evaluate(adapted, data, cfg.task.type, t.eval_batch_size, t.device, stepper.procs)
            evals.append((step, metrics))
            events.on_eval(step, metrics)
            if checkpointer is not None and stepper.procs.main:  # the others read it on a resume
                checkpointer.after_eval(stepper, evals)
    final = evals[-1][1]
    result = TrainResult(
        metric_name=cfg.task.metric, metric=final[cfg.task.metric], metrics=final, ranks=adapted.ranks(),
        rank_history=stepper.history, eval_history=evals, trainable_params=adapted.count_trainable(),
        adapter_params=adapted.count_adapter(), steps=t.steps, seconds=time.perf_counter() - started,
        adapted=adapted, resumed_from_step=snapshot.step if snapshot is not None else 0)
    events.on_train_end(result)
    return result
