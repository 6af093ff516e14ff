"""Tensors <-> pictures: [-1, 1] image batches to uint8, grids, progressive strips and PNG bytes, and any
picture fitted to the model's shape.

Pure functions over tensors and PIL images; no files are written here except by ``save_png``, and read only by
``load_image``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model.image_fit import fit_picture, upright

__all__ = ["fit_image", "from_uint8", "grid", "load_image", "png_bytes", "save_png", "strip", "to_pil", "to_uint8"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8, rounding as the paper's ``(x + 1) * 127.5``."""
    x = x.detach().float().clamp(-1.0, 1.0)
    arr = ((x + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> one PIL image per sample (mode L for 1 channel, RGB for 3)."""
    arr = to_uint8(x)
    return [Image.fromarray(a[:, :, 0], mode="L") if a.shape[2] == 1 else Image.fromarray(a, mode="RGB")
            for a in arr]


def grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile a batch (B, C, H, W) into one image (C, H', W'); ``nrow`` images per row (default ~sqrt(B))."""
    b, c, h, w = x.shape
    ncol = nrow or max(1, math.ceil(math.sqrt(b)))
    nrows = math.ceil(b / ncol)
    out = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value,
                     dtype=x.dtype, device=x.device)
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        out[:, top:top + h, left:left + w] = x[i]
    return out


def strip(frames: Sequence[torch.Tensor], padding: int = 2) -> torch.Tensor:
    """The paper's Fig. 6: frames (each (B, C, H, W)) side by side, one row per image, time left to right."""
    stacked = torch.stack(list(frames), dim=1)  # (B, F, C, H, W)
    b, f = stacked.shape[:2]
    return grid(stacked.reshape(b * f, *stacked.shape[2:]), nrow=f, padding=padding)


def png_bytes(image: torch.Tensor, compress_level: int = 1) -> bytes:
    """Encode one (C, H, W) image or a (B, C, H, W) batch (as a grid) in [-1, 1] to PNG bytes."""
    if image.dim() == 4:
        image = grid(image) if image.shape[0] > 1 else image[0]
    buf = io.BytesIO()
    to_pil(image[None])[0].save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write ``png_bytes(image)`` to ``path`` (atomically: temporary file, then rename)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(png_bytes(image, compress_level=6))
    os.replace(tmp, path)


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any picture in the model's shape: (size, size, C) uint8, by ``model.image_fit.fit_picture`` (the one rule
    for data sets and input images alike: L or RGB, shorter side resized bicubic, centre-cropped)."""
    arr = np.asarray(fit_picture(img, size, channels), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (1, C, H, W) float in [-1, 1] (``x / 127.5 - 1``: on the 8-bit grid)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()[None] / 127.5 - 1.0


def load_image(path: str | os.PathLike[str], size: int, channels: int) -> torch.Tensor:
    """A picture file (PNG, JPEG, ... as Pillow reads it; EXIF orientation applied) as (1, C, size, size) in
    [-1, 1], fitted by ``fit_image``."""
    with Image.open(path) as img:
        return from_uint8(fit_image(upright(img), size, channels))
