"""Optuna: a tuning job is a study whose trials are fine-tunes.

:mod:`.trials` holds what one trial is made of (the search space, samplers and pruners by name,
the report-and-prune callback, trial summaries), :mod:`.studies` the storage side (opening RDB
storages, stale-trial retries, the study lock and trial limit, orphan runs), :mod:`.tuner` sets a
study up and runs its trials in one process, :mod:`.worker` joins a shared study as one of many,
:mod:`.selection` picks a study's trial (best, under a size cap, smallest within DELTA of the best),
:mod:`.holdout` scores the selected trials once on the test split after the study.
It imports :mod:`rankopt.training`, :mod:`rankopt.tasks`, :mod:`rankopt.tracking` and the
top-level config, errors and devices; never outputs, api or cli.
"""
