"""Hostile and bad input against the real API (uvicorn on a free port, a real redis-server): bounds on frames
per job and SSE streams per client, the per-key rate limit, model names only from the configured list, ids and
paths that never reach Redis or the filesystem, unguessable job ids, and no API key in the logs.

Bounds on body size, num_images, steps, images x steps and malformed ids are in tests/service/test_api.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model.images import png_bytes
from model.progressive import frame_count
from service.queue import JobStore, connect, is_valid_job_id, new_job_id
from service.settings import Settings

from .conftest import ApiServer


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    return str(r.json()["error"]["message"])


def _submit(api: ApiServer, headers: dict[str, str] | None = None, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _clear_of_window_edge() -> None:
    """The rate limit counts in one-minute windows: keep a short test inside one window."""
    into = time.time() % 60
    if into > 55:
        time.sleep(60.5 - into)


# ---- frames per job ----------------------------------------------------------------------------------------
def test_frames_per_job_are_bounded(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_frames_per_job=10)
    message = _error(httpx.post(f"{api.url}/generate", json={"steps": 40, "preview_every": 1}), 422,
                     "invalid_request")
    assert message.startswith("preview_every:") and "at most 10 frames" in message and "at least 5" in message
    job_id = _submit(api, steps=40, preview_every=5)
    assert frame_count(40, 5) <= 10
    # The default (about 20 frames) follows the bound too.
    job = httpx.get(f"{api.url}/jobs/{_submit(api, steps=40)}").json()
    assert frame_count(40, job["request"]["preview_every"]) <= 10
    assert httpx.get(f"{api.url}/jobs/{job_id}").json()["request"]["preview_every"] == 5


# ---- SSE connections per client ----------------------------------------------------------------------------
@contextlib.contextmanager
def _open_stream(client: httpx.Client, url: str, headers: dict[str, str] | None = None
                 ) -> Iterator[httpx.Response]:
    with client.stream("GET", url, headers=headers, timeout=10) as r:
        yield r


def test_sse_streams_per_client_are_bounded(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(app_kwargs={"sse_block_ms": 100}, max_sse_per_client=2,
                   api_keys=["alice-key-012345", "bob-key-01234567"])
    alice, bob = {"x-api-key": "alice-key-012345"}, {"x-api-key": "bob-key-01234567"}
    job_id = _submit(api, headers=alice, steps=2)  # stays queued: no worker here
    url = f"{api.url}/jobs/{job_id}/events"
    bobs_url = f"{api.url}/jobs/{_submit(api, headers=bob, steps=2)}/events"
    with httpx.Client() as client, contextlib.ExitStack() as held:
        for _ in range(2):
            assert held.enter_context(_open_stream(client, url, alice)).status_code == 200
        third = client.get(url, headers=alice)
        _error(third, 429, "too_many_streams")
        assert int(third.headers["retry-after"]) >= 1
        with _open_stream(client, bobs_url, bob) as other:  # another key has its own budget
            assert other.status_code == 200
    # Closed streams give their slots back (the server notices within one read).
    deadline = time.monotonic() + 10
    while True:
        with httpx.Client() as client, _open_stream(client, url, alice) as again:
            if again.status_code == 200:
                break
        assert time.monotonic() < deadline, "closed streams never gave their slots back"
        time.sleep(0.1)


# ---- rate limit per key ------------------------------------------------------------------------------------
def test_rate_limit_per_key_in_redis_with_retry_after(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["k-alice-Secret9xy", "k-bob-Secret9xyzw"], rate_limit_per_minute=3)
    alice, bob = {"authorization": "Bearer k-alice-Secret9xy"}, {"x-api-key": "k-bob-Secret9xyzw"}
    _clear_of_window_edge()
    for _ in range(3):
        assert httpx.get(f"{api.url}/models", headers=alice).status_code == 200
    r = httpx.post(f"{api.url}/generate", json={"steps": 1}, headers=alice)
    _error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 61
    assert httpx.get(f"{api.url}/models", headers=bob).status_code == 200  # each key has its own count
    _error(httpx.get(f"{api.url}/models"), 401, "unauthorized")  # no key: 401 before any counting
    assert httpx.get(f"{api.url}/healthz").status_code == 200  # probes are never limited
    # The count lives in Redis (shared by API replicas) under the key's digest prefix, never the key: the next
    # count of each key's client id follows the API's (3 + 1 requests of alice, 1 of bob).
    store = JobStore(connect(api.settings.redis_url), queue_name=api.settings.queue_name)
    for key, counted in (("k-alice-Secret9xy", 4), ("k-bob-Secret9xyzw", 1)):
        assert store.count_request("key-" + hashlib.sha256(key.encode()).hexdigest()[:16])[0] == counted + 1
    assert not any(b"Secret9" in name for name in store.redis.scan_iter())  # in no Redis key name at all
    store.redis.close()


def test_rate_limit_without_keys_counts_per_address(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(rate_limit_per_minute=2)
    _clear_of_window_edge()
    assert [httpx.get(f"{api.url}/models").status_code for _ in range(3)] == [200, 200, 429]


def test_rate_limit_is_off_by_default(api_server: ApiServer) -> None:
    assert {httpx.get(f"{api_server.url}/models").status_code for _ in range(30)} == {200}


def _holds(obj: Any, text: str, depth: int = 6, seen: set[int] | None = None) -> bool:
    """Whether ``text`` is anywhere in ``obj``'s attributes, containers and their reprs, ``depth`` levels down."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return False
    seen.add(id(obj))
    if isinstance(obj, str | bytes):
        return text in (obj if isinstance(obj, str) else obj.decode("latin-1"))
    if text in repr(obj):
        return True
    items: list[Any] = []
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, list | tuple | set | frozenset):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    return any(_holds(item, text, depth - 1, seen) for item in items)


