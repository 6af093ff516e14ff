"""``ddpm up`` attacked as an unlucky operator would: its worker SIGKILLed mid-job, Ctrl-C pressed in the
terminal mid-job (SIGINT to the whole foreground process group), a second stack started beside the first.

Wanted: a dead worker is restarted (with backoff, logged) and its job still resolves within 30 s; Ctrl-C stops
the API, then the worker (which hands its job back without using a retry), then Redis, last; a second stack gets
its own ports, its own Redis files and is "ready" only when its own worker answers; the worker's metrics listen
where the API listens and the worker never sees the API keys.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq.job import Job

from service.queue import JobStore, connect
from service.redis_server import RedisServer, free_port
from tests.chaos.conftest import Chaos
from tests.chaos.processes import Up, write_long_checkpoint

KEY = "chaos-test-key-0123456789abcdef"  # 31 characters: a valid API key
RESOLVE_BOUND_S = 30.0  # the promise: a killed worker's job ends (retried or failed) within this


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_long_checkpoint(tmp_path_factory.mktemp("ckpt") / "long.safetensors")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A fresh cache directory (the stacks' default data directories), one torch thread, API keys on."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "DDPM_API_KEYS": KEY}


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


def _http(up: Up) -> httpx.Client:
    return httpx.Client(base_url=up.ready_field(r"ready: (http://\S+?)/ "), timeout=10,
                        headers={"Authorization": f"Bearer {KEY}"})


def _wait(http: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/jobs/{job_id}").json())["status"] not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return dict(job)


def _listening_address(port: int) -> str:
    """The local address a TCP socket listens on at ``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            return ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_up_beside_another_stack_then_its_worker_killed_then_ctrl_c(checkpoint: Path, env: dict[str, str],
                                                                    ups: list[Up], chaos: Chaos) -> None:
    """One stack's life: started with API keys, a second stack beside it (only --port differs) and a third that
    would collide, its worker SIGKILLed mid-job, then Ctrl-C mid-job."""
    lease = chaos.n(3, 15)  # the full run keeps the default lease: the 30 s promise is made with it
    up = Up("--port", str(free_port()), "--checkpoint", f"tiny={checkpoint}", "--device", "cpu",
            "--lease-seconds", str(lease), "--stop-grace", "1", env=env)
    ups.append(up)
    up.wait_ready()
    _check_exposures(up, chaos)
    _check_a_second_and_a_third_stack(up, checkpoint, env, ups, chaos)
    _check_a_killed_worker(up, lease, chaos)
    _check_ctrl_c(up, chaos)


def _check_exposures(up: Up, chaos: Chaos) -> None:
    pids = up.children()
    store = JobStore(connect(up.ready_field(r"Redis (redis://\S+)"), timeout=5.0))
    metrics_port = int(up.ready_field(r"worker metrics http://[^:]+:(\d+)/"))
    exposures = {"ready means this stack's worker answered": any(w["pid"] == pids["worker"]
                                                                  for w in store.live_workers()),
                 "worker metrics listen where the API does (127.0.0.1)": _listening_address(metrics_port)
                 == "127.0.0.1",
                 "the worker has no DDPM_API_KEYS": "DDPM_API_KEYS" not in _environ(pids["worker"]),
                 "Redis in its own session": os.getsid(pids["redis"]) == pids["redis"]}
    for what, ok in exposures.items():
        chaos.record(f"ddpm up: {what}?", "yes", "yes" if ok else "no", ok)
    assert all(exposures.values()), exposures


def _check_a_second_and_a_third_stack(first: Up, checkpoint: Path, env: dict[str, str], ups: list[Up],
                                      chaos: Chaos) -> None:
    """A second `make run` with only PORT different: its own metrics port, its own Redis files, ready on its own
    worker. A third that would take the first one's ports or data directory: refused up front, one message,
    nothing started."""
    api_port = int(first.ready_field(r"http://[^:]+:(\d+)/ "))
    metrics_a = int(first.ready_field(r"worker metrics http://[^:]+:(\d+)/"))
    data_a = Path(first.ready_field(r"data in (\S+)\)"))
    common = ("--checkpoint", f"tiny={checkpoint}", "--device", "cpu")
    second = Up("--port", str(free_port()), *common, env=env)
    ups.append(second)
    refusals = {  # started while the second one starts: they must not need it
        "the same API and metrics ports": Up("--port", str(api_port), "--worker-metrics-port", str(metrics_a),
                                             *common, env=env),
        "the same data directory": Up("--port", str(free_port()), "--data-dir", str(data_a), *common, env=env),
    }
    for what, third in refusals.items():
        code = third.proc.wait(60)
        time.sleep(0.2)  # the last stderr lines
        message = next((line for _, line in third.lines if line.startswith("ddpm up: ")), third.log)
        ok = code == 2 and "Traceback" not in third.log and "starting the" not in third.log
        chaos.record(f"a third `ddpm up` with {what}", "refused before starting anything, one clear message",
                     f"exit {code}: {message[:100]}", ok)
        assert ok, third.log
        if "ports" in what:
            assert f"{api_port} for the API" in message and f"{metrics_a} for the worker's metrics" in message
            assert "make run PORT=" in message and "WORKER_METRICS_PORT=" in message
        else:
            assert "in use by another `ddpm up`" in message and str(data_a) in message
    second.wait_ready()
    store = JobStore(connect(second.ready_field(r"Redis (redis://\S+)"), timeout=5.0))
    own = any(w["pid"] == second.children()["worker"] for w in store.live_workers())  # right at "ready"
    metrics_b = int(second.ready_field(r"worker metrics http://[^:]+:(\d+)/"))
    data_b = Path(second.ready_field(r"data in (\S+)\)"))
    ok = own and metrics_a != metrics_b and data_a != data_b
    chaos.record("a second `ddpm up` beside the first (only --port differs)", "own metrics port, own data "
                 "directory, ready when its own worker answers",
                 f"metrics {metrics_a}/{metrics_b}, data dirs {'distinct' if data_a != data_b else 'SHARED'}, "
                 f"own worker at ready: {own}", ok)
    assert ok, (own, metrics_a, metrics_b, data_a, data_b)
    assert second.stop() == 0, second.log[-3000:]


