"""A job's x0-hat frames as one animated image (WebP or GIF), so an app or a chat can show the denoising without
stitching PNGs.

``animate(frames, fmt)`` takes the frames' PNG bytes in order and returns the animation: each frame shown
``FRAME_MS``, the last one held ``LAST_FRAME_MS``, looping forever. Small models make small frames (8x8, 32x32, or
a grid of a job's images), so frames are enlarged by a whole factor (nearest neighbour: pixels stay sharp) until
the shorter side is at least ``MIN_SIDE`` pixels, at most ``MAX_SCALE`` times. WebP is lossless; GIF has 256
colours per frame (greyscale frames are exact, colour ones are quantised per frame).

Encoding is CPU work: the API runs it from its thread pool, once per job and format (the result is cached with
the job), at most ``ENCODE_SLOTS`` at a time in a process. Pillow only (the API process imports no numpy or torch);
this module knows pictures, not Redis or HTTP.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Literal

from PIL import Image

__all__ = ["ENCODE_SLOTS", "FORMATS", "FRAME_MS", "LAST_FRAME_MS", "MEDIA_TYPES", "AnimationFormat", "animate"]

AnimationFormat = Literal["webp", "gif"]
FORMATS: tuple[AnimationFormat, ...] = ("webp", "gif")
MEDIA_TYPES: dict[str, str] = {"webp": "image/webp", "gif": "image/gif"}
FRAME_MS = 120
LAST_FRAME_MS = 1500
MIN_SIDE = 128
MAX_SCALE = 8
ENCODE_SLOTS = 2
_slots = threading.BoundedSemaphore(ENCODE_SLOTS)


def _scale(size: tuple[int, int]) -> int:
    short = max(1, min(size))
    return max(1, min(MAX_SCALE, -(-MIN_SIDE // short)))


def _pictures(frames: Sequence[bytes]) -> list[Image.Image]:
    pictures = []
    for png in frames:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as img:
            img.load()
            pictures.append(img.convert("L" if img.mode in ("L", "LA", "I", "I;16") else "RGB"))
    factor = _scale(pictures[0].size)
    if factor > 1:
        pictures = [p.resize((p.width * factor, p.height * factor), Image.Resampling.NEAREST) for p in pictures]
    return pictures


def animate(frames: Sequence[bytes], fmt: AnimationFormat) -> bytes:
    """The frames (PNG bytes, in order; at least one) as an animated ``fmt`` image, looping forever."""
    if not frames:
        raise ValueError("an animation needs at least one frame")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    with _slots:
        pictures = _pictures(frames)
        durations = [FRAME_MS] * (len(pictures) - 1) + [LAST_FRAME_MS]
        buf = io.BytesIO()
        first, rest = pictures[0], pictures[1:]
        if fmt == "webp":
            first.save(buf, format="WEBP", save_all=True, append_images=rest, duration=durations, loop=0,
                       lossless=True, method=3)
        else:
            if first.mode == "RGB":
                first, rest = first.quantize(256), [p.quantize(256) for p in rest]
            first.save(buf, format="GIF", save_all=True, append_images=rest, duration=durations, loop=0,
                       optimize=False, disposal=1)
        return buf.getvalue()
