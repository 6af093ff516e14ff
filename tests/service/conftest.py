"""Service fixtures: a real redis-server on a free port, a tiny random-weight checkpoint, real worker processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
import uvicorn

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig
from model.unet import UNet
from service.queue import worker_key
from service.redis_server import RedisServer, free_port
from service.settings import Settings
from tests.tiny_model import TINY_UNET

TINY_DIFFUSION = DiffusionConfig(num_timesteps=40)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A real Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 8x8 RGB, T=40 checkpoint with small random weights (so every output is non-trivial)."""
    gen = torch.Generator().manual_seed(1234)
    unet = UNet(TINY_UNET)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, unet, TINY_UNET, TINY_DIFFUSION, dataset="random", step=0, ema=True)
    return path


# ---- the API over HTTP (added with service.api) -------------------------------------------------------------
class ApiServer:
    """The real app served by uvicorn in a background thread on a free port, configured as ``ddpm serve``
    configures it (``service.http_server.server_config``)."""

    def __init__(self, settings: Settings, **app_kwargs: object):
        from service.api import create_app
        from service.http_server import server_config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        config = server_config(create_app(settings, **app_kwargs), settings, host="127.0.0.1",  # type: ignore[arg-type]
                               port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def make_api(redis_url: str, tiny_checkpoint: Path) -> Iterator[Callable[..., ApiServer]]:
    """``make_api(**settings_overrides)`` -> a started ``ApiServer`` serving the tiny checkpoint as ``tiny``."""
    servers: list[ApiServer] = []

    def make(app_kwargs: dict[str, object] | None = None, **overrides: object) -> ApiServer:
        fields: dict[str, object] = {"redis_url": redis_url, "checkpoints": {"tiny": str(tiny_checkpoint)}}
        fields.update(overrides)
        server = ApiServer(Settings(**fields), **(app_kwargs or {})).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def api_server(make_api: Callable[..., ApiServer]) -> ApiServer:
    """The API with default limits, no auth, on the test Redis, serving ``tiny`` (T=40)."""
    return make_api()


class WorkerProcess:
    """A real ``ddpm worker`` subprocess (see the ``worker_process`` fixture)."""

    def __init__(self, args: list[str], metrics_port: int, name: str, log_path: Path):
        self.args, self.metrics_port, self.name, self.log_path = args, metrics_port, name, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, redis_url: str, timeout: float = 90.0) -> WorkerProcess:
        """Until the worker's heartbeat shows (models loaded, loop running)."""
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout
        try:
            while not client.exists(worker_key(self.name)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")
                time.sleep(0.1)
        finally:
            client.close()
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


@pytest.fixture
def worker_process(redis_url: str, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``worker_process(*extra_args)`` starts a real ``ddpm worker`` on the tiny checkpoint (model
    name ``tiny``) against ``redis_url``, waits until it is ready, and stops it (SIGTERM) after the test."""
    started: list[WorkerProcess] = []

    def start(*extra: str, ready: bool = True) -> WorkerProcess:
        name = f"test-worker-{len(started)}"
        port = free_port()
        args = [sys.executable, "-m", "service.cli", "worker", "--redis-url", redis_url, "--checkpoint",
                f"tiny={tiny_checkpoint}", "--device", "cpu", "--metrics-port", str(port), "--metrics-host",
                "127.0.0.1", "--name", name, *extra]
        proc = WorkerProcess(args, port, name, tmp_path / f"{name}.log")
        started.append(proc)
        return proc.wait_ready(redis_url) if ready else proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def shared_stack(redis_server: RedisServer, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[ApiServer, WorkerProcess]]:
    """One API (no auth) and one real worker on a freshly emptied Redis, shared by a module's tests (a worker
    start costs seconds). Don't mix with ``redis_url``-based fixtures in the same module: they flush Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    api = ApiServer(Settings(redis_url=redis_server.url, checkpoints={"tiny": str(tiny_checkpoint)})).start()
    port, name = free_port(), "shared-worker"
    # One torch thread: on a small shared machine two contending intra-op threads run ~10x slower.
    args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url",
            redis_server.url, "--checkpoint", f"tiny={tiny_checkpoint}", "--device", "cpu", "--metrics-port",
            str(port), "--metrics-host", "127.0.0.1", "--name", name]
    worker = WorkerProcess(args, port, name, tmp_path_factory.mktemp("worker") / f"{name}.log")
    try:
        worker.wait_ready(redis_server.url)
        yield api, worker
    finally:
        worker.stop()
        api.stop()
