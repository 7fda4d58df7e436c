"""`ee personalise` on generated photos with a small backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK, coloured_photos, labelled_folder, one_line_error
from ee_cli.base import compat, photos
from ee_cli.files import bundle
from ee_cli.adaptation import adapt, stepping
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, PersonaliseConfig
from ee_cli.commands.personalise import personalise
from test_photos import messy_folder

def test_personalise_writes_a_personalised_bundle(workspace, attached, cli):
    coloured_photos(workspace / "photos")
    result = cli("personalise", "--data", "photos", "--personal-classes", "r,g,b", "--out", "P", *QUICK)
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "P" / "ee.json").read_text())
    assert meta["personal_classes"] == ["r", "g", "b"] and meta["output_classes"] == ["r", "g", "b"]
    assert all(e["trained"] and e["threshold"] is None and not e["enabled"] for e in meta["exits"])
    assert meta["policy"]["set_by"] == "personalise" and "10 held-out photos" in meta["policy"]["reason"]  # below the floor: all off
    assert len(meta["adapted_bn"]["layers"]) == 4 and meta["adapted_bn"]["photos"] == 48
    assert meta["provenance"][-1]["command"] == "personalise"
    model = bundle.read_bundle(workspace / "P").load_model()
    assert model.output_names == ["exit_0", "exit_1", "exit_2", "final", "generic"]
    assert [int(model.get_layer(n).output.shape[-1]) for n in model.output_names] == [3, 3, 3, 3, 5]
    run = sorted((workspace / "runs").glob("personalise-*"))[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cache"]["bytes"] > 0 and metrics["holdout"]["photos"] == 10
    assert set(metrics["last_epoch"]) >= {"exit_0/distill", "exit_0/fixmatch", "exit_0/mask_rate", "final/pseudo"}
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    split = json.loads((run / "split.json").read_text())  # which photos trained, which chose thresholds
    assert len(split["holdout"]) == 10 and sorted(Path(p).name for p in split["train"] + split["holdout"]) == sorted(
        p.name for p in photos.scan_unlabelled(workspace / "photos").paths)
    scalars = _tensorboard_scalars(run / "tensorboard")
    assert scalars["exit_0/distill"] == [1, 2] and scalars["final/mask_rate"] == [1, 2]
    assert scalars["exit_2/holdout_agreement"] == [1, 2] and "final/holdout_agreement" not in scalars


def _tensorboard_scalars(folder: Path) -> dict[str, list[int]]:
    """Every scalar tag in the event files under `folder`, with the steps (epochs) it was written at."""
    from ee_cli.base import compat

    tf = compat.tf()
    found: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(int(event.step))
    return found


def test_backbone_weights_stay_bit_identical_and_only_early_bn_statistics_change(workspace, attached):
    coloured_photos(workspace / "photos")
    result = personalise(PersonaliseConfig(data="photos", bundle="B", out="P", epochs=1, batch=16, views=1, adapt_bn="3"))
    source = bundle.read_bundle(attached).load_model()
    adapted = bundle.read_bundle(result.bundle_path).load_model()
    bn_names = [layer.name for layer in adapt.backbone_batchnorms(source)]
    assert result.meta["adapted_bn"]["layers"] == bn_names[:3]
    for layer in source.layers:
        if layer.name.startswith("exit_") or layer.name == "final" or not layer.weights:
            continue
        for weight, before, after in zip(layer.weights, layer.get_weights(), adapted.get_layer(layer.name).get_weights()):
            statistic = "moving_" in weight.name
            if statistic and layer.name in bn_names[:3]:
                assert not np.array_equal(before, after), weight.name
            else:
                np.testing.assert_array_equal(before, after, err_msg=weight.name)


def test_adapted_statistics_are_exactly_those_of_the_photos_at_every_depth(workspace, attached):
    model = bundle.read_bundle(attached).load_model()
    layers = adapt.backbone_batchnorms(model)
    images = photos.load_array(photos.scan_unlabelled(coloured_photos(workspace / "photos", 20)).paths, 32)
    generic = adapt.statistics_of(layers)
    adapted = stepping.adapt_batchnorm(model, lambda: [images[:7], images[7:]], len(layers))
    for layer in layers:  # with every earlier layer adapted, each layer's statistics are its input's own
        inputs = compat.keras().Model(model.inputs, layer.input)(images.astype(np.float32)).numpy().reshape(-1, layer.input.shape[-1])
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(0), rtol=1e-4, atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(0), rtol=1e-3, atol=1e-4, err_msg=layer.name)
    # Nested: adapting 3 layers gives the first 3 of those statistics, and switching depth needs no pass.
    shallow = bundle.read_bundle(attached).load_model()
    shallow_layers = adapt.backbone_batchnorms(shallow)
    stepping.adapt_batchnorm(shallow, lambda: [images], 3)
    adapt.set_statistics(layers, adapted, generic, 3)
    for ours, theirs in zip(adapt.statistics_of(layers), adapt.statistics_of(shallow_layers)):
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(adapt.statistics_of(layers)[3][1], generic[3][1])
    # Deepening from 3 to every layer computes only the layers beyond 3, and gives the same statistics.
    deepened = stepping.adapt_batchnorm(shallow, lambda: [images], len(layers), start=3)
    assert len(deepened) == len(layers) - 3
    for ours, theirs in zip(adapted[3:], deepened):
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-5)


def test_batchnorm_adaptation_reads_the_photos_once_batch_by_batch_however_many_waves(workspace, attached):
    import weakref

    model = bundle.read_bundle(attached).load_model()
    alive_at_each_batch: list[int] = []

    def batches():  # 12 batches per pass; counts how many earlier batches are still held when the next is asked for
        earlier = []
        for index in range(12):  # (arrays hold no cycles: reference counting frees a dropped batch at once)
            alive_at_each_batch.append(sum(ref() is not None for ref in earlier))
            batch = np.full((4, 32, 32, 3), index * 20, np.uint8)
            earlier.append(weakref.ref(batch))
            yield batch

    assert len(adapt.batchnorm_waves(model, adapt.backbone_batchnorms(model)[:3])) == 3
    stepping.adapt_batchnorm(model, batches, 3)
    assert len(alive_at_each_batch) == 12  # one pass over the photos: later waves start from a stepping stone
    assert max(alive_at_each_batch) <= 1  # at most the batch just handed over: photos never pile up in memory


def test_parallel_batchnorms_share_a_pass_and_a_merge_waits_for_both():
    keras = compat.keras()
    pixels = keras.Input((8, 8, 3))
    left = keras.layers.BatchNormalization(name="left")(keras.layers.Conv2D(4, 3, name="a")(pixels))
    right = keras.layers.BatchNormalization(name="right")(keras.layers.Conv2D(4, 3, name="b")(pixels))
    after = keras.layers.BatchNormalization(name="after")(keras.layers.Add()([left, right]))
    model = keras.Model(pixels, keras.layers.BatchNormalization(name="last")(after))
    waves = adapt.batchnorm_waves(model, adapt.backbone_batchnorms(model))
    assert [[layer.name for layer in wave] for wave in waves] == [["left", "right"], ["after"], ["last"]]


def test_class_inference_keeps_classes_above_the_share():
    confident = np.log(np.array([[0.98, 0.01, 0.01]] * 5 + [[0.01, 0.98, 0.01]] * 3 + [[0.01, 0.01, 0.98]] * 2))
    shares = adapt.class_shares(confident)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.01)
    assert adapt.infer_classes(shares, 0.6) == [0, 1]  # never fewer than two
    assert adapt.infer_classes(shares, 0.15) == [0, 1, 2]


def test_the_class_prior_keeps_a_fifth_of_an_even_share_and_shifts_the_kept_logits_by_the_mix():
    shares = np.array([0.45, 0.30, 0.16, 0.05, 0.03, 0.01])  # an even share is 1/6: the cut at 0.2 of it is 0.033
    prior = adapt.class_prior(shares, 0.2)
    assert prior.classes == [0, 1, 2, 3]  # 0.05 is kept (reachable, shifted down), 0.03 and 0.01 are ruled out
    np.testing.assert_allclose(prior.logit_shift, np.log(6 * shares[:4]), rtol=1e-6)
    assert prior.logit_shift[3] < 0 < prior.logit_shift[0]  # a class kept on little evidence draws few photos
    np.testing.assert_allclose(adapt.class_prior(shares, 0.2, temperature=2.0).logit_shift, 2 * np.log(6 * shares[:4]), rtol=1e-6)
    # A 1,000-class model: a person's "dog" spread over 100 breeds at 0.8 % each stays reachable, the rest of ImageNet does not.
    fine = np.full(1000, 1e-4)  # after normalising: 0.011 % each, under a fifth of an even share (0.02 %)
    fine[:100] = 0.008
    assert adapt.class_prior(fine / fine.sum(), 0.2).classes == list(range(100))


def test_a_temperature_before_em_changes_an_over_confident_models_estimate():
    # Two classes, 50/50; the model is sure of every photo but calls a third of class 1 class 2, just as surely.
    truth = np.repeat([0, 1], 60)
    called = truth.copy()
    called[60:80] = 2
    over_confident = _confident_logits(called) * 3  # ~100 % on the top class
    plain, calibrated = adapt.class_shares(over_confident), adapt.class_shares(over_confident, temperature=8.0)
    assert not np.allclose(plain, calibrated)
    assert calibrated[2] < plain[2]  # softer probabilities share class 2's photos back out


def test_a_systematic_confusion_is_not_counted_as_a_class():
    # 12 % of the photos have class 2 on top, but only just, with class 0 close behind: they are
    # class-0 photos the model confuses. EM over the probabilities gives class 2 no share at all.
    probabilities = np.array([[0.9, 0.05, 0.05]] * 44 + [[0.05, 0.9, 0.05]] * 44 + [[0.35, 0.2, 0.45]] * 12)
    top_counts = np.bincount(probabilities.argmax(1)) / len(probabilities)
    assert top_counts[2] == pytest.approx(0.12)
    shares = adapt.class_shares(np.log(probabilities))
    assert shares[2] < 0.01 and adapt.infer_classes(shares, 0.10) == [0, 1]
    assert adapt.resolve_adapt_count("auto", 8) == 4 and adapt.resolve_adapt_count("0", 8) == 0


def test_labelled_photos_set_the_classes_and_train_with_labels(workspace, attached, cli):
    coloured_photos(workspace / "photos")
    labelled_folder(workspace / "labelled", ["r", "b"])
    result = cli("personalise", "--data", "photos", "--labelled", "labelled", "--out", "P", *QUICK)
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "P" / "ee.json").read_text())
    assert meta["personal_classes"] == ["r", "b"] and meta["holdout"]["kind"].startswith("accuracy on 2 labelled photos, agreement")
    run = sorted((workspace / "runs").glob("personalise-*"))[-1]
    assert "exit_0/supervised" in json.loads((run / "metrics.json").read_text())["last_epoch"]


def test_messy_folder_personalises_with_skips_counted(workspace, attached, cli):
    messy_folder(workspace / "photos", size=40)
    coloured_photos(workspace / "photos" / "more", 12)
    result = cli("personalise", "--data", "photos", "--out", "P", "--json", "--epochs", "1", "--batch", "4", "--views", "1")
    assert result.exit_code == 0, result.output
    skipped = json.loads(result.stdout)["metrics"]["photos"]
    assert skipped["unlabelled"] == 17 and sum(skipped["skipped"].values()) == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "--data is required"),
        (["--data", "missing"], "does not exist"),
        (["--data", "photos", "--bundle", "nowhere"], "not a bundle"),
        (["--data", "photos", "--labelled", "wrong"], "match no class"),
        (["--data", "photos", "--adapt-bn", "99"], "BatchNorm layers"),
        (["--data", "photos", "--personal-classes", "r,zebra"], "personal-classes"),
        (["--data", "photos", "--holdout", "1.5"], "--holdout"),
        (["--data", "photos", "--resume"], "no unfinished"),
        (["--data", "photos", "--out", "B"], "already exists"),
    ],
)
def test_user_mistakes_are_one_line(workspace, attached, cli, args, expected):
    coloured_photos(workspace / "photos", 6)
    (workspace / "wrong" / "zebra").mkdir(parents=True)
    assert expected in one_line_error(cli("personalise", *args))


def test_all_classes_and_no_batchnorm_adaptation(workspace, attached, cli):
    coloured_photos(workspace / "photos", 24)
    result = cli("personalise", "--data", "photos", "--personal-classes", "all", "--adapt-bn", "0", "--out", "P", *QUICK, "--epochs", "0")
    assert result.exit_code == 0, result.output
    meta = json.loads((workspace / "P" / "ee.json").read_text())
    assert meta["output_classes"] == ["r", "g", "b", "x", "y"] and meta["adapted_bn"]["layers"] == []
    generic, personal = bundle.read_bundle(attached).load_model(), bundle.read_bundle(workspace / "P").load_model()
    for layer in adapt.backbone_batchnorms(generic):
        for a, b in zip(layer.get_weights(), personal.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)


def test_class_inference_finds_the_demo_users_three_classes(workspace, cli):
    """End to end on real photos: the shipped Fashion-MNIST model and the demo user's unlabelled photos."""
    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "datasets" / "demo" / "README.json").read_text())
    attach(AttachConfig(backbone=str(root / "models" / "fashion_resnet9.h5"), classes=str(root / "models" / "fashion_classes.txt"), out="G"))
    result = cli("personalise", "--data", str(root / "datasets" / "demo" / "unlabelled"), "--bundle", "G", "--out", "P", "--epochs", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((workspace / "P" / "ee.json").read_text())["personal_classes"]) == sorted(summary["classes"])


