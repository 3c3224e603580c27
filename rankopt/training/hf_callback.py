"""Attach the rank controller to a user's own ``transformers.Trainer``.

    adapted = rankopt.adapt(model, ["query", "value"], rank=8, alpha=16)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=ds,
                      callbacks=[RankControllerCallback(adapted, target_rank=4)])
    trainer.train()
    rankopt.save_adapter(adapted, "out/adapter", base_model="bert-base-uncased")

The Trainer owns the loop; the callback reads gradients before each optimizer step (the
sensitivity EMA), reallocates ranks at the scheduled steps after it, and swaps the resized
tensors into the Trainer's optimizer with the survivors' Adam state carried over.

Each step runs in the order of rankopt's own trainer: the controller reads the task's gradient,
then the orthogonality penalty's gradient is added (``orth_reg``), then the gradients are
clipped. The Trainer would clip before any callback sees them (transformers clips, then calls
``on_pre_optimizer_step``), which would feed the sensitivity a gradient shrunk by a factor that
changes from step to step; so for the run the callback takes the clipping over: it sets
``args.max_grad_norm`` to 0 at ``on_train_begin``, clips to the value it found there itself,
and puts the value back at ``on_train_end``. (The Trainer still logs the norm before clipping.)

One process only: under torchrun the Trainer wraps the model in DistributedDataParallel, whose
gradient buckets cannot follow parameters that change shape, so the callback refuses to start
there (``torchrun -m rankopt train`` is rankopt's data-parallel path).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from rankopt import distributed
from rankopt.adapters.model import AdaptedModel, add_orthogonality_gradient
from rankopt.config import ControllerConfig
from rankopt.controller import BudgetSchedule, RankController
from rankopt.errors import RankoptError
from rankopt.training.events import RankEvent, tensor_lists
from rankopt.training.optim import apply_resizes


class RankControllerCallback(TrainerCallback):
    """Runs rankopt's budget schedule inside ``Trainer.train``; ``history`` records every reallocation.

    ``orth_reg`` weighs the orthogonality penalty on each adapter's P and Q (rankopt's
    ``training.orth_reg``, same default): it keeps the components apart, so that a component's
    energy is its singular value and pruning one removes what its score measured.
    """

    def __init__(self, adapted: AdaptedModel, controller: ControllerConfig | dict[str, Any] | None = None,
                 seed: int = 0, orth_reg: float = 0.1, **controller_values: Any):
        if isinstance(controller, ControllerConfig):
            self.cfg = controller.model_copy(update=controller_values)
        else:
            self.cfg = ControllerConfig(**{**(controller or {}), **controller_values})
        if orth_reg < 0:
            raise RankoptError(f"orth_reg must be 0 or more, not {orth_reg}")
        self.adapted = adapted
        self.seed = seed
        self.orth_reg = orth_reg
        self.max_grad_norm: float | None = None  # the Trainer's, while the callback clips in its place
        self.controller: RankController | None = None
        self.history: list[RankEvent] = [RankEvent(step=0, budget=adapted.total_rank(), ranks=adapted.ranks())]

    def on_train_begin(self, args, state, control, **kwargs):
        world = max(getattr(args, "world_size", 1), distributed.current().world)
        if world > 1:
            raise RankoptError(f"RankControllerCallback runs in one process, not {world}: DistributedDataParallel "
                               "cannot follow adapters that change shape; for data-parallel adaptive ranks use "
                               "`torchrun --nproc-per-node N -m rankopt train PRESET`, or run this Trainer in one "
                               "process")
        layers = self.adapted.adapters
        target = round(self.cfg.target_rank * len(layers))
        if target < len(layers) * self.cfg.min_rank:
            raise RankoptError(f"rank budget {target} is below {len(layers)} layers x min_rank {self.cfg.min_rank}")
        schedule = BudgetSchedule.from_fractions(self.adapted.total_rank(), target, state.max_steps,
                                                 self.cfg.warmup, self.cfg.final, self.cfg.interval)
        self.controller = RankController(layers, schedule, self.cfg.importance, self.cfg.min_rank, self.cfg.max_rank,
                                         self.cfg.max_grow, self.cfg.beta1, self.cfg.beta2, seed=self.seed,
                                         min_age=self.cfg.min_age, growth=self.cfg.growth,
                                         probe_tokens=self.cfg.probe_tokens, budget_unit=self.cfg.budget_unit,
                                         swap=self.cfg.swap)
        self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0  # clipped here, after the controller read

    def on_train_end(self, args, state, control, **kwargs):
        if self.max_grad_norm is not None:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.controller is not None:  # arms the gradient probe before a growing reallocation
            self.controller.before_step(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.controller is None:
            return
        self.controller.after_backward(state.global_step)  # the task's gradient, unclipped (fp16: unscaled)
        if self.orth_reg:
            add_orthogonality_gradient(self.adapted, self.orth_reg)
        if self.max_grad_norm:
            params = [p for p in (model or self.adapted.model).parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.controller is None:
            return
        change = self.controller.step(state.global_step)
        if change is None:
            return
        if optimizer is None:
            raise RankoptError("the Trainer passed no optimizer to the callback; cannot resize adapters")
        apply_resizes(getattr(optimizer, "optimizer", optimizer), change.resizes)
        self.history.append(RankEvent(step=change.step, budget=change.budget, ranks=change.ranks,
                                      scores={k: tensor_lists(v) for k, v in change.scores.items()}))
