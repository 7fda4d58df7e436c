"""Exit heads: small, TFLite-friendly classifiers grafted onto a backbone feature map.

Every head ends in an unannotated linear Activation named after the exit (`exit_k`): it names the
model output, and keeps the name intact when tfmot annotates the head's other layers.
"""

from __future__ import annotations

import numpy as np

from ee_cli import compat

HEAD_KINDS = {
    "light": "global average pool -> dense(<=256, relu) -> dense(classes); pool-first, cache-friendly",
    "conv": "2 x [3x3 conv -> BN -> relu] -> global average pool -> dense(classes), as in the paper",
}


# `auto` picks conv heads while every graft map is small enough to cache whole (32x32 photos),
# light (pool-first) heads otherwise: a ResNet50@224 map of 28x28x512 would cost 0.8 MB per photo and view.
AUTO_CONV_LIMIT = 128 * 1024  # elements of one graft map


def resolve_kind(kind: str, feature_shapes: list[tuple[int, ...]]) -> str:
    if kind != "auto":
        return kind
    largest = max((int(np.prod(shape)) for shape in feature_shapes), default=0)
    return "conv" if largest <= AUTO_CONV_LIMIT else "light"


def build_head(kind: str, features, num_classes: int, name: str):
    layers = compat.keras().layers
    channels = int(features.shape[-1])
    if kind == "light":
        x = layers.GlobalAveragePooling2D(name=f"{name}_pool")(features)
        x = layers.Dense(min(256, channels), activation="relu", name=f"{name}_hidden")(x)
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
