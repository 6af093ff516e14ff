"""HTTP plumbing of the API: the one error shape and its handlers, API-key auth, the body-size limit and the
request metrics middleware. ``service.api`` wires these into the app; this module knows no routes and no Redis
keys (it maps ``StoreUnavailable``/``StoreFull`` and ``QueueFull`` from ``service.queue`` to 503 and 429).

    ApiError(status, code, message)  -> {"error": {"code", "message"}} with that status
    RequestValidationError, RequestInvalid -> 422 invalid_request (the field and its allowed range or values)
    StarletteHTTPException           -> its status (404 unknown route, 405 with every allowed method, 400 unreadable
                                        body)
    StoreUnavailable -> 503 store_unavailable (Retry-After 2)    QueueFull -> 429 queue_full (Retry-After)
    StoreFull        -> 503 store_full (Retry-After 30)
    any other redis.RedisError that escaped the store           -> 503 store_unavailable, never a 500
    rate_limit (per key and minute, counted in Redis) -> 429 rate_limited (Retry-After)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.queue import QueueFull, StoreUnavailable, store_error
from service.schemas import ErrorBody, GenerateRequest, Limits, RequestInvalid

__all__ = ["ApiError", "BodyLimitMiddleware", "MetricsMiddleware", "allowed_methods", "client_id", "error_response",
           "install_error_handlers", "key_digests", "rate_limit", "require_key", "responses"]

log = logging.getLogger(__name__)
_STORE_MESSAGES = {
    "store_unavailable": "the job store (Redis) is unavailable (unreachable, timed out, read-only or loading); "
                         "retry shortly",
    "store_full": "the job store (Redis) is full: no new jobs until finished ones expire; retry later",
}
_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          410: "expired", 413: "body_too_large", 422: "invalid_request", 429: "queue_full", 503: "unavailable"}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error responses of a route."""
    return {c: {"model": ErrorBody, "description": _CODES.get(c, "error")} for c in codes}


# ---- middleware --------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length or by counting a streamed body."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, "body_too_large", f"the request body must be at most {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class MetricsMiddleware:
    """Request count and latency by method, route template (never the raw path) and status."""

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
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            labels = (scope["method"], route, str(status))
            metrics.HTTP_REQUESTS.labels(*labels).inc()
            metrics.HTTP_REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - start)


# ---- auth --------------------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (when DDPM_API_KEYS is set)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY (alternative)")


def require_key(request: Request,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                 api_key: Annotated[str | None, Depends(_api_key)]) -> None:
    """When API keys are configured, the request needs one: 401 when none is given, 403 when it is wrong."""
    digests: list[bytes] = request.app.state.key_digests
    if not digests:
        return
    given = bearer.credentials if bearer is not None else api_key
    if not given:
        raise ApiError(401, "unauthorized", "an API key is needed: send 'Authorization: Bearer KEY' or "
                                            "'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for known in digests:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise ApiError(403, "forbidden", "the API key is not valid")
    request.state.client_id = "key-" + digest.hex()[:16]  # names the key's digest, never the key


def client_id(request: Request) -> str:
    """Who is asking, for per-client limits: the API key's digest prefix once ``require_key`` passed, else
    the client's address."""
    known = getattr(request.state, "client_id", None)
    if known:
        return str(known)
    return "addr-" + (request.client.host if request.client else "unknown")


def rate_limit(request: Request) -> None:
    """``settings.rate_limit_per_minute`` requests per client and minute, counted in Redis (shared by every
    API replica): 429 ``rate_limited`` with Retry-After beyond it. Fails open while Redis is unreachable (the
    routes that need Redis answer 503 on their own)."""
    limit = request.app.state.settings.rate_limit_per_minute
    if limit <= 0:
        return
    try:
        count, retry_after = request.app.state.store.count_request(client_id(request))
    except StoreUnavailable:
        return
    if count > limit:
        raise ApiError(429, "rate_limited", f"at most {limit} requests per minute per client; retry in "
                                            f"{retry_after} s", headers={"Retry-After": str(retry_after)})


# ---- error handlers ----------------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError, limits: Limits) -> str:
    """``field: what is wrong (allowed range or values)`` for the first few errors."""
    ranges, parts = limits.ranges(), []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{field}: unknown field (allowed: {', '.join(GenerateRequest.model_fields)})")
        elif field in ranges and err.get("type") in ("greater_than_equal", "less_than_equal"):
            lo, hi = ranges[field]
            parts.append(f"{field}: must be between {lo} and {hi} (got {err.get('input')})")
        else:
            parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestInvalid):
            return error_response(422, "invalid_request", str(exc))
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(exc, request.app.state.limits))

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


def key_digests(keys: list[str]) -> list[bytes]:
    """The SHA-256 digests of the API keys: the only form in which the app keeps them."""
    return [hashlib.sha256(k.encode()).digest() for k in keys]
