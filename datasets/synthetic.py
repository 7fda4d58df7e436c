"""Generated photos for smoke tests: 10 classes told apart by colour and stripe direction, plus noise.
Shaped like `cifar10.load()` (32x32 RGB uint8), so every experiment runs without the real data."""

from __future__ import annotations

import numpy as np

CLASSES = tuple(f"shape{i}" for i in range(10))


def make(train_per_class: int = 120, test_per_class: int = 60, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, 5])
    palette = rng.uniform(40, 215, (10, 3))
    grid = np.arange(32)
    stripes = [np.sin(grid[:, None] * np.cos(a) + grid[None, :] * np.sin(a)) for a in np.linspace(0, np.pi, 10, endpoint=False)]

    def split(per_class: int):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = palette[labels][:, None, None, :] + 30 * np.stack([stripes[c] for c in labels])[..., None]
        images = images + rng.normal(0, 12, images.shape)
        return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = split(train_per_class)
    x_test, y_test = split(test_per_class)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "names": CLASSES}
