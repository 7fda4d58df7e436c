"""What `ee personalise` is measured against: forward passes of the generic model, at the least.

Two bounds, in whole batched passes over the person's photos (`timed_pass` times one):
- the *strict* bound: one pass per trained photo per view (weak and strong), what a trainer of the
  exits alone must spend on the backbone;
- the *method* bound (issue 22's): everything `ee personalise` needs at the least — the cache's two
  views of every photo, one pass per held-out photo, and the passes of BatchNorm adaptation and of
  the class mix at each depth `--adapt-bn auto` tried, as personalise counted them
  (`metrics["adapted_bn"]["passes"]`: each pass's share of a whole pass's MACs, from its stepping
  stone to the layers it reached; see ee_cli/stepping.py).

Both are timed inside a warm process. What any command that runs those passes pays before its first
one is measured apart, in a fresh process (`python -m bench.bound --startup BUNDLE PHOTOS`: the
interpreter, TensorFlow's import, the bundle's model loaded, every photo decoded), so the whole
command can also be set against that start-up plus the method bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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


def startup(bundle_path: Path, photo_folder: Path) -> int:
    """Everything a command pays before its first pass over the photos: returns how many it decoded."""
    from ee_cli.base import compat, photos
    from ee_cli.files import bundle

    compat.tf()
    model = bundle.read_bundle(bundle_path).load_model()
    paths = photos.scan_unlabelled(photo_folder).paths
    size = int(model.input_shape[1])
    return sum(len(batch) for batch in photos.decoded_batches(paths, size, photos.inference_batch(size, model.count_params())))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bound", description="A fresh process's start-up before its first pass, to be timed from outside.")
    parser.add_argument("--startup", nargs=2, type=Path, metavar=("BUNDLE", "PHOTOS"), required=True)
    print(startup(*parser.parse_args().startup))
