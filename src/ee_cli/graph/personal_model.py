"""The personalised multi-exit model: heads over the person's classes, and a personalised final exit.

Outputs: `exit_0 … exit_{k-1}` and `final` (logits over the personal classes) and `generic` (the
frozen generic classifier over every class: the teacher, and the baseline). Each head is a chain of
layers; training runs the chain's tail from a cache point (pooled features for pool-first heads),
so the frozen backbone runs once per photo and view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ee_cli.base import compat
from ee_cli.graph import heads
from ee_cli.graph.graft import FINAL_OUTPUT

GENERIC_OUTPUT = "generic"


@dataclass
class PersonalHead:
    name: str
    cache_tensor: object  # where the feature cache stops
    tail: list  # layers applied in order to the cached features

    def apply(self, tensor, training: bool | None = None):
        for layer in self.tail:
            tensor = layer(tensor, training=training) if training is not None else layer(tensor)
        return tensor

    def tail_model(self):
        keras = compat.keras()
        features = keras.Input(tuple(self.cache_tensor.shape[1:]), name=f"{self.name}_cached")
        return keras.Model(features, self.apply(features), name=f"{self.name}_tail")


def exit_names_of(model) -> list[str]:
    return [name for name in model.output_names if name.startswith("exit_")]


def _output_layer(model, name: str):
    return model.get_layer(name)


def _inbound_layer(layer):
    inbound = layer._inbound_nodes[0].inbound_layers
    return inbound[0] if isinstance(inbound, list) else inbound


def generic_output(model) -> str:
    """The output holding the generic classifier's logits: `generic` in a personalised model, else `final`."""
    return GENERIC_OUTPUT if GENERIC_OUTPUT in model.output_names else FINAL_OUTPUT


def generic_classifier(model):
    """The backbone's classifier (a Dense), behind the generic output."""
    return _inbound_layer(_output_layer(model, generic_output(model)))


def build_personal_model(model, output_classes: list[str], class_names: list[str], personal: list[int], logit_shift=None):
    """Return (personal model, heads in output order: exits then final).

    `output_classes` are the classes the source model's exits predict (all classes for an attached
    bundle, the earlier personal classes for a personalised one); `personal` indexes `class_names`.
    New logits layers copy the columns of classes the old ones knew; the final exit starts as the
    generic classifier restricted to the personal classes, its logits shifted by `logit_shift` (the
    class prior over `personal`) where one is given.
    """
    keras = compat.keras()
    classifier = generic_classifier(model)
    teacher_kernel, teacher_bias = classifier.get_weights()
    wanted = [class_names[i] for i in personal]
    built: list[PersonalHead] = []
    for name in exit_names_of(model):
        chain = [layer for layer in model.layers if heads.is_head_layer(layer.name, name)]
        body, old_logits = chain[:-2], chain[-2]
        if type(body[0]).__name__ in ("GlobalAveragePooling2D", "AveragePooling2D"):
            cache_tensor, tail = body[0].output, body[1:]
        else:
            cache_tensor, tail = body[0].input, body
        logits = keras.layers.Dense(len(personal), name=f"{name}_logits")
        logits.build(old_logits.input_shape)
        _copy_columns(old_logits, logits, output_classes, wanted)
        built.append(PersonalHead(name, cache_tensor, [*tail, logits, keras.layers.Activation("linear", name=name)]))
    final_logits = keras.layers.Dense(len(personal), name=f"{FINAL_OUTPUT}_logits")
    final_logits.build(classifier.input_shape)
    shift = np.zeros(len(personal), np.float32) if logit_shift is None else np.asarray(logit_shift, np.float32)
    final_logits.set_weights([teacher_kernel[:, personal], teacher_bias[personal] + shift])
    old_final = _find(model, f"{FINAL_OUTPUT}_logits")
    if old_final is not None:  # continuing from a personalised bundle
        _copy_columns(old_final, final_logits, output_classes, wanted)
    built.append(PersonalHead(FINAL_OUTPUT, classifier.input, [final_logits, keras.layers.Activation("linear", name=FINAL_OUTPUT)]))
    generic = keras.layers.Activation("linear", name=GENERIC_OUTPUT)(classifier.output)
    outputs = [head.apply(head.cache_tensor) for head in built] + [generic]
    personal_model = keras.Model(model.inputs, outputs, name=model.name)
    for layer in personal_model.layers:
        layer.trainable = any(heads.is_head_layer(layer.name, head.name) for head in built)
    return personal_model, built


def _find(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def _copy_columns(source, target, source_classes: list[str], target_classes: list[str]) -> None:
    kernel, bias = (np.array(w) for w in target.get_weights())
    old_kernel, old_bias = source.get_weights()
    known = {c: i for i, c in enumerate(source_classes)}
    for column, class_name in enumerate(target_classes):
        if class_name in known:
            kernel[:, column], bias[column] = old_kernel[:, known[class_name]], old_bias[known[class_name]]
    target.set_weights([kernel, bias])
