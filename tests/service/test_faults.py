"""Faults with real processes: a worker killed mid-job, Redis stopped or frozen mid-run and restarted (with and
without append-only persistence), and a crash while a worker writes frames or results.

The bounds asserted here are the promises (a killed worker's job ends within 30 s; the API answers within
about a second while Redis is away), checked generously against hanging, not benchmarks.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model.images import png_bytes
from service.queue import TERMINAL_STATES, JobState, JobStore, connect
from service.redis_server import RedisServer, free_port

from .conftest import ApiServer, WorkerProcess

log = logging.getLogger(__name__)  # the measured times (pytest --log-cli-level=INFO shows them)
KILLED_WORKER_BOUND_S = 30.0  # the promise: a killed worker's job ends (retried or failed) within this
STORE_DOWN_BOUND_S = 3.0  # the promise is about a second (1 s Redis timeouts); generous against hanging


def _worker(redis_url: str, checkpoint: Path, log_dir: Path, name: str, *extra: str) -> WorkerProcess:
    args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url", redis_url,
            "--checkpoint", f"tiny={checkpoint}", "--device", "cpu", "--metrics-port", "0", "--name", name, *extra]
    return WorkerProcess(args, 0, name, log_dir / f"{name}.log")


def _wait(api: ApiServer, job_id: str, states: frozenset[JobState] | set[JobState] = TERMINAL_STATES,
          timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{api.url}/jobs/{job_id}", timeout=5)
        if r.status_code == 200 and JobState(r.json()["status"]) in states:
            return dict(r.json())
        assert time.monotonic() < deadline, f"job {job_id} stuck: {r.status_code} {r.text[:300]}"
        time.sleep(0.05)


def _submit(api: ApiServer, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json=body, timeout=5)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may stop, freeze and restart (same port), with append-only persistence."""
    server = RedisServer(port=free_port(), data_dir=tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.cleanup()


# ---- a worker killed mid-job -------------------------------------------------------------------------------
def _kill_the_runner_mid_job(api: ApiServer, job_id: str, workers: list[WorkerProcess]) -> tuple[dict[str, Any], float]:
    """SIGKILL the worker running ``job_id``; the job's final view and the seconds from the kill to its end."""
    running = _wait(api, job_id, {JobState.RUNNING, *TERMINAL_STATES})
    assert running["status"] == "running", "the job ended before the worker could be killed"
    doomed = next(w for w in workers if w.name == _store(api).get(job_id)["worker"])  # type: ignore[index]
    killed_at = time.monotonic()
    doomed.signal(signal.SIGKILL)
    job = _wait(api, job_id, timeout=KILLED_WORKER_BOUND_S + 30)
    return job, time.monotonic() - killed_at


@pytest.mark.parametrize("retries", [1, 0])
def test_a_job_of_a_worker_killed_mid_job_ends_within_30_s(make_api: Callable[..., ApiServer],
                                                           tiny_checkpoint: Path, tmp_path: Path,
                                                           retries: int) -> None:
    """With a retry left, another worker runs it to the end; without, it fails with a reason. Never stuck."""
    api = make_api()
    url = api.settings.redis_url
    workers = [_worker(url, tiny_checkpoint, tmp_path, f"w{i}", "--lease-seconds", "3") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready(url)
        if retries:
            job_id = _submit(api, num_images=16, steps=40, preview_every=10)  # the API's policy: one retry
        else:
            request = {"num_images": 16, "seed": 1, "steps": 40, "sampler": "ddpm", "eta": 0.0,
                       "variance": "fixedlarge", "preview_every": 10, "model": "tiny"}
            no_retry = JobStore(connect(url, timeout=5.0), queue_name=api.settings.queue_name, max_retries=0)
            job_id = no_retry.submit(request, "tiny", num_images=16, total_steps=40, seeds=[1] * 16,
                                     max_queue_length=100)
        job, ended_after = _kill_the_runner_mid_job(api, job_id, workers)
        log.info("killed worker's job (retries %d) ended %s %.1f s after the SIGKILL (lease 3 s)", retries,
                 job["status"], ended_after)
        if retries:
            assert job["status"] == "succeeded" and job["attempt"] == 2 and len(job["images"]) == 16, job
        else:
            assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
            assert "stopped responding" in job["error"]["message"]
        assert ended_after < KILLED_WORKER_BOUND_S, f"the job took {ended_after:.1f} s to end after the kill"
    finally:
        for w in workers:
            w.stop()


def _store(api: ApiServer) -> JobStore:
    return JobStore(connect(api.settings.redis_url, timeout=5.0), queue_name=api.settings.queue_name)


# ---- Redis stopped or frozen mid-run -----------------------------------------------------------------------
def _every_store_route(api: ApiServer, job_id: str) -> list[tuple[str, Callable[[], httpx.Response]]]:
    u = api.url
    return [
        ("POST /generate", lambda: httpx.post(f"{u}/generate", json={"steps": 1}, timeout=10)),
        ("GET /jobs/{id}", lambda: httpx.get(f"{u}/jobs/{job_id}", timeout=10)),
        ("DELETE /jobs/{id}", lambda: httpx.delete(f"{u}/jobs/{job_id}", timeout=10)),
        ("GET /jobs/{id}/events", lambda: httpx.get(f"{u}/jobs/{job_id}/events", timeout=10)),
        ("GET /jobs/{id}/frames/0.png", lambda: httpx.get(f"{u}/jobs/{job_id}/frames/0.png", timeout=10)),
        ("GET /jobs/{id}/images/0.png", lambda: httpx.get(f"{u}/jobs/{job_id}/images/0.png", timeout=10)),
        ("GET /readyz", lambda: httpx.get(f"{u}/readyz", timeout=10)),
    ]


def _assert_all_503_quickly(api: ApiServer, job_id: str) -> dict[str, float]:
    took = {}
    for name, call in _every_store_route(api, job_id):
        start = time.monotonic()
        r = call()
        took[name] = time.monotonic() - start
        assert r.status_code == 503, (name, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "store_unavailable" and "retry-after" in r.headers, name
        assert took[name] < STORE_DOWN_BOUND_S, f"{name} took {took[name]:.2f} s while Redis was away"
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200  # liveness does not depend on Redis
    return took


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_redis_away_mid_run_is_503_at_once_then_everything_resumes(make_api: Callable[..., ApiServer],
                                                                  own_redis: RedisServer, tiny_checkpoint: Path,
                                                                  tmp_path: Path, fault: str) -> None:
    """Stopped: connections are refused. Frozen (SIGSTOP): connections hang, so only the client's timeouts
    keep requests short. Either way the API and the worker carry on, without a restart, once Redis is back."""
    api = make_api(redis_url=own_redis.url)
    worker = _worker(own_redis.url, tiny_checkpoint, tmp_path, "survivor")
    try:
        worker.wait_ready(own_redis.url)
        before = _submit(api, steps=4, preview_every=2)
        assert _wait(api, before)["status"] == "succeeded"
        assert own_redis.proc is not None
        if fault == "stopped":
            own_redis.stop()
        else:
            own_redis.proc.send_signal(signal.SIGSTOP)
        took = _assert_all_503_quickly(api, before)
        log.info("redis %s: 503 in %s", fault, ", ".join(f"{k} {v:.3f} s" for k, v in took.items()))
        if fault == "stopped":
            own_redis.start()  # same port, same data directory
        else:
            own_redis.proc.send_signal(signal.SIGCONT)
        job = _wait(api, before)  # written before the outage, still there
        assert job["status"] == "succeeded" and len(job["images"]) == 1
        after = _submit(api, num_images=2, steps=4)
        job = _wait(api, after)
        assert job["status"] == "succeeded" and len(job["images"]) == 2
        deadline = time.monotonic() + 30  # ready again, and the worker's heartbeat returns
        while httpx.get(f"{api.url}/readyz", timeout=5).json().get("worker") != "serving":
            assert time.monotonic() < deadline, "readyz never recovered"
            time.sleep(0.2)
    finally:
        assert worker.stop() == 0, worker.log()


def test_queued_jobs_survive_a_redis_restart_with_append_only_persistence(make_api: Callable[..., ApiServer],
                                                                           own_redis: RedisServer,
                                                                           tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    api = make_api(redis_url=own_redis.url)
    queued = [_submit(api, num_images=1 + i, steps=3, seed=i) for i in range(3)]  # no worker yet: all queued
    own_redis.stop()
    own_redis.start()  # a restart: the data comes back from the append-only file
    assert [httpx.get(f"{api.url}/jobs/{j}").json()["queue_position"] for j in queued] == [1, 2, 3]
    worker = _worker(own_redis.url, tiny_checkpoint, tmp_path, "after-restart")
    try:
        worker.wait_ready(own_redis.url)
        for i, job_id in enumerate(queued):
            job = _wait(api, job_id)
            assert job["status"] == "succeeded" and len(job["images"]) == 1 + i
    finally:
        assert worker.stop() == 0, worker.log()


# ---- a crash while writing frames or results ---------------------------------------------------------------
class Crash(BaseException):
    """Stands for the process dying at that point (not an Exception: nothing may catch it)."""


def _png(value: float) -> bytes:
    return png_bytes(torch.full((3, 8, 8), value))


def _crash_on_nth_call(monkeypatch: pytest.MonkeyPatch, pipe_class: type, method: str, n: int) -> None:
    original = getattr(pipe_class, method)
    calls = {"n": 0}

    def crashing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipe_class, method, crashing)


def test_a_crash_while_writing_results_never_shows_a_half_written_success(api_server: ApiServer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.client

    store = _store(api_server)
    job_id = _submit(api_server, num_images=3, steps=2)
    assert store.start(job_id, "w") is not None
    store.add_frame(job_id, step=1, t=1, png=_png(0.1))
    # The worker dies after queueing the second of three images into the results transaction.
    with monkeypatch.context() as m:
        _crash_on_nth_call(m, redis.client.Pipeline, "set", 2)
        with pytest.raises(Crash):
            store.succeed(job_id, [_png(0.2), _png(0.3), _png(0.4)])
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "running" and job["images"] == []
    assert [store.image_png(job_id, i) for i in range(3)] == [None, None, None]  # nothing of it was written
    assert httpx.get(f"{api_server.url}/jobs/{job_id}/images/0.png").status_code == 404
    # Its retry writes everything at once.
    assert store.succeed(job_id, [_png(0.2), _png(0.3), _png(0.4)])
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and len(job["images"]) == 3
    assert all(httpx.get(api_server.url + im["url"]).status_code == 200 for im in job["images"])


def test_a_crash_while_writing_a_frame_leaves_no_broken_frame(api_server: ApiServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.client

    store = _store(api_server)
    job_id = _submit(api_server, steps=4, preview_every=1)
    store.start(job_id, "w")
    store.add_frame(job_id, step=1, t=3, png=_png(0.1))
    with monkeypatch.context() as m:  # dies inside the frame's transaction
        _crash_on_nth_call(m, redis.client.Pipeline, "rpush", 1)
        with pytest.raises(Crash):
            store.add_frame(job_id, step=2, t=2, png=_png(0.2))
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "running" and [f["index"] for f in job["frames"]] == [0]  # only whole frames listed
    assert all(httpx.get(api_server.url + f["url"]).status_code == 200 for f in job["frames"])
    assert httpx.get(f"{api_server.url}/jobs/{job_id}/frames/1.png").status_code in (404, 410)  # never 5xx
