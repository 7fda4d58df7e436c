"""What `ee personalise` is measured against: forward passes of the generic model, at the least.

Two bounds, in whole batched passes over the person's photos (`timed_pass` times one):
- the *strict* bound: one pass per trained photo per view (weak and strong), what a trainer of the
  exits alone must spend on the backbone;
- the *method* bound (issue 22's): everything `ee personalise` needs at the least — the cache's two
  views of every photo, one pass per held-out photo, one class-mix pass per BatchNorm depth
  `--adapt-bn auto` tried (its predictions decide whether to go deeper), and the exact BatchNorm
  passes: one per wave of layers up to the deepest depth tried, each only as deep as its wave (its
  share of a whole pass's MACs).
"""

from __future__ import annotations

import time

import numpy as np


def timed_pass(model, images: np.ndarray, batch: int = 64, repeats: int = 2) -> float:
    """Seconds of one plain batched pass of `model` over float32 `images`: the fastest of `repeats`
    after a whole untimed pass (every batch shape traced and warm; a pass timed right after a
    64-photo warm-up ran up to 1.8x slower on Lite1, which flattered whatever was divided by it)."""
    model.predict(images, batch_size=batch, verbose=0)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(images, batch_size=batch, verbose=0)
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def bn_wave_inputs(model, depth: int) -> list[list[str]]:
    """Per exact BatchNorm pass up to the first `depth` BN layers: the layers whose outputs it reads."""
    from ee_cli import adapt

    waves = adapt.batchnorm_waves(model, adapt.backbone_batchnorms(model)[:depth])
    return [[layer.inbound_nodes[0].inbound_layers.name for layer in wave] for wave in waves]


def bn_wave_shares(model, depth: int) -> list[float]:
    """Per exact BatchNorm pass up to the first `depth` BN layers of an ee model (a bundle's): its
    share of the MACs of a whole pass to the final exit."""
    from ee_cli import graft

    graph = graft.layer_graph(model)
    whole = graft.cumulative_macs(graph, graft.FINAL_OUTPUT)
    return [graft.cumulative_macs(graph, inputs) / whole for inputs in bn_wave_inputs(model, depth)]


def method_passes(tried: list[int], views: int, holdout_share: float, wave_shares: list[float]) -> float:
    """The method bound in whole passes over every photo."""
    return 2 * views + holdout_share + len(tried) + sum(wave_shares)
