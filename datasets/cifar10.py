"""CIFAR-10 from ../shared/datasets/cifar10-jpg.tar.gz (JPEGs, train/<class>/NNNN.jpg, test/...).

Decoded once with Pillow into a cached .npz (uint8 arrays), so scripts and tests load it in a second.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from ee_cli.base import atomic

ARCHIVE_SHA256 = "5dc4dcc09c3c35e9a7894a9a192b607330ff35f54d7a280ff8ee6489b1f085c6"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_archive() -> Path:
    """EE_CIFAR10, else ../shared/datasets/cifar10-jpg.tar.gz beside the repository."""
    if os.environ.get("EE_CIFAR10"):
        return Path(os.environ["EE_CIFAR10"])
    return Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def cache_dir() -> Path:
    return Path(os.environ.get("EE_CACHE", Path.home() / ".cache" / "ee"))


def load(archive: Path | None = None) -> dict[str, np.ndarray]:
    """{"x_train", "y_train", "x_test", "y_test"}: uint8 images (N, 32, 32, 3) and int labels."""
    archive = archive or default_archive()
    cached = cache_dir() / "cifar10.npz"
    if cached.is_file():
        with np.load(cached) as data:
            return {key: data[key] for key in data.files}
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found at {archive} (set EE_CIFAR10)")
    arrays = _decode(archive)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(cached) as partial:
        np.savez(partial, **arrays)
    return arrays


def _decode(archive: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    images: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    index = {name: i for i, name in enumerate(CLASSES)}
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for member in members:
            parts = Path(member.name).parts
            split, label = parts[-3], parts[-2]
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                images[split].append(np.asarray(image.convert("RGB"), np.uint8))
            labels[split].append(index[label])
    return {
        "x_train": np.stack(images["train"]),
        "y_train": np.array(labels["train"], np.int64),
        "x_test": np.stack(images["test"]),
        "y_test": np.array(labels["test"], np.int64),
    }
