"""Exit heads: small, TFLite-friendly classifiers grafted onto a backbone feature map.

Every head ends in an unannotated linear Activation named after the exit (`exit_k`): it names the
model output, and keeps the name intact when tfmot annotates the head's other layers.
"""

from __future__ import annotations

import math

from ee_cli.base import compat

HEAD_KINDS = {
    "light": "average-pool to a grid of at most 4x4 (coarser for wide maps) -> dense(256, relu) -> dense(classes); pool-first, so features cache small",
    "conv": "2 x [3x3 conv -> BN -> relu] -> global average pool -> dense(classes), as drawn in the paper",
}
GRID = 4
# The light head's dense layer holds grid² x channels x 256 weights, and a batch-of-one dense layer
# costs the bytes of its weights more than its MACs: on ResNet50@224 three 4x4/3x3-grid heads held
# 6.9M weights and the int8 stages' own calls summed to 6 % over the plain model; with the grid
# bounded here (2.6M weights), 1.4 %. CIFAR-sized maps (<= 256 channels) keep 4x4.
MAX_FEATURES = 4096


def build_head(kind: str, features, num_classes: int, name: str):
    layers = compat.keras().layers
    channels = int(features.shape[-1])
    if kind == "light":
        # A coarse spatial grid keeps where things are (global pooling alone lost that: on a colour-cast
        # CIFAR user, exits at 21/41 % of the compute reached 70.7/73.5 % with it, 81.0/81.6 % with the grid).
        side = min(int(features.shape[1]), int(features.shape[2]))
        x = layers.AveragePooling2D(pool_size=light_pool_size(side, channels), name=f"{name}_pool")(features)
        x = layers.Flatten(name=f"{name}_flat")(x)
        x = layers.Dense(256, activation="relu", name=f"{name}_hidden")(x)
    elif kind == "conv":
        width = min(128, channels)
        stride = 2 if min(features.shape[1], features.shape[2]) >= 8 else 1
        x = features
        for index, step in enumerate((stride, 1)):
            x = layers.Conv2D(width, 3, strides=step, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
            x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
            x = layers.ReLU(name=f"{name}_relu{index}")(x)
        x = layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    else:
        raise ValueError(f"unknown head kind {kind!r}")
    logits = layers.Dense(num_classes, name=f"{name}_logits")(x)
    return layers.Activation("linear", name=name)(logits)


def light_pool_size(side: int, channels: int) -> int:
    """Pooling that leaves a grid of at most 4x4; coarser where grid² x channels would pass MAX_FEATURES."""
    pool = math.ceil(side / min(GRID, side))
    grid = side // pool
    if grid * grid * channels <= MAX_FEATURES:
        return pool
    grid = max(1, math.isqrt(MAX_FEATURES // channels))
    return side // grid


def is_head_layer(layer_name: str, exit_name: str) -> bool:
    return layer_name == exit_name or layer_name.startswith(f"{exit_name}_")
