"""``Idempotency-Key`` on job creation, over real HTTP against a real redis-server: replays, a different body,
scoping per API key, concurrent retries, and a failed creation that frees its key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from fastapi import Response

from service.idempotency import IdempotentCreation, fingerprint
from service.queue import JobStore, connect, new_job_id
from service.schemas import GenerateRequest

from .conftest import ApiServer


def _post(api: ApiServer, body: dict[str, Any], key: str | None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{api.url}/generate", json=body, headers=headers)


def _jobs_made(api: ApiServer) -> int:
    """Jobs created so far: no worker runs here, so each one the API made waits in the queue (a job record and its
    place in the queue are written in one transaction)."""
    store = JobStore(connect(api.settings.redis_url), queue_name=api.settings.queue_name)
    try:
        return store.queue_length()
    finally:
        store.redis.close()


def test_twenty_concurrent_identical_posts_make_one_job(api_server: ApiServer) -> None:
    body, n = {"num_images": 2, "steps": 5, "seed": 9}, 20
    barrier, replies = threading.Barrier(n), []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            r = client.post(f"{api_server.url}/generate", json=body, headers={"Idempotency-Key": "race-1"})
        with lock:
            replies.append(r)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * (n - 1) + [202], [r.text for r in replies if r.status_code not in (200, 202)]
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == n - 1
    assert _jobs_made(api_server) == 1


def test_same_key_and_body_replays_the_job_a_different_body_is_422(api_server: ApiServer) -> None:
    first = _post(api_server, {"num_images": 1, "steps": 4}, "order-17")
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = _post(api_server, {"steps": 4}, "order-17")  # the same request: num_images defaults to 1
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    other = _post(api_server, {"steps": 5}, "order-17")
    assert other.status_code == 422
    assert other.json()["error"]["message"].startswith("Idempotency-Key: this key was already used with a different")
    assert _post(api_server, {"steps": 4}, "order-18").json()["id"] != first.json()["id"]  # a new key, a new job
    assert _post(api_server, {"steps": 4}, None).json()["id"] != first.json()["id"]  # no key: always a new job
    assert _jobs_made(api_server) == 3


def test_a_replay_reports_the_jobs_current_status(api_server: ApiServer) -> None:
    job_id = _post(api_server, {"steps": 4}, "k").json()["id"]
    httpx.delete(f"{api_server.url}/jobs/{job_id}")
    again = _post(api_server, {"steps": 4}, "k")
    assert again.status_code == 200 and again.json()["id"] == job_id and again.json()["status"] == "canceled"


def test_keys_are_scoped_to_the_api_key(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["alice-key-0123456789", "bob-key-0123456789"])
    alice = _post(api, {"steps": 4}, "shared", **{"X-API-Key": "alice-key-0123456789"})
    # another caller: no clash, no replay
    bob = _post(api, {"steps": 5}, "shared", **{"X-API-Key": "bob-key-0123456789"})
    assert alice.status_code == bob.status_code == 202 and alice.json()["id"] != bob.json()["id"]
    again = _post(api, {"steps": 4}, "shared", **{"X-API-Key": "alice-key-0123456789"})
    assert again.json()["id"] == alice.json()["id"]


def test_a_failed_creation_leaves_the_key_free_for_the_retry(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_queue_length=1)
    blocker = _post(api, {"steps": 4}, None).json()["id"]
    full = _post(api, {"steps": 4}, "after-429")
    assert full.status_code == 429
    httpx.delete(f"{api.url}/jobs/{blocker}")  # room again
    retried = _post(api, {"steps": 4}, "after-429")
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
    again = _post(api, {"steps": 4}, "after-429")  # now the key is taken: a replay, not a 429 for a full queue
    assert again.status_code == 200 and again.json()["id"] == retried.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "naïve"])
def test_malformed_keys_are_422_naming_the_header(api_server: ApiServer, key: str) -> None:
    r = httpx.post(f"{api_server.url}/generate", json={}, headers={"Idempotency-Key": key.encode()})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("Idempotency-Key"), r.text


def _record_key(api: ApiServer, key: str) -> tuple[redis.Redis, str]:
    """The Redis record of ``key`` for this test's client (keys off: scoped to the address 127.0.0.1)."""
    client = redis.Redis.from_url(api.settings.redis_url)
    return client, IdempotentCreation(client, "addr-127.0.0.1", key, 60, "POST /generate", Response()).record_key


def test_a_request_that_died_after_reserving_its_key_does_not_block_it(api_server: ApiServer) -> None:
    client, record_key = _record_key(api_server, "orphan")
    body = {"steps": 4}
    fp = fingerprint("POST /generate", GenerateRequest(steps=4))
    dead = {"fp": fp, "job": new_job_id(), "state": "pending", "at": time.time() - 120}  # its job never came
    client.set(record_key, json.dumps(dead), ex=600)
    r = _post(api_server, body, "orphan")
    assert r.status_code == 202 and r.json()["id"] != dead["job"]  # taken over: the job is created once
    assert _post(api_server, body, "orphan").json()["id"] == r.json()["id"]


def test_a_job_created_by_a_request_that_died_before_marking_it_is_replayed(api_server: ApiServer) -> None:
    job_id = _post(api_server, {"steps": 4}, None).json()["id"]
    client, record_key = _record_key(api_server, "half-done")
    fp = fingerprint("POST /generate", GenerateRequest(steps=4))
    client.set(record_key, json.dumps({"fp": fp, "job": job_id, "state": "pending", "at": time.time()}), ex=600)
    r = _post(api_server, {"steps": 4}, "half-done")
    assert r.status_code == 200 and r.json()["id"] == job_id and _jobs_made(api_server) == 1
    assert json.loads(client.get(record_key))["state"] == "created"  # type: ignore[arg-type]
