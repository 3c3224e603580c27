"""A tracking client that rides out an MLflow server going away for a while.

Training must not die because the tracking server restarts. :class:`ResilientClient` wraps
an ``MlflowClient`` and sorts its calls in three kinds:

* **deferrable** (``log_batch``, ``set_tag``, ...): while the server is unreachable they are
  queued in memory and the call returns at once, so training goes on at full speed; the
  queue is delivered, in order, as soon as a later call gets through;
* **best effort** (artifacts, ``set_terminated``, ...): the queue is flushed first, then the call
  is retried with exponential backoff (0.5 s doubling to 15 s) up to ``max_wait`` seconds;
  after that it is dropped with a warning;
* **essential** (everything else: ``create_run``, ``get_run``, ``search_runs``, ...): retried
  the same way, then :class:`TrackingUnavailable` is raised.

Only transient failures are retried (no connection, timeouts, HTTP 429/5xx, a locked SQLite
database); a real error (a bad parameter, a missing run) is raised at once. An outage is
reported once as a warning when it starts and once when the server answers again.
``create_run`` is made idempotent with a unique tag, so a retry after a lost reply does not
leave a second, forever-running run behind.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from rankopt.errors import RankoptError
from rankopt.tracking.urls import mask_text, mask_url

log = logging.getLogger("rankopt.tracking")

DEFERRABLE = frozenset({"log_batch", "log_metric", "log_param", "set_tag", "delete_tag"})
BEST_EFFORT = frozenset({"log_artifact", "log_artifacts", "log_dict", "log_text", "log_figure", "set_terminated",
                         "update_run", "set_experiment_tag", "log_inputs", "log_outputs"})
CREATE_TAG = "rankopt.create_id"
MAX_WAIT_ENV = "RANKOPT_MLFLOW_MAX_WAIT"


class TrackingUnavailable(RankoptError):
    """The tracking server stayed unreachable longer than the client would wait."""


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later retry may not see: the server is down, slow, or busy."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError",
                "ProtocolError", "MaxRetryError", "NewConnectionError"):
        return True
    text = str(exc).lower()
    status = None
    getter = getattr(exc, "get_http_status_code", None)
    if callable(getter):
        try:
            status = int(getter())
        except Exception:  # noqa: BLE001 - an exception without a usable status
            status = None
    if "api request to" in text and ("failed with exception" in text or "error code" in text):
        return True
    markers = ("database is locked", "could not connect", "connection refused", "server closed the connection",
               "timed out", "temporarily unavailable", "max retries exceeded")
    return (status in (429, 500, 502, 503, 504) or status is None) and any(m in text for m in markers)


class ResilientClient:
    """Proxy for an ``MlflowClient``: same methods, but outages are waited out (see the module doc)."""

    def __init__(self, client, uri: str = "", max_wait: float | None = None, first_delay: float = 0.5,
                 max_delay: float = 15.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self._client = client
        self._uri = mask_url(uri or getattr(client, "tracking_uri", "") or "")
        self.max_wait = float(os.environ.get(MAX_WAIT_ENV, 600)) if max_wait is None else float(max_wait)
        self.first_delay, self.max_delay = first_delay, max_delay
        self._sleep, self._clock = sleep, clock
        self._pending: list[tuple[str, tuple, dict]] = []
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = first_delay
        self._lock = threading.RLock()

    @property
    def tracking_uri(self) -> str:
        return getattr(self._client, "tracking_uri", "")

    @property
    def pending(self) -> int:
        """Calls queued while the server was away, not yet delivered."""
        return len(self._pending)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            return self._call(name, args, kwargs)

        return call

    # -- the three kinds of call ------------------------------------------------------------
    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        with self._lock:
            if name in DEFERRABLE:
                return self._deferred(name, args, kwargs)
            if not self._flush(block=True):
                if name in BEST_EFFORT:
                    self._drop(name)
                    return None
                raise self._unavailable(name)
            if name == "create_run":
                return self._create_run(args, kwargs)
            try:
                return self._retry(name, lambda: getattr(self._client, name)(*args, **kwargs))
            except TrackingUnavailable:
                if name in BEST_EFFORT:
                    self._drop(name)
                    return None
                raise

    def _deferred(self, name: str, args: tuple, kwargs: dict) -> None:
        self._pending.append((name, args, kwargs))
        if self._down_since is not None and self._clock() < self._next_try:
            self._give_up_if_too_long()
            return None
        self._flush(block=False)
        return None

    def _flush(self, block: bool) -> bool:
        """Deliver queued calls in order; True when the queue is empty afterwards."""
        while self._pending:
            name, args, kwargs = self._pending[0]
            try:
                if block:
                    self._retry(name, lambda: getattr(self._client, name)(*args, **kwargs))
                else:
                    self._attempt(lambda: getattr(self._client, name)(*args, **kwargs))
            except TrackingUnavailable:
                self._drop_pending()
                return False
            except _Down:
                self._give_up_if_too_long()
                return False
            except Exception:
                self._pending.pop(0)  # a real error: report it once, do not replay it forever
                raise
            self._pending.pop(0)
        return True

    def _create_run(self, args: tuple, kwargs: dict):
        """``create_run`` with a unique tag: after a lost reply, find the run instead of making a second one."""
        token = uuid.uuid4().hex
        kwargs = dict(kwargs)
        kwargs["tags"] = {**(kwargs.get("tags") or {}), CREATE_TAG: token}
        experiment_id = kwargs.get("experiment_id", args[0] if args else None)
        state = {"tried": False}

        def attempt():
            if state["tried"] and experiment_id is not None:
                found = self._client.search_runs([experiment_id], filter_string=f"tags.`{CREATE_TAG}` = '{token}'",
                                                 max_results=1)
                if found:
                    return found[0]
            state["tried"] = True
            return self._client.create_run(*args, **kwargs)

        return self._retry("create_run", attempt)

    # -- retry machinery --------------------------------------------------------------------------
    def _attempt(self, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - sorted into transient / real just below
            if not is_transient(exc):
                raise
            self._went_down(exc)
            raise _Down() from exc
        self._came_back()
        return result

    def _retry(self, name: str, fn: Callable[[], Any]) -> Any:
        while True:
            try:
                return self._attempt(fn)
            except _Down:
                since = self._down_since if self._down_since is not None else self._clock()
                if self._clock() - since >= self.max_wait:
                    raise self._unavailable(name) from None
                wait = max(0.0, min(self._next_try - self._clock(), self.max_delay))
                self._sleep(wait or self.first_delay)

    def _went_down(self, exc: BaseException) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self._delay = self.first_delay
            first = mask_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
            log.warning("MLflow at %s is unreachable (%s); retrying with backoff for up to %.0fs, "
                        "training goes on", self._uri or "the tracking URI", first, self.max_wait)
        else:
            self._delay = min(self._delay * 2, self.max_delay)
        self._next_try = now + self._delay

    def _came_back(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow at %s answers again after %.0fs; delivering %d queued call(s)",
                        self._uri or "the tracking URI", self._clock() - self._down_since, len(self._pending))
            self._down_since = None
            self._delay = self.first_delay

    def _give_up_if_too_long(self) -> None:
        if self._down_since is not None and self._clock() - self._down_since >= self.max_wait:
            self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending:
            log.warning("MLflow stayed unreachable for %.0fs; dropped %d queued logging call(s)",
                        self.max_wait, len(self._pending))
            self._pending.clear()

    def _drop(self, name: str) -> None:
        log.warning("MLflow unreachable: gave up on %s after %.0fs", name, self.max_wait)

    def _unavailable(self, name: str) -> TrackingUnavailable:
        return TrackingUnavailable(f"MLflow at {self._uri or 'the tracking URI'} stayed unreachable for "
                                   f"{self.max_wait:.0f}s ({name}); check the tracking server")


class _Down(Exception):
    """Internal: one attempt hit a transient failure."""
