"""`ee attach`: bundles, their fidelity, and one-line errors for every user mistake."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error, random_pixels, run_ee, tiny_classifier
from ee_cli.base import compat
from ee_cli.graph import backbones, heads
from ee_cli.files import bundle
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig


def test_attach_writes_a_bundle_that_loads_back_identically(workspace, cli):
    result = cli("attach", "--backbone", "cifar_resnet9", "--exits", "0.2,0.4,0.8", "--out", "B")
    assert result.exit_code == 0, result.output
    assert "ee personalise" in result.stdout and "layer1_add" in result.stdout
    meta = json.loads((workspace / "B" / "ee.json").read_text())
    assert [e["graft_layer"] for e in meta["exits"]] == ["layer1_pool", "layer1_add", "layer3_pool"]
    cumulative = [e["cumulative_mflops"] for e in meta["exits"]]
    assert cumulative == sorted(cumulative) and meta["final"]["cumulative_mflops"] == pytest.approx(190.518, abs=1e-3)
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input"]["shape"] == [32, 32, 3]
    assert meta["provenance"][0]["command"] == "attach" and meta["provenance"][0]["config"]["seed"] == 0
    assert all(not e["trained"] and not e["enabled"] and e["head_params"] > 0 for e in meta["exits"])
    loaded = bundle.read_bundle(workspace / "B").load_model()
    assert loaded.output_names == ["exit_0", "exit_1", "exit_2", "final"]


def test_reloaded_bundle_matches_the_in_memory_model_and_only_heads_train(workspace):
    result = attach(AttachConfig(backbone="cifar_resnet9", out="B", head="conv"))
    loaded = bundle.read_bundle(result.bundle_path).load_model()
    pixels = random_pixels(4, 32)
    for before, after in zip(result.model(pixels, training=False), loaded(pixels, training=False)):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    trainable = {weight.name.split("/")[0] for weight in loaded.trainable_weights}
    assert trainable and all(name.startswith("exit_") for name in trainable)
    exit_names = [e["name"] for e in result.meta["exits"]]
    for layer in loaded.layers:
        is_head = any(heads.is_head_layer(layer.name, name) for name in exit_names)
        assert layer.trainable == is_head or not layer.weights, layer.name


def test_backbone_weights_are_bit_identical_to_the_source(workspace):
    source = backbones.cifar_resnet9(32, 10)
    for layer in source.layers:  # make every weight differ from a fresh initialisation
        layer.set_weights([w + np.float32(0.123) for w in layer.get_weights()])
    source.save_weights(workspace / "source.h5")
    result = attach(AttachConfig(backbone="cifar_resnet9", weights=str(workspace / "source.h5"), out="B"))
    loaded = bundle.read_bundle(result.bundle_path).load_model()
    for layer in source.layers:
        for expected, actual in zip(layer.get_weights(), loaded.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(expected, actual)


def test_user_model_file_with_softmax_gives_logits(workspace, cli):
    path = tiny_classifier(workspace / "user.h5", softmax=True)
    original = compat.keras().models.load_model(path, compile=False)
    (workspace / "names.txt").write_text("cat\ndog\nbird\n")
    result = cli("attach", "--backbone", path, "--classes", "names.txt", "--exits", "0.3,0.6", "--out", "B")
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "B" / "ee.json").read_text())
    assert meta["classes"] == ["cat", "dog", "bird"] and meta["backbone"]["source"] == "file"
    loaded = bundle.read_bundle(workspace / "B").load_model()
    pixels = random_pixels(5, 16)
    logits = loaded(pixels)[-1].numpy()
    probabilities = original(pixels).numpy()
    np.testing.assert_allclose(compat.tf().nn.softmax(logits).numpy(), probabilities, rtol=1e-5, atol=1e-6)
    for layer in original.layers:
        for expected, actual in zip(layer.get_weights(), loaded.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(expected, actual)


def test_same_seed_same_heads_other_seed_other_heads(workspace):
    def head_weights(out: str, seed: int):
        result = attach(AttachConfig(backbone="cifar_resnet9", out=out, seed=seed))
        return result.model.get_layer("exit_0_logits").get_weights()[0]

    first, again, other = head_weights("A", 1), head_weights("B", 1), head_weights("C", 2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_existing_output_needs_exist_ok_and_nothing_half_written(workspace, cli):
    assert cli("attach", "--backbone", "cifar_resnet9", "--out", "B").exit_code == 0
    assert "already exists" in one_line_error(cli("attach", "--backbone", "cifar_resnet9", "--out", "B"))
    replaced = cli("attach", "--backbone", "cifar_resnet9", "--out", "B", "--exist-ok", "--head", "conv")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((workspace / "B" / "ee.json").read_text())["exits"][0]["head"] == "conv"
    (workspace / "notes").mkdir()
    (workspace / "notes" / "todo.txt").write_text("mine")
    assert "not a bundle" in one_line_error(cli("attach", "--backbone", "cifar_resnet9", "--out", "notes", "--exist-ok"))
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".")) == []


def test_a_failed_save_leaves_nothing_behind(workspace, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compat.keras().Model, "save", broken_save)
    with pytest.raises(OSError):
        attach(AttachConfig(backbone="cifar_resnet9", out="B"))
    assert not (workspace / "B").exists() and list(workspace.iterdir()) == []


def test_default_output_is_numbered_and_becomes_the_latest(workspace, cli):
    assert cli("attach", "--backbone", "cifar_resnet9").exit_code == 0
    assert cli("attach", "--backbone", "cifar_resnet9").exit_code == 0
    assert (workspace / "bundles" / "cifar_resnet9").is_dir() and (workspace / "bundles" / "cifar_resnet9-2").is_dir()
    latest, implicit = bundle.input_bundle(None)
    assert implicit and latest.path == (workspace / "bundles" / "cifar_resnet9-2").resolve()


def test_toml_config_is_overridden_by_flags(workspace, cli):
    (workspace / "ee.toml").write_text('[attach]\nbackbone = "cifar_resnet9"\nexits = [0.2, 0.8]\nhead = "conv"\n')
    assert cli("attach", "--config", "ee.toml", "--head", "light", "--out", "B").exit_code == 0
    meta = json.loads((workspace / "B" / "ee.json").read_text())
    assert [e["graft_layer"] for e in meta["exits"]] == ["layer1_pool", "layer3_pool"]
    assert meta["exits"][0]["head"] == "light"
    (workspace / "bad.toml").write_text("[attach]\nbackbon = 'x'\n")
    assert "unknown key" in one_line_error(cli("attach", "--config", "bad.toml"))


def test_json_output_is_machine_readable(workspace, cli):
    result = cli("attach", "--backbone", "cifar_resnet9", "--out", "B", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["bundle"] == "B"


def _keras3_file(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", "{}")
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--backbone", "vgg99"], "unknown backbone"),
        (["--backbone", "cifar_resnet9", "--exits", "0.5,1.5"], "fraction"),
        (["--backbone", "cifar_resnet9", "--exits", "half"], "comma-separated numbers"),
        (["--backbone", "cifar_resnet9", "--exits", "0.1,0.2,0.3,0.4,0.5,0.6,0.7"], "asks for 7 exits but this backbone has 6"),
        (["--backbone", "cifar_resnet9", "--head", "huge"], "unknown --head"),
        (["--backbone", "cifar_resnet9", "--classes", "a,b,c", "--num-classes", "5"], "3 class names"),
        (["--backbone", "headless.h5", "--num-classes", "5"], "does not end in a classifier"),
        (["--backbone", "cifar_resnet9", "--weights", "imagenet"], "no ImageNet weights"),
        (["--backbone", "cifar_resnet9", "--weights", "missing.h5"], "existing weights file"),
        (["--backbone", "cifar_resnet9", "--input-size", "8"], "too small"),
        (["--backbone", "resnet50", "--weights", "imagenet", "--num-classes", "5"], "1000 classes"),
        (["--backbone", "garbage.h5"], "cannot be opened as a tf_keras model file"),
        (["--backbone", "headless.h5"], "does not end in a classifier"),
        (["--backbone", "k3.keras"], "Keras 3"),
        (["--backbone", "cifar_resnet9", "--exit-layers", "layer1_res1_relu"], "inside a block"),
    ],
)
def test_every_user_mistake_is_one_line_and_exit_2(workspace, cli, args, expected):
    (workspace / "garbage.h5").write_bytes(b"not an hdf5 file at all")
    tiny_classifier(workspace / "headless.h5", classifier=False)
    _keras3_file(workspace / "k3.keras")
    assert expected in one_line_error(cli("attach", *args))
    assert not (workspace / "bundles").exists()


def test_imagenet_download_failure_is_one_line(workspace, cli, monkeypatch):
    from tf_keras.src.utils import data_utils

    def offline(*args, **kwargs):
        print("Downloading data from https://storage.googleapis.com/...")
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data_utils, "get_file", offline)
    line = one_line_error(cli("attach", "--backbone", "mobilenet_v2", "--input-size", "96"))
    assert "--weights none" in line and "--weights PATH" in line


def _internet_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_imagenet_offline_fails_fast_in_a_real_process(tmp_path):
    if _internet_reachable():
        pytest.skip("the internet is reachable here, so the offline path cannot be exercised")
    started = time.monotonic()
    result = run_ee("attach", "--backbone", "resnet50", timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--weights none" in lines[0], result.stderr
    assert result.stdout.strip() == ""


def test_help_is_grouped_and_does_not_import_tensorflow(tmp_path):
    import subprocess
    import sys

    probe = "import sys; from ee_cli.cli import app; assert 'tensorflow' not in sys.modules; print('lazy')"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "lazy"
    result = run_ee("--help", cwd=tmp_path)
    assert result.returncode == 0 and "attach" in result.stdout and "Pipeline" in result.stdout
    result = run_ee("attach", "--help", cwd=tmp_path)
    assert all(panel in result.stdout for panel in ("Backbone", "Exits", "Output", "Examples"))


@pytest.mark.parametrize("command", ["attach", "personalise", "evaluate", "export", "run"])
def test_every_command_has_help_with_examples_and_the_run_options(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout
    assert all(option in result.stdout for option in ("--seed", "--config", "--json"))


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_imagenet_backbones_with_preprocessing_inside_reload_identically(workspace, name):
    result = attach(AttachConfig(backbone=name, weights="none", input_size=32, num_classes=4, out="B"))
    loaded = bundle.read_bundle(result.bundle_path).load_model()
    pixels = random_pixels(2, 32)
    for before, after in zip(result.model(pixels), loaded(pixels)):
        np.testing.assert_array_equal(before.numpy(), after.numpy())


def test_caffe_preprocessing_is_bgr_minus_imagenet_means(workspace):
    model = backbones.build_backbone("resnet50", "none", 32, 4).model
    layer = model.get_layer(backbones.PREPROCESS_LAYER)
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    np.testing.assert_allclose(layer(pixel).numpy()[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def pointwise_classifier(path: Path, flatten: bool) -> Path:
    """MobileNet's (Reshape) or MobileNetV3's (Flatten) classifier: a 1x1 conv on the pooled map."""
    keras = compat.keras()
    layers = keras.layers
    pixels = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="c1")(layers.Rescaling(1 / 255.0)(pixels))
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="c2")(x)
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D(keepdims=True)(x))
    x = layers.Conv2D(4, 1, name="preds")(x)
    x = layers.Flatten()(x) if flatten else layers.Reshape((4,))(x)
    keras.Model(pixels, layers.Activation("softmax")(x)).save(path)
    return path


@pytest.mark.parametrize("flatten", [False, True])
def test_a_pointwise_conv_classifier_becomes_the_same_dense_classifier(workspace, flatten):
    path = pointwise_classifier(workspace / "user.h5", flatten)
    original = compat.keras().models.load_model(path, compile=False)
    result = attach(AttachConfig(backbone=str(path), exits=(0.4,), out="B"))
    assert len(result.meta["classes"]) == 4
    loaded = bundle.read_bundle(result.bundle_path).load_model()
    pixels = random_pixels(5, 16)
    np.testing.assert_allclose(compat.tf().nn.softmax(loaded(pixels)[-1]).numpy(), original(pixels).numpy(), rtol=1e-5, atol=1e-6)
    kernel, bias = loaded.get_layer("preds").get_weights()
    expected_kernel, expected_bias = original.get_layer("preds").get_weights()
    np.testing.assert_array_equal(kernel, expected_kernel.reshape(16, 4))
    np.testing.assert_array_equal(bias, expected_bias)


def test_list_graft_points_shows_every_candidate_and_the_chosen_ones_and_writes_nothing(workspace, cli):
    listed = cli("attach", "--backbone", "cifar_resnet9", "--list-graft-points", "--exits", "0.2,0.4")
    assert listed.exit_code == 0, listed.output
    assert all(name in listed.stdout for name in ("prep_relu", "layer1_pool", "layer3_add", "exit_1"))
    as_json = json.loads(cli("attach", "--backbone", "cifar_resnet9", "--list-graft-points", "--json").stdout)
    rows = {row["layer"]: row for row in as_json["graft_points"]}
    assert len(rows) == 6 and rows["layer1_add"]["relative_depth"] == pytest.approx(0.406, abs=1e-3)
    assert [row["exit"] for row in as_json["graft_points"] if row["exit"]] == ["exit_0", "exit_1", "exit_2"]
    assert rows["layer3_add"]["cumulative_mflops"] == pytest.approx(190.513, abs=1e-3)
    assert list(workspace.iterdir()) == []


def test_a_plain_stack_gets_three_exits_by_default_and_is_told_where_they_could_not_go(workspace, cli):
    keras = compat.keras()
    pixels = keras.Input((16, 16, 3))
    x = pixels
    for width in (8, 16, 32):  # strided conv -> BN -> ReLU, three times
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(width, 3, strides=2, padding="same")(x)))
    keras.Model(pixels, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))).save(workspace / "plain.h5")
    result = cli("attach", "--backbone", "plain.h5", "--out", "B")
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "B" / "ee.json").read_text())
    assert len({e["graft_layer"] for e in meta["exits"]}) == 3
    assert "Note: exit at 0.75" in " ".join(result.stdout.split())


def test_cells_reading_two_previous_cells_are_grafted_through_handoffs_and_cut_exactly(workspace):
    from test_graft import two_path_cells

    from ee_cli.graph import stages

    original = two_path_cells()
    original.save(workspace / "cells.h5")
    result = attach(AttachConfig(backbone=str(workspace / "cells.h5"), out="B"))
    assert [e["graft_layer"] for e in result.meta["exits"]] == ["ee_handoff_cell0_out", "ee_handoff_cell1_out", "cell2_out"]
    loaded = bundle.read_bundle(result.bundle_path).load_model()
    pixels = random_pixels(3, 16)
    outputs = [output.numpy() for output in loaded(pixels)]
    np.testing.assert_allclose(compat.tf().nn.softmax(outputs[-1]).numpy(), original(pixels).numpy(), rtol=1e-5, atol=1e-6)
    graft_layers = [e["graft_layer"] for e in result.meta["exits"]]
    carried = pixels
    for index, stage in enumerate(stages.cascade_stages(loaded, graft_layers, ["exit_0", "exit_1", "exit_2"])):
        staged = stage(carried)
        name = f"exit_{index}" if index < 3 else "final"
        np.testing.assert_allclose(staged[name].numpy(), compat.tf().nn.softmax(outputs[index]).numpy(), rtol=1e-5, atol=1e-6)
        carried = staged.get(graft_layers[index]) if index < 3 else None
