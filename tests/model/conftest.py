"""Fixtures of the model tests (the tiny U-Net config itself is tests/tiny_model.py's, via tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from model.config import UNetConfig
from model.unet import UNet


@pytest.fixture
def random_unet(tiny_unet_config: UNetConfig) -> UNet:
    """A tiny U-Net with random weights everywhere (a fresh one predicts eps = 0: too easy to be batch-exact),
    in eval mode, its timestep table cached for up to the paper's T = 1000."""
    unet = UNet(tiny_unet_config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    unet.cache_time_embeddings(1000)
    return unet
