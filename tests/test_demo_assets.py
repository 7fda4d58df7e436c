"""The committed demo: generic model, class names and the demo user's photos fit together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets import fashion_mnist
from ee_cli.base import photos
from ee_cli.graph import backbones

ROOT = Path(__file__).resolve().parents[1]


def test_demo_user_folders_match_the_model_classes():
    classes = (ROOT / "models" / "fashion_classes.txt").read_text().split()
    assert classes == list(fashion_mnist.CLASSES)
    summary = json.loads((ROOT / "datasets" / "demo" / "README.json").read_text())
    test = photos.scan_labelled(ROOT / "datasets" / "demo" / "test", classes)
    assert len(test) == summary["test"] == 300 and sorted({classes[i] for i in test.labels}) == sorted(summary["classes"])
    assert len(photos.scan_unlabelled(ROOT / "datasets" / "demo" / "unlabelled")) == summary["unlabelled"] == 600


def test_shipped_generic_model_is_small_and_loads_as_a_backbone():
    path = ROOT / "models" / "fashion_resnet9.h5"
    assert path.stat().st_size < 5 * 1024 * 1024
    backbone = backbones.load_model_file(path)
    assert backbone.num_classes == 10 and backbone.input_shape == (32, 32, 3)
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["test_accuracy"] > 0.8


def test_fashion_mnist_loader_when_the_debian_package_is_installed():
    if not (fashion_mnist.default_folder() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    data = fashion_mnist.load()
    assert data["x_train"].shape == (60000, 32, 32, 3) and np.bincount(data["y_test"]).tolist() == [1000] * 10
    assert np.array_equal(data["x_train"][..., 0], data["x_train"][..., 2])  # grey in three equal channels


@pytest.mark.nightly
def test_make_demo_runs_the_whole_flow_offline(tmp_path):
    """`make demo`'s script end to end (a few minutes): every step succeeds and the cascade it runs is real."""
    import os
    import subprocess

    work = tmp_path / "demo"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=1800,
                          env=os.environ | {"EE_DEMO_DIR": str(work)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Why the generic row is so low" in done.stdout
    for mode in ("float32", "int8"):
        ran = json.loads((work / f"run-{mode}.json").read_text())
        assert ran["photos"] == 300 and sum(ran["histogram"].values()) == 300 and ran["accuracy"] > 0.5
