"""A checkpoint's metadata, read from its safetensors header with the standard library alone.

The API process, ``ddpm up`` and anything else that only needs to know what a checkpoint is (T, image size,
configs) import this module, never ``model.checkpoint``: reading the header needs neither PyTorch nor the
``safetensors`` package, so those processes stay small and start fast. ``model.checkpoint`` (which loads the
weights with torch) re-exports everything here.

The safetensors layout (https://github.com/huggingface/safetensors, "Format")::

    8 bytes     N, the header length, unsigned little-endian
    N bytes     a UTF-8 JSON object (may be padded with spaces):
                  {"__metadata__": {str: str}, "<tensor>": {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    the rest    the tensors' bytes; offsets are relative to its start, contiguous, and cover all of it

The header is checked as ``safe_open`` checks it (size, JSON, entries, offsets against the file's length), so a
truncated or corrupt file is refused here as it would be when the weights are loaded. Every failure raises
``CheckpointError`` naming the file and what is wrong. This module knows nothing of tensors beyond their sizes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from model.config import DiffusionConfig, UNetConfig

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "SafetensorsHeader", "read_header", "read_metadata"]

FORMAT_NAME = "ddpm-service-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on N
# Bytes per element; a dtype not listed here (e.g. a sub-byte float) is accepted without its size check.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: missing, truncated, foreign, pickled or incompatible."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"checkpoint {self.path}: {reason}")


SafetensorsHeader = tuple[dict[str, str], dict[str, dict[str, Any]]]  # (__metadata__, tensor name -> entry)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits in the file, then the header's opening ``{``."""
    return len(head) >= 9 and 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def _refuse_foreign_format(path: Path, head: bytes, size: int) -> None:
    # The first byte of a safetensors file is the low byte of its header length, which can be 0x80 or 'P':
    # only call it a pickle when it is not a plausible safetensors header.
    if _looks_like_safetensors(head, size):
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(path, "this is a pickle file (PyTorch .pt/.bin); served checkpoints must be "
                                    "safetensors (convert diffusers weights with `ddpm import-diffusers`)")
    if len(head) < 8:
        raise CheckpointError(path, f"file too short ({len(head)} bytes) to be a safetensors checkpoint "
                                    "(truncated or empty)")
    raise CheckpointError(path, "not a readable safetensors file (truncated or corrupt?): the header length "
                                f"{int.from_bytes(head[:8], 'little')} does not fit in the file's {size} bytes")


def _check_tensors(path: Path, entries: dict[str, Any], buffer_bytes: int) -> None:
    """Each entry's dtype, shape and offsets; the offsets tile the data buffer exactly (as safetensors checks)."""
    spans = []
    for name, entry in entries.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): tensor {name!r} "
                                        f"has an invalid header entry {entry!r}")
        if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): tensor {name!r} "
                                        f"spans {end - begin} bytes, its {dtype} {shape} needs "
                                        f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): tensor {name!r} "
                                        f"starts at byte {begin} of the data, expected {position}")
        position = end
    if position != buffer_bytes:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): the tensors need "
                                    f"{position} bytes of data, the file holds {buffer_bytes}")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The ``__metadata__`` and the tensor entries of a safetensors file, checked against the file's length.
    Raises ``CheckpointError`` (missing, pickle, truncated, corrupt)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found" if not p.exists() else "not a regular file")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(16)
        _refuse_foreign_format(p, head, size)
        n = int.from_bytes(head[:8], "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(p, f"not a readable safetensors file: a {n}-byte header is over the "
                                     f"{MAX_HEADER_BYTES}-byte limit")
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(p, f"not a readable safetensors file (truncated or corrupt?): bad header JSON: {exc}"
                              ) from None
    if not isinstance(header, dict):
        raise CheckpointError(p, "not a readable safetensors file (truncated or corrupt?): the header is not an "
                                 "object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(p, "not a readable safetensors file: __metadata__ must map strings to strings")
    _check_tensors(p, header, size - 8 - n)
    return metadata, header


def _int_field(path: Path, raw: dict[str, str], key: str) -> int:
    try:
        return int(raw.get(key, "0"))
    except ValueError:
        raise CheckpointError(path, f"invalid {key!r} in metadata: {raw.get(key)!r}") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed metadata of a checkpoint, without loading its weights (nor importing torch). Raises
    ``CheckpointError``."""
    p = Path(path)
    raw, tensors = read_header(p)
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(p, "not a DDPM service checkpoint (no 'format' metadata); for diffusers weights "
                                 "run `ddpm import-diffusers DIR --out FILE`")
    try:
        version = int(raw.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(p, f"format version {raw.get('format_version')!r} is not supported "
                                 f"(this build reads version {FORMAT_VERSION})")
    try:
        unet_config = UNetConfig.from_dict(json.loads(raw["unet_config"]))
        diffusion_config = DiffusionConfig.from_dict(json.loads(raw["diffusion_config"]))
        extra = json.loads(raw.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(p, f"invalid config in metadata: {exc}") from None
    return {
        "format_version": version,
        "unet_config": unet_config.to_dict(),
        "diffusion_config": diffusion_config.to_dict(),
        "dataset": raw.get("dataset", "unknown"),
        "image_size": unet_config.image_size,
        "channels": unet_config.in_channels,
        "step": _int_field(p, raw, "step"),
        "ema": raw.get("ema") == "true",
        "extra": extra,
        "num_tensors": len(tensors),
    }
