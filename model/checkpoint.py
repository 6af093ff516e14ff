"""The checkpoint: the contract between training and serving.

One ``.safetensors`` file: the U-Net weights (EMA weights for serving) as tensors, and in the safetensors
metadata (string -> string) the format name and version, the U-Net and diffusion configs as JSON, the dataset,
image size, training step and whether the weights are EMA. Loading never unpickles anything: a pickle file
(PyTorch ``.pt``/``.bin``) offered as a checkpoint is refused with a clear error.

Every failure raises ``CheckpointError`` naming the file and what is wrong. Reading the metadata alone
(``read_metadata``) lives in the torch-free ``model.checkpoint_meta`` and is re-exported here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint_meta import FORMAT_NAME, FORMAT_VERSION, CheckpointError, read_metadata
from model.config import DiffusionConfig, UNetConfig
from model.diffusion import GaussianDiffusion
from model.unet import UNet

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadedCheckpoint",
    "atomic_save_safetensors",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns: ``unet`` (eval mode, on the device), ``diffusion``, ``metadata``."""

    unet: UNet
    diffusion: GaussianDiffusion
    metadata: dict[str, Any]
    unet_config: UNetConfig
    diffusion_config: DiffusionConfig
    path: str = field(default="")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                            path: str | os.PathLike[str]) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | os.PathLike[str],
    unet: UNet | Mapping[str, torch.Tensor],
    unet_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    *,
    dataset: str = "unknown",
    step: int = 0,
    ema: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a servable checkpoint (atomically). ``unet`` is a module or its state dict.

    ``extra``: more JSON-serialisable metadata (e.g. ``ema_decay``, ``source``) stored under ``extra``.
    """
    state = unet.state_dict() if isinstance(unet, torch.nn.Module) else dict(unet)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "unet_config": json.dumps(unet_config.to_dict()),
        "diffusion_config": json.dumps(diffusion_config.to_dict()),
        "dataset": dataset,
        "image_size": str(unet_config.image_size),
        "channels": str(unet_config.in_channels),
        "step": str(int(step)),
        "ema": "true" if ema else "false",
        "extra": json.dumps(dict(extra or {})),
    }
    atomic_save_safetensors(state, metadata, path)


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint: ``.unet`` (eval mode, on ``device``), ``.diffusion`` (on ``device``), ``.metadata``.

    ``unet(x, t) -> eps`` with x (B,C,H,W) in [-1, 1] and t int64 (B,) in 0..T-1; ``diffusion.betas`` and
    ``diffusion.alphas_cumprod`` are (T,) tensors. Raises ``CheckpointError`` for any unusable file.
    """
    p = Path(path)
    meta = read_metadata(p)
    unet_config = UNetConfig.from_dict(meta["unet_config"])
    diffusion_config = DiffusionConfig.from_dict(meta["diffusion_config"])
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise CheckpointError(p, f"could not read the weights (truncated or corrupt?): {exc}") from None
    unet = UNet(unet_config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                parts.append(f"{len(names)} {label} tensor(s) (e.g. {', '.join(names[:3])})")
        raise CheckpointError(p, "weights do not match the stored U-Net config: " + "; ".join(parts))
    unet.load_state_dict(state)
    unet.to(device).eval()
    diffusion = GaussianDiffusion.from_config(diffusion_config, device=device)
    return LoadedCheckpoint(unet, diffusion, meta, unet_config, diffusion_config, str(p))