# ---- nothing secret in logs --------------------------------------------------------------------------------
def test_api_keys_never_appear_in_logs(make_api: Callable[..., ApiServer], caplog: pytest.LogCaptureFixture,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    secret, wrong = "sk-live-Do-Not-Log-4242", "sk-guess-Do-Not-Log-1717"
    caplog.set_level(logging.DEBUG)
    api = make_api(api_keys=[secret], rate_limit_per_minute=2, log_level="DEBUG")
    good, bad = {"authorization": f"Bearer {secret}"}, {"x-api-key": wrong}
    job_id = _submit(api, headers=good, steps=1)
    for headers in (good, bad, {}):
        httpx.get(f"{api.url}/jobs/{job_id}", headers=headers)
        httpx.post(f"{api.url}/generate", json={"steps": 1}, headers=headers)  # 202/429, 403, 401
    app: Any = api.server.config.app
    assert _holds(api.settings, secret)  # the control: the settings the test gave hold it, and the check finds it
    assert not _holds(app.state, secret)  # the app keeps digests only
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert secret not in text and wrong not in text


# ---- names, ids and paths ----------------------------------------------------------------------------------
def test_model_names_come_only_from_the_configured_list(make_api: Callable[..., ApiServer], tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    api = make_api()
    elsewhere = tmp_path / "other.safetensors"
    shutil.copy(tiny_checkpoint, elsewhere)  # a valid checkpoint on disk, not configured
    for name in (str(elsewhere), str(tiny_checkpoint), "../tiny", "tiny/../tiny", "tiny\x00", "TINY", " tiny", ""):
        message = _error(httpx.post(f"{api.url}/generate", json={"model": name, "steps": 1}), 422,
                         "invalid_request")
        assert message.startswith("model:") and "['tiny']" in message
    assert [m["name"] for m in httpx.get(f"{api.url}/models").json()["models"]] == ["tiny"]


@pytest.mark.parametrize("path", [
    "/jobs/..%2F..%2Fetc%2Fpasswd", "/jobs/%2e%2e", "/jobs/*", "/jobs/ddpm:workers", "/jobs/" + "a" * 10_000,
    "/jobs/0123456789ABCDEF0123456789ABCDEF", "/jobs/0123456789abcdef0123456789abcdef/frames/-1.png",
    "/jobs/0123456789abcdef0123456789abcdef/frames/99999999999999999999999.png",
    "/jobs/0123456789abcdef0123456789abcdef/images/0.png", "/jobs/x/events", "/static/../service/api.py",
])
def test_hostile_paths_are_404_or_422_never_5xx(api_server: ApiServer, path: str) -> None:
    r = httpx.get(api_server.url + path)
    assert r.status_code in (404, 422), (r.status_code, r.text[:200])


def test_out_of_range_query_values_are_422(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=1)
    for since in ("-2", str(10**12), "1e3", "nan"):
        _error(httpx.get(f"{api_server.url}/jobs/{job_id}", params={"since": since}), 422, "invalid_request")


def test_job_ids_are_128_random_bits() -> None:
    ids = [new_job_id() for _ in range(400)]
    assert len(set(ids)) == len(ids) and all(is_valid_job_id(i) and len(i) == 32 for i in ids)
    bits = [int(i, 16) for i in ids]
    for position in range(128):  # every bit varies, about half the time (not a counter, not a timestamp)
        ones = sum(b >> position & 1 for b in bits)
        assert 100 < ones < 300, position


def test_405_lists_every_method_of_the_path(api_server: ApiServer) -> None:
    r = httpx.request("OPTIONS", f"{api_server.url}/jobs/0123456789abcdef0123456789abcdef")
    _error(r, 405, "method_not_allowed")
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}
    r = httpx.put(f"{api_server.url}/generate", json={})
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize("field", ["num_images", "seed", "steps", "eta", "preview_every"])
def test_booleans_are_not_numbers(api_server: ApiServer, field: str) -> None:
    message = _error(httpx.post(f"{api_server.url}/generate", json={field: True}), 422, "invalid_request")
    assert message.startswith(f"{field}:")


def test_the_spec_names_the_served_models(api_server: ApiServer) -> None:
    props = httpx.get(f"{api_server.url}/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    options = props["properties"]["model"]["anyOf"]
    assert {"type": "string", "enum": ["tiny"]} in options


# ---- whose job ---------------------------------------------------------------------------------------------
def test_a_job_belongs_to_the_key_that_submitted_it(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["alice-key-0123456789", "bob-key-0123456789"], admin_api_keys=["admin-key-0123456789"])
    alice, bob = {"x-api-key": "alice-key-0123456789"}, {"authorization": "Bearer bob-key-0123456789"}
    admin = {"x-api-key": "admin-key-0123456789"}
    finished, queued = _submit(api, headers=alice, steps=2), _submit(api, headers=alice, steps=2)
    store = JobStore(connect(api.settings.redis_url))
    store.start(finished, "w")
    store.add_frame(finished, 0, 1, png_bytes(torch.zeros(3, 8, 8)))
    store.succeed(finished, [png_bytes(torch.zeros(3, 8, 8))])
    # The record names the key by its digest, never the key itself.
    assert store.get(finished)["owner"] == hashlib.sha256(b"alice-key-0123456789").hexdigest()  # type: ignore[index]
    unknown = _error(httpx.get(f"{api.url}/jobs/{'0' * 32}", headers=bob), 404, "not_found")
    for job_id in (finished, queued):
        for method, path in (("GET", ""), ("GET", "/frames/0.png"), ("GET", "/images/0.png"), ("GET", "/events"),
                             ("DELETE", "")):
            r = httpx.request(method, f"{api.url}/jobs/{job_id}{path}", headers=bob, timeout=10)
            # Exactly what an unknown id gets: another key's job is not even shown to exist.
            assert _error(r, 404, "not_found") == unknown.replace("0" * 32, job_id), (method, path)
        assert httpx.get(f"{api.url}/jobs/{job_id}", headers=alice).status_code == 200
        assert httpx.get(f"{api.url}/jobs/{job_id}", headers=admin).status_code == 200  # admin keys see all
    assert httpx.get(f"{api.url}/jobs/{queued}", headers=alice).json()["status"] == "queued"  # bob's DELETE: no-op
    assert httpx.get(f"{api.url}/jobs/{finished}/images/0.png", headers=alice).status_code == 200
    with httpx.stream("GET", f"{api.url}/jobs/{finished}/events", headers=admin, timeout=10) as r:
        assert r.status_code == 200 and "succeeded" in r.read().decode()
    assert httpx.delete(f"{api.url}/jobs/{queued}", headers=admin).json()["status"] == "canceled"


def test_docs_and_the_spec_need_a_key_when_keys_are_on(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["docs-key-0123456789"])
    for path in ("/docs", "/redoc", "/openapi.json"):
        _error(httpx.get(api.url + path), 401, "unauthorized")
        _error(httpx.get(api.url + path, headers={"x-api-key": "wrong-key-0123456789"}), 403, "forbidden")
        assert httpx.get(api.url + path, headers={"x-api-key": "docs-key-0123456789"}).status_code == 200
    open_api = make_api()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(open_api.url + path).status_code == 200


def test_readyz_says_ready_or_not_and_nothing_else(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["probe-key-0123456789"])
    JobStore(connect(api.settings.redis_url)).heartbeat("gpu-worker-7", {
        "name": "gpu-worker-7", "models": ["tiny"], "device": "cuda:0", "pid": 31337, "host": "node-42.internal",
        "max_batch_size": 64})
    r = httpx.get(f"{api.url}/readyz")
    assert r.status_code == 200 and set(r.json()) == {"status", "worker", "message"}
    assert r.json()["worker"] == "serving"
    for secret in ("gpu-worker-7", "cuda", "31337", "node-42", "tiny"):
        assert secret not in r.text


# ---- who the client is -------------------------------------------------------------------------------------
def _from(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.x.y.z is this machine's loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR network"):
        Settings(trusted_proxies="10.0.0.0/8,proxy.internal")
    assert Settings(trusted_proxies="10.0.0.0/8, 127.0.0.1").trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]


def test_limits_take_the_forwarded_client_only_behind_a_trusted_proxy(make_api: Callable[..., ApiServer]) -> None:
    untrusting = make_api(rate_limit_per_minute=2)  # the default: no proxy is trusted, not even 127.0.0.1
    api = make_api(rate_limit_per_minute=2, trusted_proxies=["127.0.0.1"])
    _clear_of_window_edge()
    with _from("127.0.0.1") as local:
        codes = [local.get(f"{untrusting.url}/models", headers={"x-forwarded-for": f"198.51.100.{i}"}).status_code
                 for i in range(3)]
        assert codes == [200, 200, 429]
    with _from("127.0.0.1") as proxy, _from("127.0.0.2") as direct:
        # Behind the proxy, each forwarded client has its own budget.
        for client in ("203.0.113.1", "203.0.113.2"):
            codes = [proxy.get(f"{api.url}/models", headers={"x-forwarded-for": client}).status_code
                     for _ in range(3)]
            assert codes == [200, 200, 429], client
        # A client that reaches the API directly cannot pick its identity with the header.
        codes = [direct.get(f"{api.url}/models", headers={"x-forwarded-for": f"198.51.100.{i}"}).status_code
                 for i in range(3)]
        assert codes == [200, 200, 429]
