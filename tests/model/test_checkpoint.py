"""Checkpoints: the round trip gives the same network, and every unusable file gets one error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CheckpointError,
    atomic_save_safetensors,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model.config import DiffusionConfig, UNetConfig
from model.unet import UNet


@pytest.fixture
def trained(tiny_unet_config: UNetConfig) -> UNet:
    unet = UNet(tiny_unet_config)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    return unet.eval()


@pytest.fixture
def ckpt_path(tmp_path: Path, trained: UNet, tiny_unet_config: UNetConfig,
              short_diffusion_config: DiffusionConfig) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, trained, tiny_unet_config, short_diffusion_config, dataset="digits", step=1234,
                    ema=True, extra={"ema_decay": 0.999})
    return path


def test_round_trip_gives_the_same_network_and_metadata(ckpt_path: Path, trained: UNet,
                                                        tiny_unet_config: UNetConfig,
                                                        short_diffusion_config: DiffusionConfig) -> None:
    ckpt = load_checkpoint(ckpt_path)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(ckpt.unet(x, t), trained(x, t))
    assert not ckpt.unet.training
    assert ckpt.unet_config == tiny_unet_config and ckpt.diffusion_config == short_diffusion_config
    assert ckpt.diffusion.num_timesteps == 50 and ckpt.diffusion.alphas_cumprod.shape == (50,)
    meta = ckpt.metadata
    assert (meta["dataset"], meta["step"], meta["ema"], meta["image_size"]) == ("digits", 1234, True, 8)
    assert meta["extra"] == {"ema_decay": 0.999}
    assert read_metadata(ckpt_path) == meta


def test_saving_replaces_atomically_and_leaves_no_temporary_files(ckpt_path: Path, trained: UNet,
                                                                  tiny_unet_config: UNetConfig) -> None:
    save_checkpoint(ckpt_path, trained, tiny_unet_config, DiffusionConfig(num_timesteps=20), step=99)
    assert read_metadata(ckpt_path)["step"] == 99
    assert [p.name for p in ckpt_path.parent.iterdir()] == [ckpt_path.name]


def test_a_header_length_whose_first_byte_looks_like_pickle_still_loads(tmp_path: Path, ckpt_path: Path) -> None:
    # The first byte of a safetensors file is the low byte of its header length: 0x80 is a pickle's magic.
    state, meta = load_file(str(ckpt_path)), read_metadata(ckpt_path)
    raw_meta = _raw_metadata(ckpt_path)
    for pad in range(256):
        path = tmp_path / "odd.safetensors"
        atomic_save_safetensors(state, {**raw_meta, "pad": "x" * pad}, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a 0x80 first byte")
    assert load_checkpoint(path).metadata["step"] == meta["step"]


def _raw_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


# ---- errors -----------------------------------------------------------------------------------------------------
def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.safetensors", "not found")


def test_truncated_and_empty_files(tmp_path: Path, ckpt_path: Path) -> None:
    data = ckpt_path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(cut, "truncated")
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:100])
    _expect_error(header_cut, "truncated")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _expect_error(empty, "truncated or empty")


def test_foreign_safetensors_without_our_metadata(tmp_path: Path, trained: UNet) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    _expect_error(path, "not a DDPM service checkpoint")


def test_pickle_files_are_refused_without_unpickling(tmp_path: Path, trained: UNet) -> None:
    for name, kwargs in (("model.pt", {}), ("legacy.bin", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save(trained.state_dict(), path, **kwargs)
        _expect_error(path, "pickle")


def test_format_version_mismatch(tmp_path: Path, ckpt_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    atomic_save_safetensors(load_file(str(ckpt_path)), {**_raw_metadata(ckpt_path), "format_version": "99"}, path)
    _expect_error(path, "format version '99'")


def test_invalid_config_in_metadata(tmp_path: Path, ckpt_path: Path) -> None:
    path = tmp_path / "badcfg.safetensors"
    atomic_save_safetensors(load_file(str(ckpt_path)), {**_raw_metadata(ckpt_path), "unet_config": "{\"ch\": 3"},
                            path)
    _expect_error(path, "invalid config")


def test_weights_of_another_shape_are_named(tmp_path: Path, tiny_unet_config: UNetConfig,
                                            short_diffusion_config: DiffusionConfig) -> None:
    other = UNetConfig(**{**tiny_unet_config.to_dict(), "ch": 32, "num_groups": 8})
    path = tmp_path / "mismatch.safetensors"
    # Weights of a 32-channel network under the metadata of the 16-channel one.
    save_checkpoint(path, UNet(other), tiny_unet_config, short_diffusion_config)
    _expect_error(path, r"wrong shape.*conv_in")
    partial = tmp_path / "partial.safetensors"
    state = UNet(tiny_unet_config).state_dict()
    del state["conv_out.bias"]
    save_checkpoint(partial, state, tiny_unet_config, short_diffusion_config)
    _expect_error(partial, r"missing tensor.*conv_out\.bias")
