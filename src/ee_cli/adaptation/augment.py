"""Weak and strong views (FixMatch): weak = flip + pad-and-crop; strong = weak + 2 RandAugment-like
colour/tone ops at random magnitudes + cutout.

Each photo's random draws come from a generator seeded by (seed, view, photo index), so a view
depends on nothing else — not on batch size or neighbours — and a resumed run rebuilds exactly
the same views. The draws are made on the host; the image ops then run vectorised over the batch.
"""

from __future__ import annotations

import numpy as np

from ee_cli.base import compat

STRONG_OPS = ("brightness", "contrast", "saturation", "hue", "posterize", "solarize", "autocontrast", "identity")


def draws(seed: int, view: int, indices) -> dict[str, np.ndarray]:
    """Per-photo random parameters, reproducible from (seed, view, index) alone."""
    rows = []
    for index in np.asarray(indices).ravel():
        rng = np.random.default_rng([seed, view, int(index)])
        rows.append(
            (
                rng.random() < 0.5,  # flip
                rng.random(),  # crop offset y (share of the padding)
                rng.random(),  # crop offset x
                rng.integers(len(STRONG_OPS)),
                rng.integers(len(STRONG_OPS)),
                rng.uniform(0.05, 0.95),
                rng.uniform(0.05, 0.95),
                rng.random(),  # cutout y
                rng.random(),  # cutout x
            )
        )
    table = np.array(rows, np.float64).reshape(-1, 9)
    keys = ("flip", "dy", "dx", "op0", "op1", "mag0", "mag1", "cy", "cx")
    return {key: table[:, i] for i, key in enumerate(keys)}


VIEW_COLUMNS = ("flip", "top", "left", "op0", "op1", "mag0", "mag1", "cut_top", "cut_left")


def view_table(seed: int, view: int, indices, height: int, width: int) -> np.ndarray:
    """Per photo, the view's parameters as one float32 row (VIEW_COLUMNS; offsets already in
    pixels): computed on the host with numpy alone, so a process without TensorFlow (the LiteRT
    trainer) feeds the very same views to the on-device artefact."""
    params = draws(seed, view, indices)
    pad, side = max(1, height // 8), max(1, height // 3)
    columns = (
        params["flip"],
        np.floor(params["dy"] * (2 * pad + 1)),
        np.floor(params["dx"] * (2 * pad + 1)),
        params["op0"],
        params["op1"],
        params["mag0"],
        params["mag1"],
        np.floor(params["cy"] * (height - side + 1)),
        np.floor(params["cx"] * (width - side + 1)),
    )
    return np.stack(columns, axis=1).astype(np.float32).reshape(-1, len(VIEW_COLUMNS))


def weak(images, seed: int, view: int, indices):
    return weak_from_table(images, view_table(seed, view, indices, *_sides(images)))


def strong(images, seed: int, view: int, indices):
    """The host's strong view (each op on its own photos; the same values as the artefact's form)."""
    return strong_from_table(images, view_table(seed, view, indices, *_sides(images)), each_op_on_its_photos_only=True)


def _sides(images) -> tuple[int, int]:
    return int(images.shape[1]), int(images.shape[2])


def weak_from_table(images, table):
    """Flip and pad-and-crop, as tensor ops on a view table (also traced into the LiteRT artefact)."""
    tf = compat.tf()
    images, table = tf.cast(images, tf.float32), tf.convert_to_tensor(table, tf.float32)
    flip = (table[:, 0] > 0.5)[:, None, None, None]
    images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    height, width = _sides(images)
    pad = max(1, height // 8)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    rows = tf.cast(table[:, 1], tf.int32)[:, None] + tf.range(height)[None, :]
    cols = tf.cast(table[:, 2], tf.int32)[:, None] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def strong_from_table(images, table, each_op_on_its_photos_only: bool = False):
    """Weak view, two tone/colour ops per photo, cutout. By default every op runs on every photo and
    each photo keeps its own (builtin ops only, for the LiteRT artefact); on the host each op runs
    on the photos that drew it alone, the same values at a quarter of the work."""
    tf = compat.tf()
    table = tf.convert_to_tensor(table, tf.float32)
    images = weak_from_table(images, table)
    for step in range(2):
        op = tf.cast(table[:, 3 + step], tf.int32)
        magnitude = table[:, 5 + step]
        if each_op_on_its_photos_only:
            images = _each_op_on_its_photos(images, op, magnitude)
        else:
            candidates = tf.stack([_apply(name, images, magnitude) for name in STRONG_OPS], axis=1)  # (B, ops, H, W, C)
            images = tf.gather(candidates, op, axis=1, batch_dims=1)
    return _cutout(images, table)


def _each_op_on_its_photos(images, op, magnitude):
    tf = compat.tf()
    parts = tf.dynamic_partition(images, op, len(STRONG_OPS))
    magnitudes = tf.dynamic_partition(magnitude, op, len(STRONG_OPS))
    positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), op, len(STRONG_OPS))
    done = tf.dynamic_stitch(positions, [_apply(name, part, m) for name, part, m in zip(STRONG_OPS, parts, magnitudes)])
    return tf.reshape(done, tf.shape(images))


