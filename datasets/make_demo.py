"""Write the committed demo user (datasets/demo/) from Fashion-MNIST (MIT): 3 classes drawn with a
seed, a colour cast the grey-trained generic model never saw, 600 unlabelled photos from the train
split and 100 labelled test photos per class from the test split.

    python -m datasets.make_demo
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from datasets import fashion_mnist, scenarios

OUT = Path(__file__).parent / "demo"


def main() -> None:
    data = fashion_mnist.load()
    user = scenarios.make_user(data, seed=1, k=3, condition="colour_cast", unlabelled=600, names=fashion_mnist.CLASSES)
    keep = [i for c in user.classes for i in list((user.test_y == c).nonzero()[0])[:100]]
    user = scenarios.User(user.seed, user.classes, user.condition, user.unlabelled, user.labelled, user.labelled_y,
                          user.test[keep], user.test_y[keep], user.names)
    shutil.rmtree(OUT, ignore_errors=True)
    scenarios.write_user(user, OUT)
    (OUT / "labelled").rmdir() if (OUT / "labelled").exists() and not any((OUT / "labelled").iterdir()) else None
    summary = {"source": "Fashion-MNIST (MIT), Debian package dataset-fashion-mnist", "classes": user.class_names,
               "condition": user.condition, "seed": user.seed, "unlabelled": len(user.unlabelled), "test": len(user.test)}
    (OUT / "README.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
