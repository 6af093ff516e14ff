"""Hostile and bad input against the real API (uvicorn on a free port, a real redis-server): bounds on frames
per job and SSE streams per client, the per-key rate limit, model names only from the configured list, ids and
paths that never reach Redis or the filesystem, unguessable job ids, and no API key in the logs.

Bounds on body size, num_images, steps, images x steps and malformed ids are in tests/service/test_api.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.queue import is_valid_job_id, new_job_id
from service.schemas import frame_count

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


def test_frame_count_matches_the_workers_rule() -> None:
    # Frames at steps 0, every, 2 every, ... and always the last one (service.engine._Job.wants_frame).
    for steps in range(1, 60):
        for every in range(1, steps + 1):
            expected = sum(1 for i in range(steps) if i == steps - 1 or i % every == 0)
            assert frame_count(steps, every) == expected


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
    with httpx.Client() as client, contextlib.ExitStack() as held:
        for _ in range(2):
            assert held.enter_context(_open_stream(client, url, alice)).status_code == 200
        third = client.get(url, headers=alice)
        _error(third, 429, "too_many_streams")
        assert int(third.headers["retry-after"]) >= 1
        with _open_stream(client, url, bob) as other:  # another key has its own budget
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
    # The count lives in Redis (shared by API replicas) under the key's digest, never the key.
    client = redis.Redis.from_url(api.settings.redis_url)
    names = [k.decode() for k in client.scan_iter("ddpm:ratelimit:*")]
    client.close()
    assert len(names) == 2 and not any("Secret9" in n for n in names)


def test_rate_limit_without_keys_counts_per_address(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(rate_limit_per_minute=2)
    _clear_of_window_edge()
    assert [httpx.get(f"{api.url}/models").status_code for _ in range(3)] == [200, 200, 429]


def test_rate_limit_is_off_by_default(api_server: ApiServer) -> None:
    assert {httpx.get(f"{api_server.url}/models").status_code for _ in range(30)} == {200}


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
    assert secret not in repr(app.state.__dict__)  # the app keeps digests only
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
