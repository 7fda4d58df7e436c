"""The only module that imports TensorFlow, tf_keras, tfmot and LiteRT.

Imports are lazy so that `ee --help` answers without loading TensorFlow. tf_keras (Keras 2) is
the project's one Keras: tensorflow-model-optimization rejects Keras 3 models. Should tfmot learn
Keras 3, switching is a change to this module alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import warnings


def _prepare_environment() -> None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def thread_count() -> int:
    """TF's intra-op threads: EE_THREADS, else every core. Results are bit-identical per count."""
    value = os.environ.get("EE_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


@functools.cache
def tf():
    _prepare_environment()
    with native_logs_silenced():
        import tensorflow

        # Thread settings are refused once TF has run an op, so apply them right after the import.
        tensorflow.config.threading.set_intra_op_parallelism_threads(thread_count())
        tensorflow.config.threading.set_inter_op_parallelism_threads(min(2, thread_count()))
        tensorflow.constant(0)  # initialise devices now, while their start-up chatter is silenced
    tensorflow.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
    return tensorflow


@contextlib.contextmanager
def native_logs_silenced(descriptors: tuple[int, ...] = (2,)):
    """TF 2.21 and LiteRT log through absl regardless of TF_CPP_MIN_LOG_LEVEL (oneDNN, CUDA and
    XNNPACK notices), and the TFLite converter prints its calibration settings, straight to the file
    descriptors: point them at /dev/null meanwhile. EE_TF_LOGS=1 keeps them."""
    if os.environ.get("EE_TF_LOGS"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in descriptors}
    try:
        with open(os.devnull, "w") as devnull:
            for fd in descriptors:
                os.dup2(devnull.fileno(), fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


@functools.cache
def keras():
    tf()
    import tf_keras

    return tf_keras


@functools.cache
def tfmot():
    keras()
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def retype_signature_io(model: bytes, input_types: dict, output_types: dict) -> bytes:
    """Set each signature's integer input and output types (dicts keyed by signature key) on a
    model converted with float I/O, which has a QUANTIZE after every input and a DEQUANTIZE before
    every output. The converter's own inference_input/output_type apply one type to every
    signature; a cascade needs its pixels in the user's type but its hand-offs in the network's
    int8, or each stage boundary pays a uint8<->int8 QUANTIZE pass. These are the converter's own
    helpers (what `modify_model_io_type` calls), applied one signature at a time."""
    tf()
    from tensorflow.lite.python import util

    found = util._convert_model_from_bytearray_to_object(model)
    for index, signature in enumerate(found.signatureDefs):
        key = signature.signatureKey.decode() if isinstance(signature.signatureKey, bytes) else signature.signatureKey
        util._modify_model_input_type_per_subgraph(found, signature.subgraphIndex, index, input_types[key])
        util._modify_model_output_type_per_subgraph(found, signature.subgraphIndex, index, output_types[key])
    util._remove_redundant_quantize_ops(found)
    return util._convert_model_from_object_to_bytearray(found)


def litert_interpreter_class():
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter


def litert_schema():
    """LiteRT's flatbuffer schema (no TensorFlow): read a .tflite file's operator codes."""
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def seed_everything(seed: int) -> None:
    """Python, numpy and TF seeds at once; training is then bit-identical at a fixed thread count."""
    keras().utils.set_random_seed(seed)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names, from Keras' cache or its download (reachable whenever the weights were)."""
    import json

    utils = keras().utils  # prepares TF's environment before tf_keras.src is imported
    from tf_keras.src.applications.imagenet_utils import CLASS_INDEX_PATH

    path = utils.get_file("imagenet_class_index.json", CLASS_INDEX_PATH, cache_subdir="models")
    with open(path) as handle:
        index = json.load(handle)
    return [index[str(i)][1] for i in range(1000)]


def versions() -> dict[str, str]:
    from ee_cli import __version__

    found = {"ee": __version__, "python": platform.python_version()}
    if "tensorflow" in sys.modules:
        found["tensorflow"] = tf().__version__
        found["tf_keras"] = keras().__version__
    return found
