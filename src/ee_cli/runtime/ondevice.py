"""`personalise.tflite`: the artefact a phone trains its exits with, in LiteRT, builtin ops only.

Signatures (keys are the tf.function names; read outputs by name):
- `features`  pixels + a weak and a strong view table -> each head's pooled, flattened graft-point
  features on both views, and the teacher's logits (the frozen generic classifier, restricted to
  the personal classes and shifted by their prior) on the weak view;
- `bn_stats`  pixels -> per adapted BatchNorm layer, the per-channel sum and sum of squares of its
  input (and how many values were summed), under the statistics the file holds now;
- `set_bn_statistics`  a mean and variance per adapted BatchNorm layer -> stored (the app's running
  estimate over its photo stream; the prefix stays float so no folded int8 scale needs rewriting);
- `train`  a batch of cached features (weak, strong, labelled), teacher logits and one-hot labels
  (a zero row = no label) -> the losses; Adam steps the heads' variables in place;
- `infer`  pixels -> every exit's probabilities under the current head weights;
- `get_weights` / `set_weights`  the heads' weights, Adam's moments and step count as tensors.

Measured here (design note): gradients stay within builtins when ReLU has a custom gradient, heads
are dense layers, and the train signature has a static batch, so no broadcast in the losses needs
TF's BroadcastGradientArgs; the objective (terms, weights, teachers) is `ssl`'s, the one the
TensorFlow step uses. The converter is told to use
TFLITE_BUILTINS only, so a Flex op fails the conversion instead of the phone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import compat
from ee_cli.files import bundle
from ee_cli.adaptation import adapt, augment, ssl
from ee_cli.runtime import litert
from ee_cli.base.config import PersonaliseConfig
from ee_cli.base.errors import UserError
from ee_cli.graph.personal_model import GENERIC_OUTPUT, build_personal_model

FILE = "personalise.tflite"
TEACHER = "teacher"
ADAM = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}  # tf_keras' Adam defaults, as `ee personalise` uses


@dataclass(frozen=True)
class DenseStep:
    layer: str  # the Keras layer these weights are read from and written back to
    kernel: np.ndarray
    bias: np.ndarray
    relu: bool


@dataclass(frozen=True)
class TrainableHead:
    name: str
    steps: tuple[DenseStep, ...]

    @property
    def features(self) -> int:
        return int(self.steps[0].kernel.shape[0])


def trainable_heads(heads) -> list[TrainableHead]:
    """Each personal head's tail as dense steps (Flatten and linear Activations carry no weights)."""
    keras = compat.keras()
    found = []
    for head in heads:
        steps = []
        for layer in head.tail:
            if isinstance(layer, keras.layers.Dense) and layer.get_config()["activation"] in ("relu", "linear"):
                kernel, bias = layer.get_weights()
                steps.append(DenseStep(layer.name, kernel, bias, layer.get_config()["activation"] == "relu"))
            elif not isinstance(layer, (keras.layers.Flatten, keras.layers.Activation)) or (
                    isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] != "linear"):
                raise UserError(f"{head.name}: on-device training takes light heads (pool -> dense -> dense); "
                                f"its layer {layer.name} is not one: attach with --head light")
        found.append(TrainableHead(head.name, tuple(steps)))
    return found


def weight_names(heads: list[TrainableHead]) -> list[str]:
    return [f"{head.name}__{step.layer}__{part}" for head in heads for step in head.steps for part in ("kernel", "bias")]


def state_names(heads: list[TrainableHead]) -> list[str]:
    """Everything `get_weights` returns: weights, Adam's first and second moments, its step count."""
    weights = weight_names(heads)
    return [*weights, *(f"m__{n}" for n in weights), *(f"v__{n}" for n in weights), "step"]


@dataclass(frozen=True)
class Shapes:
    batch: int  # photos per train step (static: see the module note)
    labelled: int  # labelled photos per train step (1 when there are none: a zero label row)
    size: int
    classes: int


def build(personal_model, heads, personal: list[int], bn_layers: list[str], shapes: Shapes, objective: ssl.Objective, teacher_shift=None) -> bytes:
    """Convert the personal model's frozen float prefix and trainable heads into one .tflite file;
    `teacher_shift` (the class prior over `personal`) is added to the teacher's logits."""
    tf = compat.tf()
    signatures = _Signatures(personal_model, heads, personal, bn_layers, shapes, objective, teacher_shift)
    functions = signatures.functions()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function() for f in functions], signatures.module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    with compat.native_logs_silenced((1, 2)):
        return converter.convert()


