"""Per-user normalisation statistics and personal classes, with forward passes only.

Measured (see the personalise issue): re-estimating the moving statistics of the first BatchNorm
layers on a person's unlabelled photos, then reading off which classes the adapted model predicts,
is what beats the generic model restricted to the person's classes; adapting every BN layer soaks
up the person's class mix instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ee_cli.base import compat
from ee_cli.graph import graft
from ee_cli.base.errors import UserError


def backbone_batchnorms(model, head_prefixes: tuple[str, ...] = ("exit_",)) -> list:
    """The backbone's BatchNorm layers in topological order (exit heads excluded)."""
    keras = compat.keras()
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.name.startswith(head_prefixes)
    ]


def resolve_adapt_count(spec: str, available: int) -> int:
    """The most layers `spec` adapts: for `auto` the first half (rounded up), of which `auto_depth`
    keeps what the photos allow; an integer is taken as given."""
    if spec == "auto":
        return math.ceil(available / 2)
    try:
        count = int(spec)
    except ValueError:
        raise UserError(f"--adapt-bn expects a number of BatchNorm layers, auto, or 0; not {spec!r}") from None
    if not 0 <= count <= available:
        raise UserError(f"--adapt-bn {count}: the backbone has {available} BatchNorm layers")
    return count


def auto_depths(available: int) -> list[int]:
    """The depths `auto` tries, shallowest first: quarters of the first half of the BN layers."""
    half = resolve_adapt_count("auto", available)
    return sorted({max(1, round(half * step / 4)) for step in (1, 2, 3, 4)}) if half else []


COLLAPSED_SHARE = 0.9  # one class holding this much of the estimated mix: the adaptation swallowed the others
CONFIDENT = 0.9  # an unadapted prediction this sure is about what the photo shows, not about its condition
MIN_CONFIDENT = 32  # fewer photos than this that sure: the generic model is lost on them, nothing to keep
KEEP_CONFIDENT = 0.8  # an adaptation that overturns more of those than 20 % changes what the model sees


def collapsed(shares: np.ndarray) -> bool:
    return float(np.max(shares)) >= COLLAPSED_SHARE


def kept_confident(logits: np.ndarray, unadapted: np.ndarray) -> float | None:
    """The share of the unadapted model's confident predictions that `logits` keep; None when it is
    sure of fewer than MIN_CONFIDENT photos (the demo's colour-cast Fashion-MNIST user: 6 of 600,
    all wrong, and adapting is what finds the classes)."""
    probabilities = softmax(unadapted)
    sure = probabilities.max(axis=1) >= CONFIDENT
    if sure.sum() < MIN_CONFIDENT:
        return None
    return float(np.mean(np.argmax(logits[sure], axis=1) == probabilities[sure].argmax(axis=1)))


