"""What a finished study leaves behind for its user.

:mod:`.export` picks a study's trial and writes its adapter as a PEFT folder or a merged
transformers model (with tokenizer and the model card :mod:`.card` fills in), :mod:`.report` writes the study's
self-contained HTML report. They read studies and runs back through :mod:`rankopt.search` and
:mod:`rankopt.tracking` and write through :mod:`rankopt.adapters.peft_format` and
:mod:`rankopt.figures`; only the api and cli import them. (Named ``outputs`` rather than
``export``/``report`` because ``rankopt.export`` and ``rankopt.report`` are the public functions:
a subpackage of the same name would replace them as attributes of :mod:`rankopt` once imported.)
"""