def _apply(op: str, images, magnitude):
    """One tone/colour op on float images in 0..255, a magnitude in 0..1 per image."""
    tf = compat.tf()
    unit = images / 255.0
    m = magnitude[:, None, None, None]
    if op == "brightness":
        unit = unit + (m - 0.5) * 0.6
    elif op == "contrast":
        mean = tf.reduce_mean(unit, axis=[1, 2, 3], keepdims=True)
        unit = (unit - mean) * (0.3 + 1.4 * m) + mean
    elif op in ("saturation", "hue"):
        hsv = rgb_to_hsv(tf.clip_by_value(unit, 0.0, 1.0))
        h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
        if op == "saturation":
            s = tf.clip_by_value(s * 2.0 * m, 0.0, 1.0)
        else:
            h = tf.math.floormod(h + (m - 0.5) * 0.3, 1.0)
        unit = hsv_to_rgb(tf.concat([h, s, v], axis=-1))
    elif op == "posterize":
        levels = tf.round(2.0 ** (2.0 + 4.0 * (1.0 - m)))
        unit = tf.round(unit * levels) / levels
    elif op == "solarize":
        unit = tf.where(unit < 1.0 - 0.5 * m, unit, 1.0 - unit)
    elif op == "autocontrast":
        low = tf.reduce_min(unit, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(unit, axis=[1, 2], keepdims=True)
        unit = (unit - low) / tf.maximum(high - low, 1e-3)
    return tf.clip_by_value(unit, 0.0, 1.0) * 255.0


def _cutout(images, table):
    """Grey out a square of a third of the side at a random place in each photo."""
    tf = compat.tf()
    height, width = _sides(images)
    side = max(1, height // 3)
    top = tf.cast(table[:, 7], tf.int32)[:, None, None]
    left = tf.cast(table[:, 8], tf.int32)[:, None, None]
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return tf.where(inside[..., None], 127.5, images)


def rgb_to_hsv(rgb):
    """TF's RGBToHSV kernel in elementwise ops: that kernel is no TFLite builtin, and the LiteRT
    artefact must hold builtins only (phones often lack the Flex runtime)."""
    tf = compat.tf()
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    value = tf.reduce_max(rgb, axis=-1, keepdims=True)
    spread = value - tf.reduce_min(rgb, axis=-1, keepdims=True)
    saturation = tf.where(value > 0, spread / tf.maximum(value, 1e-12), 0.0)
    norm = 1.0 / (6.0 * tf.maximum(spread, 1e-12))
    hue = tf.where(r == value, norm * (g - b), tf.where(g == value, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    hue = tf.where(spread > 0, hue, 0.0)
    hue = tf.where(hue < 0, hue + 1.0, hue)
    return tf.concat([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv):
    """TF's HSVToRGB kernel in elementwise ops (the hexcone: channel n at k = (n + 6h) mod 6)."""
    tf = compat.tf()
    hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    chroma = saturation * value
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = tf.math.floormod(n + 6.0 * hue, 6.0)
        channels.append(value - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0))
    return tf.concat(channels, axis=-1)