def auto_depth(logits_at: Callable[[int], np.ndarray], depths: list[int]) -> tuple[int, np.ndarray, str | None]:
    """The deepest of `depths` (shallowest first) reached before an adaptation overturns the unadapted
    model's confident predictions or collapses its class mix; `logits_at(n)` gives the generic
    output on the unlabelled photos with the first n layers adapted.

    Measured on dev users (bench/results/bn-depth-dev-*): on a ResNet-9 trained with its BN
    statistics, adapting its first half keeps >= 88 % of the confident predictions and lifts the
    class-inferred accuracy from 60.0 to 72.7 %; on EfficientNet-Lite1 fine-tuned with ImageNet's
    statistics left in place, adapting even 8 of its 64 layers keeps <= 47 % and drops it from 76.4 %
    to 23.8 %; re-expressed in its training photos' statistics (models/reference_statistics.py),
    32 layers keep >= 86 % and lift it from 63.6 to 71.8 %. Photos of one class collapse the mix
    unadapted too: not a reason to stop; nor is overturning a model that saw one class in every photo
    (Lite1's blurred dev user: 94 % of the mix on one class unadapted, 32.2 -> 72.2 % adapted).
    Where the generic model is sure of too few photos to check a depth against (and its mix has not
    collapsed), nothing says a deeper adaptation keeps what the photos show: `auto` then stops at the
    shallowest depth, which normalises the photos' colour and light and little else (a 1,000-class
    ImageNet model sure of none of 600 photos went to 25 of 49 layers, and its mix turned to
    brassiere and great white shark).
    Returns the depth, the class mix there and a one-line note when it stopped short."""
    unadapted = logits_at(0)
    kept, kept_shares = 0, class_shares(unadapted)
    unadapted_collapsed = collapsed(kept_shares)
    for depth in depths:
        logits = logits_at(depth)
        # A generic model that puts every photo in one class is sure of their condition, not their content.
        shares, keeps = class_shares(logits), None if unadapted_collapsed else kept_confident(logits, unadapted)
        if keeps is None and not unadapted_collapsed and depth > depths[0]:
            return kept, kept_shares, f"the generic model is sure of fewer than {MIN_CONFIDENT} photos, nothing to check a deeper adaptation against: kept {kept}"
        if keeps is not None and keeps < KEEP_CONFIDENT:
            return kept, kept_shares, _stopped_note(depth, f"overturned {1 - keeps:.0%} of the generic model's confident predictions", kept)
        if collapsed(shares) and not unadapted_collapsed:
            return kept, kept_shares, _stopped_note(depth, f"collapsed the class mix onto one class ({np.max(shares):.0%})", kept)
        kept, kept_shares = depth, shares
    return kept, kept_shares, None


def _stopped_note(depth: int, why: str, kept: int) -> str:
    return f"adapting {depth} BatchNorm layers {why}: kept {kept}"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64."""
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probabilities / probabilities.sum(axis=-1, keepdims=True)


Statistics = list[tuple[np.ndarray, np.ndarray]]  # per BatchNorm layer: moving mean and variance


def batchnorm_waves(model, layers: list) -> list[list]:
    """`layers` grouped into passes: a layer goes one wave after the latest adapted layer upstream of it."""
    graph = graft.layer_graph(model)
    chosen = {layer.name for layer in layers}
    wave_of: dict[str, int] = {}
    position = {name: index for index, name in enumerate(graph.order)}
    for layer in sorted(layers, key=lambda layer: position[layer.name]):  # every upstream layer first
        upstream = (graft.ancestors(graph, [layer.name]) - {layer.name}) & chosen
        wave_of[layer.name] = 1 + max((wave_of[name] for name in upstream), default=-1)
    waves: list[list] = [[] for _ in range(1 + max(wave_of.values(), default=-1))]
    for layer in layers:
        waves[wave_of[layer.name]].append(layer)
    return waves


def statistics_of(layers) -> Statistics:
    return [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]


def set_statistics(layers, adapted: Statistics, original: Statistics, depth: int) -> None:
    """The first `depth` layers adapted, the rest back at the generic model's statistics."""
    assign(layers, [*adapted[:depth], *original[depth:]])


def input_statistics(probe, batches, keep: Callable[[np.ndarray], None] | None = None, shape: tuple | None = None) -> Statistics:
    """Per tensor `probe` returns: per-channel mean and variance over every photo; with `keep`, the
    probe's last output is not measured but handed to `keep` batch by batch (stepping.py's next
    stone). With `shape` (one photo's), one trace serves every batch size.

    Each batch is reduced to per-channel means and variances inside TensorFlow (a ResNet50@224 batch
    of 8 holds ~400 MB of BN inputs over 27 layers; only their channel statistics leave the graph),
    then batches are merged exactly in float64 (Chan et al.'s pairwise update)."""
    tf = compat.tf()
    signature = [tf.TensorSpec((None, *shape), tf.float32)] if shape else None

    @tf.function(autograph=False, input_signature=signature)
    def moments(images):
        features = probe(images)
        features = list(features) if isinstance(features, (list, tuple)) else [features]
        measured = len(features) - (keep is not None)
        return [tf.nn.moments(values, axes=list(range(len(values.shape) - 1))) for values in features[:measured]], features[measured:]

    merged = []
    for images in batches():
        images = np.asarray(images, np.float32)
        found, kept = moments(tf.constant(images))
        if keep is not None:
            keep(kept[0].numpy())
        # every photo gives a layer the same number of positions: photos weigh batches
        found = [(mean.numpy().astype(np.float64), variance.numpy().astype(np.float64), images.shape[0]) for mean, variance in found]
        merged = found if not merged else [merge_moments(total, part) for total, part in zip(merged, found)]
        del images, kept  # before the next batch is read: a stone's batch can be tens of MB
    return [(mean, variance) for mean, variance, _ in merged]


