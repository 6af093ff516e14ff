"""``service.store_errors`` on its own: the API store's circuit breaker with a hand-driven clock (what
``tests/chaos/test_store_faults.py`` shows end to end under a frozen Redis, step by step), and the API's
last-resort answer to a Redis error that escaped the store's translation. The real faults are in
``tests/chaos/test_store_faults.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from service.queue import CircuitBreaker, JobStore, StoreUnavailable
from tests.service.conftest import ApiServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


TIMED_OUT = StoreUnavailable("Timeout reading from socket", timed_out=True)
REFUSED = StoreUnavailable("Connection refused")


def test_a_timeout_makes_calls_fail_fast_then_one_call_tries_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker(open_seconds=1.0, clock=clock)
    breaker.before()
    breaker.after(TIMED_OUT)  # a call that waited out the timeout
    with pytest.raises(StoreUnavailable) as caught:
        breaker.before()  # the next ones fail at once, without a round-trip
    assert caught.value.timed_out and caught.value.code == "store_unavailable"
    clock.now += 1.0
    breaker.before()  # this call tries the store...
    with pytest.raises(StoreUnavailable):
        breaker.before()  # ...and the others keep failing fast while it does
    breaker.after(TIMED_OUT)  # still hung: open again for a second
    with pytest.raises(StoreUnavailable):
        breaker.before()
    clock.now += 1.0
    breaker.before()
    breaker.after(None)  # it answered: closed
    for _ in range(3):
        breaker.before()
        breaker.after(None)


def test_fast_failures_and_error_replies_never_open_it() -> None:
    breaker = CircuitBreaker(open_seconds=1.0, clock=Clock())
    for error in (REFUSED, StoreUnavailable("READONLY You can't write against a read only replica."), None):
        breaker.before()
        breaker.after(error)
    breaker.before()  # refused connections fail fast by themselves; error replies mean the store answers


def test_a_raw_redis_error_that_escaped_the_store_is_still_a_503(make_api: Callable[..., ApiServer],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api()
    job_id = httpx.post(f"{api.url}/generate", json={"steps": 1}).json()["id"]

    def escaped(self: Any, job_id: str) -> None:  # a store call written without the translation: a bug
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    monkeypatch.setattr(JobStore, "get", escaped)
    r = httpx.get(f"{api.url}/jobs/{job_id}")
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"] == "2"
