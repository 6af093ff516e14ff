"""Training and evaluation data: the built-in ``digits``, an image folder, and the CIFAR-10 python archive.

A dataset is named by a spec string:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download), upscaled
  bilinearly to the model's size.
- ``folder:PATH``: every image under PATH (recursively), resized (shorter side) and center-cropped.
- ``cifar10:PATH``: the standard CIFAR-10 python archive (``cifar-10-python.tar.gz`` or its extracted folder).

Images are kept as uint8 (N, C, H, W); ``to_model_range`` scales them to [-1, 1] (the paper's ``x/127.5 - 1``).
Every problem (an empty folder, an unreadable image, a wrong archive, a size that does not fit) raises
``DatasetError`` when the dataset is opened, before any training starts. The held-out ``test`` split is fixed
by the dataset (CIFAR-10's test batch; a seeded 10% of the others), never by the training seed.

This module knows nothing of models, optimisers or checkpoints.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model.images import fit_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageSet",
    "Split",
    "load_dataset",
    "to_model_range",
]

Split = Literal["train", "test", "all"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_SEED = 20200619  # fixes the held-out split of digits/folder datasets, whatever the training seed


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: names the dataset and what is wrong."""


class ImageSet:
    """A dataset of uint8 images at the model's size: ``len``, ``images(indices)``, optional ``labels``.

    ``images`` returns (B, C, H, W) uint8 for a sequence/tensor of indices. Tensor-backed by default; the
    folder dataset decodes files on demand instead (see ``_FolderImages``).
    """

    def __init__(self, name: str, data: torch.Tensor, labels: torch.Tensor | None = None,
                 num_classes: int | None = None):
        self.name, self.data, self.labels, self.num_classes = name, data, labels, num_classes

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.data.shape[1:]
        return int(c), int(h), int(w)

    def images(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.data[torch.as_tensor(indices, dtype=torch.long)]

    def all_images(self) -> torch.Tensor:
        return self.images(range(len(self)))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in {0..255} -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


# ---- shared helpers -----------------------------------------------------------------------------------------
def _holdout_indices(n: int, split: Split, holdout: float) -> np.ndarray:
    """A fixed permutation of 0..n-1 cut into train (first) and test (last ``holdout`` fraction)."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = round(n * holdout) if split != "all" else 0
    if split == "all":
        return np.sort(perm)
    return np.sort(perm[n - n_test:] if split == "test" else perm[: n - n_test])


def _check_channels(name: str, channels: int) -> None:
    if channels not in (1, 3):
        raise DatasetError(f"{name}: the model has {channels} input channels; datasets give 1 (grey) or 3 (RGB)")


# ---- digits ------------------------------------------------------------------------------------------------
def _load_digits(image_size: int, channels: int, split: Split, holdout: float) -> ImageSet:
    from sklearn.datasets import load_digits

    _check_channels("digits", channels)
    if image_size < 8:
        raise DatasetError(f"digits: images are 8x8; the model's image_size {image_size} is smaller")
    bunch = load_digits()
    idx = _holdout_indices(len(bunch.images), split, holdout)
    raw = (bunch.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    out = np.empty((len(idx), image_size, image_size, channels), dtype=np.uint8)
    for i, a in enumerate(raw):
        img = Image.fromarray(a, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = fit_image(img, image_size, channels)
    data = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageSet("digits", data, torch.from_numpy(bunch.target[idx]).long(), num_classes=10)


# ---- CIFAR-10 ----------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are pickled dicts of numpy arrays: allow exactly the classes those need."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batches(path: Path, names: list[str]) -> dict[str, bytes]:
    if path.is_dir():
        base = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise DatasetError(f"cifar10:{path}: not the CIFAR-10 python archive (missing {', '.join(missing)})")
        return {n: (base / n).read_bytes() for n in names}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise DatasetError(f"cifar10:{path}: not the CIFAR-10 python archive "
                                   f"(missing {', '.join(missing)})")
            out = {}
            for n in names:
                fh = tar.extractfile(members[n])
                assert fh is not None
                out[n] = fh.read()
            return out
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"cifar10:{path}: not a readable .tar.gz archive or folder: {exc}") from None


def _load_cifar10(path: Path, image_size: int, channels: int, split: Split) -> ImageSet:
    if not path.exists():
        raise DatasetError(f"cifar10:{path}: no such file or folder")
    if image_size != 32:
        raise DatasetError(f"cifar10: images are 32x32 but the model's image_size is {image_size}")
    if channels != 3:
        raise DatasetError(f"cifar10: images are RGB (3 channels) but the model has {channels}")
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    names = {"train": train_names, "test": ["test_batch"], "all": [*train_names, "test_batch"]}[split]
    datas, labels = [], []
    for name, raw in _read_cifar_batches(path, names).items():
        try:
            batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as exc:
            raise DatasetError(f"cifar10:{path}: {name} is not a CIFAR-10 python batch: {exc}") from None
        datas.append(data)
    return ImageSet("cifar10", torch.from_numpy(np.concatenate(datas)),
                    torch.from_numpy(np.concatenate(labels)), num_classes=10)


# ---- image folder -----------------------------------------------------------------------------------------
class _FolderImages(ImageSet):
    """Files decoded on demand (a folder may not fit in memory); every file was checked when opened."""

    def __init__(self, name: str, files: list[Path], image_size: int, channels: int):
        super().__init__(name, torch.empty(0, channels, image_size, image_size, dtype=torch.uint8))
        self.files, self.image_size, self.channels = files, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def images(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        arrs = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            with Image.open(self.files[i]) as img:
                arrs.append(fit_image(img, self.image_size, self.channels))
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _load_folder(path: Path, image_size: int, channels: int, split: Split, holdout: float) -> ImageSet:
    _check_channels(f"folder:{path}", channels)
    if not path.is_dir():
        raise DatasetError(f"folder:{path}: no such folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"folder:{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    for f in files:
        try:
            with Image.open(f) as img:
                w, h = img.size
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(f"folder:{path}: cannot read image {f}: {exc}") from None
        if min(w, h) < image_size:
            raise DatasetError(f"folder:{path}: image {f} is {w}x{h}, smaller than the model's image_size "
                               f"{image_size} (resize the data or use a smaller model)")
    if split != "all" and round(len(files) * holdout) < 1 and holdout > 0:
        raise DatasetError(f"folder:{path}: {len(files)} image(s) are too few for a {holdout:.0%} held-out split")
    idx = _holdout_indices(len(files), split, holdout)
    return _FolderImages("folder", [files[i] for i in idx], image_size, channels)


def load_dataset(spec: str, image_size: int, channels: int, split: Split = "train", *,
                 holdout: float = 0.1) -> ImageSet:
    """Open the dataset named by ``spec`` at the model's ``image_size`` and ``channels``.

    ``split``: ``train``, ``test`` (held out) or ``all``. Raises ``DatasetError`` for anything unusable.
    """
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _load_digits(image_size, channels, split, holdout)
    if kind == "folder" and arg:
        return _load_folder(Path(arg).expanduser(), image_size, channels, split, holdout)
    if kind == "cifar10" and arg:
        return _load_cifar10(Path(arg).expanduser(), image_size, channels, split)
    raise DatasetError(f"unknown dataset {spec!r}; use digits, folder:PATH or cifar10:PATH")
