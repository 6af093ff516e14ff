"""HTTP plumbing of the API: the one error shape and its handlers, who the client is (its address and the id
every per-client limit counts under), the body-size limit and the request metrics middleware. ``service.api``
wires these into the app; the dependencies that check keys and limits per request are ``service.deps``'. This
module knows no routes and no Redis keys; it maps the store's and the queue's exceptions to HTTP.

Every error is ``{"error": {"code", "message"}}`` with its status; who raises each code:

    400 bad_request        a body that cannot be read (Starlette)
    401 unauthorized       no API key while keys are on (``deps.require_key``; WWW-Authenticate: Bearer)
    403 forbidden          a wrong API key (``deps.require_key``)
    404 not_found          an unknown route, an unknown or expired job, another key's job, no such frame or image
    405 method_not_allowed with ``Allow`` listing every method of the path
    408 request_timeout    headers or body not received in time (``service.http_server``)
    409 idempotency_in_progress  (``service.idempotency``; Retry-After)
    410 expired            a PNG (or a frame of an animation) outlived by its job
    413 body_too_large     over DDPM_MAX_BODY_BYTES / DDPM_MAX_UPLOAD_BYTES (``BodyLimitMiddleware``)
        image_too_large    an input picture over DDPM_MAX_INPUT_PIXELS (``ImageTooLarge``)
    422 invalid_request    ``RequestValidationError`` or ``RequestInvalid``: the field and its allowed range or values
    429 queue_full         ``QueueFull``: too many jobs waiting (Retry-After)
        rate_limited       over DDPM_RATE_LIMIT_PER_MINUTE, or too many refused keys from one address
                           (``deps.rate_limit``, ``deps.require_key``; Retry-After)
        too_many_streams   over DDPM_MAX_SSE_PER_CLIENT event streams (``service.sse``; Retry-After)
    503 store_unavailable  ``StoreUnavailable``, and any ``redis.RedisError`` that escaped the store (Retry-After 2)
        store_full         ``StoreFull``: Redis near its maxmemory, no new jobs (Retry-After 30)
        model_unavailable  the chosen model's checkpoint cannot be read yet (``service.routes.operations``)

Who the client is, for every per-client limit, comes from ``client_id``: the API key's digest once the key was
accepted, else the client's address. The address is the connection's peer, or, when the peer is a proxy listed
in ``DDPM_TRUSTED_PROXIES``, the right-most address of ``X-Forwarded-For`` that is not a trusted proxy
(``client_address``; ``ClientAddressMiddleware`` puts it into the request's scope, so logs show it too).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.inputs import ImageTooLarge
from service.openapi import error_responses
from service.queue import QueueFull, StoreUnavailable, store_error
from service.schemas import INPUT_TAGS, Limits, RequestInvalid

__all__ = ["HTTP_METHODS", "ApiError", "BodyLimitMiddleware", "ClientAddressMiddleware", "MetricsMiddleware",
           "TrustedProxies", "allowed_methods", "client_address", "client_id", "error_response",
           "install_error_handlers", "request_labels", "responses"]

log = logging.getLogger(__name__)
_STORE_MESSAGES = {
    "store_unavailable": "the job store (Redis) is unavailable (unreachable, timed out, read-only or loading); "
                         "retry shortly",
    "store_full": "the job store (Redis) is full: no new jobs until finished ones expire; retry later",
}
# The code of an HTTPException raised by Starlette or FastAPI themselves (an unknown route, a body that cannot be
# read...); this API's own errors carry their code (the table above).
_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 410: "expired", 413: "body_too_large", 422: "invalid_request", 429: "rate_limited",
          503: "unavailable"}
# Methods that get their own label in the request metrics; any other (clients may invent them) is "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error responses of a route (``service.openapi.error_responses``: the error shape,
    the codes each status carries, its headers)."""
    return error_responses(*codes)


# ---- middleware --------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length or by counting a streamed body;
    ``routes`` maps exact paths to their own limit (the routes that take pictures)."""

    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[str, int] | None = None):
        self.app, self.max_bytes, self.routes = app, max_bytes, dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.routes.get(scope["path"], self.max_bytes)
        setting = "DDPM_MAX_UPLOAD_BYTES" if scope["path"] in self.routes else "DDPM_MAX_BODY_BYTES"
        too_big = error_response(413, "body_too_large", f"the request body must be at most {limit} bytes "
                                                        f"({setting})")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                return await too_big(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def request_labels(scope: Scope, status: int) -> tuple[str, str, str]:
    """The metric labels of a request, each from a closed set whatever the client sends: the method (one of
    ``HTTP_METHODS``, else ``other``), the route template that answered (``unmatched`` when none did; never the
    raw path) and the status code the app chose."""
    method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    return method, route, str(status)


class MetricsMiddleware:
    """Request count and latency by method, route template and status (``request_labels``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = request_labels(scope, status)
            metrics.HTTP_REQUESTS.labels(*labels).inc()
            metrics.HTTP_REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - start)


