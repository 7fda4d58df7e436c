"""On-device personalisation: `personalise.tflite` (builtin ops only) and `ee personalise --engine litert`.

One tiny personalisation through LiteRT is shared by the module's tests. LiteRT runs in subprocesses
that never import TensorFlow: an abort there is a failed test, and the phone's claim is checked."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import coloured_photos, narrow_resnet9, one_line_error, prepared_workspace
from ee_cli.files import bundle
from ee_cli.adaptation import ssl
from ee_cli.runtime import litert_trainer, ondevice
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, PersonaliseConfig
from ee_cli.commands.personalise import personalise

# Runs in a child process: numpy, LiteRT and ee_cli's TF-free modules only.
LITERT_CHECKS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ee_cli.adaptation import augment
    from ee_cli.runtime import litert, ondevice
    mode, artefact = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    views = {f"{kind}_view": augment.view_table(0, shift, np.arange(4), 32, 32) for kind, shift in (("weak", 0), ("strong", 1))}

    def batch(runner, seed):
        found = np.random.default_rng(seed)
        details = runner.get_input_details()
        feed = {name: found.normal(0, 1, d["shape"]).astype(np.float32) for name, d in details.items()}
        feed["labels"] = np.eye(details["labels"]["shape"][1], dtype=np.float32)[np.arange(details["labels"]["shape"][0]) % details["labels"]["shape"][1]]
        return feed

    def fresh():
        return litert.interpreter(artefact, 1)

    report = {}
    if mode == "signatures":
        loaded = fresh()
        ran = {"features": loaded.get_signature_runner("features")(pixels=pixels, **views),
               "bn_stats": loaded.get_signature_runner("bn_stats")(pixels=pixels),
               "train": loaded.get_signature_runner("train")(**batch(loaded.get_signature_runner("train"), 1)),
               "infer": loaded.get_signature_runner("infer")(pixels=pixels),
               "get_weights": loaded.get_signature_runner("get_weights")()}
        ran["set_weights"] = loaded.get_signature_runner("set_weights")(**ran["get_weights"])
        means = {n.replace("_sum", "_mean"): v / ran["bn_stats"][n.replace("_sum", "_count")] for n, v in ran["bn_stats"].items() if n.endswith("_0_sum") or n.endswith("_1_sum")}
        setter = loaded.get_signature_runner("set_bn_statistics")
        statistics = {n: np.ones(d["shape"], np.float32) for n, d in setter.get_input_details().items()} | means
        ran["set_bn_statistics"] = setter(**statistics)
        report = {"ran": sorted(ran), "keys": sorted(loaded.get_signature_list()),
                  "finite": all(np.isfinite(v).all() for outputs in ran.values() for v in outputs.values()),
                  "ops": sorted(ondevice.operator_names(open(artefact, "rb").read())),
                  "features": {k: list(v.shape) for k, v in ran["features"].items()},
                  "infer_sums": [float(v.sum(1).mean()) for v in ran["infer"].values()],
                  "moved": bool(np.abs(loaded.get_signature_runner("features")(pixels=pixels, **views)["teacher"] - ran["features"]["teacher"]).max() > 1e-4)}
    elif mode == "round_trip":
        first = fresh()
        train = first.get_signature_runner("train")
        for seed in range(3):
            train(**batch(train, seed))
        saved = first.get_signature_runner("get_weights")()
        second = fresh()
        second.get_signature_runner("set_weights")(**saved)
        outputs = [loaded.get_signature_runner("infer")(pixels=pixels) for loaded in (first, second)]
        steps = [loaded.get_signature_runner("train")(**batch(train, 9)) for loaded in (first, second)]
        after = [loaded.get_signature_runner("get_weights")() for loaded in (first, second)]
        report = {"infer_equal": all(np.array_equal(outputs[0][k], outputs[1][k]) for k in outputs[0]),
                  "loss_equal": bool(steps[0]["loss"] == steps[1]["loss"]),
                  "weights_equal": all(np.array_equal(after[0][k], after[1][k]) for k in after[0]),
                  "step": float(after[1]["step"]), "differs_from_start": bool(np.abs(outputs[0]["final"] - fresh().get_signature_runner("infer")(pixels=pixels)["final"]).max() > 0)}
    elif mode == "steps":
        loaded = fresh()
        feed = dict(np.load(sys.argv[3]))
        losses = [float(loaded.get_signature_runner("train")(**feed)["loss"]) for _ in range(3)]
        np.savez(sys.argv[4], **loaded.get_signature_runner("get_weights")())
        report = {"losses": losses}
    elif mode == "bn":
        loaded = fresh()
        stats = loaded.get_signature_runner("bn_stats")(pixels=np.load(sys.argv[3]))
        report = {n: (v.tolist() if v.ndim else float(v)) for n, v in stats.items()}
    report["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(report))
    """
)


