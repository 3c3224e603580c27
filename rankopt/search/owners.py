"""Which process runs a trial, so that a rerun on the same machine can tell at once that it died.

Heartbeats notice a lost trial after ``search.grace_period`` seconds (180 by default), which
is right for a worker on another machine. But a ``rankopt tune`` killed and rerun at once on
the same machine would leave its trial RUNNING (counted nowhere) for those three minutes,
while the answer is one system call away: every trial records its process (host, pid and the
pid's start time, so a reused pid is not taken for it) the moment Optuna makes it (:func:`mark`,
through the study's sampler), and a process that starts on the same host fails and retries the
trials whose process is gone. Other hosts' trials are left to the heartbeats: from here nothing
safe can be said about them.
"""

from __future__ import annotations

import logging
import os
import socket

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)
OWNER_ATTR = "rankopt_process"  # trial user attr: "HOST:PID:START"


def _start_time(pid: int) -> str:
    """The pid's start time in clock ticks since boot (Linux), or '' where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def mark(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Record this process on a trial Optuna has just made (before the objective runs, so a kill at
    any later moment leaves it marked)."""
    if trial.state == TrialState.RUNNING and OWNER_ATTR not in trial.user_attrs:
        study._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR, this_process())


def is_gone(owner: str) -> bool:
    """True only when ``owner`` ran on this host and that process no longer exists."""
    try:
        host, pid, start = owner.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return bool(start) and _start_time(pid_n) not in ("", start)  # the pid was reused by another process


def fail_orphaned_trials(study: optuna.Study, on_lost) -> list[int]:
    """Fail the RUNNING trials whose process on this host is gone and hand each to ``on_lost(study, trial)``.

    ``on_lost`` is the stale-trial handler (:class:`rankopt.search.studies.StaleTrialHandler`): it
    closes the trial's MLflow run and queues its retry, as for a trial that stopped beating.
    Call it under the study lock.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR)
        if not owner or not is_gone(owner):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another process got there first (UpdateFinishedTrialError)
            continue
        frozen = study._storage.get_trial(trial._trial_id)
        on_lost(study, frozen, reason="its process on this machine is gone")
        failed.append(trial.number)
    return failed
