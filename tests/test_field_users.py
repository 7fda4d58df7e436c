"""The field's users: CIFAR-10-C corruptions at CIFAR-10-C's parameters, and users whose every photo
comes from the test split, disjoint, reproducible from their seed (on made-up photos: no CIFAR needed)."""

from __future__ import annotations

import numpy as np
import pytest

from datasets import corruptions, field_users

PHOTOS = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_each_corruption_changes_the_photos_reproducibly_and_keeps_their_shape(name):
    smooth = np.stack([np.full((32, 32, 3), 40 * i + 20, np.uint8) for i in range(3)]) + PHOTOS[:3] // 8  # photos with some structure
    mild, strong = corruptions.corrupt(smooth, name, 3, seed=1), corruptions.corrupt(smooth, name, 5, seed=1)
    assert mild.shape == strong.shape == smooth.shape and strong.dtype == np.uint8
    assert not np.array_equal(strong, smooth)
    np.testing.assert_array_equal(strong, corruptions.corrupt(smooth, name, 5, seed=1))


def test_every_corruption_has_five_severities_of_cifar_parameters():
    assert len(corruptions.CORRUPTIONS) == 15 and set(corruptions.PARAMETERS) == set(corruptions.CORRUPTIONS)
    assert all(len(values) == 5 for values in corruptions.PARAMETERS.values())
    assert corruptions.PARAMETERS["defocus_blur"][4][0] == 1.5  # CIFAR-10-C's radius, not ImageNet-C's 10
    with pytest.raises(ValueError, match="32x32"):
        corruptions.corrupt(np.zeros((1, 64, 64, 3), np.uint8), "fog", 3, seed=0)


def _made_up_test_split(per_class: int = 60) -> dict:
    labels = np.repeat(np.arange(10), per_class)
    images = np.random.default_rng(1).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # tell photos apart
    images[:, 0, 0, 1] = np.arange(len(labels)) // 256
    return {"x_test": images, "y_test": labels}


def _ids(images: np.ndarray) -> set[int]:
    return set((images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)).tolist())


def test_a_users_photos_come_from_the_test_split_disjoint_and_of_its_classes():
    data = _made_up_test_split()
    spec = field_users.Spec("u", 100, (2, 5, 7), None, None)  # uncorrupted, so the photo ids survive
    user = field_users.make_field_user(data, spec, unlabelled=60, labelled_per_class=5, test_per_class=20)
    unlabelled, labelled, test = _ids(user.unlabelled), _ids(user.labelled), _ids(user.test)
    assert len(unlabelled) == 60 and len(labelled) == 15 and len(test) == 60
    assert not (unlabelled & labelled) and not (unlabelled & test) and not (labelled & test)
    assert set(data["y_test"][sorted(unlabelled | labelled | test)]) == {2, 5, 7}
    again = field_users.make_field_user(data, spec, unlabelled=60, labelled_per_class=5, test_per_class=20)
    np.testing.assert_array_equal(user.unlabelled, again.unlabelled)


def test_each_split_has_every_kind_of_user_and_the_splits_never_share_a_seed():
    dev, test = field_users.specs("dev"), field_users.specs("test")
    assert not {s.seed for s in dev} & {s.seed for s in test}
    for users in (dev, test):
        kinds = [s.name.split("-")[1] for s in users]
        assert kinds.count("personal") == 6 and kinds.count("all") == 2 and "label" in kinds and "clean" in kinds
        assert all(s.severity in (3, 5) for s in users if s.corruption) and all(len(s.classes) == 10 for s in users if "all-classes" in s.name)
        assert all(2 <= len(s.classes) <= 5 for s in users if "personal" in s.name or "label-shift" in s.name)


def test_the_grid_holds_every_corruption_at_both_severities_apart_from_the_sampled_users():
    for split in field_users.SPLIT_SEEDS:
        grid = field_users.grid_specs(split)
        personal = {(s.corruption, s.severity) for s in grid if s.corruption and len(s.classes) < 10}
        assert personal == {(c, v) for c in corruptions.CORRUPTIONS for v in field_users.SEVERITIES}
        assert {s.corruption for s in grid if len(s.classes) == 10 and s.corruption} == set(corruptions.CORRUPTIONS)
        assert sum(s.corruption is None for s in grid) == 2
        assert not {s.seed for s in grid} & {s.seed for s in field_users.specs(split)}
    assert not {s.seed for s in field_users.grid_specs("dev")} & {s.seed for s in field_users.grid_specs("test")}
