"""The trust boundary for model files from elsewhere: nothing in a file runs unless the user says so.

A tf_keras model file is a program as much as data: a `Lambda` layer stores Python bytecode that
runs when the model is built or called, a `TFOpLambda` names any TensorFlow function (file
writes included), and a `.keras` config names modules that Keras imports. So the saved
configuration is read as plain JSON and vetted *before* Keras deserialises anything:

- `Lambda` (and anything else carrying a `function_type`, or Keras 3's `__lambda__`): refused;
- `TFOpLambda` / `SlicingOpLambda`: only tensor maths (`tf.math`, `tf.nn`, operators, shape ops);
- any other object: a class tf_keras itself ships, from a Keras module; custom classes are
  refused (ee registers none, and would need the user's code to build them);
- a SavedModel folder: its TensorFlow functions are graphs ee cannot vet op by op, so it is
  loaded only with `--trust-model-code` (save it as `.h5` instead).

`--trust-model-code` skips every check, for files whose author the user trusts.
"""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

from ee_cli.base.errors import UserError

TRUST_FLAG = "--trust-model-code"
OP_LAMBDAS = ("TFOpLambda", "SlicingOpLambda")
SAFE_OP_NAMESPACES = ("__operators__.", "math.", "nn.", "linalg.", "image.resize")
SAFE_OPS = frozenset({
    "cast", "clip_by_value", "concat", "expand_dims", "gather", "identity", "ones_like", "pad",
    "reshape", "shape", "split", "squeeze", "stack", "tile", "transpose", "unstack", "zeros_like",
})
STRUCTURAL_CLASSES = frozenset({"Functional", "Sequential", "Model", "__tuple__", "__ellipsis__", "__slice__"})  # plain values Keras marks
CODE_CLASSES = frozenset({"Lambda", "__lambda__"})


def read_model_config(path: Path) -> dict[str, Any]:
    """The saved configuration of a tf_keras model file, read as plain data (nothing deserialised).
    Raises UserError for a file that is none of the formats tf_keras writes, or is damaged."""
    if path.is_dir():
        raise UserError(
            f"{path} is a SavedModel folder: its TensorFlow functions are graphs ee cannot vet, so ee loads one "
            f"only with {TRUST_FLAG}; or save the model as .h5 (model.save('model.h5')) and pass that"
        )
    if zipfile.is_zipfile(path):
        return _keras_zip_config(path)
    return _hdf5_config(path)


def _keras_zip_config(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"{path} is not a readable .keras model file (no valid config.json: {error})") from None


def _hdf5_config(path: Path) -> dict[str, Any]:
    import h5py  # installed with TensorFlow; opening a file does not import TensorFlow

    try:
        with h5py.File(path, "r") as handle:
            stored = handle.attrs.get("model_config")
    except OSError as error:
        reason = str(error).split("(", 1)[-1].rstrip(")") if "truncated" in str(error) else "not an HDF5 file, or damaged"
        raise UserError(f"{path} cannot be opened as a tf_keras model file: {reason}") from None
    if stored is None:
        raise UserError(f"{path} holds no model configuration (a weights-only file?): save the whole model with model.save")
    try:
        return json.loads(stored.decode() if isinstance(stored, bytes) else stored)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: its model configuration is not valid JSON ({error})") from None


def code_in_config(config: Any, known_classes: frozenset[str]) -> list[str]:
    """Every object in a saved model configuration that would run code from the file or import a
    module, as 'layer NAME (Class): why'. Pure: `known_classes` are the classes tf_keras ships."""
    found = []
    for node in _serialised_objects(config):
        why = _why_unsafe(node, known_classes)
        if why:
            name = (node.get("config") or {}).get("name") if isinstance(node.get("config"), dict) else None
            found.append(f"{'layer ' + repr(name) if name else 'an object'} ({node['class_name']}): {why}")
    return found


def _serialised_objects(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("class_name"), str):
            yield value
        for child in value.values():
            yield from _serialised_objects(child)
    elif isinstance(value, list):
        for child in value:
            yield from _serialised_objects(child)


def _why_unsafe(node: dict[str, Any], known_classes: frozenset[str]) -> str | None:
    name, config = node["class_name"], node.get("config")
    config = config if isinstance(config, dict) else {}
    if name in CODE_CLASSES or "function_type" in config:
        return "it stores Python code that would run"
    if name in OP_LAMBDAS:
        function = config.get("function")
        return None if is_safe_op(function) else f"it calls tf.{function}, which is not tensor maths"
    module = node.get("module")
    if module is not None and not _is_keras_module(module):
        return f"it names the module {module!r}, which Keras would import"
    if name == "function":  # Keras 3 style: a built-in activation by name
        return None if str(module).split(".")[-1] == "activations" else "a function from outside tf_keras' activations"
    if name not in known_classes and name not in STRUCTURAL_CLASSES:
        return "a custom class, whose code is not in the file"
    return None


def is_safe_op(function: Any) -> bool:
    """Tensor maths: tf.math, tf.nn, operators, resizing and shape ops (also under compat.v1)."""
    if not isinstance(function, str):
        return False
    function = function.removeprefix("compat.v1.")
    return function.startswith(SAFE_OP_NAMESPACES) or function in SAFE_OPS


def _is_keras_module(module: Any) -> bool:
    return isinstance(module, str) and (module == "keras" or module.startswith(("keras.", "tf_keras.", "tensorflow.python.ops.init_ops")))


def check_model_file(path: Path, trust_code: bool) -> None:
    """Refuse, before anything is deserialised, a model file whose configuration carries code."""
    if not trust_code:
        refuse_code(read_model_config(path), path)


def refuse_code(config: dict[str, Any], path: Path) -> None:
    found = code_in_config(config, tf_keras_classes())
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{path} would run code from the file: {found[0]}{more}; ee refuses it unless you trust its author ({TRUST_FLAG})")


@functools.cache
def tf_keras_classes() -> frozenset[str]:
    """The serialisable classes tf_keras ships: layers, initialisers, regularisers, constraints."""
    from ee_cli.base import compat

    keras = compat.keras()
    modules = (keras.layers, keras.initializers, keras.regularizers, keras.constraints)
    return frozenset(name for module in modules for name in dir(module) if name[:1].isupper()) - CODE_CLASSES
