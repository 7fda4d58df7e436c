"""Pretrain the benchmark's generic model: ee's half-width ResNet-9 on all 10 CIFAR-10 classes.

    python -m models.train_cifar [--epochs 12] [--seed 0] [--out ~/.cache/ee/models/cifar_resnet9.h5]

Seeded and resumable (a killed run continues from its last finished epoch); AdamW with a one-cycle learning rate (peak 3e-3; SGD at this budget diverged in its first
epoch), flip + pad-crop augmentation.
Writes the full model (.h5, usable as `ee attach --backbone PATH`) and a JSON of its test accuracy
and training time beside it. Not committed: the file is cached outside the repository.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from datasets import cifar10
from ee_cli.base import atomic, compat
from ee_cli.graph import backbones

DEFAULT_OUT = cifar10.cache_dir() / "models" / "cifar_resnet9.h5"


def one_cycle(peak: float, warmup_steps: int, total_steps: int):
    tf = compat.tf()
    keras = compat.keras()

    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            up = peak * step / warmup_steps
            down = peak * tf.maximum(0.0, (total_steps - step) / (total_steps - warmup_steps))
            return tf.where(step < warmup_steps, up, down)

        def get_config(self):
            return {}

    return OneCycle()


def augment(images, labels):
    tf = compat.tf()
    images = tf.image.random_flip_left_right(images)
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.random_crop(padded, tf.shape(images)), labels


def train(epochs: int, batch: int, seed: int, out: Path, data: dict | None = None, width: int = 32, description: str = "") -> dict:
    """Train ee's ResNet-9 on `data` (default CIFAR-10), save it to `out`, report its test accuracy."""
    tf = compat.tf()
    keras = compat.keras()
    compat.seed_everything(seed)
    data = data if data is not None else cifar10.load()
    x_train, y_train = data["x_train"].astype("float32"), data["y_train"]
    model = backbones.cifar_resnet9(32, 10, width=width)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    steps = epochs * (len(x_train) // batch)
    optimizer = keras.optimizers.AdamW(one_cycle(3e-3, steps // 5, steps), weight_decay=5e-4)
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed)
        .batch(batch, drop_remainder=True)
        .map(augment, num_parallel_calls=2)
        .prefetch(2)
    )
    started = time.perf_counter()
    # A killed run (a session's end, kill -9) continues from its last finished epoch next time.
    resume = keras.callbacks.BackupAndRestore(str(out.with_suffix(".backup")), save_freq="epoch", delete_checkpoint=True)
    model.fit(dataset, epochs=epochs, verbose=2, callbacks=[resume])
    seconds = time.perf_counter() - started
    logits = model.predict(data["x_test"].astype("float32"), batch_size=500, verbose=0)
    accuracy = float(np.mean(logits.argmax(1) == data["y_test"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out) as partial:
        model.save(partial, include_optimizer=False)
    report = {
        "model": str(out),
        "architecture": description or "cifar_resnet9 (half width: 32-64-128-256), 95.26 MMACs at 32x32",
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 1),
        "epochs": epochs,
        "batch": batch,
        "seed": seed,
        "threads": compat.thread_count(),
        "versions": compat.versions(),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    print(json.dumps(train(args.epochs, args.batch, args.seed, args.out), indent=2))


if __name__ == "__main__":
    main()
