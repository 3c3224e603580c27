"""Folders written whole or not at all, and replaced only when rankopt wrote them.

A folder rankopt writes (an exported adapter, a merged model, a report) is built in a hidden
temporary folder beside ``out`` and renamed into place when complete, so a kill mid-write
leaves no half folder a loader would accept. Every such folder carries a marker file
(:data:`MARKER`); ``--force`` replaces a folder only if it has one: a user's own folder (or
the current one, ``--out .``) is never deleted, whatever the flag.

Replacing goes: the new folder complete -> the old one renamed aside -> the new one renamed in ->
the old one deleted. The hidden folders carry this process's pid and host in their names, so the
next write to the same ``out`` knows which are left from a killed run (the process is gone) and
cleans them: a temporary folder is deleted, an old folder whose replacement never arrived is put
back where it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rankopt.errors import RankoptError

MARKER = ".rankopt"  # {"written_by": "rankopt"}: this folder may be replaced with --force


def _absolute(out: str | Path) -> Path:
    """``out`` made absolute with '..' and '.' resolved, without following links."""
    return Path(os.path.abspath(out))


def check_target(out: str | Path, force: bool = False) -> None:
    """Raise a one-line RankoptError unless ``out`` may be written: it is absent, or (``force``) rankopt's.

    Run it before any work is done, so that a refusal writes nothing.
    """
    path = _absolute(out)
    here = Path.cwd().resolve()
    if path == here or path in here.parents or path.resolve() == here:
        raise RankoptError(f"--out {out} is the folder you are in; rankopt writes a new folder there: "
                           "name one, such as --out ./best")
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise RankoptError(f"{out} already exists; choose another --out or pass --force to replace it")
    if not (path.is_dir() and (path / MARKER).is_file()):
        raise RankoptError(f"{out} was not written by rankopt (it has no {MARKER} file; folders from older "
                           "rankopt versions have none either), so --force does not replace it; choose another "
                           "--out, or move it away yourself")


def _tag(out: Path, kind: str) -> str:
    return f".{out.name}.rankopt-{kind}.{os.getpid()}@{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(out: str | Path) -> list[Path]:
    """Remove what a killed write to ``out`` left on this host; returns the folders it touched.

    A temporary folder is deleted; an old folder moved aside is put back when ``out`` is missing
    (the kill came between the two renames), else deleted.
    """
    out = _absolute(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.rankopt-(tmp|old)\.(\d+)@(.+)\.[A-Za-z0-9_]{{8}}")
    touched = []
    if not out.parent.is_dir():
        return touched
    for entry in sorted(out.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or found[3] != socket.gethostname() or _alive(int(found[2])):
            continue
        old = entry / "old"
        if found[1] == "old" and old.exists() and not (out.exists() or out.is_symlink()):
            os.replace(old, out)
        shutil.rmtree(entry, ignore_errors=True)
        touched.append(entry)
    return touched


@contextmanager
def atomic_folder(out: str | Path, force: bool = False):
    """Yield a temporary folder beside ``out``; rename it into place only if the block succeeds.

    An existing ``out`` is replaced only with ``force`` and only if rankopt wrote it
    (:func:`check_target`); an interrupted write leaves nothing, and the next one cleans up after it.
    """
    out = _absolute(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_tag(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "rankopt"}) + "\n")
        if out.exists() or out.is_symlink():
            check_target(out, force)  # again: it may have appeared while this one was written
            trash = Path(tempfile.mkdtemp(prefix=_tag(out, "old"), dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
