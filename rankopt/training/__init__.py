"""One fine-tune, from a built model to a result.

:mod:`.trainer` is the loop (steps, evaluation, the controller's reallocations), :mod:`.optim` the
AdamW state that follows resized tensors, :mod:`.checkpoint` exact save and resume, :mod:`.events`
the callbacks the loop reports through (so it never imports Optuna or MLflow), :mod:`.progress`
the terminal progress bars, :mod:`.hf_callback` the same controller inside a ``transformers.Trainer``,
:mod:`.setup` the model and data a run starts from. The step's helpers: :mod:`.precision` (float32
trained tensors, autocast, fp16 loss scaling), :mod:`.accumulation` (micro-batches weighted as one
batch), :mod:`.loss_log` (losses read every few steps, not every step), :mod:`.memory` (gradient
checkpointing, freeing memory between trials), :mod:`.lm_loss` (causal-LM evaluation loss in chunks).
:mod:`.memory_plan` is a run's peak memory by part before anything loads (:mod:`.memory_parts` the
parts, :mod:`.activations` what autograd saves per block, :mod:`.model_shapes` what is read off the
meta-device model). It may import :mod:`rankopt.adapters`, :mod:`rankopt.controller`,
:mod:`rankopt.tasks`, :mod:`rankopt.config`, :mod:`rankopt.devices` and :mod:`rankopt.errors`; never
tracking, search or outputs.
"""
