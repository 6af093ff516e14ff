"""A job's events as Server-Sent Events: the stream, its event ids, and the streams each client may hold.

    event_stream(...)    the events after ``Last-Event-ID`` from the job store, then the new ones as they come,
                         keep-alive comments while the job is quiet; ends after the terminal event
    parse_event_id(...)  a ``Last-Event-ID`` this API could have sent (``<ms>-<seq>``), else ``RequestInvalid``
    StreamSlots          at most ``DDPM_MAX_SSE_PER_CLIENT`` streams per client in this process (429 beyond)
    CountedStream        the response that gives its client's slot back however it ends

Each event's id is its Redis stream id, so a client that reconnects with ``Last-Event-ID`` gets what it missed.
The store's blocking reads run in worker threads (their own ``anyio`` limiter and Redis client, see
``service.app_state``), never on the event loop. The route is ``service.routes.jobs.job_events``; this module
knows the store's ``events`` and ``get`` and the SSE wire format, not routes or keys.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.queue import TERMINAL_STATES, JobStore, StoreUnavailable
from service.schemas import RequestInvalid
from service.web import ApiError

__all__ = ["RETRY_MS", "CountedStream", "StreamOptions", "StreamSlots", "event_stream", "format_event",
           "parse_event_id"]

RETRY_MS = 1000  # how long an EventSource waits before it reconnects (sent with the first event)
_STORE_AWAY = ": job store unavailable; reconnect with Last-Event-ID\n\n"
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_STREAM_ID_MAX = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit integer


@dataclass(frozen=True)
class StreamOptions:
    """How a stream waits: each store read blocks up to ``block_ms``; a quiet stream gets a keep-alive comment
    every ``keepalive_s`` (so proxies do not close it)."""

    keepalive_s: float = 15.0
    block_ms: int = 1000


def format_event(event_id: str, name: str, data: dict[str, Any]) -> str:
    """One SSE event: its id, its name and its data as one line of compact JSON."""
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def parse_event_id(value: str | None, field: str) -> str | None:
    """``value`` if it is an event id this API could have sent (``<ms>-<seq>``, both below 2^64), None when
    absent or empty; anything else raises ``RequestInvalid`` naming ``field`` (never a silent replay from the
    start, never an id Redis would refuse)."""
    if not value:
        return None
    match = _EVENT_ID.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2])) > _STREAM_ID_MAX:
        raise RequestInvalid(field, f"must be the id of an event of this stream, <ms>-<seq> with two integers "
                                    f"below 2^64 (got {value[:48]!r}); leave it out to replay from the start")
    return value


async def event_stream(request: Request, store: JobStore, job_id: str, last_id: str, options: StreamOptions,
                       limiter: anyio.CapacityLimiter) -> AsyncIterator[str]:
    """Events after ``last_id`` as SSE, then the new ones as they come; ends after the terminal event, when the
    job has expired, or when the store goes away (a comment says to reconnect). The ``retry:`` field rides on the
    first event: alone in a block, SSE client libraries surface it as an empty event."""
    retry = f"retry: {RETRY_MS}\n"
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        read = partial(store.events, job_id, last_id, block_ms=options.block_ms)
        try:
            events = await anyio.to_thread.run_sync(read, limiter=limiter)
        except StoreUnavailable:
            yield _STORE_AWAY
            return
        for event in events:
            if event.event == "frame":
                event.data["url"] = f"/jobs/{job_id}/frames/{event.data['index']}.png"
            yield retry + format_event(event.id, event.event, event.data)
            retry, last_id, quiet_since = "", event.id, time.monotonic()
            if event.event in TERMINAL_STATES:
                return
        if not events:
            try:
                job = await anyio.to_thread.run_sync(store.get, job_id, limiter=limiter)
            except StoreUnavailable:
                yield _STORE_AWAY
                return
            if job is None or job["status"] in TERMINAL_STATES:
                return  # expired, or the terminal event was already sent before this connection
            if time.monotonic() - quiet_since >= options.keepalive_s:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()


class StreamSlots:
    """The event streams each client (``service.web.client_id``) holds open in this process, at most ``limit``.
    Used on the event loop only: no lock needed."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}  # client id -> streams open now

    def take(self, who: str) -> Callable[[], None]:
        """One of ``who``'s slots (429 ``too_many_streams`` when all are in use); returns the function that gives
        it back (idempotent)."""
        if self._open.get(who, 0) >= self.limit:
            raise ApiError(429, "too_many_streams", f"at most {self.limit} event streams per client at a time; "
                                                    "close one or poll GET /jobs/{id}", headers={"Retry-After": "1"})
        self._open[who] = self._open.get(who, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[who] -= 1
                if self._open[who] <= 0:
                    del self._open[who]

        return release


class CountedStream(StreamingResponse):
    """An SSE response that gives its client's stream slot back however it ends (finished, client gone,
    error), even if the body never started."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
