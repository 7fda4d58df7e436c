"""EfficientNet-Lite1's last stage fine-tuned for CIFAR-10, on feature maps computed once.

A linear probe on the frozen pooled features gave 80.96 % (bench/results/cifar-lite1-2026-12-01.json).
Here the backbone runs once per photo up to block6e's output (8x8x192 at 240 px, stored as
float16); everything after it — the last MBConv block (block7a), the 1x1 top convolution and the
classifier — then trains on those maps, their BatchNorm statistics kept as ImageNet left them (the
generic model ee later adapts), with random horizontal flips of the maps, from the linear probe's
head, keeping the epoch with the best accuracy on the validation slice. (The probe's refit saw the
validation photos, so its own validation score is recorded but not competed with.)
"""

from __future__ import annotations

import numpy as np

from ee_cli.base import compat
from models import efficientnet_lite as lite

TAIL_INPUT = "block6e_add"
TAIL = ("block7a_expand_conv", "block7a_expand_bn", "block7a_expand_relu", "block7a_dwconv", "block7a_bn", "block7a_relu",
        "block7a_project_conv", "block7a_project_bn", "top_conv", "top_bn", "top_relu", lite.FEATURE_LAYER, lite.CLASSIFIER_LAYER)


def maps_model(model):
    """Pixels -> block6e's output, sharing the model's layers."""
    return compat.keras().Model(model.input, model.get_layer(TAIL_INPUT).output, name=f"{model.name}_maps")


def tail_model(model, upto: str = lite.CLASSIFIER_LAYER):
    """block6e's output -> `upto`, through the model's own layers (training it trains them)."""
    keras = compat.keras()
    maps = keras.Input(model.get_layer(TAIL_INPUT).output.shape[1:], name="maps")
    x = maps
    for name in TAIL[: TAIL.index(upto) + 1]:
        x = model.get_layer(name)(x)
    return keras.Model(maps, x, name=f"{model.name}_tail")


def run_tail(tail, maps: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([tail.predict_on_batch(maps[i : i + batch].astype(np.float32)) for i in range(0, len(maps), batch)])


def tune_tail(model, maps: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray, val_rows: np.ndarray, recipe) -> dict:
    """Train the tail in place (BatchNorm frozen); keep the best validation epoch. Returns what was chosen."""
    keras = compat.keras()
    tail = tail_model(model)
    for layer in tail.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    tail.compile(keras.optimizers.Adam(recipe.tune_learning_rate), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng([recipe.seed, 5])
    scores = [_accuracy(tail, maps[val_rows], labels[val_rows])]  # epoch 0: the linear probe
    best = (-1.0, 0, None)
    for epoch in range(1, recipe.tune_epochs + 1):
        order = rng.permutation(fit_rows)
        for start in range(0, len(order), recipe.tune_batch):
            rows = order[start : start + recipe.tune_batch]
            batch = maps[rows].astype(np.float32)
            flip = rng.random(len(rows)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            tail.train_on_batch(batch, labels[rows])
        scores.append(_accuracy(tail, maps[val_rows], labels[val_rows]))
        print(f"  tail epoch {epoch}: validation accuracy {scores[-1]:.4f}", flush=True)
        if scores[-1] > best[0]:
            best = (scores[-1], epoch, tail.get_weights())
        elif epoch - best[1] >= 2:  # two epochs without a better one
            break
    tail.set_weights(best[2])
    return {"epochs": best[1], "val_accuracy_by_epoch": [round(float(s), 4) for s in scores], "learning_rate": recipe.tune_learning_rate,
            "batch": recipe.tune_batch, "trained": [name for name in TAIL if not name.endswith(("_bn", "_relu", lite.FEATURE_LAYER))]}


def _accuracy(tail, maps: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(run_tail(tail, maps).argmax(1) == labels))
