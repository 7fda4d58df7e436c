"""Photo folders as people have them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ee_cli.base import photos
from ee_cli.adaptation import augment
from ee_cli.base.errors import UserError


def messy_folder(root, size: int = 40):
    """Good photos in every mode, plus files that must be skipped, nested."""
    rng = np.random.default_rng(0)
    (root / "trip" / "day1").mkdir(parents=True)
    colour = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "trip" / "day1" / "a.jpg")
    Image.fromarray(colour).save(root / "b.png")
    Image.fromarray(colour[..., 0], "L").save(root / "grey.png")
    Image.fromarray(np.dstack([colour, np.full((size, size), 128, np.uint8)]), "RGBA").save(root / "alpha.png")
    Image.fromarray(np.full((size, size), 40000, np.uint16)).save(root / "deep16.png")
    (root / "notes.txt").write_text("not a photo")
    good = (root / "b.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    return root


def test_scan_counts_skips_and_keeps_every_readable_mode(tmp_path):
    found = photos.scan_unlabelled(messy_folder(tmp_path))
    assert sorted(p.name for p in found.paths) == ["a.jpg", "alpha.png", "b.png", "deep16.png", "grey.png"]
    assert found.skipped_total == 3 and found.skipped["not an image"] >= 1


def test_sixteen_bit_grey_keeps_its_level_and_alpha_is_composited(tmp_path):
    messy_folder(tmp_path)
    deep = photos.load_photo(tmp_path / "deep16.png", 20)
    assert deep.shape == (20, 20, 3) and deep.dtype == np.uint8
    assert np.all(deep == 40000 >> 8)  # not clipped to white
    assert photos.load_photo(tmp_path / "grey.png", 20).shape == (20, 20, 3)
    # Half-transparent (alpha 128) over white, not the colour with its alpha dropped.
    colour = np.asarray(Image.open(tmp_path / "alpha.png"))[..., :3].astype(float)
    expected = colour * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(photos.load_photo(tmp_path / "alpha.png", 40).astype(float) - expected).max() <= 1


def test_exif_orientation_is_honoured(tmp_path):
    tall = np.zeros((40, 40, 3), np.uint8)
    tall[:10] = 255  # white band along the stored top edge
    image = Image.fromarray(tall)
    exif = image.getexif()
    exif[0x0112] = 6  # the camera says: rotate 90 degrees clockwise to view
    image.save(tmp_path / "rotated.jpg", exif=exif)
    raw = np.asarray(Image.open(tmp_path / "rotated.jpg"))
    shown = photos.load_photo(tmp_path / "rotated.jpg", 20)
    assert raw[:5].mean() > 200  # stored with the band on top
    assert shown[:, -3:].mean() > 200 and shown[:, :3].mean() < 50  # the band is now on the right


def test_empty_missing_and_labelled_mismatch_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        photos.scan_unlabelled(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable photos"):
        photos.scan_unlabelled(tmp_path / "empty")
    (tmp_path / "labelled" / "zebra").mkdir(parents=True)
    with pytest.raises(UserError, match="zebra"):
        photos.scan_labelled(tmp_path / "labelled", ["cat", "dog"])


def test_dataset_streams_the_validated_photos_in_order(tmp_path):
    found = photos.scan_unlabelled(messy_folder(tmp_path))
    batches = list(photos.dataset(found.paths, 16, batch=2).as_numpy_iterator())
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), photos.load_array(found.paths, 16))


def test_inference_batches_shrink_with_the_model_and_the_photos_and_stay_powers_of_two():
    assert photos.inference_batch(224, 29_029_932) == 4  # ResNet50 with its exits: issue 22's cap
    assert photos.inference_batch(240, 5_279_688) == 8  # Lite1 with its exits
    assert photos.inference_batch(32, 3_229_704) == 128
    for size in (32, 96, 224, 240, 480):
        batches = [photos.inference_batch(size, weights) for weights in (0, 5_000_000, 30_000_000, 100_000_000)]
        assert batches == sorted(batches, reverse=True) and all(2 <= b <= 128 and b & (b - 1) == 0 for b in batches)
    assert photos.inference_batch(480, 100_000_000) == 2


def test_decoded_batches_are_the_validated_photos_in_order(tmp_path):
    found = photos.scan_unlabelled(messy_folder(tmp_path))
    batches = list(photos.decoded_batches(found.paths, 16, 2))
    assert [len(b) for b in batches] == [2, 2, 1] and all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), photos.load_array(found.paths, 16))


def test_views_are_reproducible_per_seed_and_photo():
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    first, again = augment.strong(images, 7, 1, np.arange(3)).numpy(), augment.strong(images, 7, 1, np.arange(3)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, augment.strong(images, 8, 1, np.arange(3)).numpy())
    # A photo's view does not depend on its batch neighbours.
    alone = augment.strong(images[1:2], 7, 1, np.arange(1, 2)).numpy()
    np.testing.assert_array_equal(alone[0], first[1])
    assert first.shape == images.shape
    assert first.min() >= 0 and first.max() <= 255


def test_the_hosts_strong_view_runs_each_op_on_its_own_photos_with_the_same_values():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (24, 32, 32, 3)).astype(np.float32)
    table = augment.view_table(5, 1, np.arange(24), 32, 32)
    assert len(set(table[:, 3].tolist())) >= 4  # several ops drawn, so the partition is exercised
    every_op = augment.strong_from_table(images, table).numpy()
    chosen_only = augment.strong_from_table(images, table, each_op_on_its_photos_only=True).numpy()
    np.testing.assert_array_equal(chosen_only, every_op)
