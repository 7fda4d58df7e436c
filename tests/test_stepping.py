"""Exact BatchNorm adaptation from stepping stones: the same statistics and predictions as passes
from the photos, at a fraction of their compute, with nothing left on disk."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import coloured_photos
from ee_cli.base import compat, photos
from ee_cli.files import bundle
from ee_cli.adaptation import adapt, stepping
from ee_cli.graph.personal_model import generic_output


def _plain_logits(model, images: np.ndarray) -> np.ndarray:
    return compat.keras().Model(model.inputs, model.get_layer(generic_output(model)).output)(images.astype(np.float32)).numpy()


def test_reads_from_a_stone_give_the_model_s_own_predictions_and_cost_less_than_a_whole_pass(workspace, attached, tmp_path):
    model = bundle.read_bundle(attached).load_model()
    layers = adapt.backbone_batchnorms(model)
    images = photos.load_array(photos.scan_unlabelled(coloured_photos(workspace / "photos", 20)).paths, 32)
    generic = adapt.statistics_of(layers)
    walker = stepping.Stepping(model, generic_output(model), lambda: [images[:8], images[8:16], images[16:]], tmp_path / "stones")
    np.testing.assert_allclose(walker.read(0), _plain_logits(model, images), rtol=1e-5, atol=1e-5)
    assert walker.passes == [1.0]  # from the photos, the whole way
    adapted = walker.deepen(4)
    assert len(walker.passes) == 1 + len(adapt.batchnorm_waves(model, layers[:4]))
    assert sum(walker.passes[1:]) < 1.0  # four waves, each from the last stone: less than one pass between them
    assert walker.stone is not None and len(list((tmp_path / "stones").glob("stone-*"))) == 1  # the previous stone was removed
    adapt.set_statistics(layers, adapted, generic, 4)
    np.testing.assert_allclose(walker.read(4), _plain_logits(model, images), rtol=1e-5, atol=1e-5)
    assert walker.passes[-1] < 1.0
    adapt.set_statistics(layers, adapted, generic, 0)  # a stone made with adapted layers upstream: read from the photos again
    np.testing.assert_allclose(walker.read(0), _plain_logits(model, images), rtol=1e-5, atol=1e-5)
    assert walker.passes[-1] == 1.0


def test_the_photos_are_decoded_once_by_the_first_pass_that_reads_them_all(workspace, attached, tmp_path):
    model = bundle.read_bundle(attached).load_model()
    images = photos.load_array(photos.scan_unlabelled(coloured_photos(workspace / "photos", 20)).paths, 32)
    calls = []

    def batches():
        calls.append(len(calls))
        yield images[:8]
        if len(calls) == 1:
            raise OSError("a photo went missing")  # a pass that never reached the end is not read back
        yield from (images[8:16], images[16:])

    walker = stepping.Stepping(model, generic_output(model), batches, tmp_path / "stones")
    with pytest.raises(OSError):
        walker.read(0)
    first = walker.read(0)
    np.testing.assert_allclose(first, _plain_logits(model, images), rtol=1e-5, atol=1e-5)
    layers = adapt.backbone_batchnorms(model)
    generic = adapt.statistics_of(layers)
    adapted = walker.deepen(4)  # its first wave starts from the photos too
    adapt.set_statistics(layers, adapted, generic, 0)
    np.testing.assert_array_equal(walker.read(0), first)
    assert len(calls) == 2  # three passes started from the photos after the failed one: one decoded them
    assert len(list((tmp_path / "stones" / "photos").glob("*.npy"))) == 3


def test_adapt_batchnorm_leaves_no_stone_behind(workspace, attached, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = bundle.read_bundle(attached).load_model()
    images = photos.load_array(photos.scan_unlabelled(coloured_photos(workspace / "photos", 12)).paths, 32)
    stepping.adapt_batchnorm(model, lambda: [images[:6], images[6:]], 4)
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith("ee-stones-")]


def test_stones_of_layers_whose_names_nest_like_paths_stay_apart():
    """MobileNetV3 names layers `expanded_conv_1/project/BatchNorm`: one stone's name can be a folder
    above the next one's, and removing the older stone must not take the newer one with it."""
    keras = compat.keras()
    pixels = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(pixels)
    x = keras.layers.BatchNormalization(name="stem/bn")(x)
    x = keras.layers.ReLU(name="stem/bn/relu")(x)
    x = keras.layers.Conv2D(2, 1, name="stem/bn/relu/squeeze")(x)
    x = keras.layers.BatchNormalization(name="stem/bn/relu/squeeze/bn")(x)
    x = keras.layers.Conv2D(4, 1, name="stem/bn/relu/squeeze/bn/expand")(x)
    x = keras.layers.BatchNormalization(name="stem/bn/relu/squeeze/bn/expand/bn")(x)
    model = keras.Model(pixels, keras.layers.Dense(3, name="final")(keras.layers.GlobalAveragePooling2D()(x)))
    images = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3)).astype(np.uint8)
    stepping.adapt_batchnorm(model, lambda: [images[:4], images[4:]], 3)
    for layer in adapt.backbone_batchnorms(model):  # each layer's statistics are its input's, earlier ones adapted
        inputs = keras.Model(model.inputs, layer.input)(images.astype(np.float32)).numpy().reshape(-1, layer.input.shape[-1])
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(0), rtol=1e-4, atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(0), rtol=1e-3, atol=1e-4, err_msg=layer.name)
