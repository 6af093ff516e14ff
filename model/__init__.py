"""DDPM (Ho et al. 2020) in plain PyTorch: the U-Net, the Gaussian diffusion, the reverse chain, checkpoints.

This package knows nothing of HTTP, Redis, RQ or environment variables (the service builds on it, never the
other way round). The public API::

    from model import UNet, UNetConfig, GaussianDiffusion, load_checkpoint, save_checkpoint
    ckpt = load_checkpoint("checkpoints/digits.safetensors", device="cpu")
    eps = ckpt.unet(x, t)            # x (B,C,H,W) in [-1,1], t int64 (B,) in 0..T-1
    ckpt.diffusion.alphas_cumprod    # (T,) float32
"""

from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, read_metadata, save_checkpoint
from model.config import DiffusionConfig, UNetConfig, model_preset
from model.diffusion import GaussianDiffusion
from model.sampler import Chain, ImageNoise, Step, sample, sample_steps, spaced_timesteps
from model.unet import UNet

__all__ = [
    "Chain",
    "CheckpointError",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ImageNoise",
    "LoadedCheckpoint",
    "Step",
    "UNet",
    "UNetConfig",
    "load_checkpoint",
    "model_preset",
    "read_metadata",
    "sample",
    "sample_steps",
    "save_checkpoint",
    "spaced_timesteps",
]
