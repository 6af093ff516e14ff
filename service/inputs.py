"""Input images of jobs: an upload (base64 PNG or JPEG, or a ``data:`` URL of one) or a reference to a finished
job's image, fitted to the model and stored as the PNG the worker reads.

    decode_upload(text, field, max_pixels)   base64 / data URL -> a decoded, upright picture and its format (PNG
                                              or JPEG only)
    fitted_png(picture, size, channels)       the picture fitted to the model (``model.image_fit``), as PNG bytes
    InputImages                               the whole step for a request: uploads and references (read through
                                              a callable the API gives, which applies the owner rules) alike

Refusals name the field (``init_image``, ``images[1]``, ``images[0].job``): ``RequestInvalid`` (422) for text that
is not base64, a picture that is not a PNG or JPEG or cannot be decoded (and, from the reader the API gives, a
reference to a job that is unknown, another key's, unfinished or without that image); ``ImageTooLarge`` (413
``image_too_large``) for a picture over ``max_pixels`` pixels, checked from its header before any pixel is
decoded (decompression bombs). The body's size is bounded before this runs (``DDPM_MAX_UPLOAD_BYTES``).

Decoding is CPU work: the API calls this from its thread pool (sync routes), never on the event loop, and at
most ``DECODE_SLOTS`` pictures are decoded at a time in a process, which bounds the memory decoding can take
(a picture of ``max_pixels`` RGB pixels is 3 bytes each, plus the resized copy). Pillow only: no numpy or torch
in the API process. This module knows Pillow and the request schemas; it does not know Redis or HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from model.image_fit import fit_picture, upright
from service.schemas import ImageRef, RequestInvalid

__all__ = ["DECODE_SLOTS", "FORMATS", "FittedInput", "ImageTooLarge", "InputImages", "decode_upload", "fitted_png"]

FORMATS = ("PNG", "JPEG")
DECODE_SLOTS = 2  # pictures decoded at a time in one API process
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)
_WHITESPACE = re.compile(rb"\s+")
_slots = threading.BoundedSemaphore(DECODE_SLOTS)


class ImageTooLarge(Exception):
    """A picture with more pixels than allowed (the API answers 413 ``image_too_large``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class FittedInput:
    """One input image: the fitted PNG the worker reads, and what the job record says about where it came from."""

    png: bytes
    source: dict[str, Any]


def _base64(text: str, field: str) -> bytes:
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if match is None or not match["b64"]:
            raise RequestInvalid(field, "a data URL must look like data:image/png;base64,<data> (base64 only)")
        text = text[match.end():]
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise RequestInvalid(field, "must be a base64 PNG or JPEG (or a data: URL of one), or a reference "
                                    '{"job": "<id>", "index": i}; the text is not valid base64') from None
    if not data:
        raise RequestInvalid(field, "is empty: send a base64 PNG or JPEG")
    return data


def decode_upload(text: str, field: str, max_pixels: int) -> tuple[Image.Image, str]:
    """The picture in ``text`` (base64 or a data URL), decoded and turned upright (EXIF), and its format; at most
    ``max_pixels`` pixels, and only PNG and JPEG are opened. Raises ``RequestInvalid`` or ``ImageTooLarge``."""
    return _decode(_base64(text, field), field, max_pixels)


def _decode(data: bytes, field: str, max_pixels: int) -> tuple[Image.Image, str]:
    fmt = "picture"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            fmt, (width, height) = img.format or fmt, img.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageTooLarge(field, f"the picture is {width}x{height} = {width * height} pixels; at most "
                                           f"{max_pixels} are accepted (DDPM_MAX_INPUT_PIXELS)")
            img.load()
            return upright(img), fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own, larger bound
        raise ImageTooLarge(field, f"the picture has more than the {max_pixels} pixels accepted "
                                   f"(DDPM_MAX_INPUT_PIXELS): {exc}") from None
    except UnidentifiedImageError:
        raise RequestInvalid(field, f"is not a PNG or JPEG picture (accepted: {', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise RequestInvalid(field, f"the {fmt} data could not be decoded ({type(exc).__name__}: "
                                    f"{str(exc)[:120]})") from None


def fitted_png(picture: Image.Image, size: int, channels: int) -> bytes:
    """``picture`` fitted to a ``size`` x ``size`` model of ``channels`` channels, as lossless PNG bytes."""
    buf = io.BytesIO()
    fit_picture(picture, size, channels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# A finished job's image: (its PNG) or raises RequestInvalid naming the field (the API checks ownership).
ReadImage = Callable[[ImageRef, str], bytes]


class InputImages:
    """Resolves a request's input images to fitted PNGs for a model of ``size`` x ``size``, ``channels``."""

    def __init__(self, size: int, channels: int, max_pixels: int, read_image: ReadImage):
        self.size, self.channels, self.max_pixels, self.read_image = size, channels, max_pixels, read_image

    def one(self, item: str | ImageRef, field: str) -> FittedInput:
        """One item: fetched or base64-decoded here, decoded and fitted in one of the ``DECODE_SLOTS``."""
        if isinstance(item, ImageRef):
            data = self.read_image(item, field)
            with _slots:
                picture, _ = _decode(data, field, self.max_pixels)
                return FittedInput(fitted_png(picture, self.size, self.channels), {"job": item.job,
                                                                                   "index": item.index})
        data = _base64(item, field)
        with _slots:
            picture, fmt = _decode(data, field, self.max_pixels)
            source = {"upload": {"format": fmt, "width": picture.width, "height": picture.height,
                                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
            return FittedInput(fitted_png(picture, self.size, self.channels), source)

    def many(self, items: Sequence[str | ImageRef], field: str) -> list[FittedInput]:
        return [self.one(item, f"{field}[{i}]") for i, item in enumerate(items)]
