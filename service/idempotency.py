"""Idempotent job creation: the ``Idempotency-Key`` request header, for every route that creates a job.

Apps retry POSTs (a timeout, a dropped connection); without a key each retry queues another job on a GPU. With
one, the first request creates the job and every later request with the same key and the same body, within the
job TTL, gets that job back: the same id, status 200 instead of 202, and ``Idempotent-Replayed: true``. The same
key with a different body is a 422 naming the header. Keys are scoped to the caller (``service.web.client_id``:
the API key's digest, or the client's address when keys are off), so one caller's keys never meet another's.

The record is one Redis string, ``ddpm:idempotency:{sha256(scope, key)}`` (neither the key nor the scope is part
of the name), expiring with the job TTL: ``{"fp": body fingerprint, "job": id, "state": pending|created, "at"}``.
Concurrent retries are settled atomically: a script sets the record only if there is none (with a job id drawn
beforehand); the winner creates that job and marks it ``created``; the others wait (up to ``WAIT_SECONDS``) until
the job exists, then replay it. If the winner fails (queue full, Redis away) it removes the record, so a retry
can create the job; if it died, its ``pending`` record is taken over after ``STALE_SECONDS`` (a job it did create
is found and replayed, never duplicated). Still pending after the wait: 409 ``idempotency_in_progress`` with
``Retry-After``.

A route takes the ``Idempotency`` dependency and hands ``run`` two callables: ``create(job_id)`` and
``existing(job_id)`` (the response for a job that exists, else None). Redis errors become the job store's
(``service.store_errors.translate_errors``: 503 ``store_unavailable`` or ``store_full``). This module knows Redis
and FastAPI's request objects; it does not know what a job holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel

from service.deps import Store
from service.queue import StoreUnavailable, new_job_id
from service.store_errors import translate_errors
from service.web import ApiError, client_id

__all__ = ["HEADER", "REPLAYED_HEADER", "Idempotency", "IdempotentCreation", "fingerprint", "idempotency"]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
WAIT_SECONDS = 10.0  # how long a concurrent retry waits for the first request to create the job
STALE_SECONDS = 30.0  # a pending record older than this, with no job, belongs to a request that died
POLL_SECONDS = 0.02
Answer = TypeVar("Answer")  # what a route answers with: the job created, or the one found again

# KEYS: record. ARGV: new record, ttl. Sets it if there is none; returns the current record otherwise.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return false
"""

# KEYS: record. ARGV: expected job id, replacement ('' deletes). Only while the record still names that job.
_SWAP = """
local current = redis.call('GET', KEYS[1])
if not current or cjson.decode(current).job ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
return 1
"""


def fingerprint(route: str, body: BaseModel) -> str:
    """What "the same request" means: the route and the body as parsed, defaults included (so ``{}`` and
    ``{"num_images": 1}`` are the same request; key order and spacing never matter)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()


class IdempotentCreation:
    """One request's idempotency: ``key`` None means the request carries no key (every call creates)."""

    def __init__(self, client: Any, scope: str, key: str | None, ttl: int, route: str, response: Response):
        self.redis, self.key, self.ttl, self.route, self.response = client, key, ttl, route, response
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        self.record_key = f"ddpm:idempotency:{digest}"
        self._claim = client.register_script(_CLAIM)
        self._swap = client.register_script(_SWAP)

    def run(self, body: BaseModel, create: Callable[[str], Answer], existing: Callable[[str], Answer | None]) -> Answer:
        """``create(job_id)`` once per key and body; ``existing(job_id)`` for every replay (module docstring)."""
        if self.key is None:
            return create(new_job_id())
        fp = fingerprint(self.route, body)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            mine = {"fp": fp, "job": new_job_id(), "state": "pending", "at": time.time()}
            with translate_errors():
                current = self._claim(keys=[self.record_key], args=[json.dumps(mine), self.ttl])
            if current is None:
                return self._create(mine, create)
            record = json.loads(current)
            if record["fp"] != fp:
                raise ApiError(422, "invalid_request", f"{HEADER}: this key was already used with a different "
                                                       "request body; use a new key for a new request")
            replay = existing(record["job"])
            if replay is not None:
                if record["state"] != "created":  # its creator died or is about to mark it
                    self._replace(record["job"], {**record, "state": "created"})
                self.response.status_code = 200
                self.response.headers[REPLAYED_HEADER] = "true"
                return replay
            if record["state"] == "created":  # the job is gone (expired early): the key is free again
                self._replace(record["job"], None)
                continue
            if time.time() - record["at"] > STALE_SECONDS and self._replace(record["job"], mine):
                return self._create(mine, create)
            if time.monotonic() > deadline:
                raise ApiError(409, "idempotency_in_progress", f"a request with this {HEADER} is still being "
                                                               "processed; retry shortly", headers={"Retry-After": "1"})
            time.sleep(POLL_SECONDS)

    def _create(self, mine: dict[str, Any], create: Callable[[str], Answer]) -> Answer:
        try:
            result = create(mine["job"])
        except BaseException:
            with suppress(StoreUnavailable):
                self._replace(mine["job"], None)  # a retry with this key may create the job
            raise
        self._replace(mine["job"], {**mine, "state": "created"})
        return result

    def _replace(self, job_id: str, record: dict[str, Any] | None) -> bool:
        with translate_errors():
            return bool(self._swap(keys=[self.record_key], args=[job_id, "" if record is None else json.dumps(record)]))


def idempotency(request: Request, response: Response, store: Store,
                key: Annotated[str | None, Header(
                    alias=HEADER, min_length=1, max_length=255, pattern=r"^[\x21-\x7e][\x20-\x7e]*$",
                    description="any unique string (e.g. a UUID): a retry with the same key and body returns the "
                                "job the first request created (200, Idempotent-Replayed: true) instead of a new "
                                "one; the same key with another body is 422")] = None) -> IdempotentCreation:
    """The dependency: this request's ``IdempotentCreation`` (scoped to ``client_id``, kept for the job TTL)."""
    return IdempotentCreation(store.redis, client_id(request), key, store.ttl,
                              f"{request.method} {request.url.path}", response)


Idempotency = Annotated[IdempotentCreation, Depends(idempotency)]
