"""service.web at its own level: the error shape and what each exception becomes, 405 with every method, the
body-size limit, the client's address behind proxies, and the labels of the request metrics. Bare FastAPI apps and
ASGI apps driven in-process (Starlette's TestClient): no Redis, no uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Message, Receive, Scope, Send

from service import metrics
from service.inputs import ImageTooLarge
from service.queue import QueueFull, StoreFull, StoreUnavailable
from service.schemas import Limits, RequestInvalid
from service.web import (
    ApiError,
    BodyLimitMiddleware,
    ClientAddressMiddleware,
    MetricsMiddleware,
    TrustedProxies,
    client_address,
    install_error_handlers,
    request_labels,
)

LIMITS = Limits(max_num_images=16, max_steps=1000, max_image_steps=16000, max_frames=100, max_input_pixels=64)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1, ge=1)
    seed: int = 0


def _raising(exc: BaseException) -> Any:
    def route() -> None:
        raise exc

    return route


RAISED: dict[str, BaseException] = {
    "api-error": ApiError(410, "expired", "frame 3 of job x has expired", headers={"X-Why": "ttl"}),
    "invalid": RequestInvalid("steps", "must be between 1 and 40 (got 41)"),
    "too-large": ImageTooLarge("init_image", "the picture is 9x9 = 81 pixels; at most 64"),
    "store-away": StoreUnavailable("ConnectionError: refused"),
    "store-full": StoreFull("OOM command not allowed"),
    "queue-full": QueueFull(length=100, retry_after=7),
    "raw-redis": redis.ConnectionError("Connection refused"),
    "raw-oom": redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'"),
    "starlette-429": HTTPException(429, "slow down"),
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    for name, exc in RAISED.items():
        app.get(f"/raise/{name}")(_raising(exc))

    @app.post("/body")
    def take(body: Body) -> dict[str, int]:
        return {"num_images": body.num_images}

    other = APIRouter()  # the methods of a path may sit on several routers
    other.delete("/raise/api-error")(_raising(ApiError(409, "conflict", "no")))
    app.include_router(other)
    install_error_handlers(app, LIMITS)
    return TestClient(app, raise_server_exceptions=False)


def _error(r: Any, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


@pytest.mark.parametrize(("name", "status", "code", "retry_after"), [
    ("api-error", 410, "expired", None),
    ("invalid", 422, "invalid_request", None),
    ("too-large", 413, "image_too_large", None),
    ("store-away", 503, "store_unavailable", "2"),
    ("store-full", 503, "store_full", "30"),
    ("queue-full", 429, "queue_full", "7"),
    ("raw-redis", 503, "store_unavailable", "2"),  # a Redis error that bypassed the store: still no 500
    ("raw-oom", 503, "store_full", "30"),
    ("starlette-429", 429, "rate_limited", None),  # a 429 that is not ours is not called queue_full
])
def test_every_error_has_the_one_shape_and_its_code(client: TestClient, name: str, status: int, code: str,
                                                    retry_after: str | None) -> None:
    r = client.get(f"/raise/{name}")
    _error(r, status, code)
    assert r.headers.get("retry-after") == retry_after


def test_messages_say_what_is_wrong_without_internals(client: TestClient) -> None:
    r = client.get("/raise/api-error")
    assert _error(r, 410, "expired") == "frame 3 of job x has expired" and r.headers["x-why"] == "ttl"
    assert _error(client.get("/raise/invalid"), 422, "invalid_request") == "steps: must be between 1 and 40 (got 41)"
    assert _error(client.get("/raise/too-large"), 413, "image_too_large").startswith("init_image: the picture is 9x9")
    assert "retry shortly" in _error(client.get("/raise/store-away"), 503, "store_unavailable")
    assert "refused" not in _error(client.get("/raise/raw-redis"), 503, "store_unavailable")  # no redis-py text
    assert _error(client.get("/raise/queue-full"), 429, "queue_full") == "the queue holds 100 jobs; retry in 7 s"


@pytest.mark.parametrize(("body", "message"), [
    ({"num_images": 0}, "num_images: must be between 1 and 16 (got 0)"),  # the server's range, not pydantic's
    ({"num_images": "two"}, "num_images: Input should be a valid integer"),
    ({"prompt": "a cat"}, "prompt: unknown field (allowed: num_images, seed)"),
])
def test_validation_errors_name_the_field_and_its_range(client: TestClient, body: dict[str, Any],
                                                        message: str) -> None:
    assert _error(client.post("/body", json=body), 422, "invalid_request").startswith(message)


def test_an_unreadable_body_an_unknown_route_and_a_wrong_method(client: TestClient) -> None:
    r = client.post("/body", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 422, "invalid_request")
    _error(client.get("/nowhere"), 404, "not_found")
    r = client.put("/raise/api-error")
    _error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, DELETE"  # every route of the path, whichever router holds it


# ---- the body-size limit -----------------------------------------------------------------------------------
async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that answers with the size of the body it read."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture(scope="module")
def limited() -> TestClient:
    return TestClient(BodyLimitMiddleware(_echo, max_bytes=100, routes={"/upload": 1000}))


def test_bodies_over_the_limit_are_413_naming_the_setting(limited: TestClient) -> None:
    message = _error(limited.post("/other", content=b"x" * 101), 413, "body_too_large")
    assert message == "the request body must be at most 100 bytes (DDPM_MAX_BODY_BYTES)"
    message = _error(limited.post("/upload", content=b"x" * 1001), 413, "body_too_large")
    assert message == "the request body must be at most 1000 bytes (DDPM_MAX_UPLOAD_BYTES)"
    assert limited.post("/upload", content=b"x" * 1000).text == "1000"  # read, then handed on whole
    assert limited.post("/other", content=b"x" * 100).text == "100"

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(11):
            yield b"x" * 10

    _error(limited.post("/other", content=chunks()), 413, "body_too_large")
    assert limited.request("DELETE", "/other", content=b"x" * 500).text == "500"  # only POST, PUT, PATCH


def test_a_client_gone_mid_body_never_reaches_the_app() -> None:
    called: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    messages: list[Message] = [{"type": "http.request", "body": b"x", "more_body": True},
                               {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing is sent to a client that left: {message}")

    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=100)(scope, receive, send))
    assert called == []


# ---- who the client is -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trusted", "peer", "forwarded", "expected"), [
    ([], "127.0.0.1", ["1.2.3.4"], "127.0.0.1"),  # nobody trusted (the default): the header is ignored
    (["127.0.0.1"], "127.0.0.2", ["1.2.3.4"], "127.0.0.2"),  # the peer is not a trusted proxy
    (["127.0.0.1"], "127.0.0.1", ["1.2.3.4"], "1.2.3.4"),
    (["127.0.0.1"], "127.0.0.1", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # the left part is the client's to forge
    (["127.0.0.1"], "127.0.0.1", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # several headers: one list, in order
    (["127.0.0.1", "10.0.0.0/8"], "127.0.0.1", ["1.2.3.4, 10.1.2.3"], "1.2.3.4"),  # a chain of trusted proxies
    (["127.0.0.1"], "127.0.0.1", ["1.2.3.4:5678"], "1.2.3.4"),
    (["127.0.0.1"], "127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
    (["127.0.0.1"], "127.0.0.1", ["1.2.3.4, not-an-address"], "127.0.0.1"),  # garbage: the proxy that passed it
    (["127.0.0.1"], "127.0.0.1", [], "127.0.0.1"),
    (["::1"], "::1", ["2001:db8::7"], "2001:db8::7"),
])
def test_client_address_believes_forwarded_for_only_from_trusted_proxies(
        trusted: list[str], peer: str, forwarded: list[str], expected: str) -> None:
    scope = {"client": (peer, 5000), "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded]}
    assert client_address(scope, TrustedProxies(trusted)) == expected


def _seen_client(trusted: list[str], peer: tuple[str, int], forwarded: str) -> Any:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["client"])

    scope: Scope = {"type": "http", "client": peer, "headers": [(b"x-forwarded-for", forwarded.encode())]}
    asyncio.run(ClientAddressMiddleware(app, TrustedProxies(trusted))(scope, None, None))  # type: ignore[arg-type]
    return seen[0]


def test_the_app_and_its_logs_see_the_resolved_client() -> None:
    assert _seen_client(["10.0.0.0/8"], ("10.0.0.5", 4242), "203.0.113.9") == ("203.0.113.9", 0)
    assert _seen_client([], ("10.0.0.5", 4242), "203.0.113.9") == ("10.0.0.5", 4242)  # untouched


# ---- request metrics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "route", "expected"), [
    ("GET", "/jobs/{job_id}", ("GET", "/jobs/{job_id}", "200")),
    ("BREW", "/jobs/{job_id}", ("other", "/jobs/{job_id}", "200")),  # clients may invent methods
    ("GET", None, ("GET", "unmatched", "200")),  # no route answered: never the raw path
])
def test_request_labels_come_from_closed_sets(method: str, route: str | None, expected: tuple[str, ...]) -> None:
    scope: dict[str, Any] = {"method": method, "path": "/jobs/0123456789abcdef0123456789abcdef"}
    if route is not None:
        scope["route"] = type("Route", (), {"path": route})()
    assert request_labels(scope, 200) == expected


def _count(**labels: str) -> float:
    return metrics.API_REGISTRY.get_sample_value("ddpm_http_requests_total", labels) or 0.0


def test_metrics_count_each_request_by_method_route_template_and_status() -> None:
    app = FastAPI()

    @app.get("/things/{thing_id}")
    def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    client = TestClient(MetricsMiddleware(app))
    ok = {"method": "GET", "route": "/things/{thing_id}", "status": "200"}
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    before, before_unmatched = _count(**ok), _count(**unmatched)
    for i in range(3):
        assert client.get(f"/things/{i}").status_code == 200
    assert client.get("/elsewhere/secret-token").status_code == 404
    assert _count(**ok) == before + 3 and _count(**unmatched) == before_unmatched + 1
    exposed = metrics.exposition(metrics.API_REGISTRY).decode()
    assert "secret-token" not in exposed and "/things/1" not in exposed
