"""What a fine-tune learns from and is judged by: the task and its pretrained model.

:mod:`.data` reads a task's splits (hub, local files or the builtin demo in :mod:`.demo_data`) and
tokenizes them once (chats through :mod:`.chat`, packed rows through :mod:`.packing`), :mod:`.metrics` scores predictions, :mod:`.modeling` finds and loads the
pretrained model and tokenizer, :mod:`.architectures` only its config (and the model on the meta
device). It imports :mod:`rankopt.config` and :mod:`rankopt.errors` only, so it knows nothing of adapters, training or tracking.
"""
