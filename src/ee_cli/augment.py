"""Weak and strong views (FixMatch): weak = flip + pad-and-crop; strong = weak + 2 RandAugment-like
colour/tone ops at random magnitudes + cutout.

Every random draw is a stateless op seeded per photo, so a view depends only on (seed, view,
photo index): a resumed run rebuilds exactly the same views.
"""

from __future__ import annotations

from ee_cli import compat

STRONG_OPS = ("brightness", "contrast", "saturation", "hue", "posterize", "solarize", "autocontrast", "identity")


def photo_seeds(seed: int, view: int, indices):
    """A (batch, 2) int32 seed per photo."""
    tf = compat.tf()
    indices = tf.cast(indices, tf.int32)
    return tf.stack([tf.fill(tf.shape(indices), seed * 1009 + view), indices], axis=1)


def weak(images, seeds):
    tf = compat.tf()
    return tf.map_fn(lambda args: _weak_one(*args), (tf.cast(images, tf.float32), seeds), fn_output_signature=tf.float32)


def strong(images, seeds):
    tf = compat.tf()
    return tf.map_fn(lambda args: _strong_one(*args), (tf.cast(images, tf.float32), seeds), fn_output_signature=tf.float32)


def _sub_seed(seed, salt: int):
    tf = compat.tf()
    return tf.stack([seed[0] * 7919 + salt, seed[1]])


def _weak_one(image, seed):
    tf = compat.tf()
    image = tf.image.stateless_random_flip_left_right(image, _sub_seed(seed, 1))
    pad = max(1, image.shape[0] // 8)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(padded, tf.shape(image), _sub_seed(seed, 2))


def _strong_one(image, seed):
    tf = compat.tf()
    image = _weak_one(image, seed)
    for step in range(2):
        choice = tf.random.stateless_uniform((), _sub_seed(seed, 10 + step), 0, len(STRONG_OPS), tf.int32)
        magnitude = tf.random.stateless_uniform((), _sub_seed(seed, 20 + step), 0.05, 0.95)
        branches = [lambda op=op: _apply(op, image, magnitude) for op in STRONG_OPS]
        image = tf.switch_case(choice, branches)
    return _cutout(image, seed)


def _apply(op: str, image, magnitude):
    """One tone/colour op on a float image in 0..255 at magnitude 0..1."""
    tf = compat.tf()
    unit = image / 255.0
    if op == "brightness":
        unit = tf.image.adjust_brightness(unit, (magnitude - 0.5) * 0.6)
    elif op == "contrast":
        unit = tf.image.adjust_contrast(unit, 0.3 + 1.4 * magnitude)
    elif op == "saturation":
        unit = tf.image.adjust_saturation(unit, 2.0 * magnitude)
    elif op == "hue":
        unit = tf.image.adjust_hue(unit, (magnitude - 0.5) * 0.3)
    elif op == "posterize":
        levels = tf.round(2.0 ** (2.0 + 4.0 * (1.0 - magnitude)))
        unit = tf.round(unit * levels) / levels
    elif op == "solarize":
        unit = tf.where(unit < 1.0 - 0.5 * magnitude, unit, 1.0 - unit)
    elif op == "autocontrast":
        low = tf.reduce_min(unit, axis=[0, 1], keepdims=True)
        high = tf.reduce_max(unit, axis=[0, 1], keepdims=True)
        unit = (unit - low) / tf.maximum(high - low, 1e-3)
    return tf.clip_by_value(unit, 0.0, 1.0) * 255.0


def _cutout(image, seed):
    """Grey out a square of a third of the side at a random place."""
    tf = compat.tf()
    height, width = image.shape[0], image.shape[1]
    side = max(1, height // 3)
    top = tf.random.stateless_uniform((), _sub_seed(seed, 30), 0, height - side + 1, tf.int32)
    left = tf.random.stateless_uniform((), _sub_seed(seed, 31), 0, width - side + 1, tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return tf.where(inside[:, :, None], 127.5, image)
