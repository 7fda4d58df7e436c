"""Pretrain the demo's generic model: a quarter-width ResNet-9 (16-32-64-128 channels) on all 10
Fashion-MNIST classes (Debian's dataset-fashion-mnist), small enough to commit (models/fashion_resnet9.h5).

    python -m models.train_fashion [--epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import fashion_mnist
from models.train_cifar import train

OUT = Path(__file__).parent / "fashion_resnet9.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    report = train(args.epochs, 256, args.seed, args.out, fashion_mnist.load(), width=16,
                   description="cifar_resnet9 at quarter width (16-32-64-128), Fashion-MNIST padded to 32x32 RGB")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
