"""Do two saved classifiers compute the same function? Both on all 10,000 CIFAR-10 test photos.

    python -m models.same_function A.h5 B.h5 [--out RESULTS.json]

Each model's top-1 accuracy, how often their top classes agree and their largest logit difference,
photos resized as ee's photo loader does (used to check models.reference_statistics on Lite1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from datasets import cifar10
from ee_cli.base import compat, photos


def logits_of(path: Path, images: np.ndarray, batch: int = 100) -> tuple[np.ndarray, float]:
    model = compat.keras().models.load_model(path, compile=False)
    size, started = int(model.input_shape[1]), time.perf_counter()
    logits = np.concatenate([model.predict_on_batch(photos.resized(images[i:i + batch], size).astype(np.float32)) for i in range(0, len(images), batch)])
    return logits, time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.same_function", description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    data = cifar10.load()
    found = {str(path): logits_of(path, data["x_test"]) for path in args.models}
    (a, _), (b, _) = found.values()
    report = {"photos": int(len(data["y_test"])),
              "models": {path: {"accuracy": float(np.mean(logits.argmax(1) == data["y_test"])), "seconds": round(seconds, 1)} for path, (logits, seconds) in found.items()},
              "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))), "max_abs_logit_diff": float(np.abs(a - b).max()),
              "command": "python -m models.same_function " + " ".join(str(path) for path in args.models)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
