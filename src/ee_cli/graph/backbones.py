"""Backbones as one flat tf_keras Functional model: raw RGB pixels (0..255) in, classifier logits out.

The backbone's own preprocessing lives inside the model, so every consumer (TFLite too) feeds raw
pixels. Preprocessing uses only plain layers (a frozen 1x1 Conv2D, Rescaling), which save to `.h5`
and `.keras` alike; `preprocess_input` on a Keras tensor or a Lambda would not.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import compat
from ee_cli.graph import trust
from ee_cli.base.errors import UserError, first_line

PREPROCESS_LAYER = "ee_preprocess"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class ApplicationSpec:
    constructor: str
    preprocessing: str  # caffe | tf | built-in


APPLICATIONS = {
    "resnet50": ApplicationSpec("ResNet50", "caffe"),
    "mobilenet_v2": ApplicationSpec("MobileNetV2", "tf"),
    "efficientnet_b0": ApplicationSpec("EfficientNetB0", "built-in"),
}
CIFAR_RESNET = "cifar_resnet9"
BUILTIN_BACKBONES = (*APPLICATIONS, CIFAR_RESNET)
NATIVE_SIZE = {**{name: 224 for name in APPLICATIONS}, CIFAR_RESNET: 32}
MIN_SIZE = 32


@dataclass
class Backbone:
    model: Any  # flat tf_keras Functional model
    name: str
    source: str  # tf_keras.applications | ee | file
    weights: str  # imagenet | none | a path | file
    preprocessing: str
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.model.input_shape[1:])


def build_backbone(name: str, weights: str | None, input_size: int | None, num_classes: int | None, trust_code: bool = False) -> Backbone:
    if name in APPLICATIONS:
        return _application(name, weights or "imagenet", input_size or NATIVE_SIZE[name], num_classes)
    if name == CIFAR_RESNET:
        return _cifar_resnet(weights or "none", input_size or NATIVE_SIZE[name], num_classes or 10)
    if Path(name).exists():
        if weights is not None or input_size is not None:
            raise UserError("--weights and --input-size apply to built-in backbones; a model file brings its own")
        return load_model_file(Path(name), trust_code)
    raise UserError(
        f"unknown backbone {name!r}: choose one of {', '.join(BUILTIN_BACKBONES)}, "
        "or give a tf_keras model file (.h5, .keras, or a SavedModel folder)"
    )


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise UserError(f"--input-size {size} is too small: the backbone needs at least {MIN_SIZE} pixels")


def _application(name: str, weights: str, size: int, num_classes: int | None) -> Backbone:
    _check_size(size)
    keras = compat.keras()
    spec = APPLICATIONS[name]
    if weights == "imagenet":
        if num_classes not in (None, 1000):
            raise UserError("ImageNet weights have 1000 classes: drop --num-classes or use --weights none")
        num_classes = 1000
    elif weights != "none" and not Path(weights).exists():
        raise UserError(f"--weights {weights!r}: expected imagenet, none, or an existing weights file")
    num_classes = num_classes or 1000
    constructor = getattr(keras.applications, spec.constructor)
    pixels = keras.Input((size, size, 3), name="pixels")
    model = constructor(
        include_top=True,
        weights=None,
        input_tensor=_preprocess(spec.preprocessing, pixels),
        classes=num_classes,
        classifier_activation=None,
    )
    if weights != "none":
        reference = _reference_with_weights(name, constructor, weights, num_classes)
        copy_weights_in_order(reference, model)
    return Backbone(model, name, "tf_keras.applications", weights, spec.preprocessing, num_classes)


def _preprocess(kind: str, pixels):
    keras = compat.keras()
    if kind == "caffe":
        # RGB -> BGR permutation with the ImageNet channel means subtracted, as one frozen 1x1 conv.
        # Its weights are set after building (constant initialisers holding arrays don't reload from .h5).
        permutation = np.zeros((1, 1, 3, 3), np.float32)
        for rgb in range(3):
            permutation[0, 0, rgb, 2 - rgb] = 1.0
        layer = keras.layers.Conv2D(3, 1, name=PREPROCESS_LAYER, trainable=False)
        output = layer(pixels)
        layer.set_weights([permutation, -np.array(CAFFE_MEAN_BGR, np.float32)])
        return output
    if kind == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name=PREPROCESS_LAYER)(pixels)
    return pixels


def _reference_with_weights(name: str, constructor, weights: str, num_classes: int):
    """The plain application with its weights loaded, at its native size (weights don't depend on size)."""
    if weights != "imagenet":
        try:
            return constructor(include_top=True, weights=weights, classes=num_classes, classifier_activation=None)
        except (ValueError, OSError) as error:
            raise UserError(f"--weights {weights}: not a {name} weights file with {num_classes} classes ({first_line(error)})") from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras prints "Downloading data from ..." first
            return constructor(include_top=True, weights="imagenet", classifier_activation=None)
    except Exception as error:  # Keras raises a bare Exception when the download fails
        raise UserError(
            f"cannot download ImageNet weights for {name} (no internet?): "
            "use --weights none for random weights, or --weights PATH for a local weights file "
            f"[{first_line(error)}]"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def copy_weights_in_order(source, target) -> None:
    """Copy weights layer by layer in topological order, skipping the preprocessing layer we added.

    Names can't be used: auto-named layers (EfficientNet's Normalization) differ between builds.
    """
    sources = [layer for layer in source.layers if layer.weights]
    targets = [layer for layer in target.layers if layer.weights and layer.name != PREPROCESS_LAYER]
    if len(sources) != len(targets):
        raise UserError(f"weights do not fit: {len(sources)} layers with weights vs {len(targets)} in the backbone")
    for from_layer, to_layer in zip(sources, targets):
        values = from_layer.get_weights()
        if [v.shape for v in values] != [w.shape for w in to_layer.get_weights()]:
            raise UserError(f"weights do not fit layer {to_layer.name}: shapes differ")
        to_layer.set_weights(values)


def _cifar_resnet(weights: str, size: int, num_classes: int) -> Backbone:
    """A half-width ResNet-9 (32-64-128-256 channels) for 32x32 photos, 8 BatchNorm layers."""
    _check_size(size)
    model = cifar_resnet9(size, num_classes)
    if weights == "imagenet":
        raise UserError(f"{CIFAR_RESNET} has no ImageNet weights: use --weights none or --weights PATH")
    if weights != "none":
        if not Path(weights).exists():
            raise UserError(f"--weights {weights!r}: expected none or an existing weights file")
        try:
            model.load_weights(weights)
        except (ValueError, OSError) as error:
            raise UserError(f"--weights {weights}: not a {CIFAR_RESNET} weights file with {num_classes} classes ({first_line(error)})") from None
    return Backbone(model, CIFAR_RESNET, "ee", weights, "scale to [-1, 1]", num_classes)


def cifar_resnet9(size: int = 32, num_classes: int = 10, width: int = 32):
    keras = compat.keras()
    layers = keras.layers

    def conv_bn(x, filters: int, name: str):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    def residual(x, filters: int, name: str):
        y = conv_bn(conv_bn(x, filters, f"{name}_res1"), filters, f"{name}_res2")
        return layers.Add(name=f"{name}_add")([x, y])

    pixels = keras.Input((size, size, 3), name="pixels")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name=PREPROCESS_LAYER)(pixels)
    x = conv_bn(x, width, "prep")
    x = layers.MaxPooling2D(name="layer1_pool")(conv_bn(x, 2 * width, "layer1"))
    x = residual(x, 2 * width, "layer1")
    x = layers.MaxPooling2D(name="layer2_pool")(conv_bn(x, 4 * width, "layer2"))
    x = layers.MaxPooling2D(name="layer3_pool")(conv_bn(x, 8 * width, "layer3"))
    x = residual(x, 8 * width, "layer3")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    logits = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(pixels, logits, name=CIFAR_RESNET)


def load_model_file(path: Path, trust_code: bool = False) -> Backbone:
    """A user's tf_keras model file that takes RGB pixels 0..255 and ends in a classifier. Its
    configuration is vetted for code before Keras reads it, unless the user trusts it (`trust`)."""
    _refuse_keras3_file(path)
    trust.check_model_file(path, trust_code)
    keras = compat.keras()
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not trust_code)
    except Exception as error:  # h5py, zip, protobuf and Keras errors all mean the same thing here
        raise UserError(f"cannot load model file {path}: {first_line(error)}") from None
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise UserError(f"{path} is not a Functional or Sequential tf_keras model; subclassed models can't be grafted")
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        raise UserError(f"{path} nests model(s) {', '.join(nested)}: rebuild it as one flat model (tfmot can't quantise nested models)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"{path} must have one input and one output, not {len(model.inputs)} and {len(model.outputs)}")
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or shape[-1] != 3 or None in shape:
        raise UserError(f"{path} must take fixed-size RGB images (height, width, 3), not {shape}")
    logits = _classifier_logits(model, path)
    flat = keras.Model(model.inputs, logits, name=model.name)
    return Backbone(flat, path.stem, "file", str(path), "inside the model file (expects RGB 0..255)", int(logits.shape[-1]))


def _classifier_logits(model, path: Path):
    """The logits tensor of the model's classifier, looking through a final softmax.

    A Dense classifier is used as it is. A 1x1 convolution on a 1x1 map followed by Reshape or
    Flatten (MobileNet, MobileNetV3) becomes the equivalent Dense layer (same weights, reshaped):
    everything downstream then finds one kind of classifier.
    """
    keras = compat.keras()
    layer = model.layers[-1]
    while _is_output_activation(layer):
        layer = _producer(layer)
    if isinstance(layer, (keras.layers.Reshape, keras.layers.Flatten)) and _is_pointwise_classifier(_producer(layer)):
        return _as_dense(_producer(layer))
    if not isinstance(layer, keras.layers.Dense) or len(layer.output_shape) != 2 or layer.output_shape[-1] < 2:
        raise UserError(
            f"{path} does not end in a classifier (a Dense layer, or a 1x1 convolution then Reshape or Flatten, "
            "with at least 2 outputs)"
        )
    layer.activation = keras.activations.linear  # teacher and losses want logits
    return layer.output


def _producer(layer):
    inbound = layer._inbound_nodes[0].inbound_layers
    return inbound if not isinstance(inbound, list) else inbound[0]


def _is_output_activation(layer) -> bool:
    """A softmax or linear activation after the classifier: looked through to the logits."""
    keras = compat.keras()
    if isinstance(layer, keras.layers.Softmax):
        return True
    return isinstance(layer, keras.layers.Activation) and getattr(layer.activation, "__name__", "") in ("softmax", "linear")


def _is_pointwise_classifier(layer) -> bool:
    keras = compat.keras()
    return (
        isinstance(layer, keras.layers.Conv2D)
        and tuple(layer.kernel_size) == (1, 1)
        and layer.groups == 1
        and tuple(layer.input_shape[1:3]) == (1, 1)
        and layer.filters >= 2
    )


def _as_dense(conv):
    keras = compat.keras()
    features = keras.layers.Flatten(name=f"{conv.name}_flatten")(conv.input)
    dense = keras.layers.Dense(conv.filters, use_bias=conv.use_bias, name=conv.name)
    logits = dense(features)
    kernel, *bias = conv.get_weights()
    dense.set_weights([kernel.reshape(kernel.shape[-2:]), *bias])
    return logits


def _refuse_keras3_file(path: Path) -> None:
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        if "metadata.json" not in archive.namelist():
            return
        version = json.loads(archive.read("metadata.json")).get("keras_version", "")
    if version.startswith("3"):
        raise UserError(
            f"{path} was written by Keras {version}, which tf_keras cannot read: "
            "in Keras 3, load it and save it as .h5 (model.save('model.h5')), then pass that file"
        )
