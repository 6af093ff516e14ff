"""Service fixtures: a real redis-server on a free port, and a tiny random-weight checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
import uvicorn

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet
from service.redis_server import RedisServer, free_port
from service.settings import Settings

TINY_UNET = UNetConfig(image_size=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_groups=4)
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
    """The real app served by uvicorn in a background thread on a free port."""

    def __init__(self, settings: Settings, **app_kwargs: object):
        from service.api import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        config = uvicorn.Config(create_app(settings, **app_kwargs), host="127.0.0.1", port=self.port,  # type: ignore[arg-type]
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
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
