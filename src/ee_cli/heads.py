"""Exit heads: small, TFLite-friendly classifiers grafted onto a backbone feature map.

Every head ends in an unannotated linear Activation named after the exit (`exit_k`): it names the
model output, and keeps the name intact when tfmot annotates the head's other layers.
"""

from __future__ import annotations

import math

from ee_cli import compat

HEAD_KINDS = {
    "light": "average-pool to a grid of at most 4x4 -> dense(256, relu) -> dense(classes); pool-first, so features cache small",
    "conv": "2 x [3x3 conv -> BN -> relu] -> global average pool -> dense(classes), as drawn in the paper",
}
GRID = 4


def build_head(kind: str, features, num_classes: int, name: str):
    layers = compat.keras().layers
    channels = int(features.shape[-1])
    if kind == "light":
        # A coarse spatial grid keeps where things are (global pooling alone lost that: on a colour-cast
        # CIFAR user, exits at 21/41 % of the compute reached 70.7/73.5 % with it, 81.0/81.6 % with the grid).
        side = min(int(features.shape[1]), int(features.shape[2]))
        x = layers.AveragePooling2D(pool_size=math.ceil(side / GRID), name=f"{name}_pool")(features)
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


def is_head_layer(layer_name: str, exit_name: str) -> bool:
    return layer_name == exit_name or layer_name.startswith(f"{exit_name}_")
