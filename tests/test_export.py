"""`ee export --tflite` and `ee run`. LiteRT runs in subprocesses: an abort there is a failed test,
not a dead test run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import coloured_photos, copy_workspace, one_line_error, personalised_user, prepared_workspace, run_ee
from ee_cli.base import compat
from ee_cli.files import bundle
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, EvaluateConfig
from ee_cli.commands.evaluate import evaluate

COMPARE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pathlib import Path
    from ee_cli.base import photos
    from ee_cli.exits import policy
    from ee_cli.runtime import litert
    folder, data = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((folder / "manifest.json").read_text())
    names = manifest["cascade"]["stops_after"]
    images = photos.load_array(photos.scan_unlabelled(data).paths[:100], 32).astype(np.float32)
    engine = litert.CascadeEngine.from_file(folder / "cascade.tflite", [policy.NEVER] * (len(names) - 1), 1)
    multi = litert.Runner(litert.interpreter(folder / "multi_exit.tflite", 1), "serving_default")
    diffs, agree = {n: 0.0 for n in names}, {n: 0 for n in names}
    for image in images:
        staged, together = engine.every_exit(image), multi(image[None])
        for name, probabilities in zip(names, staged):
            other = together[name][0]
            diffs[name] = max(diffs[name], float(np.abs(probabilities - other).max()))
            agree[name] += int(probabilities.argmax() == other.argmax())
    print(json.dumps({"photos": len(images), "max_diff": diffs, "agreement": {n: a / len(images) for n, a in agree.items()}}))
    """
)


@pytest.fixture(scope="module")
def calibrated_template(tmp_path_factory):
    with prepared_workspace(tmp_path_factory, "calibrated") as root:
        personalised_user(root, photo_count=120, batch=16)
        evaluate(EvaluateConfig(data="test", bundle="P", out="C", timed_runs=1, max_drop=100.0))
    return root


@pytest.fixture
def calibrated(workspace, calibrated_template):
    copy_workspace(calibrated_template, workspace)
    return workspace / "C"


@pytest.fixture(scope="module")
def float_export(calibrated_template):
    """The float cascade export of the calibrated template, written once for the tests that read it."""
    result = run_ee("export", "--tflite", "--quant", "none", "--out", "E-none", "--validate", "test",
                    "--policy", "recorded", "--json", cwd=calibrated_template, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["manifest"]


def _exported(workspace, mode: str, bound: list[str], float_export: dict) -> dict:
    if mode == "none":
        return float_export
    result = run_ee("export", "--tflite", "--quant", mode, "--out", f"E-{mode}", "--validate", "test", *bound,
                    "--policy", "recorded", "--json", cwd=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["manifest"]


def _compute_operators(path) -> int:
    """Convolutions and fully connected operators over every subgraph of a .tflite file."""
    schema = compat.litert_schema()
    wanted = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED}
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode()) for i in range(model.OperatorCodesLength())]
    return sum(codes[graph.Operators(i).OpcodeIndex()] in wanted
               for graph in (model.Subgraphs(g) for g in range(model.SubgraphsLength())) for i in range(graph.OperatorsLength()))


