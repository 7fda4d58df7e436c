"""Peak memory of personalising a ResNet50@224 bundle on 500 photos (the personalise issue's
acceptance 3), measured as the child process's peak RSS.

    python -m bench.resnet50_memory [--photos 500] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datasets import cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    from PIL import Image

    data = cifar10.load()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for index in range(args.photos):
            Image.fromarray(data["x_train"][index * 7]).save(root / f"{index:04d}.png")
        ee = [sys.executable, "-m", "ee_cli"]
        subprocess.run([*ee, "attach", "--backbone", "resnet50", "--weights", "none", "--out", str(root / "R50"), "--json"], check=True, capture_output=True, cwd=root)
        started = time.perf_counter()
        done = subprocess.run(
            [*ee, "personalise", "--bundle", str(root / "R50"), "--data", str(root), "--epochs", str(args.epochs), "--json", "--quiet", "--out", str(root / "P")],
            capture_output=True, text=True, cwd=root,
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        metrics = json.loads(done.stdout)["metrics"]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB -> MB on Linux
    print(json.dumps({"photos": args.photos, "peak_rss_mb": round(peak, 1), "wall_seconds": round(seconds, 1),
                      "cache": metrics["cache"], "adapted_bn": len(metrics["adapted_bn"]["layers"]), "train_seconds": metrics["train_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