def _confident_logits(classes: np.ndarray, sure: bool = True) -> np.ndarray:
    """Logits with `classes` on top: at 97 % if sure, else at 79 % (under adapt.CONFIDENT)."""
    logits = np.zeros((len(classes), 3))
    logits[np.arange(len(classes)), classes] = 5.0 if sure else 2.0
    return logits


def test_auto_adapts_as_deep_as_the_confident_predictions_hold_and_says_where_it_stopped():
    unadapted = np.arange(100) % 3
    asked: list[int] = []

    def overturning_from(depth_that_breaks: int, flipped: int):
        def logits_at(depth: int) -> np.ndarray:
            asked.append(depth)
            classes = unadapted.copy()
            if depth >= depth_that_breaks:
                classes[:flipped] = (classes[:flipped] + 1) % 3
            return _confident_logits(classes)
        return logits_at

    depth, shares, note = adapt.auto_depth(overturning_from(3, 30), [1, 2, 3, 4])
    assert (depth, asked) == (2, [0, 1, 2, 3])  # stops at the first depth that breaks: no deeper pass
    assert note == "adapting 3 BatchNorm layers overturned 30% of the generic model's confident predictions: kept 2"
    assert shares == pytest.approx(adapt.class_shares(_confident_logits(unadapted)))
    assert adapt.auto_depth(overturning_from(3, 19), [1, 2, 3, 4])[::2] == (4, None)  # 81 % kept: deep enough
    assert adapt.auto_depth(overturning_from(1, 30), [1, 2, 3, 4])[0] == 0


