"""`ee personalise` across runs: a kill -9 and --resume, more photos continuing a personalised
bundle (--bundle), thresholds re-chosen or cleared by a later run, the uncached path and a config file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK, coloured_photos, labelled_folder
from ee_cli.base import compat, photos
from ee_cli.graph import inference
from ee_cli.exits import policy
from ee_cli.files import bundle
from ee_cli.base.config import PersonaliseConfig
from ee_cli.commands.personalise import _roles, personalise


def test_no_cache_mode_trains_too(workspace, attached):
    coloured_photos(workspace / "photos", 24)
    result = personalise(PersonaliseConfig(data="photos", bundle="B", out="P", epochs=1, batch=8, cache=False, personal_classes="r,g,b"))
    assert result.metrics["cache"] is None and result.metrics["last_epoch"]["loss"] > 0


EPOCHS = 8  # enough that the kill lands mid-training: it comes within ~50 ms of the second epoch


def _personalise_process(workspace: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ee_cli", "personalise", "--data", "photos", "--bundle", "B", "--personal-classes", "r,g,b",
               "--epochs", str(EPOCHS), "--batch", "8", "--views", "1", "--quiet", "--seed", "3", *extra]
    return subprocess.Popen(command, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"EE_THREADS": "2"})


def test_kill_9_then_resume_ends_bit_identical_to_an_uninterrupted_run(workspace, attached):
    coloured_photos(workspace / "photos", 64)
    # The uninterrupted run in this process (the same thread count as the children's), the killed and
    # resumed one in processes of their own.
    personalise(PersonaliseConfig(data="photos", bundle="B", personal_classes="r,g,b", epochs=EPOCHS, batch=8, views=1, quiet=True, seed=3, out="straight"))
    victim = _personalise_process(workspace, "--out", "resumed")
    history = workspace / "runs" / "personalise-2" / "history.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (history.is_file() and len(json.loads(history.read_text() or "[]")) >= 2):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = json.loads(history.read_text())
    assert 2 <= len(done) < EPOCHS, "the run was not interrupted mid-training"
    assert not (workspace / "resumed").exists()
    # Mark the finished epochs: a resume keeps them, a silent retrain from scratch would rewrite them.
    history.write_text(json.dumps([entry | {"marker": True} for entry in done]))
    resumed = _personalise_process(workspace, "--out", "resumed", "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    resumed_history = json.loads(history.read_text())
    assert resumed_history[0].get("marker"), "--resume trained the finished epochs again"
    # The resumed run went on in the killed run's folder, to the last epoch, and started no other.
    assert len(resumed_history) == EPOCHS and json.loads((history.parent / "state.json").read_text())["status"] != "running"
    assert sorted(p.name for p in (workspace / "runs").glob("personalise-*")) == ["personalise-1", "personalise-2"]
    straight = bundle.read_bundle(workspace / "straight").load_model()
    again = bundle.read_bundle(workspace / "resumed").load_model()
    for layer in straight.layers:
        for a, b in zip(layer.get_weights(), again.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)


def test_more_photos_continue_from_a_personalised_bundle(workspace, attached, cli):
    coloured_photos(workspace / "photos", 24)
    assert cli("personalise", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P1", *QUICK).exit_code == 0
    coloured_photos(workspace / "photos", 48, seed=2)
    result = cli("personalise", "--bundle", "P1", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P2", *QUICK)
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "P2" / "ee.json").read_text())
    assert [step["command"] for step in meta["provenance"]] == ["attach", "personalise", "personalise"]
    before = bundle.read_bundle(workspace / "P1").load_model()
    after = bundle.read_bundle(workspace / "P2").load_model()
    # The generic teacher is carried over untouched; the personal heads keep training.
    np.testing.assert_array_equal(before.get_layer("predictions").get_weights()[0], after.get_layer("predictions").get_weights()[0])
    assert after.output_names == ["exit_0", "exit_1", "exit_2", "final", "generic"]
    # With no epochs, the heads are P1's exactly: they continue, they are not drawn afresh.
    assert cli("personalise", "--bundle", "P1", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P3", *QUICK, "--epochs", "0").exit_code == 0
    kept = bundle.read_bundle(workspace / "P3").load_model()
    heads = [layer for layer in before.layers if layer.name.startswith(("exit_", "final_logits")) and layer.get_weights()]
    assert len(heads) >= 4
    for layer in heads:
        for a, b in zip(layer.get_weights(), kept.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)


def test_label_free_thresholds_are_chosen_on_held_out_photos_by_default(workspace, attached, cli):
    coloured_photos(workspace / "photos", 160)
    result = cli("personalise", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P", *QUICK)
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "P" / "ee.json").read_text())
    chosen = meta["policy"]
    assert chosen["set_by"] == "personalise" and chosen["operating_point"] == "keep (label-free)" and chosen["photos"] == 32
    thresholds = [e["threshold"] for e in meta["exits"]]
    assert any(t is not None for t in thresholds), chosen["reason"]
    assert [e["enabled"] for e in meta["exits"]] == [t is not None for t in thresholds]
    evidence = bundle.read_bundle(workspace / "P").evidence()
    assert evidence.confidences.shape == (3, 32) and evidence.reference.tolist() == [1] * 32  # the final exit agrees with itself
    # What the bundle says is what the policy gives on the stored evidence, and it keeps its bound there.
    costs = bundle.stage_costs(meta)
    again = policy.cheapest_cascade(evidence, policy.max_drop(0.005, 1.645), costs)
    assert [None if t >= policy.NEVER else pytest.approx(t) for t in again.thresholds] == thresholds
    taken = policy.exit_taken(evidence.confidences, again.thresholds)
    assert policy.outcome(taken, evidence.correct, costs.leaving(again.thresholds < policy.NEVER)).accuracy >= 1 - 0.005
    assert chosen["predicted"]["speedup"] > 1.0 and "predicted" in chosen["reason"] and "fewer MFLOPs" in chosen["reason"]
    # Re-personalising with too few photos to choose thresholds clears the stale ones.
    coloured_photos(workspace / "few", 40, seed=5)
    again_result = cli("personalise", "--bundle", "P", "--data", "few", "--personal-classes", "r,g,b", "--out", "P2", *QUICK)
    assert again_result.exit_code == 0, again_result.output
    cleared = json.loads((workspace / "P2" / "ee.json").read_text())
    assert all(e["threshold"] is None and not e["enabled"] for e in cleared["exits"])
    assert cleared["policy"]["set_by"] == "personalise" and cleared["policy"]["photos"] == 8
    assert not (workspace / "P2" / bundle.EVIDENCE_FILE).exists()


def test_a_few_labels_never_leave_the_thresholds_without_held_out_photos(workspace, attached, cli):
    """Labelled and unlabelled held-out photos are evidence together (10 labels per class used to
    leave 6 held-out photos, under the floor, and every exit off)."""
    coloured_photos(workspace / "photos", 160)
    labelled_folder(workspace / "labelled", ["r", "g", "b"], per_class=10)
    result = cli("personalise", "--data", "photos", "--labelled", "labelled", "--out", "P", *QUICK)
    assert result.exit_code == 0, result.output
    chosen = json.loads((workspace / "P" / "ee.json").read_text())["policy"]
    assert chosen["photos"] == 32 + 6 and "need at least" not in chosen["reason"]
    evidence = bundle.read_bundle(workspace / "P").evidence()
    assert evidence.confidences.shape == (3, 38)


def test_label_free_evidence_is_each_exits_agreement_with_the_final_exit(workspace, attached, cli):
    # Untrained exits (--epochs 0) disagree with the final exit on some photos, so evidence that
    # were not computed from the model (all ones, say) would show.
    coloured_photos(workspace / "photos", 160)
    assert cli("personalise", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P", *QUICK, "--epochs", "0").exit_code == 0
    found = bundle.read_bundle(workspace / "P")
    held = _roles(160, None, [0, 1, 2], PersonaliseConfig()).holdout_unlabelled
    paths = photos.scan_unlabelled(workspace / "photos").paths
    logits = inference.outputs_of(found.load_model(), bundle.head_outputs(found.meta), [paths[i] for i in held], 32)
    agree = np.stack([exit_logits.argmax(1) == logits[-1].argmax(1) for exit_logits in logits]).astype(np.int8)
    evidence = found.evidence()
    np.testing.assert_array_equal(evidence.correct, agree)
    assert not agree[:-1].all()
    maxprob = np.stack([compat.tf().nn.softmax(exit_logits).numpy().max(1) for exit_logits in logits[:-1]])
    np.testing.assert_allclose(evidence.confidences, maxprob, rtol=1e-5)


def test_a_config_file_sets_personalise_options_and_flags_override_it(workspace, attached, cli):
    coloured_photos(workspace / "photos", 24)
    (workspace / "ee.toml").write_text('[personalise]\npersonal-classes = "r,g,b"\nepochs = 1\nbatch = 8\nholdout = 0.5\n')
    result = cli("personalise", "--data", "photos", "--config", "ee.toml", "--holdout", "0.25", "--out", "P", "--quiet")
    assert result.exit_code == 0, result.output
    used = json.loads(sorted((workspace / "runs").glob("personalise-*"))[-1].joinpath("config.json").read_text())
    assert (used["personal_classes"], used["epochs"], used["batch"], used["holdout"]) == ("r,g,b", 1, 8, 0.25)
