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


def _picture(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def test_init_image_writes_variations_and_interpolate_a_row_between_the_inputs(tmp_path: Path, ckpt: Path) -> None:
    a = _picture(tmp_path / "a.png", (20, 12))  # another size and aspect: resized and centre-cropped to 8x8
    b = _picture(tmp_path / "b.jpg", (8, 8), mode="L")  # grey JPEG for an RGB model: converted
    rec, strip = tmp_path / "rec.png", tmp_path / "rec-strip.png"
    assert cli_main(["sample", "--checkpoint", str(ckpt), "--init-image", str(a), "--start-t", "10", "--steps", "4",
                     "--n", "3", "--out", str(rec), "--progressive", str(strip), "--frames", "2",
                     "--device", "cpu"]) == 0
    assert np.asarray(Image.open(rec)).shape == (22, 22, 3) and np.asarray(Image.open(strip)).shape == (32, 22, 3)
    row = tmp_path / "row.png"
    assert cli_main(["sample", "--checkpoint", str(ckpt), "--interpolate", str(a), str(b), "--start-t", "12",
                     "--lambdas", "0,0.5,1", "--batch-size", "2", "--out", str(row), "--device", "cpu"]) == 0
    pixels = np.asarray(Image.open(row))
    assert pixels.shape == (12, 52, 3)  # A, three interpolants, B in one row
    # The row's ends are the fitted inputs themselves.
    from model.images import load_image, to_uint8

    assert np.array_equal(pixels[2:10, 2:10], to_uint8(load_image(a, 8, 3))[0])
    assert np.array_equal(pixels[2:10, 42:50], to_uint8(load_image(b, 8, 3))[0])


def test_reconstruction_modes_refuse_bad_input(tmp_path: Path, ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path / "g.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    pic = str(_picture(tmp_path / "a.png", (8, 8)))
    base = ["sample", "--checkpoint", str(ckpt), "--out", out, "--device", "cpu"]
    assert cli_main([*base, "--init-image", str(junk)]) == 2
    assert "cannot identify image file" in caplog.text
    assert cli_main([*base, "--init-image", str(tmp_path / "missing.png")]) == 2
    assert cli_main([*base, "--init-image", pic, "--start-t", "21"]) == 2
    assert "start_t must be an integer between 1 and 20" in caplog.text
    assert cli_main([*base, "--init-image", pic, "--start-t", "5", "--steps", "6"]) == 2
    assert cli_main([*base, "--interpolate", pic, pic, "--lambdas", "0,2"]) == 2
    assert "lambdas" in caplog.text
    assert cli_main([*base, "--shared-latent"]) == 2
    assert cli_main([*base, "--start-t", "5"]) == 2
    assert cli_main([*base, "--init-image", pic, "--interpolate", pic, pic]) == 2
    assert not Path(out).exists()
