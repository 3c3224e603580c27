"""``--nproc-per-node N``: start this command as N data-parallel processes, through torchrun's own launcher.

``rankopt train PRESET --nproc-per-node 2`` is ``torchrun --standalone --nproc-per-node 2 -m
rankopt train PRESET`` (torch.distributed.run does the work: rendezvous, environment, the
one-thread-per-process default, ending the others when one dies), with the outcome said in one
line instead of the launcher's traceback. A user error is printed once and exits 2: the
processes leave their error lines in a folder the launcher reads, rather than racing to print
them before the launcher ends the others. A process that died or lost its peers ends the job
with exit code 1 and a line naming it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from rankopt.errors import RankoptError

FLAG = "--nproc-per-node"
LAUNCHED_HERE = "RANKOPT_LAUNCHER"  # in the processes started here: the folder for their error lines


def strip_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` / ``--nproc-per-node=N`` (what each process is started with)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(FLAG + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m rankopt ARGV`` as ``nproc`` processes on this machine; returns the exit code."""
    from rankopt import distributed

    if nproc < 1:
        raise RankoptError(f"{FLAG} must be 1 or more")
    if distributed.launched():
        raise RankoptError(f"{FLAG} starts the processes itself; under torchrun (or another launcher) leave it out")
    if nproc == 1:
        return -1  # nothing to start: the caller runs in this process
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # its failure report is said below, once
    # torchrun's own default (one thread each, announced in a banner), here split over this machine's cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"{FLAG}={nproc}", "--max-restarts=0",
                                         "-m", "rankopt", *strip_flag(argv)])
    with tempfile.TemporaryDirectory(prefix="rankopt-launch-") as errors:
        os.environ[LAUNCHED_HERE] = errors
        try:
            run(args)
        except ChildFailedError as exc:
            return _report(exc, nproc, Path(errors))
        finally:
            del os.environ[LAUNCHED_HERE]
    return 0


def leave_error(message: str) -> bool:
    """In a process started here: leave ``message`` for the launcher to print; False elsewhere."""
    folder = os.environ.get(LAUNCHED_HERE)
    if not folder or not Path(folder).is_dir():
        return False
    from rankopt import distributed

    (Path(folder) / f"rank-{distributed.current().rank:05d}.txt").write_text(message)
    return True


def _report(exc, nproc: int, errors: Path) -> int:
    said = sorted(errors.glob("rank-*.txt"))
    if said:  # a user error (the same on every process that got that far): rank 0's line, or the first's
        sys.stderr.write(f"error: {said[0].read_text()}\n")
        return 2
    failures = exc.failures
    rank, failure = exc.get_first_failure() if failures else (0, None)  # the first to fail, by time
    if failure is None:
        how = "failed"
    elif failure.exitcode < 0:
        how = f"was killed by {_signal_name(-failure.exitcode)}"
    else:
        how = f"exited with code {failure.exitcode}"
    sys.stderr.write(f"error: data-parallel process {rank} of {nproc} {how}; the job stopped and the other "
                     "processes were ended (rerun the same command to start over)\n")
    return 1


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
