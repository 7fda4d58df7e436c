"""The user-scenario builder, on a synthetic stand-in for CIFAR-10 (the real archive is optional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets import cifar10, scenarios


def fake_cifar(per_class_train: int = 40, per_class_test: int = 10) -> dict:
    rng = np.random.default_rng(0)
    y_train = np.repeat(np.arange(10), per_class_train)
    y_test = np.repeat(np.arange(10), per_class_test)
    # Each image carries its own index in its first pixel, so we can trace where photos came from.
    x_train = rng.integers(0, 255, (len(y_train), 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 255, (len(y_test), 32, 32, 3), dtype=np.uint8)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def test_user_draws_classes_and_keeps_splits_apart():
    data = fake_cifar()
    user = scenarios.make_user(data, seed=4, k=3, condition="rotation", unlabelled=60, labelled_per_class=5)
    assert len(user.classes) == 3 and set(user.labelled_y) == set(user.classes)
    assert np.bincount(user.labelled_y, minlength=10)[list(user.classes)].tolist() == [5, 5, 5]
    assert len(user.unlabelled) == 60 and len(user.test) == 30 and set(user.test_y) == set(user.classes)
    unrotate = lambda x: np.rot90(x, k=-1, axes=(1, 2))  # noqa: E731
    train_rows = {bytes(image) for image in data["x_train"]}
    labelled_rows = {bytes(image) for image in unrotate(user.labelled)}
    unlabelled_rows = {bytes(image) for image in unrotate(user.unlabelled)}
    assert labelled_rows <= train_rows and unlabelled_rows <= train_rows and not labelled_rows & unlabelled_rows
    assert {bytes(image) for image in unrotate(user.test)} <= {bytes(image) for image in data["x_test"]}


def test_same_seed_same_user_other_seed_other_user():
    data = fake_cifar()
    first = scenarios.make_user(data, seed=1, unlabelled=30)
    again = scenarios.make_user(data, seed=1, unlabelled=30)
    assert first.classes == again.classes and first.condition == again.condition
    np.testing.assert_array_equal(first.unlabelled, again.unlabelled)
    others = {scenarios.make_user(data, seed=s, unlabelled=30).classes for s in range(2, 8)}
    assert len(others | {first.classes}) > 1


@pytest.mark.parametrize("condition", scenarios.CONDITIONS + scenarios.TEST_ONLY_CONDITIONS)
def test_every_condition_changes_the_photos_and_keeps_their_shape(condition):
    images = fake_cifar()["x_test"][:4]
    changed = scenarios.condition_function(condition, 0)(images)
    assert changed.shape == images.shape and changed.dtype == np.uint8 and not np.array_equal(changed, images)


def test_written_folders_are_what_a_person_has(tmp_path):
    user = scenarios.make_user(fake_cifar(), seed=0, k=2, condition="colour_cast", unlabelled=8, labelled_per_class=2)
    folders = scenarios.write_user(user, tmp_path)
    assert len(list(folders["unlabelled"].glob("*.png"))) == 8
    assert sorted(p.name for p in folders["labelled"].iterdir()) == sorted(user.class_names)
    assert sum(1 for _ in folders["test"].rglob("*.png")) == 20


def test_the_real_archive_loads_when_present():
    if not cifar10.default_archive().is_file() and not (cifar10.cache_dir() / "cifar10.npz").is_file():
        pytest.skip(f"CIFAR-10 archive not found at {cifar10.default_archive()}")
    data = cifar10.load()
    assert data["x_train"].shape == (50000, 32, 32, 3) and np.bincount(data["y_test"]).tolist() == [1000] * 10


def test_the_scenario_command_writes_a_users_folders(tmp_path):
    if not cifar10.default_archive().is_file() and not (cifar10.cache_dir() / "cifar10.npz").is_file():
        pytest.skip(f"CIFAR-10 archive not found at {cifar10.default_archive()}")
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "datasets.scenarios", "--seed", "4", "--k", "2", "--condition", "blur", "--unlabelled", "12", "--labels", "2", "--out", str(tmp_path / "user")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "user" / "unlabelled").glob("*.png"))) == 12
    assert sum(1 for _ in (tmp_path / "user" / "labelled").rglob("*.png")) == 4
