"""The label-free baselines behind `ee personalise --method`: their numeric pieces as pure functions,
and each method, run as a user runs it, changing exactly what it should (and `source` nothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import coloured_photos, copy_workspace, narrow_resnet9, one_line_error, prepared_workspace
from ee_cli.files import bundle
from ee_cli.adaptation import adapt, baselines
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig


def test_entropy_is_zero_when_sure_and_log_classes_when_uniform():
    probabilities = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(baselines.entropy(probabilities), [0.0, math.log(4)], atol=1e-9)


def test_eata_keeps_reliable_photos_weighted_by_their_certainty_and_drops_redundant_ones():
    sure, unsure = np.array([0.97, 0.01, 0.01, 0.01]), np.array([0.4, 0.3, 0.2, 0.1])
    margin = 0.4 * math.log(4)
    weights, running_mean = baselines.eata_weights(np.stack([sure, unsure]), None, margin, redundancy=0.4)
    assert weights[1] == 0.0 and weights[0] == pytest.approx(math.exp(margin - baselines.entropy(sure[None])[0]))
    np.testing.assert_allclose(running_mean, sure)
    # The same prediction again is redundant against that running mean; another class's is not.
    other = np.array([0.01, 0.97, 0.01, 0.01])
    weights, updated = baselines.eata_weights(np.stack([sure, other]), running_mean, margin, redundancy=0.4)
    assert weights[0] == 0.0 and weights[1] > 0
    np.testing.assert_allclose(updated, 0.9 * sure + 0.1 * other)


def test_eatas_redundancy_margin_follows_the_number_of_classes():
    assert baselines.redundancy_margin(10) == 0.4 and baselines.redundancy_margin(1000) == 0.05


def test_knn_affinity_links_each_photo_to_its_k_nearest_others():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    affinity = baselines.knn_affinity(features, neighbours=2)
    assert np.all(np.diag(affinity) == 0) and np.all(affinity.sum(axis=1) == 2)
    assert affinity[0, 1] == 1 and affinity[2, 3] == 1 and affinity[2, 0] == 0


def test_lame_lets_a_photos_neighbours_overturn_an_unsure_wrong_prediction():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    features = np.eye(2)[labels] + rng.normal(0, 0.05, (40, 2))  # two tight clusters, one per class
    probabilities = np.where(np.eye(2)[labels] == 1, 0.8, 0.2)
    wrong = rng.choice(40, 8, replace=False)
    probabilities[wrong] = probabilities[wrong][:, ::-1] * np.array([0.75, 1.0]) + np.array([0.1, 0.0])  # unsure and wrong
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    before = np.mean(probabilities.argmax(1) == labels)
    after = np.mean(baselines.lame_probabilities(probabilities, features).argmax(1) == labels)
    assert before == pytest.approx(0.8) and after == 1.0


@pytest.fixture(scope="module")
def attached_template(tmp_path_factory):
    with prepared_workspace(tmp_path_factory, "baselines") as root:
        attach(AttachConfig(backbone=narrow_resnet9(root), out="B", classes="r,g,b,x,y"))
        coloured_photos(root / "photos", 96)
    return root


def _batchnorm_weights(path):
    model = bundle.read_bundle(path).load_model()
    layers = adapt.backbone_batchnorms(model)
    return {layer.name: dict(zip(("gamma", "beta", "mean", "variance"), layer.get_weights())) for layer in layers}, model


@pytest.mark.parametrize(
    "method, changed, unchanged",
    [("source", set(), {"gamma", "beta", "mean", "variance"}), ("bn", {"mean", "variance"}, {"gamma", "beta"}),
     ("tent", {"gamma", "beta", "mean", "variance"}, set()), ("eata", {"gamma", "beta", "mean", "variance"}, set())],
)
def test_each_method_changes_what_it_adapts_and_nothing_else(workspace, attached_template, cli, method, changed, unchanged):
    copy_workspace(attached_template, workspace)
    result = cli("personalise", "--bundle", "B", "--data", "photos", "--method", method, "--out", "M", "--batch", "32", "--quiet")
    assert result.exit_code == 0, result.output
    before, generic = _batchnorm_weights(workspace / "B")
    after, adapted = _batchnorm_weights(workspace / "M")
    for kind in changed:
        assert any(not np.allclose(before[name][kind], after[name][kind]) for name in before), (method, kind)
    for kind in unchanged:
        assert all(np.array_equal(before[name][kind], after[name][kind]) for name in before), (method, kind)
    batchnorms = set(before)
    for layer in generic.layers:  # every other weight is the generic model's
        if layer.name not in batchnorms:
            for a, b in zip(layer.get_weights(), adapted.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b, err_msg=layer.name)
    meta = bundle.read_bundle(workspace / "M").meta
    assert meta["method"] == {"name": method, "changes_backbone": method != "source"}
    assert bundle.thresholds(meta) == [None] * len(meta["exits"])


def test_lame_has_no_model_to_write_and_says_so(workspace, attached_template, cli):
    copy_workspace(attached_template, workspace)
    line = one_line_error(cli("personalise", "--bundle", "B", "--data", "photos", "--method", "lame"))
    assert "lame" in line and "test time" in line
    assert "--method must be one of" in one_line_error(cli("personalise", "--bundle", "B", "--data", "photos", "--method", "sar"))
