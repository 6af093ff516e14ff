"""How the API is served: uvicorn, configured in one place (``server_config``) for ``ddpm serve`` and for the
tests' ``ApiServer``, with read deadlines for slow clients. This module knows HTTP connections, not routes.

uvicorn has no deadline for reading a request: a client that sends its headers one byte every few seconds
(slow-loris), a body that never ends, or nothing at all after connecting holds its connection for as long as
it likes. ``DeadlineH11Protocol`` is uvicorn's h11 protocol with two deadlines:

    headers  from the moment the server waits for a request (connection opened, or the previous response sent)
             until the request line and headers are complete (``DDPM_HEADER_TIMEOUT_SECONDS``, default 10 s)
    body     from the end of the headers until the end of the body (``DDPM_BODY_TIMEOUT_SECONDS``, default 30 s),
             whether or not the app reads it

A connection that misses one is answered ``408 request_timeout`` (when a request had begun and no answer was
sent yet) and closed. Responses are never timed: an event stream may run for as long as its job does.

It watches h11's view of the client (``their_state``) after every read, so it leans on two uvicorn internals,
``H11Protocol.conn`` and ``H11Protocol.cycle`` (pinned uvicorn range in pyproject.toml);
tests/service/test_slow_clients.py fails when they change. The h11 protocol is used whatever else is installed
(httptools would not get the deadlines), and WebSocket upgrades are off (the API has none).

uvicorn's own proxy-header handling is off (it trusts 127.0.0.1 by default): the app resolves the client's
address from ``DDPM_TRUSTED_PROXIES`` itself (``service.web.ClientAddressMiddleware``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

__all__ = ["DeadlineH11Protocol", "deadline_protocol", "server_config"]

log = logging.getLogger(__name__)
Phase = Literal["headers", "body"]


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read deadlines (seconds, class attributes: see
    ``deadline_protocol``)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._phase: Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._began = False  # a byte of the awaited request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        self._began = True
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next (pipelined) request
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of what is awaited from the client now: a request's headers, its body, or nothing."""
        state = self.conn.their_state
        phase: Phase | None = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._arm(phase)

    def _arm(self, phase: Phase | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase == "headers":
            self._began = False
            self._deadline = self.loop.call_later(self.header_timeout, self._expired, phase)
        elif phase == "body":
            self._deadline = self.loop.call_later(self.body_timeout, self._expired, phase)

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        timeout = self.header_timeout if phase == "headers" else self.body_timeout
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        cycle = self.cycle if phase == "body" else None
        answer = (phase == "headers" and self._began) or (cycle is not None and not cycle.response_started)
        log.info("closing the connection of %s: request %s not received within %.3g s", who, phase, timeout)
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() now says http.disconnect; its sends are dropped
            cycle.message_event.set()
        if answer:
            self.transport.write(_timeout_response(phase, timeout))
        self.transport.close()


def _timeout_response(phase: Phase, timeout: float) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout", "message": f"the request {phase} did not arrive "
                                                                       f"within {timeout:.3g} s"}}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    return head + body


def deadline_protocol(header_timeout: float, body_timeout: float) -> type[DeadlineH11Protocol]:
    """A ``DeadlineH11Protocol`` class with these deadlines (uvicorn instantiates the class it is given)."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})


def server_config(app: ASGIApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of the API: ``settings``' address, log level and read deadlines, h11 with
    deadlines, no proxy-header handling by uvicorn, no WebSockets. ``overrides`` go to ``uvicorn.Config`` (tests
    pass a port and a quieter log level)."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level.lower(),
        "http": deadline_protocol(settings.header_timeout_seconds, settings.body_timeout_seconds),
        "ws": "none", "proxy_headers": False, "lifespan": "on", "timeout_graceful_shutdown": 5,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
