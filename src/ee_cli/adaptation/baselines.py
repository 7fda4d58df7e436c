"""The label-free adaptation methods researchers compare personalisation against, one small unit
each behind one interface (`ee personalise --method NAME`), so the same command runs each and
`ee evaluate` / `ee export` read the result unchanged:

- `source`: the generic model as it is;
- `bn`: the statistics of every BatchNorm layer re-estimated on the person's photos (exactly, wave by
  wave, as `--adapt-bn N` does for the first N);
- `tent` (Wang et al., ICLR 2021): one epoch of entropy minimisation over the BatchNorm scales and
  offsets, BatchNorm on batch statistics, Adam 1e-3; the bundle then holds every layer's statistics
  re-estimated under the new scales and offsets (TENT's online model uses each batch's own
  statistics; a written model needs fixed ones, and the person's are the closest fixed ones);
- `eata`: TENT on reliable, non-redundant photos with entropy weights (Niu et al., ICML 2022),
  without its Fisher anti-forgetting term, which needs the source training photos (the paper's ETA);
- `lame` (Boudiaf et al., CVPR 2022): corrects each batch's outputs through the k-nearest-neighbour
  affinity (k = 5) of its photos' features, no model change: `lame_probabilities` applies it to a batch; it has no model to
  write, so `ee personalise --method lame` says so.

These change the backbone (BatchNorm only); `ee`'s own method keeps the backbone frozen and adapts
the early BatchNorm statistics and the exits. The exits of a baseline's bundle are the input
bundle's, switched off. The small numeric pieces (entropy, EATA's weights, LAME's update) are pure
numpy with unit tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("ee", "source", "bn", "tent", "eata", "lame")
CHANGES_BACKBONE = {"ee": False, "source": False, "bn": True, "tent": True, "eata": True, "lame": False}
TENT_LEARNING_RATE = 1e-3
EATA_ENTROPY_MARGIN = 0.4  # x ln(classes): photos less uncertain than this count as reliable (EATA's default)
# Cosine similarity to the running mean prediction at or above which a photo is redundant: 0.05 for
# ImageNet (EATA's default), 0.4 for CIFAR-10 (the TTA benchmark's cifar10_c setting): with 10 classes
# a sure prediction's cosine with a uniform mean is already 1/sqrt(10) = 0.32, so 0.05 keeps none.
EATA_REDUNDANCY_MARGINS = {100: 0.4, None: 0.05}  # up to this many classes: margin
EATA_MOMENTUM = 0.9
LAME_NEIGHBOURS = 5
LAME_ITERATIONS = 100


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per photo, the Shannon entropy (nats) of its predicted class distribution."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def redundancy_margin(classes: int) -> float:
    return EATA_REDUNDANCY_MARGINS[100] if classes <= 100 else EATA_REDUNDANCY_MARGINS[None]


def eata_weights(probabilities: np.ndarray, running_mean: np.ndarray | None, entropy_margin: float,
                 redundancy: float, momentum: float = EATA_MOMENTUM) -> tuple[np.ndarray, np.ndarray | None]:
    """EATA's per-photo loss weights: 1 / exp(H - margin) on reliable photos (entropy under the
    margin) that are not redundant (cosine similarity to the running mean prediction under
    `redundancy`), 0 elsewhere; and the running mean updated with the photos kept."""
    h = entropy(probabilities)
    keep = h < entropy_margin
    if running_mean is not None:
        norms = np.linalg.norm(probabilities, axis=1) * np.linalg.norm(running_mean)
        similarity = probabilities @ running_mean / np.maximum(norms, 1e-12)
        keep &= np.abs(similarity) < redundancy
    weights = np.where(keep, 1.0 / np.exp(h - entropy_margin), 0.0)
    if keep.any():
        mean = probabilities[keep].mean(axis=0)
        running_mean = mean if running_mean is None else momentum * running_mean + (1 - momentum) * mean
    return weights, running_mean


def knn_affinity(features: np.ndarray, neighbours: int = LAME_NEIGHBOURS) -> np.ndarray:
    """LAME's affinity: 1 between a photo and each of its k nearest photos (cosine), else 0."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(neighbours, len(features) - 1)
    affinity = np.zeros_like(similarity)
    if k > 0:
        nearest = np.argsort(-similarity, axis=1)[:, :k]
        np.put_along_axis(affinity, nearest, 1.0, axis=1)
    return affinity