def merge_moments(a: tuple, b: tuple) -> tuple:
    """Mean and (population) variance of two groups from each group's mean, variance and size."""
    mean_a, var_a, n_a = a
    mean_b, var_b, n_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    variance = (var_a * n_a + var_b * n_b + delta**2 * n_a * n_b / n) / n
    return mean, variance, n


def assign(layers, statistics: Statistics) -> None:
    for layer, (mean, variance) in zip(layers, statistics):
        layer.moving_mean.assign(np.asarray(mean, np.float32))
        layer.moving_variance.assign(np.asarray(variance, np.float32))


def class_shares(logits: np.ndarray, iterations: int = 100, temperature: float = 1.0) -> np.ndarray:
    """The person's mix of classes, estimated from the model's probabilities by EM under label shift
    (Saerens, Latinne & Decaestecker, 2002), from the uniform mix the generic model was trained on;
    `temperature` calibrates an over-confident model's probabilities first.

    Counting top predictions instead counts each systematic confusion of the generic model as a
    class: on 15 CIFAR-10 users (5 conditions x 3 seeds, BN statistics adapted) counting at 5 %
    found the exact class set 6 times, EM at 10 % 11 times (restricted accuracy 69.1 -> 74.8 %).
    """
    probabilities = softmax(np.asarray(logits, np.float64) / temperature)
    classes = probabilities.shape[1]
    mix = np.full(classes, 1.0 / classes)
    for _ in range(iterations):
        reweighted = probabilities * mix * classes
        reweighted /= reweighted.sum(axis=1, keepdims=True)
        mix = reweighted.mean(axis=0)
    return mix


def infer_classes(shares: np.ndarray, min_share: float) -> list[int]:
    """Classes with at least `min_share` of the estimated mix (at least the top two)."""
    chosen = [int(i) for i in np.flatnonzero(shares >= min_share)]
    if len(chosen) < 2:
        chosen = sorted(int(i) for i in np.argsort(-shares, kind="stable")[:2])
    return chosen


@dataclass(frozen=True)
class ClassPrior:
    """The person's classes and the shift of their generic logits by the estimated mix: EM's label
    shift correction (p(y|x) * K * share_y), in logits of the generic model."""

    classes: list[int]
    logit_shift: np.ndarray  # over `classes`: temperature * log(K * share)


def class_prior(shares: np.ndarray, min_share_of_even: float, temperature: float = 1.0) -> ClassPrior:
    """Keep each class whose share of the estimated mix is at least `min_share_of_even` of an even
    share (1/K: the cut scales to a 1,000-class model), and shift the kept logits by the mix, so a
    class kept wrongly draws few photos and a class with a low estimate stays reachable.

    Measured on the dev users' saved logits (bench/results/class-set-dev-{resnet9,lite1}-2026-12-08.json,
    BN adapted, no head trained, mean accuracy): the hard cut at 10 % of the mix 73.1 % on ResNet-9's
    10 users (3 more than 1 pt under the generic model: all-class users lose the classes under the
    cut) and 76.4 % on Lite1's 5; a cut at 0.2 of an even share with this shift 85.1 % and 86.8 %,
    no user under, no true class missed; with the logits divided by 1.5 before EM, 86.1 % and 87.5 %
    (3 made it worse on both)."""
    classes = infer_classes(shares, min_share_of_even / len(shares))
    shift = temperature * np.log(np.maximum(len(shares) * shares[classes], 1e-6))
    return ClassPrior(classes, shift.astype(np.float32))
