"""The paper's expensive baseline: FixMatch fine-tuning of the whole network (every layer trains,
BatchNorm in training mode) over the same personal classes and epochs as `ee personalise`.

Like for like with `ee personalise` (the benchmark's default): the same photos it trained its heads
on (its run folder's split.json, the hold-out left out for both) and the same views, drawn the same
way: `views` weak/strong pairs per photo, the very pairs its feature cache holds (augment.view_table
on the photo's index and seed), the whole network taking pair `epoch % views` each epoch. With
`views=None` every epoch draws fresh views instead (the first benchmark's way).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ee_cli.base import compat
from ee_cli.adaptation import augment, ssl
from ee_cli.base.photos import resized

LEARNING_RATES = (3e-5, 1e-4, 3e-4)  # the three tried on dev users (bench/whole_network_lr.py)


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch: int = 64
    learning_rate: float = 1e-4
    threshold: float = 0.9
    seed: int = 0
    views: int | None = None  # pairs per photo as ee's cache holds them; None: fresh views every epoch


@dataclass(frozen=True)
class Photos:
    unlabelled: np.ndarray  # uint8 (N, H, W, 3), brought to the model's input size batch by batch
    ids: np.ndarray  # each unlabelled photo's index in the user's folder: what its views are drawn from
    labelled: np.ndarray
    labels: np.ndarray  # index into `personal`


def weak_view(epoch: int, views: int | None) -> int:
    """The view index (augment.view_table's) of an epoch's weak views; the strong ones are the next."""
    return 2 * epoch if views is None else 2 * (epoch % views)


def finetune_whole_network(model_path: str, photos: Photos, personal: list[int], recipe: Recipe):
    """Return (model restricted to the personal classes, wall seconds, wall seconds per epoch)."""
    tf = compat.tf()
    keras = compat.keras()
    compat.seed_everything(recipe.seed)
    generic = keras.models.load_model(model_path, compile=False)
    for layer in generic.layers:
        layer.trainable = True
    index = tf.constant(personal, tf.int32)
    optimizer = keras.optimizers.Adam(recipe.learning_rate)

    @tf.function
    def step(weak, strong, labelled_images, labelled_y, use_labels):
        with tf.GradientTape() as tape:
            weak_logits = tf.gather(generic(weak, training=True), index, axis=1)
            strong_logits = tf.gather(generic(strong, training=True), index, axis=1)
            loss, _ = ssl.fixmatch_loss(weak_logits, strong_logits, recipe.threshold)
            if use_labels:
                loss += ssl.cross_entropy(tf.gather(generic(labelled_images, training=True), index, axis=1), labelled_y)
        variables = generic.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    started = time.perf_counter()
    unlabelled, labelled, seed, size = photos.unlabelled, photos.labelled, recipe.seed, int(generic.input_shape[1])
    steps = max(1, len(unlabelled) // recipe.batch)
    ended: list[float] = []
    for epoch in range(recipe.epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(unlabelled))
        view = weak_view(epoch, recipe.views)
        for number in range(steps):
            take = order[number * recipe.batch : (number + 1) * recipe.batch]
            images, ids = resized(unlabelled[take], size).astype(np.float32), photos.ids[take]
            weak, strong = augment.weak(images, seed, view, ids), augment.strong(images, seed, view + 1, ids)
            if len(labelled):
                pick = rng.integers(len(labelled), size=min(recipe.batch, len(labelled)))
                step(weak, strong, resized(labelled[pick], size).astype(np.float32), photos.labels[pick].astype(np.int32), True)
            else:
                step(weak, strong, weak[:1], np.zeros(1, np.int32), False)
        ended.append(time.perf_counter() - started)
    return generic, ended[-1] if ended else 0.0, list(np.diff([0.0, *ended]))
