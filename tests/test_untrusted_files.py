"""Files from elsewhere are untrusted: a model file runs no code unless the user trusts it, and a
broken bundle, export or run folder ends in one line and exit 2, never a traceback.

The first five cases are the fault table of the issue that asked for this boundary; each failed
before it (the Lambda ran and attach succeeded; tracebacks for the truncated model, the incomplete
and the garbage export; a silent export of thresholds "abc")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_workspace, one_line_error, exported_user, prepared_workspace, run_ee
from ee_cli.graph import trust

MARKER = "marker.txt"


def evil_model(folder: Path, name: str = "evil.h5") -> Path:
    """A tf_keras classifier whose Lambda layer writes MARKER (by absolute path) whenever it runs."""
    from ee_cli.base import compat

    keras = compat.keras()
    marker = str((folder / MARKER).resolve())
    pixels = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Lambda(lambda t, m=marker: (open(m, "w").write("ran"), t)[1], name="evil")(pixels)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.MaxPooling2D(name="p1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(3, name="classifier")(x)
    keras.Model(pixels, x).save(folder / name)
    (folder / MARKER).unlink()  # building it ran the function once
    return folder / name


@pytest.fixture(scope="module")
def exported_template(tmp_path_factory):
    """P (personalised), C (calibrated: exits on) and E (its float cascade export)."""
    with prepared_workspace(tmp_path_factory, "untrusted") as root:
        exported_user(root)
    return root


@pytest.fixture
def exported(workspace, exported_template):
    copy_workspace(exported_template, workspace)
    return workspace


def test_a_lambda_model_is_refused_before_it_runs_and_runs_only_when_trusted(workspace, cli):
    evil = evil_model(workspace)
    line = one_line_error(cli("attach", "--backbone", evil, "--out", "A"))
    assert "Lambda" in line and "'evil'" in line and trust.TRUST_FLAG in line
    assert not (workspace / MARKER).exists() and not (workspace / "A").exists()

    result = cli("attach", "--backbone", evil, "--out", "A", "--trust-model-code")
    assert result.exit_code == 0, result.output
    assert (workspace / MARKER).read_text() == "ran" and (workspace / "A" / "ee.json").is_file()
    (workspace / MARKER).unlink()
    # The bundle holds the Lambda too: reading it needs the same trust, every command alike.
    line = one_line_error(cli("export", "--tflite", "--bundle", "A", "--quant", "none"))
    assert "Lambda" in line and not (workspace / MARKER).exists()


def test_a_savedmodel_folder_is_refused_without_trust(workspace, cli):
    (workspace / "saved").mkdir()
    line = one_line_error(cli("attach", "--backbone", workspace / "saved"))
    assert "SavedModel" in line and trust.TRUST_FLAG in line


def test_a_truncated_model_file_is_one_line_in_a_real_process(exported):
    model = exported / "P" / "model.h5"
    data = model.read_bytes()
    model.unlink()  # the bundle's file may be a hard link shared with B
    model.write_bytes(data[: len(data) // 2])
    result = run_ee("export", "--tflite", "--bundle", "P", "--calibration", "photos", "--out", "X", cwd=exported, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "model.h5" in lines[0] and "truncated" in lines[0]
    assert not (exported / "X").exists()


@pytest.mark.parametrize("missing", [["cascade.tflite", "final.tflite"], ["multi_exit.tflite"]])
def test_an_incomplete_export_names_what_is_missing(exported, cli, missing):
    for name in missing:
        (exported / "E" / name).unlink()
    line = one_line_error(cli("run", "--export", "E", "--data", "test"))
    assert "incomplete" in line and all(name in line for name in missing)


def test_garbage_tflite_files_are_one_line_in_a_real_process(exported):
    for path in (exported / "E").glob("*.tflite"):
        path.write_bytes(b"\x00garbage" * 500)
    result = run_ee("run", "--export", "E", "--data", "test", cwd=exported, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "not a valid .tflite model" in lines[0], result.stderr[-2000:]


def test_a_tflite_file_from_another_export_is_refused(exported, cli):
    shutil.copy(exported / "E" / "final.tflite", exported / "E" / "cascade.tflite")  # a real model, the wrong one
    line = one_line_error(cli("run", "--export", "E", "--data", "test"))
    assert "does not match its manifest" in line


def test_thresholds_abc_make_the_bundle_malformed(exported, cli):
    meta = json.loads((exported / "C" / "ee.json").read_text())
    meta["policy"]["thresholds"] = ["abc"] * len(meta["exits"])
    (exported / "C" / "ee.json").write_text(json.dumps(meta))
    line = one_line_error(cli("export", "--tflite", "--bundle", "C", "--quant", "none", "--out", "X"))
    assert "ee.json is malformed" in line and "policy.thresholds[0]" in line
    assert not (exported / "X").exists()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.update(format_version=99), "bundle format 99"),
        (lambda m: (m["exits"].pop(), m["policy"]["thresholds"].pop()), "does not match ee.json"),
        (lambda m: m.update(personal_classes=["nobody"]), "personal_classes must be among classes"),
        (lambda m: m["exits"][0].update(cumulative_macs=-1), "exits[0].cumulative_macs"),
        (lambda m: m.update(model_file="../../elsewhere.h5"), "model_file"),
    ],
    ids=["newer-format", "an-exit-too-few", "stray-personal-class", "negative-cost", "model-elsewhere"],
)
def test_a_bundle_that_breaks_its_schema_is_refused(exported, cli, edit, expected):
    meta = json.loads((exported / "C" / "ee.json").read_text())
    edit(meta)
    (exported / "C" / "ee.json").write_text(json.dumps(meta))
    line = one_line_error(cli("export", "--tflite", "--bundle", "C", "--quant", "none"))
    assert expected in line


def test_nan_in_a_manifest_is_refused_not_read_as_never_leaving(exported, cli):
    text = (exported / "E" / "manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest["cascade"]["thresholds"], "the fixture's cascade should have an early exit"
    manifest["cascade"]["thresholds"][0] = float("nan")
    (exported / "E" / "manifest.json").write_text(json.dumps(manifest))  # Python writes NaN unquoted
    line = one_line_error(cli("run", "--export", "E", "--data", "test"))
    assert "manifest.json is not valid JSON" in line and "NaN" in line


def test_a_manifest_may_not_name_files_outside_its_folder(exported, cli):
    manifest = json.loads((exported / "E" / "manifest.json").read_text())
    manifest["cascade"]["file"] = "../C/model.tflite"
    (exported / "E" / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(cli("run", "--export", "E", "--data", "test"))
    assert "cascade.file" in line


def test_a_damaged_run_folder_is_one_line_on_resume(workspace, cli):
    from conftest import QUICK, coloured_photos, narrow_resnet9

    assert cli("attach", "--backbone", narrow_resnet9(workspace), "--out", "B", "--classes", "r,g,b,x,y").exit_code == 0
    coloured_photos(workspace / "photos", 40)
    run = workspace / "runs" / "personalise-1"
    run.mkdir(parents=True)
    (run / "state.json").write_text("{not json")
    line = one_line_error(cli("personalise", "--bundle", "B", "--data", "photos", "--resume", *QUICK))
    assert "state.json is not valid JSON" in line
    (run / "state.json").write_text(json.dumps({"status": 3}))
    line = one_line_error(cli("personalise", "--bundle", "B", "--data", "photos", "--resume", *QUICK))
    assert "state.json is damaged" in line


# The vetting rule itself, on saved configurations written by hand: no TensorFlow needed.
KNOWN = frozenset({"Conv2D", "Dense", "InputLayer", "GlorotUniform", "Zeros"})


def _layer(class_name: str, **config) -> dict:
    return {"class_name": class_name, "config": {"name": config.pop("name", "x"), **config}}


@pytest.mark.parametrize(
    "layer, refused",
    [
        (_layer("Lambda", function=["4wEAAAAA", None, None], function_type="lambda"), "Python code"),
        (_layer("TFOpLambda", function="io.write_file"), "tf.io.write_file"),
        (_layer("TFOpLambda", function="compat.v1.py_func"), "tf.compat.v1.py_func"),
        ({"module": "os", "class_name": "Dense", "config": {"name": "x"}}, "module 'os'"),
        (_layer("MyCustomBlock"), "custom class"),
        ({"class_name": "__lambda__", "config": {"code": "..."}}, "Python code"),
        (_layer("Dense", activation={"class_name": "function", "module": "keras.utils", "config": "get_file"}), "outside tf_keras' activations"),
    ],
)
def test_code_in_a_configuration_is_found(layer, refused):
    config = {"class_name": "Functional", "config": {"layers": [_layer("InputLayer"), layer]}}
    found = trust.code_in_config(config, KNOWN)
    assert len(found) == 1 and refused in found[0]


def test_tensor_maths_and_plain_layers_pass():
    layers = [
        _layer("InputLayer"),
        _layer("TFOpLambda", function="__operators__.add"),
        _layer("TFOpLambda", function="math.multiply"),
        _layer("SlicingOpLambda", function="__operators__.getitem"),
        {"module": "keras.layers", "class_name": "Conv2D", "config": {"name": "c", "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform", "config": {}}}},
        _layer("Dense", activation={"class_name": "function", "module": "keras.activations", "config": "relu"}),
    ]
    assert trust.code_in_config({"class_name": "Functional", "config": {"layers": layers}}, KNOWN) == []


def test_the_known_classes_are_tf_keras_layers_but_never_lambda():
    known = trust.tf_keras_classes()
    assert {"Conv2D", "BatchNormalization", "Dense", "GlorotUniform", "L2"} <= known
    assert "Lambda" not in known


# What already held when the boundary was drawn, kept that way.

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's first bytes), no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_a_messy_folder_from_elsewhere_is_read_with_every_skip_counted(tmp_path):
    from PIL import Image

    from ee_cli.base import photos

    root = tmp_path / "photos"
    root.mkdir()
    colour = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    readable = {
        "cmyk.jpg": Image.fromarray(colour).convert("CMYK"),
        "one_pixel.png": Image.fromarray(colour[:1, :1]),
        "wide.png": Image.fromarray(np.resize(colour, (2, 4000, 3))),
        "anim.gif": Image.fromarray(colour).convert("P"),
        "photo.webp": Image.fromarray(colour),
        "café_été.png": Image.fromarray(colour),
        "deep16.png": Image.fromarray(np.full((40, 40), 40000, np.uint16)),
    }
    for name, image in readable.items():
        image.save(root / name)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("text named like a photo")
    (root / "folder.jpg").mkdir()
    (root / "loop").symlink_to(root, target_is_directory=True)
    Image.fromarray(colour).save(root / "whole.jpg")
    (root / "cut.jpg").write_bytes((root / "whole.jpg").read_bytes()[:200])
    _png_header_only(root / "huge.png", 20000, 20000)  # 400 Mpixel
    found = photos.scan_unlabelled(root)
    names = {path.name for path in found.paths}
    assert set(readable) | {"whole.jpg"} <= names and not names & {"empty.jpg", "notes.jpg", "cut.jpg", "huge.png"}
    assert found.skipped_total == 4, found.skipped
    pixels = photos.load_array(list(found.paths), 32)
    assert pixels.shape == (len(found.paths), 32, 32, 3)


def test_two_personalise_commands_on_one_out_one_wins_and_the_bundle_is_whole(workspace):
    import subprocess
    import sys

    from conftest import coloured_photos, narrow_resnet9

    from ee_cli.commands.attach import attach
    from ee_cli.base.config import AttachConfig

    attach(AttachConfig(backbone=narrow_resnet9(workspace), out="B", classes="r,g,b,x,y"))
    coloured_photos(workspace / "photos", 48)
    command = [sys.executable, "-m", "ee_cli", "personalise", "--bundle", "B", "--data", "photos", "--out", "P", "--personal-classes", "r,g,b",
               "--epochs", "2", "--batch", "16", "--quiet"]
    runs = [subprocess.Popen(command, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=240), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len([line for line in loser.splitlines() if line.strip()]) == 1 and "P" in loser
    assert bundle_is_whole(workspace / "P")


def bundle_is_whole(path: Path) -> bool:
    from ee_cli.files import bundle

    return bundle.read_bundle(path).load_model() is not None and not list(path.parent.glob(".P.*.partial"))


def test_kill_9_during_export_leaves_no_half_written_folder(exported):
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "ee_cli", "export", "--tflite", "--bundle", "C", "--quant", "none", "--calibration", "photos", "--out", "K", "--quiet"]
    victim = subprocess.Popen(command, cwd=exported, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(exported.glob(".K.*.partial/*.tflite")):
        time.sleep(0.05)
    assert list(exported.glob(".K.*.partial/*.tflite")), "the export never started writing"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (exported / "K").exists()
    again = subprocess.run(command, cwd=exported, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (exported / "K" / "manifest.json").is_file()


def test_an_out_written_meanwhile_is_never_replaced_without_exist_ok(tmp_path):
    from ee_cli.base import atomic
    from ee_cli.base.errors import UserError

    out = tmp_path / "P"
    with pytest.raises(UserError, match="written by another command meanwhile"):
        with atomic.staged_folder(out, exist_ok=False) as staging:
            (staging / "mine").write_text("loser")
            out.mkdir()
            (out / "theirs").write_text("winner")
    assert [path.name for path in out.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".P.*.partial"))
    with atomic.staged_folder(out, exist_ok=True) as staging:
        (staging / "mine").write_text("replaced on purpose")
    assert [path.name for path in out.iterdir()] == ["mine"]