def _relu(tf):
    @tf.custom_gradient
    def relu(x):
        # tf.nn.relu's gradient is ReluGrad, which TFLite has only as a Flex op; this mask is builtins.
        def gradient(upstream):
            return upstream * tf.cast(x > 0.0, tf.float32)

        return tf.maximum(x, 0.0), gradient

    return relu


def _signature(tf, function, name: str, specs: list):
    function.__name__ = name
    return tf.function(function, input_signature=specs, autograph=False)


class _Signatures:
    """The tf.functions of the artefact over one tf.Module that tracks every variable."""

    def __init__(self, personal_model, heads, personal: list[int], bn_layers: list[str], shapes: Shapes, objective: ssl.Objective, teacher_shift=None):
        tf, keras = compat.tf(), compat.keras()
        self.tf, self.shapes, self.objective = tf, shapes, objective
        self.heads = trainable_heads(heads)
        self.personal = tf.constant(personal, tf.int32)
        self.teacher_shift = tf.constant(np.zeros(len(personal)) if teacher_shift is None else teacher_shift, tf.float32)
        self.module = tf.Module()
        generic = personal_model.get_layer(GENERIC_OUTPUT).output
        self.module.prefix = keras.Model(personal_model.inputs, [h.cache_tensor for h in heads] + [generic])
        self.module.bn_layers = [personal_model.get_layer(name) for name in bn_layers]
        self.module.bn_probe = keras.Model(personal_model.inputs, [layer.input for layer in self.module.bn_layers]) if bn_layers else None
        arrays = [array for head in self.heads for step in head.steps for array in (step.kernel, step.bias)]
        self.module.weights_ = [tf.Variable(a, name=n) for a, n in zip(arrays, weight_names(self.heads))]
        self.module.first = [tf.Variable(np.zeros_like(a)) for a in arrays]
        self.module.second = [tf.Variable(np.zeros_like(a)) for a in arrays]
        self.module.step = tf.Variable(0.0)
        self.relu = _relu(tf)

    def functions(self) -> list:
        found = [self.features(), self.train(), self.infer(), self.get_weights(), self.set_weights()]
        if self.module.bn_layers:
            found += [self.bn_stats(), self.set_bn_statistics()]
        return found

    def _pixels(self):
        return self.tf.TensorSpec((None, self.shapes.size, self.shapes.size, 3), self.tf.float32, name="pixels")

    def _prefix(self, images) -> list:
        """Each head's flattened features, then the teacher's logits over the personal classes."""
        tf = self.tf
        outputs = self.module.prefix(images, training=False)
        flat = [tf.reshape(x, [-1, head.features]) for x, head in zip(outputs[:-1], self.heads)]
        return [*flat, tf.gather(outputs[-1], self.personal, axis=1) + self.teacher_shift]

    def _logits(self, weights: list, index: int, features, trainable: bool = False):
        """Head `index` on its features, with `weights` (every head's tensors, in variable order)."""
        tf, x = self.tf, features
        values = iter(weights[2 * sum(len(h.steps) for h in self.heads[:index]):])
        for step in self.heads[index].steps:
            kernel, bias = next(values), next(values)
            x = tf.matmul(x, kernel) + bias
            if step.relu:
                x = self.relu(x) if trainable else tf.nn.relu(x)
        return x

    def _read(self) -> list:
        # Each READ_VARIABLE copies its tensor in LiteRT: read every weight once per call.
        return [variable.read_value() for variable in self.module.weights_]

    def features(self):
        tf = self.tf
        views = [tf.TensorSpec((None, len(augment.VIEW_COLUMNS)), tf.float32, name=name) for name in ("weak_view", "strong_view")]

        def features(pixels, weak_view, strong_view):
            weak = self._prefix(augment.weak_from_table(pixels, weak_view))
            strong = self._prefix(augment.strong_from_table(pixels, strong_view))
            named = {f"{h.name}_weak": x for h, x in zip(self.heads, weak)} | {f"{h.name}_strong": x for h, x in zip(self.heads, strong)}
            return named | {TEACHER: weak[-1]}

        return _signature(tf, features, "features", [self._pixels(), *views])

    def infer(self):
        tf = self.tf

        def infer(pixels):
            found, weights = self._prefix(pixels), self._read()
            return {h.name: tf.nn.softmax(self._logits(weights, i, x)) for i, (h, x) in enumerate(zip(self.heads, found))}

        return _signature(tf, infer, "infer", [self._pixels()])

    def _train_specs(self) -> list:
        tf, b, l = self.tf, self.shapes.batch, self.shapes.labelled
        specs = []
        for head in self.heads:
            specs += [tf.TensorSpec((b, head.features), tf.float32, name=f"{head.name}_{kind}") for kind in ("weak", "strong")]
            specs.append(tf.TensorSpec((l, head.features), tf.float32, name=f"{head.name}_labelled"))
        return specs + [tf.TensorSpec((b, self.shapes.classes), tf.float32, name=TEACHER),
                        tf.TensorSpec((l, self.shapes.classes), tf.float32, name="labels")]

    def train(self):
        tf = self.tf
        names = [spec.name for spec in self._train_specs()]

        def train(*tensors):
            batch, weights = dict(zip(names, tensors)), self._read()
            with tf.GradientTape() as tape:
                tape.watch(weights)
                total, report = self._losses(batch, weights)
            self._adam(weights, tape.gradient(total, weights))
            return report | {"loss": total}

        return _signature(tf, train, "train", self._train_specs())

    def _losses(self, batch: dict, weights: list):
        last = len(self.heads) - 1

        def final_weak():
            return self._logits(weights, last, batch[f"{self.heads[last].name}_weak"])

        teachers = ssl.teachers(batch[TEACHER], final_weak, len(self.heads), self.objective)
        report, total = {}, 0.0
        for index, head in enumerate(self.heads):
            logits = {kind: self._logits(weights, index, batch[f"{head.name}_{kind}"], trainable=True) for kind in ("weak", "strong", "labelled")}
            # Labels are one-hot rows, a zero row where a slot holds no labelled photo: the static batch's mask.
            supervised = ssl.one_hot_cross_entropy(logits["labelled"], batch["labels"])
            terms, mask_rate = ssl.head_terms(logits["weak"], logits["strong"], teachers[index], self.objective, supervised)
            total += ssl.weighted_sum(terms, self.objective)
            report |= {f"{head.name}__{term}": value for term, value in terms.items()} | {f"{head.name}__mask_rate": mask_rate}
        return total, report

    def _adam(self, weights: list, gradients: list) -> None:
        """tf_keras' Adam update (adam.py, dense gradients), so both engines take the same steps."""
        tf, rate = self.tf, self.objective.learning_rate
        beta_1, beta_2, epsilon = ADAM["beta_1"], ADAM["beta_2"], ADAM["epsilon"]
        step = self.module.step.read_value() + 1.0
        self.module.step.assign(step)
        alpha = rate * tf.sqrt(1.0 - tf.pow(beta_2, step)) / (1.0 - tf.pow(beta_1, step))
        state = zip(self.module.weights_, weights, gradients, self.module.first, self.module.second)
        for variable, value, gradient, first, second in state:
            first_value, second_value = first.read_value(), second.read_value()
            first_value = first_value + (gradient - first_value) * (1.0 - beta_1)
            second_value = second_value + (tf.square(gradient) - second_value) * (1.0 - beta_2)
            first.assign(first_value)
            second.assign(second_value)
            variable.assign(value - (first_value * alpha) / (tf.sqrt(second_value) + epsilon))

    def _state(self) -> list:
        return [*self.module.weights_, *self.module.first, *self.module.second, self.module.step]

    def get_weights(self):
        tf = self.tf
        names = state_names(self.heads)

        def get_weights():
            return {name: tf.identity(variable) for name, variable in zip(names, self._state())}

        return _signature(tf, get_weights, "get_weights", [])

    def set_weights(self):
        tf = self.tf
        specs = [tf.TensorSpec(v.shape, tf.float32, name=n) for n, v in zip(state_names(self.heads), self._state())]

        def set_weights(*tensors):
            for variable, value in zip(self._state(), tensors):
                variable.assign(value)
            return {"step": tf.identity(self.module.step)}

        return _signature(tf, set_weights, "set_weights", specs)

    def bn_stats(self):
        tf = self.tf

        def bn_stats(pixels):
            found = self.module.bn_probe(pixels, training=False)
            found = found if isinstance(found, (list, tuple)) else [found]
            report = {}
            for index, values in enumerate(found):
                flat = tf.reshape(values, [-1, int(values.shape[-1])])
                report |= {f"bn_{index}_sum": tf.reduce_sum(flat, axis=0), f"bn_{index}_square_sum": tf.reduce_sum(tf.square(flat), axis=0),
                           f"bn_{index}_count": tf.cast(tf.shape(flat)[0], tf.float32)}
            return report

        return _signature(tf, bn_stats, "bn_stats", [self._pixels()])

    def set_bn_statistics(self):
        tf = self.tf
        specs = [tf.TensorSpec(layer.moving_mean.shape, tf.float32, name=f"bn_{i}_{kind}")
                 for i, layer in enumerate(self.module.bn_layers) for kind in ("mean", "variance")]

        def set_bn_statistics(*tensors):
            for index, layer in enumerate(self.module.bn_layers):
                layer.moving_mean.assign(tensors[2 * index])
                layer.moving_variance.assign(tensors[2 * index + 1])
            return {"layers": tf.constant(float(len(self.module.bn_layers)))}

        return _signature(tf, set_bn_statistics, "set_bn_statistics", specs)


