"""`ee evaluate` on a tiny personalised bundle and generated photos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import coloured_photos, copy_workspace, labelled_folder, one_line_error, personalised_user, prepared_workspace
from ee_cli.base import photos
from ee_cli.exits import policy
from ee_cli.files import bundle


@pytest.fixture(scope="module")
def personalised_template(tmp_path_factory):
    with prepared_workspace(tmp_path_factory, "personalised") as root:
        personalised_user(root, photo_count=30, batch=8)
    return root


@pytest.fixture
def personalised(workspace, personalised_template):
    copy_workspace(personalised_template, workspace)
    return workspace / "P"


def test_evaluate_profiles_exits_and_writes_a_calibrated_bundle(workspace, personalised, cli):
    result = cli("evaluate", "--data", "test", "--out", "C", "--timed-runs", "2", "--use", "match-generic")
    assert result.exit_code == 0, result.output
    assert "Operating points" in result.stdout and "oracle" in result.stdout
    run = sorted((workspace / "runs").glob("evaluate-*"))[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["photos"] == {"count": 60, "skipped": 0, "calibrate": 30, "report": 30}
    split = json.loads((run / "split.json").read_text())  # which photos chose thresholds, which reported
    assert len(split["report"]) == 30 and len(split["calibrate"]) == 30 and not set(split["report"]) & set(split["calibrate"])
    assert set(metrics["operating_points"]) == {"keep", "match-generic", "match-restricted"}
    assert {"generic", "restricted"} == set(metrics["baselines"])
    rows = list(csv.DictReader((run / "exits.csv").open()))
    assert [r["exit"] for r in rows] == ["exit_0", "exit_1", "exit_2", "final"]
    assert (run / "accuracy_vs_cost.png").stat().st_size > 10_000
    calibrated = json.loads((workspace / "C" / "ee.json").read_text())
    chosen = metrics["operating_points"]["match-generic"]["thresholds"]
    for exit_, threshold in zip(calibrated["exits"], chosen):
        assert exit_["enabled"] == (threshold <= 1) and exit_["threshold"] == (threshold if threshold <= 1 else None)
    assert calibrated["policy"]["operating_point"] == "match-generic" and calibrated["policy"]["set_by"] == "evaluate"
    assert calibrated["policy"]["photos"] == 30
    evidence = bundle.read_bundle(workspace / "C").evidence()
    assert evidence.confidences.shape == (3, 30) and evidence.correct.shape == (4, 30)
    assert (workspace / "C" / "model.h5").read_bytes() == (personalised / "model.h5").read_bytes()
    assert json.loads((personalised / "ee.json").read_text())["exits"][0]["threshold"] is None  # input untouched
    assert metrics["as_stored"]["set_by"] == "personalise"
    # C's own thresholds, read back from the bundle, on the same report photos: the point C was written from
    again = cli("evaluate", "--data", "test", "--bundle", "C", "--out", "C2", "--timed-runs", "2")
    assert again.exit_code == 0, again.output
    stored = json.loads((sorted((workspace / "runs").glob("evaluate-*"))[-1] / "metrics.json").read_text())["as_stored"]
    assert stored["set_by"] == "evaluate" and stored["operating_point"] == "match-generic" and "as stored" in again.stdout
    for key in ("thresholds", "accuracy", "mean_mflops", "shares"):
        assert stored[key] == pytest.approx(metrics["operating_points"]["match-generic"][key]), key


def test_unlabelled_photos_give_agreement_clearly_labelled(workspace, personalised, cli):
    coloured_photos(workspace / "loose", 60, seed=9)
    result = cli("evaluate", "--data", "loose", "--out", "C", "--timed-runs", "1", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["measure"] == "agreement with the final exit"
    assert "match-generic" not in metrics["operating_points"]
    # Each exit's figure is its top-1 agreement with the final exit on the report photos, recomputed here.
    run = sorted((workspace / "runs").glob("evaluate-*"))[-1]
    report = json.loads((run / "split.json").read_text())["report"]
    model = bundle.read_bundle(workspace / "P").load_model()
    outputs = dict(zip(model.output_names, model.predict(photos.load_array([Path(p) for p in report], 32).astype(np.float32), verbose=0)))
    final = outputs["final"].argmax(1)
    for row in metrics["exits"][:-1]:
        assert row["accuracy"] == pytest.approx(np.mean(outputs[row["exit"]].argmax(1) == final)), row["exit"]


def test_label_free_calibration(workspace, personalised, cli):
    coloured_photos(workspace / "held", 40, seed=11)
    result = cli("evaluate", "--data", "test", "--unlabelled", "held", "--use", "label-free", "--out", "C", "--timed-runs", "1", "--json")
    assert result.exit_code == 0, result.output
    point = json.loads(result.stdout)["metrics"]["operating_points"]["label-free"]
    assert point["calibration_photos"] == 40
    stored = json.loads((workspace / "C" / "ee.json").read_text())["policy"]
    assert stored["operating_point"] == "label-free" and stored["photos"] == 40
    # The thresholds are the policy's on the 40 held photos' own agreement, not on the labelled test photos.
    evidence = bundle.read_bundle(workspace / "C").evidence()
    model = bundle.read_bundle(workspace / "P").load_model()
    held = sorted((workspace / "held").glob("*.png"))
    outputs = dict(zip(model.output_names, model.predict(photos.load_array(held, 32).astype(np.float32), verbose=0)))
    agree = [outputs[name].argmax(1) == outputs["final"].argmax(1) for name in ("exit_0", "exit_1", "exit_2")]
    assert sorted(evidence.correct[:-1].sum(1).tolist()) == sorted(np.sum(agree, axis=1).tolist())
    assert stored["thresholds"] == [None if t >= policy.NEVER else t for t in point["thresholds"]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "empty"], "no readable photos"),
        (["--data", "mixed"], "match no class"),
        (["--data", "photos"], "personalised this bundle"),
        (["--data", "test", "--bundle", "future"], "upgrade ee"),
        (["--data", "test", "--threshold-share", "1"], "--threshold-share"),
        (["--data", "test", "--use", "fastest"], "--use"),
        (["--data", "test", "--out", "P"], "already exists"),
        (["--data", "few"], "at least 30 are needed"),
    ],
)
def test_user_mistakes_are_one_line(workspace, personalised, cli, args, expected):
    (workspace / "empty").mkdir()
    labelled_folder(workspace / "mixed", ["r", "zebra"], per_class=1)
    labelled_folder(workspace / "few", ["r", "g"], per_class=2)
    (workspace / "future").mkdir()
    meta = json.loads((personalised / "ee.json").read_text()) | {"format_version": 99}
    (workspace / "future" / "ee.json").write_text(json.dumps(meta))
    assert expected in one_line_error(cli("evaluate", *args))