def test_auto_stops_before_a_collapsed_class_mix_unless_the_photos_are_of_one_class():
    # 40 photos the generic model is sure are class 0, 60 it barely prefers 1 or 2 for.
    unadapted = np.concatenate([_confident_logits(np.zeros(40, int)), _confident_logits(1 + np.arange(60) % 2, sure=False)])
    everything_class_0 = _confident_logits(np.zeros(100, int))
    depth, _, note = adapt.auto_depth(lambda d: unadapted if d < 2 else everything_class_0, [1, 2, 3])
    assert depth == 1 and "collapsed the class mix onto one class" in note and note.endswith("kept 1")
    # Photos that really are of one class collapse even unadapted: that is no reason to stop.
    assert adapt.auto_depth(lambda d: everything_class_0, [1, 2, 3])[::2] == (3, None)


def test_kept_confident_counts_only_the_sure_predictions_and_needs_32_of_them():
    unsure_half = np.concatenate([_confident_logits(np.zeros(50, int)), _confident_logits(np.ones(50, int), sure=False)])
    flipped_unsure = np.concatenate([_confident_logits(np.zeros(50, int)), _confident_logits(np.full(50, 2), sure=False)])
    assert adapt.kept_confident(flipped_unsure, unsure_half) == 1.0  # the unsure half may change freely
    assert adapt.kept_confident(_confident_logits(np.full(100, 2)), unsure_half) == 0.0
    few_sure = np.concatenate([_confident_logits(np.zeros(31, int)), _confident_logits(np.ones(69, int), sure=False)])
    assert adapt.kept_confident(_confident_logits(np.full(100, 2)), few_sure) is None  # 31 sure photos: nothing to keep
    # ... so nothing says a deeper adaptation keeps what the photos show: auto stays at the shallowest depth, and says so.
    depth, _, note = adapt.auto_depth(lambda d: few_sure if d == 0 else _confident_logits(np.arange(100) % 3), [1, 2])
    assert depth == 1 and note.startswith("the generic model is sure of fewer than 32 photos") and note.endswith("kept 1")
    assert adapt.auto_depths(8) == [1, 2, 3, 4] and adapt.auto_depths(64) == [8, 16, 24, 32] and adapt.auto_depths(1) == [1] and adapt.auto_depths(0) == []