MEANINGS = {
    "features": "pixels (RGB 0..255, any batch) + weak_view and strong_view (one row per photo: augment.VIEW_COLUMNS, "
                "offsets in pixels) -> <head>_weak / <head>_strong (pooled graft-point features, flattened) and teacher "
                "(the generic classifier's logits on the weak view, personal classes only): what the app caches",
    "bn_stats": "pixels -> bn_<k>_sum, bn_<k>_square_sum, bn_<k>_count per adapted BatchNorm layer (its input, under the "
                "statistics the file holds now): accumulate over the photo stream, then mean = sum/count, "
                "variance = square_sum/count - mean^2; repeat once per layer for exact statistics",
    "set_bn_statistics": "bn_<k>_mean, bn_<k>_variance -> stored in the file's float prefix (features and infer use them)",
    "train": "a batch of cached features (<head>_weak, <head>_strong, <head>_labelled), teacher logits and one-hot labels "
             "(a zero row: no label) -> loss and each head's terms and mask rate; one Adam step on the heads, in place",
    "infer": "pixels -> every exit's probabilities (personal classes) under the current head weights",
    "get_weights": "-> every head weight, Adam's first (m__) and second (v__) moments and step: what the app saves",
    "set_weights": "the tensors get_weights returned -> restored (the answer is the step count)",
}