def _compare(folder, data) -> dict:
    done = subprocess.run([sys.executable, "-c", COMPARE, str(folder), str(data)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize(("mode", "tolerance", "agreement", "bound"), [("none", 1e-5, 1.0, []), ("int8_full", 0.05, 0.99, ["--max-accuracy-drop", "3.4"])])
def test_cascade_matches_the_multi_exit_model(float_export, workspace, calibrated, mode, tolerance, agreement, bound):
    # Float validates at the default bound (1 point); int8 on this near-random tiny model may flip
    # up to two of the 60 labelled photos (3.3 points), no more.
    manifest = _exported(workspace, mode, bound, float_export)
    assert set(manifest["files"]) >= {"multi_exit.tflite", "final.tflite", "cascade.tflite"}
    assert manifest["validation"]["passed"] and manifest["validation"]["labelled"]
    assert all(entry["finite"] for entry in manifest["validation"]["exits"].values())
    if mode == "none":  # each output validated against its own Keras output, not just an accuracy that a one-class model cannot tell apart
        assert max(entry["max_probability_difference"] for entry in manifest["validation"]["exits"].values()) <= 1e-4, manifest["validation"]
    assert manifest["input"]["dtype"] == ("uint8" if mode == "int8_full" else "float32")
    enabled = [e["name"] for e in manifest["exits"] if e["enabled"]]
    # Each weight stored once: the cascade is no bigger than every exit at once in one graph.
    assert manifest["files"]["cascade.tflite"] <= 1.1 * manifest["files"]["multi_exit.tflite"]
    assert manifest["files"]["cascade.tflite"] < manifest["files"]["final.tflite"] + sum(
        manifest["files"][f"{name}.tflite"] for name in enabled)
    # Each layer runs once: the stages hold the plain model's compute operators plus the enabled heads'
    # (the converter shares identical weights, so a stage that recomputes earlier layers keeps the size).
    model = bundle.read_bundle(calibrated).load_model()
    head_layers = sum(type(layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense") for name in enabled
                      for layer in model.layers if layer.name.startswith(f"{name}_"))
    export = workspace / f"E-{mode}"
    assert _compute_operators(export / "cascade.tflite") == _compute_operators(export / "final.tflite") + head_layers
    assert manifest["cascade"]["stops_after"] == [*enabled, "final"] and len(enabled) >= 1
    stage_io = manifest["cascade"]["stage_io"]
    assert len(stage_io) == len(enabled) + 1 and stage_io[0]["input"]["dtype"] == manifest["input"]["dtype"]
    assert all(stage["input"]["shape"] == previous["outputs"]["features"]["shape"] for previous, stage in zip(stage_io, stage_io[1:]))
    compared = _compare(workspace / f"E-{mode}", workspace / "photos")
    assert compared["photos"] == 100
    assert max(compared["max_diff"].values()) <= tolerance, compared
    assert min(compared["agreement"].values()) >= agreement, compared
    if mode == "int8_full":  # pixels in as --input-type (uint8 by default); hand-offs in the network's own int8
        first, *later = stage_io
        assert first["input"]["dtype"] == "uint8" and later[-1]["outputs"]["probabilities"]["dtype"] == "uint8"
        assert all(stage["input"]["dtype"] == "int8" for stage in later)
        assert all(stage["outputs"]["features"]["dtype"] == "int8" for stage in stage_io[:-1])


def test_run_and_evaluate_time_the_exported_files_in_litert(float_export, workspace, calibrated):
    result = run_ee("run", "--export", "E-none", "--data", "test", "--json", cwd=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["photos"] == 60 and sum(report["histogram"].values()) == 60
    assert report["cascade_ms"]["mean"] > 0 and report["full_ms"]["mean"] > 0 and 0 <= report["accuracy"] <= 1
    assert len(report["profile"]["stage_ms"]) == len(report["histogram"])
    profiled = run_ee("evaluate", "--bundle", "C", "--data", "test", "--export", "E-none", "--timed-runs", "3", "--out", "C2", "--json", cwd=workspace, timeout=300)
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    rows = {row["exit"]: row for row in json.loads(profiled.stdout)["metrics"]["exits"]}
    assert rows["final"]["litert_p50_ms"] > 0 and rows["final"]["litert_threads"] == 1


def test_a_bundle_without_thresholds_exports_the_plain_model_and_says_why(workspace, calibrated, cli):
    # P's 24 held-out photos are below the floor for thresholds: null thresholds never make a cascade.
    assert all(e["threshold"] is None for e in json.loads((workspace / "P" / "ee.json").read_text())["exits"])
    exported = cli("export", "--tflite", "--bundle", "P", "--quant", "none", "--out", "E0")
    assert exported.exit_code == 0, exported.output[-2000:]
    assert "Exit policy: plain model: 24 held-out photos" in " ".join(exported.stdout.split())
    cascade = json.loads((workspace / "E0" / "manifest.json").read_text())["cascade"]
    assert cascade["stops_after"] == ["final"] and cascade["thresholds"] == [] and len(cascade["signatures"]) == 1
    coloured_photos(workspace / "test" / "x", 6, seed=4)  # a class the personalised export cannot predict
    result = run_ee("run", "--export", "E0", "--data", "test", "--json", cwd=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["histogram"] == {"final": 66} and report["photos_of_classes_outside_the_export"] == {"x": 6}
    assert report["accuracy"] <= 60 / 66  # the six can only be wrong


def test_measured_policy_times_stages_and_heads_and_never_deploys_a_slower_cascade(workspace, calibrated):
    exported = run_ee("export", "--tflite", "--out", "M", "--json", cwd=workspace, timeout=300)  # the defaults: int8_full, measured
    assert exported.returncode == 0, exported.stderr[-2000:]
    manifest = json.loads(exported.stdout)["manifest"]
    assert manifest["quant"] == "int8_full" and manifest["input"]["dtype"] == "uint8"
    choice = manifest["cascade"]["policy"]
    assert choice["from_bundle"]["set_by"] == "evaluate"
    first = choice["measured"][0]
    recorded = [i for i, t in enumerate(choice["from_bundle"]["thresholds"]) if t is not None]
    assert first["exits"] == recorded and len(first["stage_ms"]) == len(recorded) + 1 and len(first["head_ms"]) == len(recorded)
    assert all(ms > 0 for ms in first["stage_ms"] + first["head_ms"]) and first["plain_ms"] > 0
    used = [e["name"] for e in manifest["exits"] if e["enabled"]]
    assert manifest["cascade"]["stops_after"] == [*used, "final"]
    if used:
        assert choice["predicted"]["speedup"] > 1.0 and choice["predicted"]["unit"] == "LiteRT ms"
    else:
        assert choice["reason"].startswith("plain model")
    assert not any(path.name.startswith("profile-") for path in (workspace / "M").iterdir())
    ran = run_ee("run", "--export", "M", "--data", "test", "--timed-runs", "5", "--json", cwd=workspace, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    report = json.loads(ran.stdout)
    assert report["quant"] == "int8_full" and sum(report["histogram"].values()) == 60 and 0 <= report["accuracy"] <= 1
    assert list(report["histogram"]) == manifest["cascade"]["stops_after"]


NIGHTLY = pytest.mark.nightly  # each mode costs a full export (~30 s); int8_full with --input-type int8 is the QAT test's, in `make test`


@pytest.mark.parametrize(("quant", "extra", "pixels"), [pytest.param("fp16", [], "float32", marks=NIGHTLY), pytest.param("dynamic", [], "float32", marks=NIGHTLY),
                                                        pytest.param("int8", [], "float32", marks=NIGHTLY),
                                                        pytest.param("int8_full", ["--input-type", "int8"], "int8", marks=NIGHTLY)])
def test_every_mode_exports_and_validates(workspace, calibrated, quant, extra, pixels):
    result = run_ee("export", "--tflite", "--quant", quant, *extra, "--policy", "recorded", "--validate", "test", "--max-accuracy-drop", "3.4",
                    "--out", "X", "--json", cwd=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["quant"] == quant and manifest["input"]["dtype"] == pixels and manifest["validation"]["passed"]
    assert {"multi_exit.tflite", "final.tflite", "cascade.tflite"} <= set(manifest["files"])
    refused = run_ee("export", "--tflite", "--quant", quant, "--out", "X", cwd=workspace, timeout=300)  # an existing --out
    assert refused.returncode == 2 and "already exists" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--quant", "int8_full"], "int8"),
        (["--tflite", "--quant", "int4"], "--quant"),
        (["--tflite", "--quant", "int8_full", "--calibration", "few"], "at least 100"),
        (["--tflite", "--out", "notes"], "not an ee export"),
    ],
)
def test_user_mistakes_are_one_line(workspace, cli, args, expected):
    attach(AttachConfig(backbone="cifar_resnet9", out="B", classes="r,g,b,x,y"))
    coloured_photos(workspace / "few", 20)
    (workspace / "notes").mkdir()
    (workspace / "notes" / "mine.txt").write_text("keep")
    if "--quant" in args and args[0] != "--tflite":
        assert "--tflite" in one_line_error(cli("export", *args))
    else:
        assert expected in one_line_error(cli("export", *args, "--exist-ok"))


def test_quantisation_aware_heads_export_with_int8_pixels_and_validate(workspace, calibrated):
    # One int8_full export for two promises (each costs ~30 s here): --qat, and --input-type int8.
    result = run_ee("export", "--tflite", "--quant", "int8_full", "--input-type", "int8", "--qat", "--qat-steps", "5", "--policy", "recorded",
                    "--out", "Q", "--validate", "test", "--max-accuracy-drop", "100", "--json", cwd=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["qat"] and manifest["validation"]["passed"] and manifest["quant"] == "int8_full"
    assert manifest["input"]["dtype"] == "int8" and manifest["cascade"]["stage_io"][0]["input"]["dtype"] == "int8"
    assert {"multi_exit.tflite", "final.tflite", "cascade.tflite"} <= set(manifest["files"])
    refused = run_ee("export", "--tflite", "--quant", "int8_full", "--out", "Q", cwd=workspace, timeout=300)  # an existing --out
    assert refused.returncode == 2 and "already exists" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    # LiteRT against the QAT Keras model, every output, on the 60 validation photos: at most one flip.
    # (The cascade's own int8 path is compared photo by photo in test_cascade_matches_the_multi_exit_model.)
    assert all(entry["finite"] and entry["top1_agreement"] >= 59 / 60 for entry in manifest["validation"]["exits"].values()), manifest["validation"]


def test_qat_needs_an_int8_mode(workspace, cli):
    attach(AttachConfig(backbone="cifar_resnet9", out="B", classes="r,g,b,x,y"))
    assert "--qat" in one_line_error(cli("export", "--tflite", "--quant", "fp16", "--qat"))


def test_a_broken_bound_writes_the_export_reports_it_and_exits_1(workspace, calibrated, cli):
    # A negative bound cannot be met: the export is kept, the failure is said, the exit code is 1.
    result = cli("export", "--tflite", "--quant", "none", "--out", "E", "--validate", "test", "--max-accuracy-drop", "-1", "--json")
    assert result.exit_code == 1 and "validation failed" in result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert not manifest["validation"]["passed"] and (workspace / "E" / "cascade.tflite").is_file()


def test_uint8_probabilities_top_out_below_one_so_thresholds_are_clamped_there():
    import numpy as np

    from ee_cli.runtime import litert

    uint8 = {"dtype": np.uint8, "quantization": (1 / 256, 0)}
    float32 = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert litert.highest_probability(uint8) == pytest.approx(255 / 256)
    # A photo whose float probability is 0.999 saturates at 255 (0.996): at a 0.9975 threshold
    # calibrated in float it must still leave, so the engine's threshold is clamped to 255/256.
    saturated = litert.dequantise(litert.quantise(np.array([0.999]), uint8), uint8)[0]
    assert saturated < 0.9975 and saturated >= litert.usable_threshold(0.9975, uint8)
    assert litert.usable_threshold(0.9975, float32) == 0.9975  # float outputs keep it as it is
    assert litert.usable_threshold(None, uint8) > 1  # an exit that is off never fires


def test_alternating_wall_times_takes_turns_in_blocks_and_times_every_call_asked_for():
    from ee_cli.runtime import litert

    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("plain", "cascade")}
    times = litert.alternating_wall_times(calls, runs=7, block=3, warmup=1)
    assert {name: len(found) for name, found in times.items()} == {"plain": 7, "cascade": 7}
    timed = order[2:]  # after one warm-up call each
    # Each turn: one untimed call after the switch, then up to `block` timed ones.
    assert timed[:8] == ["plain"] * 4 + ["cascade"] * 4
    assert timed.count("plain") == timed.count("cascade") == 7 + 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "test"], "--export DIR and --data DIR are required"),
        (["--export", "E", "--data", "test", "--threads", "0"], "at least 1"),
        (["--export", "E", "--data", "missing"], "does not exist"),
    ],
)
def test_run_mistakes_are_one_line(workspace, cli, args, expected):
    (workspace / "E").mkdir()
    (workspace / "E" / "manifest.json").write_text(json.dumps({"classes": ["r", "g"], "input": {"shape": [1, 32, 32, 3]}}))
    assert expected in one_line_error(cli("run", *args))
