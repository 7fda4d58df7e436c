"""Fashion-MNIST (MIT) from the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*.gz, the original idx files): 70,000 grey 28x28 images."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def default_folder() -> Path:
    return Path(os.environ.get("EE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def load(folder: Path | None = None) -> dict[str, np.ndarray]:
    """{"x_train", "y_train", "x_test", "y_test"}: uint8 RGB images padded to 32x32 (grey in three
    equal channels), int labels."""
    folder = folder or default_folder()
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}: apt-get install dataset-fashion-mnist")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays[f"x_{split}"] = to_rgb32(_idx(folder / f"{prefix}-images-idx3-ubyte.gz"))
        arrays[f"y_{split}"] = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return arrays


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def to_rgb32(grey: np.ndarray) -> np.ndarray:
    padded = np.pad(grey, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)
