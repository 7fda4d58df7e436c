"""Quantisation-aware training of the exit heads with tensorflow-model-optimization, before an int8
export. Only the heads are annotated (tfmot cannot quantise the preprocessing inside a bundle, and
the backbone is frozen anyway); each head's output Activation stays unannotated so outputs keep
their names. The QAT heads learn to match the float model's probabilities on the person's photos.
"""

from __future__ import annotations

import numpy as np

from ee_cli.base import compat
from ee_cli.graph import heads
from ee_cli.files import bundle
from ee_cli.adaptation import augment

QUANTISABLE = ("Conv2D", "Dense", "BatchNormalization", "ReLU", "GlobalAveragePooling2D")
BATCH = 32
LEARNING_RATE = 1e-4


def quantisation_aware_heads(model, meta, images: np.ndarray, steps: int = 200, seed: int = 0):
    """A copy of `model` whose heads carry fake-quantisation, trained for `steps` steps."""
    tf, keras, tfmot = compat.tf(), compat.keras(), compat.tfmot()
    quantization = tfmot.quantization.keras
    names = bundle.head_outputs(meta)

    def annotate(layer):
        in_head = any(heads.is_head_layer(layer.name, name) for name in names) and layer.name not in names
        if in_head and type(layer).__name__ in QUANTISABLE:
            return quantization.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))
        return layer.__class__.from_config(layer.get_config())

    compat.seed_everything(seed)
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with quantization.quantize_scope():
        student = quantization.quantize_apply(annotated)
    outputs = [name for name in names if name in student.output_names]
    teacher = keras.Model(model.inputs, [model.get_layer(name).output for name in outputs])
    trainable = [v for v in student.trainable_variables if any(name in v.name for name in names)]
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    index = [student.output_names.index(name) for name in outputs]

    @tf.function(autograph=False)
    def step(pixels):
        targets = [tf.nn.softmax(t) for t in teacher(pixels, training=False)]
        with tf.GradientTape() as tape:
            predicted = student(pixels, training=True)
            loss = tf.add_n([
                tf.reduce_mean(keras.losses.kl_divergence(target, tf.nn.softmax(predicted[i])))
                for i, target in zip(index, targets)
            ])
        optimizer.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
        return loss

    rng = np.random.default_rng([seed, 31])
    for number in range(steps):
        take = rng.integers(len(images), size=min(BATCH, len(images)))
        step(augment.weak(images[take], seed, 1000 + number, take))
    return student
