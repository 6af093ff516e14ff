"""service.deps and service.app_state at their own level: the real app (``create_app``) driven in-process, with
the job store swapped for a recording fake through ``app.dependency_overrides``, as the FastAPI documentation's
"Testing Dependencies" does. What only a real Redis shows (counts shared by replicas, expiry, the store going
away) is in test_api.py and test_security.py."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api import create_app
from service.app_state import ApiState
from service.auth import NOBODY, OPEN, Caller
from service.deps import Who, job_store, visible_job
from service.queue import StoreUnavailable
from service.settings import Settings

JOB = "0123456789abcdef0123456789abcdef"
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789xy"


class FakeStore:
    """The part of ``JobStore`` these routes use, recording every call."""

    ttl = 60

    def __init__(self, jobs: dict[str, dict[str, Any]] | None = None, workers: list[dict[str, Any]] | None = None):
        self.jobs, self.workers = jobs or {}, workers or []
        self.frames: dict[tuple[str, int], bytes] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.counts: Counter[str] = Counter()
        self.down = False

    def ping(self) -> None:
        self.calls.append(("ping",))

    def live_workers(self, max_age_seconds: float = 15.0) -> list[dict[str, Any]]:
        self.calls.append(("live_workers", max_age_seconds))
        return self.workers

    def get(self, job_id: str) -> dict[str, Any] | None:
        self.calls.append(("get", job_id))
        return self.jobs.get(job_id)

    def frame_png(self, job_id: str, index: int) -> bytes | None:
        return self.frames.get((job_id, index))

    def count_request(self, client: str, window_seconds: int = 60) -> tuple[int, int]:
        if self.down:
            raise StoreUnavailable("ConnectionError: refused")
        self.counts[client] += 1
        return self.counts[client], 42


@pytest.fixture
def serve(tiny_checkpoint: Path) -> Iterator[Any]:
    """``serve(fake_store, **settings)`` -> a TestClient of the real app whose job store is ``fake_store``."""
    clients: list[TestClient] = []

    def make(store: FakeStore, **overrides: Any) -> TestClient:
        app = create_app(Settings(checkpoints={"tiny": str(tiny_checkpoint)}, **overrides))
        app.dependency_overrides[job_store] = lambda: store
        client = TestClient(app, client=("203.0.113.5", 50000)).__enter__()  # runs the lifespan
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_the_job_store_can_be_swapped_and_readiness_uses_the_lease_window(serve: Any) -> None:
    store = FakeStore(workers=[{"name": "w1", "models": ["tiny"]}])
    client = serve(store, worker_lease_seconds=40)
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["worker"] == "serving"
    assert store.calls == [("ping",), ("live_workers", 40)]  # DDPM_WORKER_LEASE_SECONDS, the one window
    store.workers.clear()
    assert "in the last 40 s" in client.get("/readyz").json()["message"]
    assert client.get("/models").json()["models"][0]["workers"] == 0


def test_a_frame_whose_bytes_expired_is_410(serve: Any) -> None:
    store = FakeStore(jobs={JOB: {"id": JOB, "owner": None, "num_frames": 2}})
    store.frames[(JOB, 0)] = b"\x89PNG..."
    client = serve(store)
    assert client.get(f"/jobs/{JOB}/frames/0.png").content == b"\x89PNG..."
    r = client.get(f"/jobs/{JOB}/frames/1.png")  # the record says 2 frames; the bytes of frame 1 are gone
    assert r.status_code == 410 and r.json()["error"] == {"code": "expired",
                                                          "message": f"frame 1 of job {JOB} has expired"}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_refused_keys_and_the_id_limits_count_under(serve: Any) -> None:
    store = FakeStore(jobs={JOB: {"id": JOB, "owner": _digest(ALICE), "num_frames": 0}})
    client = serve(store, api_keys=[ALICE, BOB], auth_failures_per_minute=2, rate_limit_per_minute=100)
    r = client.get("/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/models", headers={"x-api-key": "wrong-key-0123456789"}).status_code == 403
    assert store.counts == {"authfail-addr-203.0.113.5": 2}  # refusals count per address, never per key given
    r = client.get("/models", headers={"x-api-key": ALICE})  # the budget is spent: even the right key waits
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 42


def test_an_accepted_key_is_the_client_and_the_owner(serve: Any) -> None:
    store = FakeStore(jobs={JOB: {"id": JOB, "owner": _digest(ALICE), "num_frames": 1}})
    store.frames[(JOB, 0)] = b"\x89PNG..."
    client = serve(store, api_keys=[ALICE, BOB], rate_limit_per_minute=100)
    assert client.get(f"/jobs/{JOB}/frames/0.png", headers={"authorization": f"Bearer {ALICE}"}).status_code == 200
    r = client.get(f"/jobs/{JOB}/frames/0.png", headers={"x-api-key": BOB})  # another key's job: as unknown
    assert r.status_code == 404 and r.json()["error"]["message"].startswith(f"no job {JOB}: the id is unknown")
    # each accepted request counted once, under the key's digest prefix (never the key, never the address)
    assert store.counts == {f"key-{_digest(ALICE)[:16]}": 1, f"key-{_digest(BOB)[:16]}": 1}


def test_the_rate_limit_counts_per_client_and_fails_open(serve: Any) -> None:
    store = FakeStore()
    client = serve(store, rate_limit_per_minute=2)
    assert [client.get("/healthz").status_code for _ in range(3)] == [200] * 3  # probes are never counted
    codes = [client.get("/models").status_code for _ in range(3)]
    assert codes == [200, 200, 429] and store.counts == {"addr-203.0.113.5": 3}
    r = client.get("/models")
    assert r.json()["error"]["code"] == "rate_limited" and r.headers["retry-after"] == "42"
    store.down = True  # the store is away: not counted, not refused (routes that need it answer 503 themselves)
    assert client.get("/models").status_code == 200


def test_without_keys_every_caller_is_open_and_nothing_is_counted(serve: Any) -> None:
    store = FakeStore(jobs={JOB: {"id": JOB, "owner": "someone", "num_frames": 0}})
    client = serve(store)
    assert client.get(f"/jobs/{JOB}/frames/0.png").json()["error"]["message"].startswith(f"job {JOB} has 0 frames")
    assert store.counts == {}


def _caller_app(keys: list[str]) -> TestClient:
    """A bare app with the ApiState of ``keys`` and one route that takes ``Who`` without ``require_key``."""
    app = FastAPI()
    app.state.api = ApiState(Settings(api_keys=keys))

    @app.get("/who")
    def who(caller: Who) -> dict[str, Any]:
        return {"key": caller.key, "admin": caller.admin}

    return TestClient(app)


def test_a_route_that_skipped_the_key_check_sees_no_job_while_keys_are_on() -> None:
    assert _caller_app([]).get("/who").json() == {"key": OPEN.key, "admin": OPEN.admin}
    assert _caller_app([ALICE]).get("/who").json() == {"key": NOBODY.key, "admin": NOBODY.admin}


def test_visible_job_is_the_one_owner_rule() -> None:
    store = FakeStore(jobs={JOB: {"id": JOB, "owner": "alice"}})
    alice, bob, admin = Caller("alice", False), Caller("bob", False), Caller("root", True)
    assert visible_job(store, JOB, alice) == store.jobs[JOB] and visible_job(store, JOB, admin) is not None
    assert visible_job(store, JOB, bob) is None and visible_job(store, JOB, NOBODY) is None
    calls = len(store.calls)
    for hostile in ("../etc", JOB.upper(), JOB + "0", "ddpm:workers", "*"):
        assert visible_job(store, hostile, admin) is None
    assert len(store.calls) == calls  # an id we could not have made never reaches the store


def test_the_state_exists_only_in_an_app_of_create_app_and_its_stores_only_in_the_lifespan() -> None:
    with pytest.raises(RuntimeError, match=r"not made by service\.api\.create_app"):
        ApiState.of(FastAPI().state)
    state = ApiState(Settings())
    with pytest.raises(RuntimeError, match="lifespan has not started"):
        _ = state.store
    assert state.settings.api_keys == [] and state.keys.enabled is False
