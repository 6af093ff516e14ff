"""Checkpoint metadata without torch: the header parser agrees with the safetensors library, refuses what it
refuses, and importing it (or the ``model`` package) loads no PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import save_checkpoint
from model.checkpoint_meta import CheckpointError, read_header, read_metadata
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet


@pytest.fixture
def ckpt_path(tmp_path: Path, tiny_unet_config: UNetConfig, short_diffusion_config: DiffusionConfig) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, UNet(tiny_unet_config), tiny_unet_config, short_diffusion_config, dataset="digits",
                    step=7, extra={"source": "test"})
    return path


def test_the_header_matches_what_safetensors_reads(ckpt_path: Path) -> None:
    metadata, tensors = read_header(ckpt_path)
    with safe_open(str(ckpt_path), framework="pt") as f:
        assert metadata == f.metadata()
        assert sorted(tensors) == sorted(f.keys())
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert tensors[name]["shape"] == list(f.get_slice(name).get_shape())
    meta = read_metadata(ckpt_path)
    assert (meta["step"], meta["dataset"], meta["extra"], meta["num_tensors"]) == (7, "digits", {"source": "test"},
                                                                                  len(tensors))


def _rewrite_header(src: Path, dst: Path, edit: dict[str, object], *, cut: int = 0) -> Path:
    """``src`` with its header JSON updated by ``edit`` (same data bytes), optionally ``cut`` bytes shorter."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = {**json.loads(data[8:8 + n]), **edit}
    raw = json.dumps(header).encode()
    out = len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    dst.write_bytes(out[:len(out) - cut])
    return dst


@pytest.mark.parametrize(("edit", "cut", "match"), [
    ({}, 1, "truncated or corrupt.*the file holds"),  # one data byte missing
    ({"__metadata__": {"format": 1}}, 0, "strings to strings"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 0, "tensor 'x' spans 4 bytes"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 0, "invalid header entry"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 0, "starts at byte"),  # overlaps a tensor
])
def test_corrupt_headers_are_refused_naming_the_file(tmp_path: Path, ckpt_path: Path, edit: dict[str, object],
                                                    cut: int, match: str) -> None:
    bad = _rewrite_header(ckpt_path, tmp_path / "bad.safetensors", edit, cut=cut)
    with pytest.raises(CheckpointError, match=match) as info:
        read_metadata(bad)
    assert str(bad) in str(info.value)
    # the safetensors library refuses the same file
    with pytest.raises(Exception), safe_open(str(bad), framework="pt") as f:  # noqa: B017
        for name in f.keys():  # noqa: SIM118
            f.get_tensor(name)


def test_an_oversized_or_non_json_header_is_refused(tmp_path: Path) -> None:
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((200_000_000).to_bytes(8, "little") + b"{" + b" " * 100)
    with pytest.raises(CheckpointError, match="does not fit"):
        read_metadata(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(CheckpointError, match="bad header JSON"):
        read_metadata(garbage)


def test_reading_metadata_imports_no_torch(ckpt_path: Path) -> None:
    code = ("import sys, model, model.checkpoint_meta as m; meta = m.read_metadata(sys.argv[1]); "
            "heavy = sorted(x for x in ('torch', 'safetensors', 'numpy') if x in sys.modules); "
            "print(meta['image_size'], heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["8", "[]"], out.stdout + out.stderr


def test_the_package_still_offers_every_name() -> None:
    import model

    assert model.load_checkpoint.__module__ == "model.checkpoint"
    assert model.CheckpointError is CheckpointError and model.UNet is UNet
    assert sorted(model.__all__) == sorted(n for n in model.__all__ if getattr(model, n) is not None)
    with pytest.raises(AttributeError):
        model.no_such_name  # noqa: B018
    assert torch.is_tensor(model.GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=5)).betas)
