"""The paper's expensive baseline: FixMatch fine-tuning of the whole network (every layer trains,
BatchNorm in training mode) over the same photos, epochs and personal classes as `ee personalise`.
"""

from __future__ import annotations

import time

import numpy as np

from ee_cli import augment, compat, ssl


def finetune_whole_network(model_path: str, unlabelled: np.ndarray, labelled: np.ndarray, labels: np.ndarray, personal: list[int],
                           epochs: int, batch: int = 64, learning_rate: float = 1e-4, threshold: float = 0.9, seed: int = 0):
    """Return (model restricted to the personal classes, wall seconds). `labels` index `personal`."""
    tf = compat.tf()
    keras = compat.keras()
    compat.seed_everything(seed)
    generic = keras.models.load_model(model_path, compile=False)
    for layer in generic.layers:
        layer.trainable = True
    index = tf.constant(personal, tf.int32)
    optimizer = keras.optimizers.Adam(learning_rate)

    @tf.function
    def step(weak, strong, labelled_images, labelled_y, use_labels):
        with tf.GradientTape() as tape:
            weak_logits = tf.gather(generic(weak, training=True), index, axis=1)
            strong_logits = tf.gather(generic(strong, training=True), index, axis=1)
            loss, _ = ssl.fixmatch_loss(weak_logits, strong_logits, threshold)
            if use_labels:
                loss += ssl.cross_entropy(tf.gather(generic(labelled_images, training=True), index, axis=1), labelled_y)
        variables = generic.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    started = time.perf_counter()
    steps = max(1, len(unlabelled) // batch)
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(unlabelled))
        for number in range(steps):
            take = order[number * batch : (number + 1) * batch]
            images = unlabelled[take].astype(np.float32)
            weak = augment.weak(images, seed, 2 * epoch, take)
            strong = augment.strong(images, seed, 2 * epoch + 1, take)
            if len(labelled):
                pick = rng.integers(len(labelled), size=min(batch, len(labelled)))
                step(weak, strong, labelled[pick].astype(np.float32), labels[pick].astype(np.int32), True)
            else:
                step(weak, strong, weak[:1], np.zeros(1, np.int32), False)
    return generic, time.perf_counter() - started
