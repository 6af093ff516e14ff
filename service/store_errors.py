"""What a failing store means to its callers: one exception family for every Redis error, a circuit breaker
for a store that hangs, and a sampled view of how full it is. ``service.queue`` uses these around every Redis
call (its own and RQ's); the API maps the family to 503s. Knows redis-py's exceptions, no keys and no RQ::

    StoreUnavailable          code "store_unavailable": unreachable, timed out, connection reset, read-only
     |                        replica, loading its data set, refusing writes, any other ``redis.RedisError``
     +-- StoreFull            code "store_full": Redis is out of memory (OOM), or the store is past the API's
                              high-water mark and new jobs are refused so that running ones can still write
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

__all__ = ["CircuitBreaker", "MemorySample", "StoreFull", "StoreUnavailable", "store_error", "translate_errors"]


class StoreUnavailable(Exception):
    """The store (Redis) cannot do this now. ``code`` and ``retry_after`` (seconds) are what clients are told;
    ``timed_out``: the store did not answer in time (it may be hung, not just down)."""

    code = "store_unavailable"
    retry_after = 2

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class StoreFull(StoreUnavailable):
    """Redis is out of memory, or past the API's high-water mark: no new jobs until finished ones expire."""

    code = "store_full"
    retry_after = 30


def store_error(exc: redis.RedisError) -> StoreUnavailable:
    """The one exception a Redis error becomes (see the module docstring). The message is cut short: redis-py
    puts a failed pipeline command, arguments and all (PNG bytes...), into it."""
    message = f"{type(exc).__name__}: {exc}"
    message = message if len(message) <= 300 else message[:300] + "..."
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
        return StoreFull(message)
    return StoreUnavailable(message, timed_out=isinstance(exc, redis.TimeoutError))


@contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise store_error(exc) from exc


class CircuitBreaker:
    """Fail fast while the store hangs. After a call times out, every call for the next ``open_seconds`` fails
    at once with ``StoreUnavailable``; then one call at a time is let through to try the store again, and the
    first answer of any kind (even an error reply: the store is answering) closes the breaker. Refused
    connections fail fast on their own and do not open it. Thread-safe."""

    def __init__(self, open_seconds: float, clock: Any = time.monotonic):
        self.open_seconds, self._clock = open_seconds, clock
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed
        self._trying = False

    def before(self) -> None:
        with self._lock:
            if self._open_until is None:
                return
            if self._trying or self._clock() < self._open_until:
                raise StoreUnavailable("the store did not answer within its timeout a moment ago; not trying "
                                       "again yet", timed_out=True)
            self._trying = True  # this call tries the store; the others keep failing fast

    def after(self, error: StoreUnavailable | None) -> None:
        with self._lock:
            self._trying = False
            if error is not None and error.timed_out:
                self._open_until = self._clock() + self.open_seconds
            else:
                self._open_until = None


class MemorySample:
    """``used_memory / maxmemory`` from INFO, refreshed at most every ``every`` seconds (thread-safe: one
    thread refreshes, the others use the last sample meanwhile)."""

    def __init__(self, every: float = 1.0):
        self.every = every
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._fraction: float | None = None

    def fraction(self, client: Any) -> float | None:
        if time.monotonic() - self._at >= self.every and self._lock.acquire(blocking=False):
            try:
                info = client.info("memory")
                limit = int(info.get("maxmemory") or 0)
                self._fraction = int(info["used_memory"]) / limit if limit else None
                self._at = time.monotonic()
            finally:
                self._lock.release()
        return self._fraction
