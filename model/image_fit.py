"""Any picture fitted to a model's shape, with Pillow alone (no numpy, no torch), so the API process can fit
uploaded pictures without importing either.

The rule, in one place, used for data sets (``model.data``), picture files (``model.images.load_image``) and the
service's input images alike: convert to L (1 channel) or RGB (3 channels; Pillow's conversion, so an alpha
channel is dropped and a palette expanded), resize the shorter side to ``size`` (bicubic, antialiased), and
centre-crop the longer one. EXIF orientation is applied by the callers that read files (``upright``).
"""

from __future__ import annotations

from PIL import Image, ImageOps

__all__ = ["fit_picture", "upright"]


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a photo taken sideways stands up); unchanged without EXIF."""
    return ImageOps.exif_transpose(img)


def fit_picture(img: Image.Image, size: int, channels: int) -> Image.Image:
    """``img`` as a ``size`` x ``size`` picture of mode L (``channels`` 1) or RGB (3): the rule above."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
