"""Whole passes of a folder's photos through a model without gradients, for the hold-out scores,
`ee evaluate` and the benchmark: decoded and batched by tf.data (`photos.dataset`), through one
traced graph (eager dispatch cost as much as the convolutions at 224 px), a batch at a time, so only
the outputs asked for are kept. The passes of BatchNorm adaptation and of the class mix at each depth
are stepping.py's (they resume from stepping stones inside the network); the feature cache's passes
over augmented views are cache.py's."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ee_cli.base import compat, photos


def outputs_of(model, names: list[str], paths, size: int) -> list[np.ndarray]:
    """The named layers' outputs (logits for ee's outputs) for every photo, in order."""
    return output_reader(model, names)(photos.dataset(paths, size, photos.inference_batch(size, model.count_params())))


def output_reader(model, names: list[str]) -> Callable[[Iterable], list[np.ndarray]]:
    """A function from uint8 image batches to the named layers' outputs, traced once: reused across
    passes, it reads the model's variables as they are then (BatchNorm statistics being adapted)."""
    tf, keras = compat.tf(), compat.keras()
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in names])
    run = tf.function(lambda images: probe(tf.cast(images, tf.float32), training=False), reduce_retracing=True, autograph=False)

    def read(batches: Iterable) -> list[np.ndarray]:
        collected: list[list[np.ndarray]] = [[] for _ in names]
        for images in batches:
            results = run(images)
            for store, values in zip(collected, results if isinstance(results, (list, tuple)) else [results]):
                store.append(values.numpy())
        return [np.concatenate(store) if store else np.zeros((0, *probe.outputs[i].shape[1:]), np.float32) for i, store in enumerate(collected)]

    return read
