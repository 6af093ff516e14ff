"""Every API response the test suite observes, recorded so that one test at the end of the session can check
each against the API's OpenAPI document (``tests/service/test_observed_contract.py``).

``Recorder.install()`` wraps httpx's own transports (``HTTPTransport.handle_request`` and its async twin; every
``httpx`` call and the generated client go through them) so that each exchange is kept with the bytes of the body
the test read; a body read only in part (an event stream left open) is kept as such, and its schema is checked
only as far as it was read (the complete events of a stream; nothing of a JSON body left unread). Only exchanges
with servers that answer as uvicorn are API exchanges (the worker's metrics server is not); the rest are ignored.
``check(exchanges, document)`` runs schemathesis's response checks (status code, content type, headers, body
schema) on each exchange whose method and path the document has, and describes every mismatch with the route.
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Exchange", "Recorder", "check"]


@dataclass
class Exchange:
    """One request and its response as the test saw them."""

    method: str
    url: str
    request_headers: dict[str, str]
    status: int
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole body was read

    @property
    def from_api(self) -> bool:
        return any(k.lower() == "server" and v.startswith("uvicorn") for k, v in self.headers)


class _Tee(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, exchange: Exchange):
        self.inner, self.exchange = inner, exchange

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.exchange.body += chunk
            yield chunk
        self.exchange.complete = True

    def close(self) -> None:
        self.inner.close()


class _AsyncTee(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, exchange: Exchange):
        self.inner, self.exchange = inner, exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.exchange.body += chunk
            yield chunk
        self.exchange.complete = True

    async def aclose(self) -> None:
        await self.inner.aclose()


class Recorder:
    """Keeps every exchange made through httpx while installed (thread-safe)."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._saved: tuple[Any, Any] | None = None

    def _keep(self, request: httpx.Request, response: httpx.Response) -> Exchange:
        exchange = Exchange(request.method, str(request.url), dict(request.headers), response.status_code,
                            list(response.headers.multi_items()))
        with self._lock:
            self.exchanges.append(exchange)
        return exchange

    def install(self) -> Recorder:
        sync_send, async_send = httpx.HTTPTransport.handle_request, httpx.AsyncHTTPTransport.handle_async_request
        recorder = self

        def handle_request(transport: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
            response = sync_send(transport, request)
            assert isinstance(response.stream, httpx.SyncByteStream)
            response.stream = _Tee(response.stream, recorder._keep(request, response))
            return response

        async def handle_async_request(transport: httpx.AsyncHTTPTransport, request: httpx.Request
                                       ) -> httpx.Response:
            response = await async_send(transport, request)
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _AsyncTee(response.stream, recorder._keep(request, response))
            return response

        self._saved = (sync_send, async_send)
        httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
        httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        if self._saved is not None:
            httpx.HTTPTransport.handle_request, httpx.AsyncHTTPTransport.handle_async_request = self._saved
            self._saved = None


def _is_event_stream(exchange: Exchange) -> bool:
    return any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in exchange.headers)


def _as_schemathesis(exchange: Exchange) -> Any:
    import requests
    from schemathesis.core.transport import Response

    headers: dict[str, list[str]] = collections.defaultdict(list)
    for key, value in exchange.headers:
        headers[key.lower()].append(value)
    body = bytes(exchange.body)
    if not exchange.complete:  # an event stream left open: its complete events only
        body = body[:body.rfind(b"\n\n") + 2] if b"\n\n" in body else b""
    request = requests.Request(exchange.method, exchange.url, headers=exchange.request_headers).prepare()
    return Response(status_code=exchange.status, headers=dict(headers), content=body, request=request,
                    elapsed=0.0, verify=True, stream_cut_short=not exchange.complete)


def _path_parameters(template: str, path: str) -> dict[str, str]:
    """``{"job_id": "abc", "index": "3"}`` for ``/jobs/{job_id}/frames/{index}.png`` and a concrete path."""
    pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+?)", re.escape(template))
    found = re.fullmatch(pattern, path)
    return found.groupdict() if found else {}


def check(exchanges: list[Exchange], document: dict[str, Any]) -> tuple[list[str], collections.Counter[str]]:
    """Mismatches between ``exchanges`` and ``document`` (one line per distinct route, status and problem), and
    how many exchanges each route had. Exchanges with no operation in the document (unknown paths, methods the
    document does not list, the docs pages) are counted under ``"not in the document"``."""
    import schemathesis
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(document)
    checks = [status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    problems: dict[str, None] = {}
    seen: collections.Counter[str] = collections.Counter()
    for exchange in exchanges:
        url = httpx.URL(exchange.url)
        operation = schema.find_operation_by_path(exchange.method, url.path)
        if operation is None:
            seen["not in the document"] += 1
            continue
        route = f"{exchange.method} {operation.path}"
        seen[route] += 1
        case = operation.Case(path_parameters=_path_parameters(operation.path, url.path), query=dict(url.params),
                              headers=exchange.request_headers)
        # A body the test did not read (whole) cannot be judged, except the complete events of a stream.
        judged = checks if exchange.complete or _is_event_stream(exchange) else checks[:-1]
        try:
            case.validate_response(_as_schemathesis(exchange), checks=judged)
        except FailureGroup as group:
            for failure in group.exceptions:
                detail = " ".join(f"{failure.title}: {failure.message}".split())[:400]
                problems[f"{route} -> {exchange.status}: {detail}"] = None
        except AssertionError as exc:  # a single failed check
            problems[f"{route} -> {exchange.status}: {' '.join(str(exc).split())[:400]}"] = None
    return list(problems), seen
