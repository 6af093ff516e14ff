"""The models benchmarks time: random-weight U-Nets of a preset, checkpoints of them, the demo checkpoint when it is
there; the diffusers ``UNet2DModel`` config equivalent to one of ours (the reference in the diffusers comparisons) is
``model.convert.diffusers_config_from_unet``, re-exported here.

Random weights are for timing only. A fresh U-Net's output layer is zero-initialised (the paper's choice), so its
eps is identically 0; every parameter gets small Gaussian noise so the network computes something real.

This module knows the model package only; what is measured with these models is each benchmark's business.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import model_preset
from model.convert import diffusers_config_from_unet
from model.diffusion import GaussianDiffusion
from model.unet import UNet
from service.settings import DEMO_CHECKPOINT

__all__ = ["DEMO_CHECKPOINT", "demo_or_random_checkpoint", "diffusers_config_from_unet", "random_checkpoint",
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