def _check_a_killed_worker(up: Up, lease: int, chaos: Chaos) -> None:
    pids, http = up.children(), _http(up)
    job_id = http.post("/generate", json={"num_images": 16, "steps": 300, "seed": 1}).json()["id"]
    _wait(http, job_id, ("running",))
    killed_at = time.monotonic()
    os.kill(pids["worker"], 9)
    job = _wait(http, job_id, ("succeeded", "failed"), timeout=RESOLVE_BOUND_S + 60)
    resolved = time.monotonic() - killed_at
    now = up.children()
    restarted = [t for t, line in up.lines if "restarting it in" in line and "worker" in line]
    back = next((t - killed_at for t, line in up.lines if t > killed_at and " ready on " in line), float("nan"))
    same = (now["api"], now["redis"]) == (pids["api"], pids["redis"])
    ok = (job["status"] == "succeeded" and job["attempt"] == 2 and resolved < RESOLVE_BOUND_S and same
          and now["worker"] != pids["worker"])
    chaos.record(f"ddpm up: worker SIGKILLed mid-job (lease {lease} s)", "worker restarted (logged), job "
                 "succeeds on its retry within 30 s, API and Redis untouched",
                 f"restart logged {len(restarted)}x, new worker ready {back:.1f} s after the kill; job "
                 f"{job['status']} (attempt {job['attempt']}) {resolved:.1f} s after the kill; API/Redis pids "
                 f"{'same' if same else 'changed'}", ok)
    assert restarted, up.log[-3000:]
    assert ok, (job, resolved, pids, now)


def _check_ctrl_c(up: Up, chaos: Chaos) -> None:
    http = _http(up)
    redis_url = up.ready_field(r"Redis (redis://\S+)")
    job_id = http.post("/generate", json={"num_images": 16, "steps": 991, "seed": 2}).json()["id"]
    before = _wait(http, job_id, ("running",))
    retries_before = Job.fetch(job_id, connection=redis.Redis.from_url(redis_url)).retries_left
    data_dir = Path(up.ready_field(r"data in (\S+)\)"))
    up.interrupt()
    code = up.proc.wait(90)
    order = [next((t for t, line in up.lines if re.search(p, line)), None) for p in (
        r"stopping the api", r"the api stopped", r"stopping the worker", r"the worker stopped \(status 0\)",
        r"stopping redis-server", r"redis-server stopped")]
    in_order = None not in order and order == sorted(order)  # type: ignore[type-var]
    with RedisServer(data_dir=data_dir, appendonly=True) as server:  # what Redis kept, read after the fact
        after = JobStore(connect(server.url, timeout=5.0)).get(job_id) or {}
        retries_after = Job.fetch(job_id, connection=redis.Redis.from_url(server.url)).retries_left
        queued = job_id in JobStore(connect(server.url, timeout=5.0)).rq_queue().get_job_ids()
    ok = (code == 0 and in_order and after.get("status") == "queued" and queued
          and after.get("attempt") == before["attempt"] and retries_after == retries_before)
    chaos.record("ddpm up: Ctrl-C (SIGINT to the process group) mid-job", "exit 0; API, worker, Redis stop in "
                 "that order; job queued again, attempt and retries unchanged",
                 f"exit {code}; order {'kept' if in_order else 'broken'}; job {after.get('status')}, attempt "
                 f"{before['attempt']}->{after.get('attempt')}, retries {retries_before}->{retries_after}", ok)
    assert ok, (code, order, after, retries_before, retries_after, up.log[-3000:])
