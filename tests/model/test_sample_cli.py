"""``ddpm sample``: a grid PNG and the progressive x0-hat strip from a checkpoint, reproducible per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.sample_cli import frame_indices
from model.unet import UNet
from service.cli import main as cli_main


@pytest.fixture
def ckpt(tmp_path: Path, tiny_unet_config: UNetConfig) -> Path:
    unet = UNet(tiny_unet_config)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, unet, tiny_unet_config, DiffusionConfig(num_timesteps=20))
    return path


def test_frame_indices_always_end_on_the_last_step() -> None:
    assert frame_indices(20, 5) == [0, 5, 10, 14, 19]
    assert frame_indices(3, 10) == [0, 1, 2]
    assert frame_indices(7, 1) == [6]


@pytest.mark.filterwarnings("ignore:TF32")
def test_sample_writes_grid_and_strip_reproducibly(tmp_path: Path, ckpt: Path) -> None:
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    with torch.backends.mkldnn.flags(enabled=False):  # bit-exact across batch sizes (see test_sampler)
        assert cli_main(["sample", "--checkpoint", str(ckpt), "--n", "3", "--steps", "5", "--seed", "4",
                         "--out", str(grid), "--progressive", str(strip), "--frames", "3", "--batch-size", "2",
                         "--device", "cpu"]) == 0
        one = tmp_path / "one.png"
        assert cli_main(["sample", "--checkpoint", str(ckpt), "--n", "1", "--steps", "5", "--seed", "4",
                         "--out", str(one), "--device", "cpu"]) == 0
    g = np.asarray(Image.open(grid))
    assert g.shape == (22, 22, 3)  # 3 images of 8x8 on a 2x2 grid with 2-pixel padding
    assert np.asarray(Image.open(strip)).shape == (32, 32, 3)  # 3 rows (images) x 3 frames
    # Image 0 of seed 4 is the same picture whether sampled among 3 (in batches of 2) or alone.
    assert np.array_equal(g[2:10, 2:10], np.asarray(Image.open(one))[2:10, 2:10])


def test_sample_reports_bad_input_without_a_traceback(tmp_path: Path, ckpt: Path) -> None:
    out = str(tmp_path / "g.png")
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", out]) == 2
    assert cli_main(["sample", "--checkpoint", str(ckpt), "--steps", "21", "--out", out]) == 2
    assert cli_main(["sample", "--checkpoint", str(ckpt), "--sampler", "ddim", "--eta", "2", "--out", out]) == 2