def test_auto_adapts_past_overturned_predictions_when_the_generic_model_saw_one_class_in_every_photo():
    # Lite1's k5-blur dev user: unadapted, 94 % of the mix on one class; adapting 24 of 64 layers found all five.
    everything_class_0 = _confident_logits(np.zeros(100, int))
    three_classes = _confident_logits(np.arange(100) % 3)  # overturns two thirds of the sure predictions
    depth, shares, note = adapt.auto_depth(lambda d: everything_class_0 if d < 2 else three_classes, [1, 2, 3])
    assert (depth, note) == (3, None) and shares == pytest.approx(adapt.class_shares(three_classes))


def test_inferred_classes_start_the_final_exit_as_the_generic_model_shifted_by_their_prior(workspace, attached):
    """Wiring: the class prior adapt.class_prior computes is the one the final exit starts from and ee.json records."""
    coloured_photos(workspace / "photos", 40)
    result = personalise(PersonaliseConfig(data="photos", bundle=str(attached), out="P", epochs=0, adapt_bn="0", seed=0, quiet=True))
    prior = result.meta["class_prior"]
    assert prior["classes"] == result.meta["personal_classes"] and len(prior["logit_shift"]) == len(prior["classes"])
    classes = len(result.meta["classes"])
    np.testing.assert_allclose(prior["logit_shift"], prior["temperature"] * np.log(np.maximum(classes * np.array(prior["estimated_mix"]), 1e-6)), atol=1e-3)
    model = bundle.read_bundle(result.bundle_path).load_model()
    pixels = photos.resized(np.stack([np.full((32, 32, 3), c, np.uint8) for c in (0, 90, 200)]), 32).astype(np.float32)
    final, generic = (np.asarray(x) for x in model(pixels, training=False)[-2:])
    personal = [result.meta["classes"].index(name) for name in prior["classes"]]
    np.testing.assert_allclose(final, generic[:, personal] + np.array(prior["logit_shift"]), atol=1e-4)
    assert result.metrics["holdout"]["do_no_harm"]["harm"] is None  # no training: the final exit is its start
