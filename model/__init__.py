"""DDPM (Ho et al. 2020) in plain PyTorch: the U-Net, the Gaussian diffusion, the reverse chain, checkpoints.

This package knows nothing of HTTP, Redis, RQ or environment variables (the service builds on it, never the
other way round). The public API::

    from model import UNet, UNetConfig, GaussianDiffusion, load_checkpoint, save_checkpoint
    ckpt = load_checkpoint("checkpoints/digits.safetensors", device="cpu")
    eps = ckpt.unet(x, t)            # x (B,C,H,W) in [-1,1], t int64 (B,) in 0..T-1
    ckpt.diffusion.alphas_cumprod    # (T,) float32

The paper's other operations (docs/OPERATIONS.md), each a plain loop and a step-driven object for an engine::

    from model import reconstruct, interpolate, likelihood
    reconstruct(ckpt.unet, ckpt.diffusion, x0, start_t=250, seed=0)        # Sec. 4.3-4.4, Fig. 7
    interpolate(ckpt.unet, ckpt.diffusion, x_a, x_b, t=500, seed=0)         # Fig. 8-9, one row per lambda
    likelihood(ckpt.unet, ckpt.diffusion, x0).bits_per_dim                  # Eq. 5, every term; .rate(), .distortion()
"""

from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, read_metadata, save_checkpoint
from model.config import DiffusionConfig, UNetConfig, model_preset
from model.diffusion import GaussianDiffusion
from model.likelihood import BoundChain, Likelihood, likelihood
from model.reconstruct import interpolate, interpolation_chain, reconstruct, reconstruction_chain
from model.sampler import Chain, ImageNoise, Step, StepDriven, sample, sample_steps, spaced_timesteps
from model.unet import UNet

__all__ = [
    "BoundChain",
    "Chain",
    "CheckpointError",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ImageNoise",
    "Likelihood",
    "LoadedCheckpoint",
    "Step",
    "StepDriven",
    "UNet",
    "UNetConfig",
    "interpolate",
    "interpolation_chain",
    "likelihood",
    "load_checkpoint",
    "model_preset",
    "read_metadata",
    "reconstruct",
    "reconstruction_chain",
    "sample",
    "sample_steps",
    "save_checkpoint",
    "spaced_timesteps",
]
