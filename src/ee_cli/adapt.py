"""Per-user normalisation statistics and personal classes, with forward passes only.

Measured (see the personalise issue): re-estimating the moving statistics of the first BatchNorm
layers on a person's unlabelled photos, then reading off which classes the adapted model predicts,
is what beats the generic model restricted to the person's classes; adapting every BN layer soaks
up the person's class mix instead.
"""

from __future__ import annotations

import math

import numpy as np

from ee_cli import compat
from ee_cli.errors import UserError


def backbone_batchnorms(model, head_prefixes: tuple[str, ...] = ("exit_",)) -> list:
    """The backbone's BatchNorm layers in topological order (exit heads excluded)."""
    keras = compat.keras()
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.name.startswith(head_prefixes)
    ]


def resolve_adapt_count(spec: str, available: int) -> int:
    """`auto` adapts the first half of the BN layers (rounded up); an integer is taken as given."""
    if spec == "auto":
        return math.ceil(available / 2)
    try:
        count = int(spec)
    except ValueError:
        raise UserError(f"--adapt-bn expects a number of BatchNorm layers, auto, or 0; not {spec!r}") from None
    if not 0 <= count <= available:
        raise UserError(f"--adapt-bn {count}: the backbone has {available} BatchNorm layers")
    return count


def adapt_batchnorm(model, batches, count: int) -> list[str]:
    """Set the moving mean and variance of the first `count` BN layers to those of the photos.

    Exact and deterministic: layer by layer, each layer's statistics are computed over every photo
    with the layers before it already adapted (the BN layers are frozen, so `training=True` would
    change nothing; we compute the statistics ourselves). `batches` is a callable returning an
    iterable of uint8 image batches. Returns the adapted layers' names.
    """
    keras = compat.keras()
    layers = backbone_batchnorms(model)[:count]
    for layer in layers:
        probe = keras.Model(model.inputs, layer.input)
        total, total_sq, n = 0.0, 0.0, 0
        for images in batches():
            features = probe(np.asarray(images, np.float32), training=False).numpy().astype(np.float64)
            flat = features.reshape(-1, features.shape[-1])
            total = total + flat.sum(axis=0)
            total_sq = total_sq + (flat**2).sum(axis=0)
            n += flat.shape[0]
        mean = total / n
        variance = np.maximum(total_sq / n - mean**2, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    return [layer.name for layer in layers]


def class_shares(logits: np.ndarray) -> np.ndarray:
    """Share of photos whose top prediction is each class."""
    predictions = np.asarray(logits).argmax(axis=1)
    return np.bincount(predictions, minlength=logits.shape[1]) / max(1, len(predictions))


def infer_classes(shares: np.ndarray, min_share: float) -> list[int]:
    """Classes predicted for at least `min_share` of the photos (at least the top two)."""
    chosen = [int(i) for i in np.flatnonzero(shares >= min_share)]
    if len(chosen) < 2:
        chosen = sorted(int(i) for i in np.argsort(-shares, kind="stable")[:2])
    return chosen
