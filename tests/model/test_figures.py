"""``make figures`` (docs/figures/make_figures.py) on a tiny checkpoint: every figure written, the same bytes twice."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "figures" / "make_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_digits(tmp_path: Path) -> Path:
    cfg = UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_groups=4)
    torch.manual_seed(0)
    unet = UNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, unet, cfg, DiffusionConfig(num_timesteps=20), dataset="digits", step=1)
    return path


def test_make_figures_writes_every_figure_deterministically(tmp_path: Path, tiny_digits: Path) -> None:
    make_figures = _script()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": 20 * i, "loss": 1.0 / i}) + "\n" for i in range(1, 30)))
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    common = ["--checkpoint", str(tiny_digits), "--metrics", str(metrics), "--rd-images", "6"]
    assert make_figures.main([*common, "--out", str(out_a)]) == 0
    names = {"samples", "progressive", "reconstruction", "interpolation", "rate_distortion", "training_curve",
             "benchmarks"}
    assert {p.stem for p in out_a.glob("*.png")} == names
    for name in names:
        with Image.open(out_a / f"{name}.png") as img:
            assert img.format == "PNG" and min(img.size) > 100
    with Image.open(out_a / "interpolation.png") as img:
        assert img.size[0] > 3 * img.size[1]  # three rows of 13 pictures (A, 11 lambdas, B)
    rows = list(csv.DictReader((out_a / "rate_distortion.csv").open()))
    assert [int(r["t"]) for r in rows] == list(range(1, 21))
    # The same checkpoint and seeds give the same bytes (one torch thread, fp32, no timestamps in the PNGs).
    assert make_figures.main([*common, "--out", str(out_b), "--only", "reconstruction", "rate_distortion"]) == 0
    for name in ("reconstruction.png", "rate_distortion.png", "rate_distortion.csv"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes()