def write_trainable(model, meta: dict[str, Any], folder) -> dict[str, Any]:
    """`ee export --trainable`: personalise.tflite beside the inference files; returns its manifest entry."""
    classes = meta["classes"]
    output = bundle.output_classes(meta)
    personal = [classes.index(name) for name in output]
    settings = _personalise_settings(meta)
    personal_model, heads = build_personal_model(model, output, classes, personal)
    layers = adapt.backbone_batchnorms(personal_model)
    adapted = (meta.get("adapted_bn") or {}).get("layers") or [layer.name for layer in layers[: adapt.resolve_adapt_count("auto", len(layers))]]
    shapes = Shapes(settings.batch, settings.batch, bundle.input_size(meta), len(personal))
    path = Path(folder) / FILE
    prior = meta.get("class_prior")  # the teacher the bundle's heads were trained against
    shift = prior["logit_shift"] if prior and prior["classes"] == list(output) else None
    path.write_bytes(build(personal_model, heads, personal, adapted, shapes, ssl.Objective.of(settings), shift))
    return {"file": FILE, "bytes": path.stat().st_size, "classes": list(output), "batch": shapes.batch,
            "losses": vars(ssl.Objective.of(settings)), "adapted_bn_layers": adapted, "ops": sorted(operator_names(path.read_bytes())),
            "signatures": describe(path)}


def _personalise_settings(meta):
    """The settings of the `ee personalise` that made the bundle, else its defaults."""
    made = [step["config"] for step in meta.get("provenance", []) if step.get("command") == "personalise"]
    wanted = {*ssl.Objective.__dataclass_fields__, "batch"}
    renamed = {"threshold": "pseudo_label_confidence"}  # bundles made before the option's rename
    given = {renamed.get(key, key): value for key, value in (made[-1] if made else {}).items()}
    return PersonaliseConfig(**{key: value for key, value in given.items() if key in wanted})


def describe(path) -> dict[str, Any]:
    """Every signature's tensors as an app developer needs them (-1: any batch size)."""
    loaded = litert.interpreter(path, 1)
    found = {}
    for key in loaded.get_signature_list():
        runner = loaded.get_signature_runner(key)
        tensors = {side: {name: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d.get("shape_signature", d["shape"])]}
                          for name, d in sorted(details.items())}
                   for side, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details()))}
        found[key] = {"meaning": MEANINGS.get(key, "")} | tensors
    return found


def operator_names(data: bytes) -> set[str]:
    """Every operator code the flatbuffer holds (all subgraphs); a Flex op shows as `Flex...`."""
    schema = compat.litert_schema()
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAs(data, 0)
    found = set()
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        found.add(code.CustomCode().decode() if code.CustomCode() else names.get(builtin, str(builtin)))
    return found
