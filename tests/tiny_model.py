"""The tiny U-Net config of the test suite, written once: the model tests' ``tiny_unet_config`` fixture
(tests/conftest.py) and the service tests' checkpoints (tests/service/conftest.py, tests/chaos) use it."""

from __future__ import annotations

from model.config import UNetConfig

# 8x8 RGB, two levels, attention at 4x4: a real U-Net in every part, a few milliseconds per forward on a CPU.
TINY_UNET = UNetConfig(image_size=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_groups=4)
