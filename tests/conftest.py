"""Shared fixtures: a scratch workspace per test and an in-process CLI runner (Typer's testing docs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, PersonaliseConfig
from ee_cli.commands.personalise import personalise

os.environ.setdefault("EE_THREADS", "2")  # results are bit-identical only at a fixed thread count


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """Run each test in its own folder, so bundles/ and runs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def prepared_workspace(tmp_path_factory, name: str):
    """Build once per module what several tests start from (bundles are slow to make); each test
    then gets its own copy through `copy_workspace`."""
    root = tmp_path_factory.mktemp(name)
    with contextlib.chdir(root):
        yield root


def copy_workspace(template: Path, workspace: Path) -> None:
    """A prepared workspace copied into a test's own; the absolute paths its bundles record follow it."""
    shutil.copytree(template, workspace, dirs_exist_ok=True)
    for recorded in [*workspace.glob("**/ee.json"), *workspace.glob("bundles/latest.json")]:
        recorded.write_text(recorded.read_text().replace(str(template), str(workspace)))


@pytest.fixture
def cli():
    from ee_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


def run_ee(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process: what a user really sees."""
    command = [sys.executable, "-m", "ee_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def random_pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def tiny_classifier(path: Path, *, softmax: bool = True, classifier: bool = True, num_classes: int = 3) -> Path:
    """A small flat Functional CNN saved to `path`: conv blocks with a residual add, then a classifier."""
    from ee_cli.base import compat

    keras = compat.keras()
    layers = keras.layers
    pixels = keras.Input((16, 16, 3), name="image")
    x = layers.Rescaling(1 / 255.0)(pixels)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    x = layers.MaxPooling2D(name="p1")(x)
    y = layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = layers.Add(name="a1")([x, y])
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="c3")(x)
    x = layers.MaxPooling2D(name="p2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if classifier:
        x = layers.Dense(num_classes, activation="softmax" if softmax else None, name="classifier")(x)
    model = keras.Model(pixels, x)
    model.save(path)
    return path


QUICK = ["--epochs", "2", "--batch", "16", "--views", "1", "--quiet"]  # personalise flags for a quick run


def narrow_resnet9(folder: Path, num_classes: int = 5) -> str:
    """ee's ResNet-9 at a quarter of its width, saved as a model file: the same graph, graft points
    and exits as `--backbone cifar_resnet9` at 1/16 of the compute, so personalising, calibrating and
    exporting it is quick. Seeded: the same weights in every test."""
    from ee_cli.base import compat
    from ee_cli.graph import backbones

    path = folder / f"narrow_resnet9_{num_classes}.h5"
    if not path.is_file():
        compat.seed_everything(0)
        backbones.cifar_resnet9(32, num_classes, width=8).save(path)
    return str(path)


def coloured_photos(root: Path, count: int = 48, size: int = 32, seed: int = 0) -> Path:
    """Photos dominated by red, green or blue, a cheap stand-in for three classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        base = np.zeros((size, size, 3))
        base[..., index % 3] = 180
        pixels = (base + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{index:03d}.png")
    return root


def labelled_folder(root: Path, classes: list[str], per_class: int = 6) -> Path:
    for index, name in enumerate(classes):
        coloured_photos(root / name, per_class, seed=index + 10)
    return root


def personalised_user(root: Path, photo_count: int, batch: int) -> None:
    """In `root`: bundle B (attached), photos/ (the person's), P (personalised on them, classes r,g,b)
    and test/ (20 labelled photos per class)."""
    attach(AttachConfig(backbone=narrow_resnet9(root), out="B", classes="r,g,b,x,y"))
    coloured_photos(root / "photos", photo_count)
    personalise(PersonaliseConfig(data="photos", bundle="B", out="P", epochs=2, batch=batch, views=1, personal_classes="r,g,b"))
    labelled_folder(root / "test", ["r", "g", "b"], per_class=20)


def exported_user(root: Path) -> None:
    """In `root`: personalised_user's folders and P, C (P calibrated by `ee evaluate`: exits on) and E
    (C's float cascade export, the bundle's thresholds as recorded)."""
    from ee_cli.base.config import EvaluateConfig, ExportConfig
    from ee_cli.commands.evaluate import evaluate
    from ee_cli.commands.export import export

    personalised_user(root, photo_count=120, batch=16)
    evaluate(EvaluateConfig(data="test", bundle="P", out="C", timed_runs=1, max_drop=100.0))
    export(ExportConfig(bundle="C", out="E", quant="none", calibration="photos", policy="recorded", quiet=True))


@pytest.fixture
def attached(workspace):
    """Bundle B: exits grafted onto the narrow ResNet-9, classes r,g,b,x,y."""
    return attach(AttachConfig(backbone=narrow_resnet9(workspace), out="B", classes="r,g,b,x,y")).bundle_path


# `make test` runs xdist workers that each take whole files in collection order: handing out the
# files that hold the slowest tests first lets the workers finish together instead of one waiting
# on a long file collected last.
SLOWEST_FILES = ("test_export.py", "test_bench.py", "test_personalise_runs.py", "test_ondevice.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: (SLOWEST_FILES.index(item.path.name) if item.path.name in SLOWEST_FILES else len(SLOWEST_FILES)))
