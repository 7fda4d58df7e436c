"""Weak and strong views (FixMatch): weak = flip + pad-and-crop; strong = weak + 2 RandAugment-like
colour/tone ops at random magnitudes + cutout.

Each photo's random draws come from a generator seeded by (seed, view, photo index), so a view
depends on nothing else — not on batch size or neighbours — and a resumed run rebuilds exactly
the same views. The draws are made on the host; the image ops then run vectorised over the batch.
"""

from __future__ import annotations

import numpy as np

from ee_cli import compat

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


def weak(images, seed: int, view: int, indices):
    return _weak(images, draws(seed, view, indices))


def strong(images, seed: int, view: int, indices):
    params = draws(seed, view, indices)
    tf = compat.tf()
    images = _weak(images, params)
    for step in range(2):
        op = tf.constant(params[f"op{step}"].astype(np.int32))
        magnitude = tf.constant(params[f"mag{step}"].astype(np.float32))
        candidates = tf.stack([_apply(name, images, magnitude) for name in STRONG_OPS], axis=1)  # (B, ops, H, W, C)
        images = tf.gather(candidates, op, axis=1, batch_dims=1)
    return _cutout(images, params)


def _weak(images, params):
    tf = compat.tf()
    images = tf.cast(images, tf.float32)
    flip = tf.constant(params["flip"].astype(bool))[:, None, None, None]
    images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    height, width = int(images.shape[1]), int(images.shape[2])
    pad = max(1, height // 8)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    top = np.floor(params["dy"] * (2 * pad + 1)).astype(np.int32)
    left = np.floor(params["dx"] * (2 * pad + 1)).astype(np.int32)
    rows = tf.constant(top[:, None] + np.arange(height)[None, :])
    cols = tf.constant(left[:, None] + np.arange(width)[None, :])
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


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
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(unit, 0.0, 1.0))
        h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
        if op == "saturation":
            s = tf.clip_by_value(s * 2.0 * m, 0.0, 1.0)
        else:
            h = tf.math.floormod(h + (m - 0.5) * 0.3, 1.0)
        unit = tf.image.hsv_to_rgb(tf.concat([h, s, v], axis=-1))
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


def _cutout(images, params):
    """Grey out a square of a third of the side at a random place in each photo."""
    tf = compat.tf()
    height, width = int(images.shape[1]), int(images.shape[2])
    side = max(1, height // 3)
    top = np.floor(params["cy"] * (height - side + 1))[:, None, None]
    left = np.floor(params["cx"] * (width - side + 1))[:, None, None]
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return tf.where(tf.constant(inside[..., None]), 127.5, images)