# ---- who is asking -----------------------------------------------------------------------------------------
def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it in X-Forwarded-For (``1.2.3.4``, ``1.2.3.4:567``, ``::1``, ``[::1]:567``)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """The reverse proxies whose ``X-Forwarded-For`` is believed (``DDPM_TRUSTED_PROXIES``: addresses or CIDR
    networks). Empty: no proxy is trusted and the header is ignored."""

    def __init__(self, entries: list[str]):
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        ip = _parse_address(host)
        return ip is not None and any(ip in net for net in self.networks)


def client_address(scope: Scope, trusted: TrustedProxies) -> str:
    """The client's address. The connection's peer, unless the peer is a trusted proxy: then the right-most
    address of ``X-Forwarded-For`` that is not itself a trusted proxy (each proxy appends the address it got the
    request from, so what lies left of that was written by the client and may be forged). An entry that is not
    an address stops the walk at the proxy that passed it on."""
    peer = scope["client"][0] if scope.get("client") else "unknown"
    if not trusted.trusts(peer):
        return peer
    hops = [h for name, value in scope["headers"] if name == b"x-forwarded-for"
            for h in value.decode("latin-1").split(",")]
    client = peer
    for hop in reversed(hops):
        ip = _parse_address(hop)
        if ip is None:
            break
        client = str(ip)
        if not trusted.trusts(client):
            break
    return client


class ClientAddressMiddleware:
    """Puts the client's address (``client_address``) into ``scope["client"]``, in place, so the app, its
    limits and uvicorn's access log all see the same one. A no-op without trusted proxies."""

    def __init__(self, app: ASGIApp, trusted: TrustedProxies):
        self.app, self.trusted = app, trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.trusted and scope["type"] in ("http", "websocket"):
            host = client_address(scope, self.trusted)
            if scope.get("client") is None or host != scope["client"][0]:
                scope["client"] = (host, 0)
        await self.app(scope, receive, send)


def client_id(request: Request) -> str:
    """Who is asking, for every per-client limit (SSE streams, requests per minute, failed keys): the API key's
    digest prefix once ``service.deps.require_key`` accepted it, else the client's address."""
    known = getattr(request.state, "client_id", None)
    if known:
        return str(known)
    return "addr-" + (request.client.host if request.client else "unknown")


# ---- error handlers ----------------------------------------------------------------------------------------
def _allowed_fields(request: Request, loc: list[str | int]) -> str:
    """`` (allowed: a, b, c)``: the fields of the route's body model where an unknown top-level field was sent
    (FastAPI's ``APIRoute.body_field``; tests/service/test_inputs.py holds it), else nothing."""
    body = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", None)
    return f" (allowed: {', '.join(fields)})" if fields and len(loc) == 1 else ""


def _validation_message(request: Request, exc: RequestValidationError, limits: Limits) -> str:
    """``field: what is wrong (allowed range or values)`` for the first few errors."""
    ranges, parts = limits.ranges(), []
    for err in exc.errors()[:3]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", *INPUT_TAGS)]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{field}: unknown field{_allowed_fields(request, loc)}")
        elif field in ranges and err.get("type") in ("greater_than_equal", "less_than_equal"):
            lo, hi = ranges[field]
            parts.append(f"{field}: must be between {lo} and {hi} (got {err.get('input')})")
        else:
            parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI, limits: Limits) -> None:
    """The handlers that turn every exception the app raises on purpose into the error shape (module docstring);
    ``limits`` name the allowed ranges in 422 messages."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestInvalid):
            return error_response(422, "invalid_request", str(exc))
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(request, exc, limits))

    async def too_large(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImageTooLarge)
        return error_response(413, "image_too_large", str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # every method of the path, not just those of the first route that matched
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), str(exc.detail), headers)

    async def store_down(_: Request, exc: Exception) -> Response:
        if isinstance(exc, redis.RedisError):  # a store call that bypassed JobStore: a bug, but still a 503
            log.error("unexpected Redis error outside the job store", exc_info=exc)
            exc = store_error(exc)
        assert isinstance(exc, StoreUnavailable)
        log.warning("job store unavailable: %s", exc)
        return error_response(503, exc.code, _STORE_MESSAGES[exc.code], {"Retry-After": str(exc.retry_after)})

    async def queue_full(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, QueueFull)
        return error_response(429, "queue_full", f"{exc}", {"Retry-After": str(exc.retry_after)})

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(RequestInvalid, invalid)
    app.add_exception_handler(ImageTooLarge, too_large)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StoreUnavailable, store_down)
    app.add_exception_handler(redis.RedisError, store_down)
    app.add_exception_handler(QueueFull, queue_full)


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app accepts for the request's path (for ``Allow``): each method is tried
    against every route (included routers answer for the routes they hold)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed
