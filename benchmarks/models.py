"""The models benchmarks time: random-weight U-Nets of a preset, checkpoints of them, the demo checkpoint when it is
there, and the diffusers ``UNet2DModel`` config equivalent to one of ours (the reference in the diffusers comparisons).

Random weights are for timing only. A fresh U-Net's output layer is zero-initialised (the paper's choice), so its
eps is identically 0; every parameter gets small Gaussian noise so the network computes something real.

This module knows the model package only; what is measured with these models is each benchmark's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.checkpoint import save_checkpoint
from model.config import UNetConfig, model_preset
from model.diffusion import GaussianDiffusion
from model.unet import UNet
from service.settings import DEMO_CHECKPOINT

__all__ = ["DEMO_CHECKPOINT", "demo_or_random_checkpoint", "diffusers_unet_config", "random_checkpoint",
           "random_model"]


def random_model(preset: str, device: torch.device | str = "cpu") -> tuple[UNet, GaussianDiffusion]:
    """The preset's U-Net (eval mode) with seeded random weights, and its diffusion, on ``device``."""
    cfg = model_preset(preset)
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return unet.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion, device=device)


def random_checkpoint(path: Path, preset: str = "digits") -> Path:
    """A checkpoint file of ``random_model(preset)``, for a stack to serve."""
    cfg = model_preset(preset)
    unet, _ = random_model(preset)
    save_checkpoint(path, unet, cfg.unet, cfg.diffusion, dataset="random", step=0, ema=True)
    return path


def demo_or_random_checkpoint(folder: Path) -> Path:
    """The demo checkpoint if it is there, else a random-weight ``digits`` one (the same compute) in ``folder``."""
    return DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else random_checkpoint(folder / "digits-random.safetensors")


def diffusers_unet_config(cfg: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config equivalent to ``cfg`` (the paper's layout, as google/ddpm-* use): attention
    blocks at the resolutions in ``attn_resolutions``, sinusoidal embedding with ``freq_shift`` 1 and sin first."""
    res = [cfg.image_size // 2**i for i in range(len(cfg.ch_mult))]
    down = ["AttnDownBlock2D" if r in cfg.attn_resolutions else "DownBlock2D" for r in res]
    up = ["AttnUpBlock2D" if r in cfg.attn_resolutions else "UpBlock2D" for r in reversed(res)]
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "down_block_types": down, "up_block_types": up,
        "layers_per_block": cfg.num_res_blocks, "freq_shift": 1, "flip_sin_to_cos": False,
        "downsample_padding": 0, "norm_eps": cfg.norm_eps, "norm_num_groups": cfg.num_groups,
        "attention_head_dim": None, "dropout": cfg.dropout,
    }
