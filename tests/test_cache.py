"""The feature cache streams: photos are decoded a few batches ahead of the backbone, never all at
once, and features go to files on disk as each batch is done, read back by rows, never mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import coloured_photos
from ee_cli.base import compat, photos
from ee_cli.adaptation import cache

BATCH = 8
VIEWS = 2


class CountingModel:
    """A feature model that records, at each call, how many photos were decoded beyond the batches
    already through the backbone (a batch is through after its weak and strong view of every view)."""

    def __init__(self, decoded: list):
        keras = compat.keras()
        pixels = keras.Input((32, 32, 3))
        features = keras.layers.Conv2D(4, 3)(pixels)
        teacher = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(features))
        self.model = keras.Model(pixels, [keras.layers.Flatten()(features), teacher])
        self.outputs, self.decoded = self.model.outputs, decoded
        self.calls, self.through, self.ahead = 0, 0, []

    def __call__(self, images, training: bool):
        self.ahead.append(len(self.decoded) - self.through)
        self.calls += 1
        if self.calls % (2 * VIEWS) == 0:
            self.through += int(images.shape[0])
        return self.model(images, training=training)


def test_photos_are_decoded_a_few_batches_ahead_and_features_go_to_disk(tmp_path, monkeypatch):
    coloured_photos(tmp_path / "photos", 200)
    paths = sorted((tmp_path / "photos").glob("*.png"))
    decoded: list = []
    real = photos.load_photo
    monkeypatch.setattr(photos, "load_photo", lambda path, size: (decoded.append(path), real(path, size))[1])
    model = CountingModel(decoded)
    built = cache.build(tmp_path / "cache", model, ["h"], cache.Plan(paths, 32, VIEWS, 0, BATCH))
    assert len(decoded) == len(paths)  # each photo decoded once, for every view
    assert max(model.ahead) <= 5 * BATCH < len(paths), max(model.ahead)
    assert built.arrays[("h", "strong")].shape[:2] == (VIEWS, len(paths))
    # a map would keep every page the heads' epochs read resident: RSS growing with the photo count
    assert str(tmp_path / "cache") not in Path("/proc/self/maps").read_text()


def test_rows_read_back_are_the_rows_written(tmp_path):
    stored = np.arange(2 * 5 * 3, dtype=np.float16).reshape(2, 5, 3)
    rows = cache.OnDisk(tmp_path / "a.npy", np.float16, stored.shape)
    for view in range(2):
        rows.write(view, 0, stored[view, :2])
        rows.write(view, 2, stored[view, 2:])
    views, indices = np.array([1, 0, 1]), np.array([4, 0, 2])
    np.testing.assert_array_equal(cache.OnDisk(tmp_path / "a.npy").read(views, indices), stored[views, indices])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), stored)  # still a plain .npy file


def test_a_small_cache_is_read_from_memory_with_the_rows_of_the_disk_and_a_large_one_stays_on_disk(tmp_path):
    stored = (np.arange(2 * 6 * 4, dtype=np.float32) / 7).astype(np.float16).reshape(2, 6, 4)
    on_disk = cache.OnDisk(tmp_path / "h.weak.npy", np.float16, stored.shape)
    for view in range(2):
        on_disk.write(view, 0, stored[view])
    features = cache.FeatureCache(tmp_path, 2, {("h", "weak"): cache.OnDisk(tmp_path / "h.weak.npy")}, 0.0)
    float32_bytes = stored.size * 4
    held = features.held_if_small(limit=float32_bytes)
    assert isinstance(held.arrays[("h", "weak")], cache.Held) and held.bytes == features.bytes == stored.nbytes
    views, indices = np.array([1, 0, 1, 0]), np.array([5, 0, 2, 5])
    from_memory, from_disk = held.get("h", "weak", views, indices), features.get("h", "weak", views, indices)
    assert from_memory.dtype == from_disk.dtype == np.float32
    np.testing.assert_array_equal(from_memory, from_disk)
    assert features.held_if_small(limit=float32_bytes - 1) is features
