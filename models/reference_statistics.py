"""Re-express a network's BatchNorm layers in the statistics of its training photos, function unchanged.

    python -m models.reference_statistics --model ~/.cache/ee/models/cifar_lite1.h5 [--photos 1024] [--seed 0]

A fine-tuned pretrained network (EfficientNet-Lite1 for CIFAR-10, models/train_lite.py) keeps its
ImageNet BatchNorm statistics: its training photos reach each BN layer with other moments than the
layer normalises by. `ee personalise --adapt-bn` replaces a layer's statistics with the person's
photos' — on such a network that moves every photo, clean or not, from ImageNet's moments to the
person's, a shift the fine-tuned layers never saw. Re-expressed, each layer normalises by its
training photos' moments (m, v) and its scale and offset absorb the difference:

    gamma' = gamma * sqrt(v + eps) / sqrt(var + eps)
    beta'  = beta + gamma * (m - mean) / sqrt(var + eps)

so the network computes the same function on every input, and adapting a layer to the person's
photos now moves them from the training photos' moments to the person's: only their shift.

The moments are those of each BN layer's input in the unchanged network, one pass over the photos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from datasets import cifar10
from ee_cli.base import atomic, compat, photos
from ee_cli.adaptation import adapt


def reexpress(model, images: np.ndarray, batch: int = 16) -> dict:
    """Re-express in place, in the moments of `images` (uint8, any size: resized as ee's photo loader
    does), every BatchNorm layer `ee personalise --adapt-bn` may adapt (adapt.backbone_batchnorms:
    all of a generic model's); returns the layers changed and the photos used."""
    keras = compat.keras()
    layers = adapt.backbone_batchnorms(model)
    for layer in layers:
        if not (layer.scale and layer.center):
            raise ValueError(f"{layer.name} has no scale or offset to absorb its statistics")
    size = int(model.input_shape[1])
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    starts = range(0, len(images), batch)
    moments = adapt.input_statistics(probe, lambda: (photos.resized(images[i:i + batch], size).astype(np.float32) for i in starts))
    for layer, (mean, variance) in zip(layers, moments):
        gamma, beta, moving_mean, moving_variance = (np.asarray(w, np.float64) for w in layer.get_weights())
        old_scale = np.sqrt(moving_variance + layer.epsilon)
        layer.set_weights([
            (gamma * np.sqrt(variance + layer.epsilon) / old_scale).astype(np.float32),
            (beta + gamma * (mean - moving_mean) / old_scale).astype(np.float32),
            mean.astype(np.float32),
            variance.astype(np.float32),
        ])
    return {"layers": len(layers), "photos": int(len(images))}


def reexpress_checked(model, images: np.ndarray, check_images: np.ndarray, batch: int = 16) -> dict:
    """`reexpress`, then the logits on `check_images` compared with before; a difference above 1e-3
    of the largest logit is a bug, not a result."""
    check = photos.resized(check_images, int(model.input_shape[1])).astype(np.float32)
    before = model.predict_on_batch(check)
    report = reexpress(model, images, batch)
    after = model.predict_on_batch(check)
    diff, scale = float(np.abs(after - before).max()), float(np.abs(before).max())
    if diff > 1e-3 * max(scale, 1e-6):
        raise RuntimeError(f"re-expressing the BatchNorm layers changed the logits by {diff:.3g} (largest |logit| {scale:.3g})")
    return report | {"max_abs_logit_diff": diff, "max_abs_logit": scale, "check_photos": int(len(check_images)),
                     "same_top_class": float(np.mean(after.argmax(1) == before.argmax(1)))}


def drawn(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    return images[np.sort(np.random.default_rng([seed, 11]).permutation(len(images))[:count])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.reference_statistics", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved tf_keras .h5 classifier (rewritten in place, atomically)")
    parser.add_argument("--photos", type=int, default=1024, help="CIFAR-10 training photos whose moments each layer takes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras = compat.keras()
    model = keras.models.load_model(args.model, compile=False)
    data = cifar10.load()
    started = time.perf_counter()
    report = reexpress_checked(model, drawn(data["x_train"], args.photos, args.seed), data["x_test"][:32])
    report |= {"seconds": round(time.perf_counter() - started, 1), "seed": args.seed}
    with atomic.replacing(args.model) as partial:
        model.save(partial, include_optimizer=False)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
