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

Importing the package imports nothing heavy: each name is loaded from its module on first use (PEP 562), so
``import model.checkpoint_meta`` (metadata without torch, as the API process does) never pulls in PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.bound import BoundChain, Likelihood, likelihood
    from model.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
    from model.checkpoint_meta import CheckpointError, read_metadata
    from model.config import DiffusionConfig, UNetConfig, model_preset
    from model.diffusion import GaussianDiffusion
    from model.latents import interpolate, interpolation_chain, reconstruct, reconstruction_chain
    from model.sampler import Chain, ImageNoise, Step, StepDriven, sample, sample_steps, spaced_timesteps
    from model.unet import UNet

# public name -> the module that defines it
_HOMES = {
    "CheckpointError": "model.checkpoint_meta",
    "read_metadata": "model.checkpoint_meta",
    "DiffusionConfig": "model.config",
    "UNetConfig": "model.config",
    "model_preset": "model.config",
    "LoadedCheckpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "GaussianDiffusion": "model.diffusion",
    "BoundChain": "model.bound",
    "Likelihood": "model.bound",
    "likelihood": "model.bound",
    "interpolate": "model.latents",
    "interpolation_chain": "model.latents",
    "reconstruct": "model.latents",
    "reconstruction_chain": "model.latents",
    "Chain": "model.sampler",
    "ImageNoise": "model.sampler",
    "Step": "model.sampler",
    "StepDriven": "model.sampler",
    "sample": "model.sampler",
    "sample_steps": "model.sampler",
    "spaced_timesteps": "model.sampler",
    "UNet": "model.unet",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