def _litert(*args) -> dict:
    done = subprocess.run([sys.executable, "-c", LITERT_CHECKS, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("tensorflow_imported") is False
    return report


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny bundle personalised through LiteRT (3 epochs); returns the workspace."""
    with prepared_workspace(tmp_path_factory, "ondevice") as root:
        attach(AttachConfig(backbone=narrow_resnet9(root), out="B", classes="r,g,b,x,y"))
        coloured_photos(root / "photos", 48)
        personalise(PersonaliseConfig(data="photos", bundle="B", out="P", epochs=3, batch=16, views=1, personal_classes="r,g,b", engine="litert", seed=1))
    return root


def _run_dir(root: Path) -> Path:
    return sorted((root / "runs").glob("personalise-*"))[-1]


def test_engine_litert_writes_a_normal_bundle_trained_in_a_process_without_tensorflow(trained):
    run = _run_dir(trained)
    report = json.loads((run / litert_trainer.REPORT_FILE).read_text())
    assert report["tensorflow_imported"] is False and report["steps"] == 3 * 2  # 38 training photos, batch 16
    assert 0 < report["peak_rss_mb"] < 600 and report["step_ms_median"] > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["last_epoch"]["epoch"] == 3 and metrics["cache"]["bytes"] > 0
    assert {"exit_0/distill", "exit_0/fixmatch", "exit_0/mask_rate", "final/pseudo"} <= set(metrics["last_epoch"])
    meta = json.loads((trained / "P" / "ee.json").read_text())
    assert meta["output_classes"] == ["r", "g", "b"] and meta["provenance"][-1]["config"]["engine"] == "litert"
    model = bundle.read_bundle(trained / "P").load_model()
    with np.load(run / litert_trainer.STATE_FILE) as state:
        np.testing.assert_array_equal(model.get_layer("exit_1_hidden").get_weights()[0], state["exit_1__exit_1_hidden__kernel"])
        np.testing.assert_array_equal(model.get_layer("final_logits").get_weights()[1], state["final__final_logits__bias"])
        assert int(state["epochs_done"]) == 3 and float(state["step"]) == 6


def test_every_signature_runs_in_plain_litert_with_builtin_ops_only(trained):
    report = _litert("signatures", _run_dir(trained) / ondevice.FILE)
    expected = ["bn_stats", "features", "get_weights", "infer", "set_bn_statistics", "set_weights", "train"]
    assert report["keys"] == expected and report["ran"] == expected and report["finite"]
    assert not [op for op in report["ops"] if "flex" in op.lower() or op.startswith("Custom")], report["ops"]
    assert {"READ_VARIABLE", "ASSIGN_VARIABLE", "VAR_HANDLE"} <= set(report["ops"])  # state lives in the file
    # exit_0's features: a 4x4 grid of the narrow ResNet-9's 16 channels at its graft point.
    assert report["features"]["exit_0_weak"] == [4, 16 * 16] and report["features"]["teacher"] == [4, 3]
    assert report["infer_sums"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert report["moved"]  # new BN statistics change what the prefix computes


def test_get_weights_into_a_fresh_interpreter_gives_identical_outputs_and_steps(trained):
    report = _litert("round_trip", _run_dir(trained) / ondevice.FILE)
    assert report == {"infer_equal": True, "loss_equal": True, "weights_equal": True, "step": 4.0, "differs_from_start": True}


def _trainer(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ee_cli.runtime.litert_trainer", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_between_epochs_then_restart_ends_identical(trained, tmp_path):
    source = _run_dir(trained)
    job = json.loads((source / litert_trainer.JOB_FILE).read_text()) | {"epochs": 20}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        shutil.copy(source / ondevice.FILE, tmp_path / name)
        shutil.copytree(source / litert_trainer.CACHE_FOLDER, tmp_path / name / litert_trainer.CACHE_FOLDER)
        (tmp_path / name / litert_trainer.JOB_FILE).write_text(json.dumps(job))
    assert _trainer(tmp_path / "straight").wait(timeout=300) == 0
    victim, state = _trainer(tmp_path / "killed"), tmp_path / "killed" / litert_trainer.STATE_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not state.is_file():
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with np.load(state) as saved:
        done = int(saved["epochs_done"])
    assert 1 <= done < 20, "the run was not interrupted mid-training"
    assert _trainer(tmp_path / "killed").wait(timeout=300) == 0
    with np.load(tmp_path / "straight" / litert_trainer.STATE_FILE) as a, np.load(state) as b:
        assert sorted(a.files) == sorted(b.files) and int(b["epochs_done"]) == 20
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_litert_step_is_the_tensorflow_engines_step(trained, tmp_path):
    from ee_cli.base import compat
    from ee_cli.graph.personal_model import build_personal_model
    from ee_cli.adaptation.training import _make_step

    tf, keras = compat.tf(), compat.keras()
    source = bundle.read_bundle(trained / "B")
    _, heads = build_personal_model(source.load_model(), source.meta["classes"], source.meta["classes"], [0, 1, 2])
    tails = [head.tail_model() for head in heads]
    rng = np.random.default_rng(4)
    weak = [rng.normal(0, 1, (16, *tail.input_shape[1:])).astype(np.float32) for tail in tails]
    strong = [w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in weak]
    teacher = rng.normal(0, 3, (16, 5)).astype(np.float32)
    feed = {f"{h.name}_{kind}": values[i].reshape(16, -1) for i, h in enumerate(heads) for kind, values in (("weak", weak), ("strong", strong))}
    feed |= {f"{h.name}_labelled": np.zeros((1, feed[f"{h.name}_weak"].shape[1]), np.float32) for h in heads}
    shift = np.array([0.5, -1.0, 0.2], np.float32)  # a class prior: the LiteRT features signature adds it to the teacher it caches
    np.savez(tmp_path / "feed.npz", teacher=teacher[:, :3] + shift, labels=np.zeros((1, 3), np.float32), **feed)
    report = _litert("steps", _run_dir(trained) / ondevice.FILE, tmp_path / "feed.npz", tmp_path / "after.npz")
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build([v for tail in tails for v in tail.trainable_variables])
    step = _make_step(tails, optimizer, tf.constant([0, 1, 2]), PersonaliseConfig(), shift)
    losses = [float(step({"weak": weak, "strong": strong, "teacher": teacher})["loss"]) for _ in range(3)]
    # The first loss agrees to float precision; after an Adam step the few weights whose gradients
    # are at rounding size (see below) move the narrow heads' loss by a few 1e-4.
    assert report["losses"][0] == pytest.approx(losses[0], rel=1e-5) and report["losses"] == pytest.approx(losses, rel=1e-3)
    with np.load(tmp_path / "after.npz") as after:
        differences = []
        for head in ondevice.trainable_heads(heads):
            tail = next(t for t in tails if t.name == f"{head.name}_tail")
            for dense in head.steps:
                for name, expected in zip(("kernel", "bias"), tail.get_layer(dense.layer).get_weights()):
                    differences.append(np.abs(after[f"{head.name}__{dense.layer}__{name}"] - expected).ravel())
    differences = np.concatenate(differences)
    # Adam moves a weight by about the learning rate whatever its gradient's size, so a weight whose
    # gradient is at float-rounding size may move differently; nearly all agree to float precision.
    assert differences.max() < 1e-2 and np.mean(differences < 1e-5) > 0.99, (differences.max(), np.mean(differences < 1e-5))


def test_bn_stats_sum_what_adapt_averages(trained, tmp_path):
    from ee_cli.base import compat, photos
    from ee_cli.adaptation import adapt

    images = photos.load_array(photos.scan_unlabelled(trained / "photos").paths[:12], 32).astype(np.float32)
    np.save(tmp_path / "pixels.npy", images)
    sums = _litert("bn", _run_dir(trained) / ondevice.FILE, tmp_path / "pixels.npy")
    model = bundle.read_bundle(trained / "P").load_model()
    layers = adapt.backbone_batchnorms(model)[:2]
    probe = compat.keras().Model(model.inputs, [layer.input for layer in layers])
    for index, (mean, variance) in enumerate(adapt.input_statistics(probe, lambda: [images])):
        count = sums[f"bn_{index}_count"]
        assert count == 12 * np.prod(probe.outputs[index].shape[1:3])
        np.testing.assert_allclose(np.array(sums[f"bn_{index}_sum"]) / count, mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(sums[f"bn_{index}_square_sum"]) / count - mean**2, variance, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--engine", "torch"], "--engine must be"), (["--engine", "litert", "--no-cache"], "--no-cache")],
)
def test_engine_mistakes_are_one_line(workspace, cli, args, expected):
    coloured_photos(workspace / "photos", 6)
    assert expected in one_line_error(cli("personalise", "--data", "photos", *args))


def test_conv_heads_are_refused_with_what_to_do(workspace):
    from ee_cli.base.errors import UserError
    from ee_cli.graph.personal_model import build_personal_model

    made = attach(AttachConfig(backbone="cifar_resnet9", out="K", classes="r,g,b", head="conv", exits=(0.5,)))
    _, heads = build_personal_model(bundle.read_bundle(made.bundle_path).load_model(), ["r", "g", "b"], ["r", "g", "b"], [0, 1, 2])
    with pytest.raises(UserError, match="--head light"):
        ondevice.trainable_heads(heads)


def test_export_trainable_writes_personalise_tflite_and_documents_its_signatures(trained, tmp_path, monkeypatch):
    # What `ee export --trainable` calls. The conversion itself is the fixture's (the same
    # ondevice.build): the artefact it converted stands in for a second 20-second conversion.
    built = []

    def convert_once(personal_model, heads, personal, bn_layers, shapes, losses, teacher_shift):
        built.append((personal, bn_layers, shapes, losses, teacher_shift))
        return (_run_dir(trained) / ondevice.FILE).read_bytes()

    monkeypatch.setattr(ondevice, "build", convert_once)
    source = bundle.read_bundle(trained / "P")
    entry = ondevice.write_trainable(source.load_model(), source.meta, tmp_path)
    assert (tmp_path / ondevice.FILE).stat().st_size == entry["bytes"] and entry["classes"] == ["r", "g", "b"]
    personal, bn_layers, shapes, losses, teacher_shift = built[0]
    prior = source.meta.get("class_prior")
    assert teacher_shift == (prior["logit_shift"] if prior else None)  # the teacher P's heads trained against
    assert personal == [0, 1, 2] and bn_layers == entry["adapted_bn_layers"] == source.meta["adapted_bn"]["layers"]
    assert shapes.batch == 16 and losses == ssl.Objective.of(PersonaliseConfig())  # the settings P was personalised with
    assert set(entry["signatures"]) == set(ondevice.MEANINGS) and not [op for op in entry["ops"] if "Flex" in op]
    train = entry["signatures"]["train"]
    assert train["inputs"]["teacher"] == {"dtype": "float32", "shape": [16, 3]} and "loss" in train["outputs"]
    assert entry["signatures"]["infer"]["inputs"]["pixels"]["shape"] == [-1, 32, 32, 3] and train["meaning"]
