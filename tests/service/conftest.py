"""Service fixtures: a real redis-server on a free port, and a tiny random-weight checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet
from service.redis_server import RedisServer

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
