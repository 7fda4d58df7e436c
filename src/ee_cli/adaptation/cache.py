"""The feature cache: the frozen backbone runs once per photo and view; heads then train for many
epochs on what it stored (pooled features for pool-first heads, feature maps otherwise).

Arrays live on disk as .npy files in the run directory (float16 features, float32 teacher logits),
written and read a batch of rows at a time, so they need not fit in memory, and a resumed run reuses
them; a cache of up to HELD_BYTES is read into memory once for the heads' epochs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ee_cli.base import compat, photos
from ee_cli.adaptation import augment

KINDS = ("weak", "strong")
TEACHER = "teacher"
# A cache up to this size (as float32) is read into memory for the heads' epochs: rows read one by one
# from disk and converted from float16 cost a ResNet-9 user 1.1 s of its 30 epochs (100,000 reads),
# from memory 0.2 s. Larger caches stream from disk, so memory stays bounded (ResNet50 at 224 px:
# 29 MB on disk for 500 photos, 57 MB held, peak 978 MB against the 1.0 GB cap; 2,000 photos stream).
HELD_BYTES = 64e6


@dataclass(frozen=True)
class Plan:
    """Which photos go through the backbone, at what size, how many views, in what batches."""

    paths: list[Path]
    size: int
    views: int
    seed: int
    batch: int


class OnDisk:
    """A (views, photos, ...) .npy array on disk, written and read by rows with plain file reads and
    writes: a memory map would keep every page it ever touched in the process's resident memory, which
    then grows with the photo count."""

    def __init__(self, path: Path, dtype=None, shape: tuple | None = None):
        # numpy writes a new file's header and sizes it; the map is dropped before a page is read
        layout = np.lib.format.open_memmap(path, "w+", dtype, shape) if shape is not None else np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.offset = layout.shape, layout.dtype, layout.offset
        del layout
        self.path = path
        self.row_bytes = math.prod(self.shape[2:]) * self.dtype.itemsize
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def _at(self, view: int, photo: int) -> int:
        return self.offset + (view * self.shape[1] + photo) * self.row_bytes

    def write(self, view: int, start: int, values: np.ndarray) -> None:
        """Rows start, start + 1, ... of one view."""
        with open(self.path, "r+b") as file:
            file.seek(self._at(view, start))
            file.write(np.ascontiguousarray(values, self.dtype).tobytes())

    def read(self, views: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Row (views[i], indices[i]) for each i."""
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            chunks = [os.pread(descriptor, self.row_bytes, self._at(int(v), int(i))) for v, i in zip(np.broadcast_to(views, np.shape(indices)), indices)]
        finally:
            os.close(descriptor)
        return np.frombuffer(b"".join(chunks), self.dtype).reshape(len(chunks), *self.shape[2:])

    def held(self) -> "Held":
        return Held(np.load(self.path).astype(np.float32), self.nbytes)


@dataclass(frozen=True)
class Held:
    """An OnDisk array read into memory as float32 (numpy's float16 conversion, done per batch, cost
    as much as the rows' disk reads), read by rows the same way."""

    values: np.ndarray
    nbytes: int  # on disk, as the cache reports its size

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def read(self, views: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.values[np.broadcast_to(views, np.shape(indices)), indices]


@dataclass
class FeatureCache:
    directory: Path
    views: int
    arrays: dict[tuple[str, str], OnDisk | Held]  # (head or "teacher", kind) -> (views, photos, ...)
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def held_if_small(self, limit: float = HELD_BYTES) -> "FeatureCache":
        """The same cache read into memory when it holds at most `limit` bytes as float32, else itself."""
        if sum(math.prod(array.shape) * 4 for array in self.arrays.values() if isinstance(array, OnDisk)) > limit:
            return self
        return FeatureCache(self.directory, self.views, {key: array.held() if isinstance(array, OnDisk) else array for key, array in self.arrays.items()},
                            self.seconds)

    def get(self, name: str, kind: str, view, index) -> np.ndarray:
        return np.asarray(self.arrays[(name, kind)].read(view, index), np.float32)


def build(directory: Path, feature_model, head_names: list[str], plan: Plan, progress=None) -> FeatureCache:
    """Fill the cache, or open it if a finished one is there (same photos, views and seed)."""
    paths, size, views, seed, batch = plan.paths, plan.size, plan.views, plan.seed, plan.batch
    key = {"photos": len(paths), "views": views, "seed": seed, "heads": head_names, "size": size}
    done = directory / "complete.json"
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        arrays = {(name, kind): OnDisk(directory / f"{name}.{kind}.npy") for name in [*head_names, TEACHER] for kind in KINDS}
        return FeatureCache(directory, views, arrays, json.loads(done.read_text())["seconds"])
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = [*head_names, TEACHER]
    arrays = {}
    for name, output in zip(names, feature_model.outputs):
        for kind in KINDS:
            dtype = np.float32 if name == TEACHER else np.float16
            shape = (views, len(paths), *output.shape[1:])
            arrays[(name, kind)] = OnDisk(directory / f"{name}.{kind}.npy", dtype, shape)
    tf = compat.tf()
    # One graph per view kind (eager dispatch cost as much as the convolutions at 224 px), traced once
    # for every batch size: retracing for the last, smaller batch cost a ResNet-9 user 0.1 s (weak) and 0.6 s (strong).
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None, len(augment.VIEW_COLUMNS)), tf.float32)]
    weak_features = tf.function(lambda images, table: feature_model(augment.weak_from_table(images, table), training=False), input_signature=signature,
                                autograph=False)
    strong_features = tf.function(lambda images, table: feature_model(augment.strong_from_table(images, table, each_op_on_its_photos_only=True), training=False),
                                  input_signature=signature, autograph=False)
    start = 0
    for images in photos.dataset(paths, size, batch):  # each photo decoded once, for every view
        count = int(images.shape[0])
        indices = np.arange(start, start + count)
        for view in range(views):
            for kind, features_of in (("weak", weak_features), ("strong", strong_features)):
                table = augment.view_table(seed, 2 * view + (kind == "strong"), indices, size, size)
                outputs = features_of(tf.cast(images, tf.float32), tf.constant(table))
                for name, values in zip(names, outputs):
                    arrays[(name, kind)].write(view, start, values.numpy())
        start += count
        if progress:
            progress(start / len(paths))
    seconds = time.perf_counter() - started
    done.write_text(json.dumps({"key": key, "seconds": seconds}))
    return FeatureCache(directory, views, arrays, seconds)
