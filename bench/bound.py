"""What `ee personalise` is measured against: forward passes of the generic model, at the least.

Two bounds, in whole batched passes over the person's photos (`timed_pass` times one):
- the *strict* bound: one pass per trained photo per view (weak and strong), what a trainer of the
  exits alone must spend on the backbone;
- the *method* bound (issue 22's): everything `ee personalise` needs at the least — the cache's two
  views of every photo, one pass per held-out photo, and the passes of BatchNorm adaptation and of
  the class mix at each depth `--adapt-bn auto` tried, as personalise counted them
  (`metrics["adapted_bn"]["passes"]`: each pass's share of a whole pass's MACs, from its stepping
  stone to the layers it reached; see ee_cli/stepping.py).
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


def method_passes(adaptation_passes: float, views: int, holdout_share: float) -> float:
    """The method bound in whole passes over every photo."""
    return 2 * views + holdout_share + adaptation_passes
