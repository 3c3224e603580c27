"""One process at a time opens a database store that may still need its tables.

Optuna and MLflow both create their tables (and run their migrations) when a store is first
opened. Two processes opening the same fresh database at once (two ``rankopt tune`` on one
study, workers started together) race: "table studies already exists", a UNIQUE violation on
``alembic_version``, or a half-migrated MLflow database. :func:`opening` serializes the open:
an advisory lock on PostgreSQL (its own connection, dropped by the server if the process dies),
an ``flock`` on the folder of a SQLite file. Other stores (MySQL, a tracking server) are opened
as they are: a server migrates its own database. A fresh SQLite store is also made aside and
renamed into place (:func:`made_whole`), so a kill during its creation leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def _sqlite_folder(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).parent


@contextlib.contextmanager
def opening(url: str) -> Iterator[None]:
    """Hold the store-creation lock of ``url``'s database while the block opens it."""
    scheme = urlsplit(url).scheme.split("+")[0].lower()
    if scheme in ("postgresql", "postgres"):
        with _advisory_lock(url):
            yield
        return
    folder = _sqlite_folder(url) if scheme == "sqlite" else None
    if folder is None or not folder.is_dir():
        yield  # nothing to lock on; a missing folder is the caller's error to report
        return
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without flock on folders: open unserialized
            log.debug("no creation lock on %s (%s)", folder, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def made_whole(url: str, create) -> None:
    """Make a missing SQLite store beside its place (``create(temp_url)``) and rename it in when complete.

    A process killed while MLflow migrates a fresh database leaves it half made, and every later
    open fails ("out-of-date database schema"). Made aside, the store appears whole or not at all.
    Call it under :func:`opening` (the temporary file then belongs to no one else).
    """
    folder = _sqlite_folder(url) if url.startswith("sqlite:///") else None
    if folder is None or not folder.is_dir():
        return
    path = Path(url[len("sqlite:///"):].split("?", 1)[0])
    if path.exists():
        return
    tmp = folder / f".{path.name}.creating"
    leftovers = [tmp, *(folder / f"{tmp.name}{suffix}" for suffix in ("-journal", "-wal", "-shm"))]
    for stale in leftovers:  # left by a creation that was killed
        stale.unlink(missing_ok=True)
    try:
        create(f"sqlite:///{tmp}")
        os.replace(tmp, path)
    finally:
        for stale in leftovers:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from rankopt.tracking.urls import sqlalchemy_url

    key = int.from_bytes(hashlib.sha256(b"rankopt:create-store").digest()[:8], "big", signed=True)
    try:
        engine = create_engine(sqlalchemy_url(url), poolclass=NullPool, connect_args={"connect_timeout": 10})
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except Exception:  # noqa: BLE001 - unreachable or bad URL: the open that follows reports it
        yield
        return
    try:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        yield
    finally:
        with contextlib.suppress(Exception):
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.close()
        engine.dispose()
