"""Datasets: digits, image folders and the CIFAR-10 archive load at the model's size, and bad data fails early."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import DatasetError, load_dataset, to_model_range


def test_digits_upscaled_to_model_size_with_a_fixed_disjoint_holdout() -> None:
    train = load_dataset("digits", 16, 1, "train")
    test = load_dataset("digits", 16, 1, "test")
    assert train.shape == (1, 16, 16) and train.data.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.1)
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))  # type: ignore[union-attr]
    # Ink reaches full white and the background is black.
    assert train.data.max() >= 250 and train.data.min() == 0
    # The held-out images are not training images.
    flat_train = {bytes(x.numpy()) for x in train.data}
    assert not any(bytes(x.numpy()) in flat_train for x in test.data[:50])
    # Three channels: the grey image repeated.
    rgb = load_dataset("digits", 8, 3, "test")
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb.data[:, 0], rgb.data[:, 2])


def test_model_range_is_minus_one_to_one() -> None:
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


def _png(path: Path, w: int, h: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def test_folder_images_are_resized_and_center_cropped(tmp_path: Path) -> None:
    # A wide image: left third red, middle third green, right third blue -> the crop keeps the green middle.
    img = Image.new("RGB", (48, 16), (255, 0, 0))
    img.paste((0, 255, 0), (16, 0, 32, 16))
    img.paste((0, 0, 255), (32, 0, 48, 16))
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "wide.png")
    for i in range(9):
        _png(tmp_path / "b" / f"{i}.jpg", 20, 30, (10 * i, 0, 0))
    data = load_dataset(f"folder:{tmp_path}", 8, 3, "all")
    assert len(data) == 10 and data.shape == (3, 8, 8)
    wide = data.images([0])[0]
    assert wide[1].float().mean() > 200 and wide[0].float().mean() < 30  # green centre, no red edge
    assert len(load_dataset(f"folder:{tmp_path}", 8, 3, "test")) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no image files"),
        (lambda p: (p / "bad.png").write_bytes(b"not an image at all"), "cannot read image"),
        (lambda p: _png(p / "small.png", 4, 4, (0, 0, 0)), "smaller than the model's image_size"),
    ],
)
def test_unusable_folders_fail_before_training(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"folder:{tmp_path}", 8, 3)


def _cifar_batch(n: int, label: int) -> bytes:
    data = np.full((n, 3072), label * 20, dtype=np.uint8)
    return pickle.dumps({b"data": data, b"labels": [label] * n, b"batch_label": b"x"})


def _cifar_archive(path: Path, payloads: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in payloads.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_cifar10_archive_and_extracted_folder(tmp_path: Path) -> None:
    batches = {f"data_batch_{i}": _cifar_batch(3, i) for i in range(1, 6)} | {"test_batch": _cifar_batch(2, 9)}
    archive = _cifar_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    train = load_dataset(f"cifar10:{archive}", 32, 3, "train")
    test = load_dataset(f"cifar10:{archive}", 32, 3, "test")
    assert len(train) == 15 and len(test) == 2 and train.shape == (3, 32, 32)
    assert sorted(set(train.labels.tolist())) == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert int(test.data[0, 0, 0, 0]) == 180
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in batches.items():
        (folder / name).write_bytes(raw)
    assert len(load_dataset(f"cifar10:{tmp_path / 'extracted'}", 32, 3, "test")) == 2


def test_cifar10_errors_are_clear(tmp_path: Path) -> None:
    wrong = _cifar_archive(tmp_path / "wrong.tar.gz", {"readme.txt": b"hello"})
    with pytest.raises(DatasetError, match="not the CIFAR-10 python archive"):
        load_dataset(f"cifar10:{wrong}", 32, 3)
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable"):
        load_dataset(f"cifar10:{tmp_path / 'junk.tar.gz'}", 32, 3)
    with pytest.raises(DatasetError, match="32x32"):
        load_dataset(f"cifar10:{wrong}", 64, 3)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(f"cifar10:{tmp_path / 'missing'}", 32, 3)


def test_cifar10_batches_cannot_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    batches = {f"data_batch_{i}": pickle.dumps(Evil()) for i in range(1, 6)}
    archive = _cifar_archive(tmp_path / "evil.tar.gz", batches)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset(f"cifar10:{archive}", 32, 3, "train")


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(DatasetError, match="digits, folder:PATH or cifar10:PATH"):
        load_dataset("mnist", 32, 1)
