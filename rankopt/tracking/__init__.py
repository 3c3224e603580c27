"""MLflow: where runs and studies are recorded and looked at.

:mod:`.mlflow_runs` creates experiments, runs and nested trial runs and logs to them (a training
callback), :mod:`.resilient` is the client that waits out tracking-server outages, :mod:`.urls`
checks storage and tracking URLs and masks their passwords, :mod:`.ui` serves the MLflow UI.
It imports :mod:`rankopt.training.events`, :mod:`rankopt.adapters.peft_format` (to log the
adapter), :mod:`rankopt.figures` and :mod:`rankopt.errors`; never search or outputs.
"""