def lame_probabilities(probabilities: np.ndarray, features: np.ndarray, neighbours: int = LAME_NEIGHBOURS,
                       iterations: int = LAME_ITERATIONS) -> np.ndarray:
    """LAME's assignment for one batch: z_i proportional to p_i * exp(sum_j W_ij z_j), iterated from
    z = p to a fixed point (the bound optimisation of its Laplacian-regularised likelihood)."""
    affinity = knn_affinity(features, neighbours)
    log_p = np.log(np.clip(probabilities, 1e-12, 1.0))
    z = probabilities.copy()
    for _ in range(iterations):
        logits = log_p + affinity @ z
        updated = np.exp(logits - logits.max(axis=1, keepdims=True))
        updated /= updated.sum(axis=1, keepdims=True)
        if np.abs(updated - z).max() < 1e-6:
            return updated
        z = updated
    return z


@dataclass(frozen=True)
class EntropySteps:
    """What an entropy method did: steps, photos that moved the parameters, backward passes."""

    steps: int
    photos_used: int
    backward_passes: int  # photos passed backwards through the backbone
    mean_entropy_first: float
    mean_entropy_last: float


def minimise_entropy(model, output: str, batches, method: str, seed: int) -> EntropySteps:
    """One epoch of TENT or EATA over `batches` (uint8 arrays): BatchNorm layers of the backbone in
    training mode (batch statistics), their scales and offsets the only variables trained. Every
    other weight of the model, and every moving statistic, is restored afterwards: the caller
    re-estimates the statistics."""
    from ee_cli.base import compat
    from ee_cli.adaptation import adapt

    tf, keras = compat.tf(), compat.keras()
    compat.seed_everything(seed)
    layers = adapt.backbone_batchnorms(model)
    saved = [layer.get_weights() for layer in model.layers]
    trainable = {layer.name: layer.trainable for layer in model.layers}
    for layer in model.layers:
        layer.trainable = False
    for layer in layers:
        layer.trainable = True  # BatchNorm with trainable=False ignores training=True
    variables = [v for layer in layers for v in (layer.gamma, layer.beta) if v is not None]
    optimizer = keras.optimizers.Adam(TENT_LEARNING_RATE)
    classes = int(model.get_layer(output).output.shape[-1])
    margin = EATA_ENTROPY_MARGIN * math.log(classes)
    running_mean, steps, used, backward, entropies = None, 0, 0, 0, []
    for batch in batches:
        pixels = tf.constant(batch, tf.float32)
        with tf.GradientTape() as tape:
            logits = model(pixels, training=True)
            logits = logits[model.output_names.index(output)] if isinstance(logits, (list, tuple)) else logits
            probabilities = tf.nn.softmax(logits, axis=-1)
            per_photo = -tf.reduce_sum(probabilities * tf.math.log(tf.maximum(probabilities, 1e-12)), axis=-1)
            if method == "tent":
                weights = np.ones(len(batch), np.float32)
            else:
                weights, running_mean = eata_weights(probabilities.numpy(), running_mean, margin, redundancy_margin(classes))
            loss = tf.reduce_sum(per_photo * tf.constant(weights, tf.float32)) / len(batch)
        entropies.append(float(tf.reduce_mean(per_photo)))
        if np.any(weights > 0):  # the tape spans the whole batch: every photo of it goes backwards
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            steps, used, backward = steps + 1, used + int(np.count_nonzero(weights)), backward + len(batch)
    for layer, weights in zip(model.layers, saved):
        if layer in layers:  # the new scale and offset stay; the moving statistics are restored
            kept = [new if _is_affine(variable.name) else old for new, old, variable in zip(layer.get_weights(), weights, layer.weights)]
            layer.set_weights(kept)
        else:
            layer.set_weights(weights)
        layer.trainable = trainable[layer.name]
    return EntropySteps(steps, used, backward, entropies[0] if entropies else 0.0, entropies[-1] if entropies else 0.0)


def _is_affine(name: str) -> bool:
    return name.rsplit("/", 1)[-1].split(":")[0] in ("gamma", "beta")
