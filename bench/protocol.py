"""One user of the benchmark protocol (../shared/design.md), measured end to end.

A user is one of the field's users (`datasets.field_users`): k classes and one CIFAR-10-C corruption
at one severity (or none), every photo — unlabelled, 10 labelled per class, test — from CIFAR-10's
test split, disjoint, drawn with the user's own seed. On the same photos, in one process: the
generic model; the generic model restricted to the user's true classes (free); the label-free
baselines researchers compare against (`ee personalise --method source|bn|tent|eata`, and LAME on
the generic model's test batches); early-BN statistics only with inferred classes (no training);
`ee personalise` at 0 and 10 labels per class; whole-network FixMatch fine-tuning at 0 labels;
and, at 0 labels, the exported TFLite cascade's latency in LiteRT beside the plain model's at two
operating points calibrated by `ee evaluate` on half of the test photos and measured on the other
half.

`run_user` returns plain JSON-ready figures. Times are measured; everything else is a function
of (user, settings) at a fixed thread count, so a Ray worker gives the same figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scenario:
    k: int
    condition: str

    @property
    def name(self) -> str:
        return f"k{self.k}-{self.condition}"

    @classmethod
    def named(cls, name: str) -> "Scenario":
        """The scenario `name` names ("k3-colour_cast")."""
        k, _, condition = name.partition("-")
        return cls(int(k.removeprefix("k")), condition)


# Dev users tune defaults and designs; test users are run only to report. Every user has a seed of
# its own (dev from 100, test from 200: datasets.field_users), so its classes, corruption and photos
# are drawn independently of every other user's.
LABEL_FREE = "label-free"  # the exits as `ee personalise` left them: thresholds from its own hold-out, no labels
SPLITS = ("dev", "test")
METHODS = ("source", "bn", "tent", "eata", "lame")  # the label-free baselines, run beside ee on every user


@dataclasses.dataclass(frozen=True)
class User:
    split: str
    spec: Any  # datasets.field_users.Spec: classes, corruption, severity, seed

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def scenario(self) -> Scenario:
        condition = f"{self.spec.corruption}-{self.spec.severity}" if self.spec.corruption else "none"
        return Scenario(len(self.spec.classes), condition)


def users(split: str, per_scenario: int, grid: bool = False) -> list[User]:
    """The split's field users, `per_scenario` of each kind (k-class corrupted, all-class corrupted),
    or with `grid` one per corruption and severity; each with its own seed."""
    from datasets import field_users

    specs = field_users.grid_specs(split) if grid else field_users.specs(split, personal=6 * per_scenario, all_classes=2 * per_scenario)
    return [User(split, spec) for spec in specs]


@dataclasses.dataclass(frozen=True)
class Settings:
    unlabelled: int = 500
    labels: tuple[int, ...] = (0, 10)  # labelled photos per class
    test_per_class: int = 300
    epochs: int = 30
    exits: tuple[float, ...] = (0.2, 0.4, 0.8)
    whole_network: bool = True
    whole_network_lr: float = 3e-5  # of bench.whole_network.LEARNING_RATES, picked on dev users (bench/results/whole-network-lr-dev-2026-12-01.jsonl)
    whole_network_epochs: int | None = None  # fewer than `epochs`: timed on these, its seconds scaled up (no accuracy)
    quant: tuple[str, ...] = ("none", "int8_full")  # export modes timed in LiteRT
    points: tuple[str, ...] = (LABEL_FREE, "match-restricted", "keep")  # operating points evaluated (also: match-generic)
    timed_points: tuple[str, ...] | None = None  # of `points`, those exported and timed in LiteRT (None: every one)
    methods: tuple[str, ...] = METHODS  # the label-free baselines run beside ee
    latency_threads: int = 1
    export_photos: int = 200  # calibration and validation photos per export
    costs: bool = True  # LiteRT latency, whole-network fine-tuning and the bounds (make bench: test users only)


@dataclasses.dataclass(frozen=True)
class GenericModel:
    """A generic classifier the benchmark personalises, with the settings its users get."""

    title: str
    path: str
    made_by: str  # the command that writes `path`
    overrides: dict  # Settings fields this model's users get instead of the command line's
    sample: tuple[int, ...] | None = None  # which of a split's sampled users (by position) this model runs; None: all
    cores: int = 1  # cores (and TensorFlow threads) a user of this model takes when users run at once

    def runs(self, position: int, every: bool) -> bool:
        """Whether this model runs the split's user at `position` (`every`: a grid or hand-picked users)."""
        return every or self.sample is None or position in self.sample


GENERIC_MODELS = {
    "resnet9": GenericModel("ResNet-9 at 32 px (trained here, BN statistics its own)", str(Path.home() / ".cache/ee/models/cifar_resnet9.h5"),
                            "python -m models.train_cifar", {}),
    # 240 px costs ~60x the MACs a photo: fewer photos, 0 labels, the whole network timed on two epochs,
    # 100 photos to calibrate and validate each export (int8 calibration was half of a 2.6-minute export),
    # half the users of each split (three k-class corrupted, one all-class, the label-shift one), and
    # LiteRT timing at the label-free point only (what the three lines ship; a Lite1 int8 export and
    # its timing took 4-7 minutes a point), so that `make bench` stays under 90 minutes; the labelled
    # points keep their MFLOPs figures; `make bench-full` runs every user of the grid.
    "lite1": GenericModel("EfficientNet-Lite1 at 240 px (ImageNet-pretrained, last stage tuned on CIFAR-10)", str(Path.home() / ".cache/ee/models/cifar_lite1.h5"),
                          "python -m models.train_lite", {"unlabelled": 300, "test_per_class": 100, "labels": (0,), "whole_network_epochs": 2,
                           "export_photos": 100, "timed_points": (LABEL_FREE,)}, sample=(0, 1, 2, 6, 8),
                          # two at once held 7-9 GB each beside a 6 GB `ee personalise` child: Ray killed one for memory
                          cores=2),
}


def settings_for(model: GenericModel, base: Settings) -> Settings:
    """`base` with the model's overrides, never asking for more than `base` does (a smoke run stays small)."""
    fields = {name: min(value, getattr(base, name)) if isinstance(value, int) and getattr(base, name) is not None else value
              for name, value in model.overrides.items()}
    if "labels" in fields:
        fields["labels"] = tuple(label for label in base.labels if label in fields["labels"]) or base.labels[:1]
    return dataclasses.replace(base, **fields)


@dataclasses.dataclass(frozen=True)
class UserJob:
    generic: str  # tf_keras model file: the generic classifier
    data: str  # "cifar10", or "synthetic" (generated classes, for smoke tests)
    user: User
    settings: Settings
    work: str  # this user's scratch folder
    model: str = "resnet9"  # the GENERIC_MODELS name the generic classifier goes by in the tables

    @property
    def cores(self) -> int:
        return GENERIC_MODELS[self.model].cores if self.model in GENERIC_MODELS else 1

    @property
    def seed(self) -> int:
        return self.user.seed


def load_data(source: str) -> dict:
    from datasets import cifar10, synthetic

    if source == "cifar10":
        return cifar10.load() | {"names": cifar10.CLASSES}
    if source == "synthetic":
        return synthetic.make()
    raise ValueError(f"unknown data source {source!r}")


def user_photos(job: UserJob):
    """The user's photos, drawn from their seed (all from the test split) and written as a person has
    them under work/photos: (user, folders, every class name of the data set)."""
    from datasets import field_users, scenarios

    settings, work = job.settings, Path(job.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = load_data(job.data)
    names = tuple(data["names"])
    user = field_users.make_field_user(data, job.user.spec, settings.unlabelled, max(settings.labels), settings.test_per_class)
    user = dataclasses.replace(user, names=names)
    return user, scenarios.write_user(user, work / "photos"), names


def run_user(job: UserJob) -> dict[str, Any]:
    settings, work = job.settings, Path(job.work).resolve()
    user, folders, names = user_photos(job)
    scenario, seed = job.user.scenario, job.seed
    row: dict[str, Any] = {"model": job.model, "split": job.user.split, "scenario": scenario.name, "k": scenario.k, "condition": scenario.condition, "seed": seed,
                           "classes": user.class_names, "photos": {"unlabelled": len(user.unlabelled), "labelled_per_class": max(settings.labels),
                                                                   "test": len(user.test)}}
    with inside(work):
        attached = attach_generic(job, names)
        row |= _baselines(attached, user)
        row["methods"] = _methods(job, user, folders, attached)
        for labels in settings.labels:
            row[f"labels_{labels}"] = _personalised(job, user, folders, attached, labels, names)
    if "labels_0" in row:
        row["bn_only"] = row["labels_0"].pop("bn_only")
    return row


@contextmanager
def inside(folder: Path):
    """bundles/ and runs/ are relative to the working folder; give each user its own."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def attach_generic(job: UserJob, names) -> Path:
    from ee_cli.commands.attach import attach
    from ee_cli.base.config import AttachConfig

    out = Path("attached")
    attach(AttachConfig(backbone=job.generic, classes=",".join(names), exits=job.settings.exits, out=str(out), seed=job.seed))
    return out


def predict(model, output: str, images: np.ndarray) -> np.ndarray:
    """The output for uint8 photos, each brought to the model's input size as ee's photo loader would."""
    return predict_outputs(model, [output], images)[output]


def predict_outputs(model, outputs: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Several outputs from one pass over the photos (at 240 px a pass per output cost minutes a user),
    in the batches ee's own passes use (250 photos at 240 px held GBs of activations: a Ray worker
    was killed for memory)."""
    from ee_cli.base import compat, photos

    probe, size = compat.keras().Model(model.inputs, [model.get_layer(name).output for name in outputs]), int(model.input_shape[1])
    batch = photos.inference_batch(size, model.count_params())
    batches = [probe(photos.resized(images[i : i + batch], size).astype(np.float32), training=False) for i in range(0, len(images), batch)]
    batches = [found if isinstance(found, (list, tuple)) else [found] for found in batches]
    return {name: np.concatenate([found[index].numpy() for found in batches]) for index, name in enumerate(outputs)}


def restricted_accuracy(logits: np.ndarray, classes, truth: np.ndarray, shift=None) -> float:
    """Accuracy of `logits` restricted to `classes` (each shifted by `shift`, the class prior, if given)."""
    classes = np.asarray(classes)
    return float(np.mean(classes[(logits[:, classes] + (0.0 if shift is None else np.asarray(shift))).argmax(1)] == truth))


def _baselines(attached: Path, user) -> dict[str, Any]:
    """The generic model, and the same restricted to the user's true classes (the free baseline)."""
    from ee_cli.files import bundle

    logits = predict(bundle.read_bundle(attached).load_model(), "final", user.test)
    return {"generic": float(np.mean(logits.argmax(1) == user.test_y)), "restricted": restricted_accuracy(logits, user.classes, user.test_y)}


def _methods(job: UserJob, user, folders: dict, attached: Path) -> dict[str, Any]:
    """Each label-free baseline as a researcher runs it (`ee personalise --method NAME`, defaults), scored
    over every class, as the TTA papers score it; LAME on the generic model's test batches."""
    from bench import command
    from ee_cli.files import bundle

    found: dict[str, Any] = {}
    for method in [m for m in job.settings.methods if m != "lame"]:
        options = {"data": str(folders["unlabelled"]), "bundle": str(attached), "method": method, "out": f"method-{method}", "seed": job.seed}
        ran = command.personalise(options, own_process=job.settings.costs)
        logits = predict(bundle.read_bundle(ran.result.bundle_path).load_model(), "final", user.test)
        steps = ran.result.metrics.get("entropy_steps") or {}
        found[method] = {"accuracy": float(np.mean(logits.argmax(1) == user.test_y)), "seconds": ran.seconds, "peak_rss_mib": ran.peak_rss_mib,
                         "backward_passes": steps.get("backward_passes", 0), "changes_backbone": ran.result.metrics["changes_backbone"]}
    if "lame" in job.settings.methods:  # applied at test time by the benchmark: no command, no RSS of its own
        started = time.perf_counter()
        accuracy = lame_accuracy(bundle.read_bundle(attached).load_model(), user.test, user.test_y, job.seed)
        found["lame"] = {"accuracy": accuracy, "seconds": time.perf_counter() - started, "peak_rss_mib": None, "backward_passes": 0, "changes_backbone": False}
    return found


LAME_BATCH = 128  # test photos per batch LAME corrects together (the TTA benchmark's default batch)


def lame_accuracy(model, images: np.ndarray, truth: np.ndarray, seed: int) -> float:
    """LAME on the model's outputs over shuffled test batches; its features: the classifier's input."""
    from ee_cli.adaptation import baselines
    from ee_cli.graph.personal_model import generic_classifier

    classifier = generic_classifier(model)
    inbound = classifier._inbound_nodes[0].inbound_layers
    features = inbound[0] if isinstance(inbound, list) else inbound
    outputs = predict_outputs(model, ["final", features.name], images)
    order = np.random.default_rng([seed, 5]).permutation(len(images))
    right = 0
    for start in range(0, len(order), LAME_BATCH):
        part = order[start : start + LAME_BATCH]
        logits = outputs["final"][part]
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        right += int(np.sum(baselines.lame_probabilities(probabilities, outputs[features.name][part]).argmax(1) == truth[part]))
    return right / len(images)


def _bn_only(generic_logits: np.ndarray, result, personal: list[int], user) -> dict[str, Any]:
    """BN statistics only + inferred classes: `ee personalise`'s own first step at 0 labels, read off
    its bundle (the generic output of the adapted backbone, restricted to the classes it inferred and
    shifted by their prior: where its final exit starts)."""
    adapted = result.metrics["adapted_bn"]
    shift = (result.meta.get("class_prior") or {}).get("logit_shift")
    return {"accuracy": restricted_accuracy(generic_logits, personal, user.test_y, shift), "adapted_layers": len(adapted["layers"]),
            "of": adapted["of"], "depths_tried": adapted["tried"], "note": adapted["note"],
            "inferred_classes": [user.names[c] for c in personal], "classes_exact": sorted(personal) == sorted(user.classes)}


def _personalised(job: UserJob, user, folders: dict, attached: Path, labels: int, names) -> dict[str, Any]:
    from ee_cli.files import bundle

    ran = personalise_user(job, folders, attached, labels)
    result, seconds = ran.result, ran.seconds
    personal = [names.index(name) for name in result.meta["personal_classes"]]
    model = bundle.read_bundle(result.bundle_path).load_model()
    logits = predict_outputs(model, [*bundle.head_outputs(result.meta), "generic"], user.test)
    accuracy = {name: float(np.mean(np.asarray(personal)[found.argmax(1)] == user.test_y)) for name, found in logits.items() if name != "generic"}
    figures: dict[str, Any] = {
        "accuracy": accuracy,
        "personal_classes": list(result.meta["personal_classes"]),
        # a collapse shows here: the estimated class mix, and the final exit's predictions on the test photos, onto one class
        "largest_share": {"estimated_mix": max(result.metrics["class_shares"].values()),
                          "final_predictions": float(np.bincount(logits["final"].argmax(1)).max() / len(user.test))},
        "exits_enabled": [e["name"] for e in result.meta["exits"] if e["enabled"]],
        "do_no_harm": result.metrics["holdout"].get("do_no_harm"),  # the label-free check's figures, and why it kept the start if it did
        # train = the feature cache's build plus head training: what whole-network fine-tuning replaces
        "seconds": {"command": seconds, "train": result.metrics["train_seconds"], "cache_build": (result.metrics["cache"] or {}).get("build_seconds"),
                    "phases": result.metrics["phases_seconds"]},
        "peak_rss_mib": ran.peak_rss_mib,
    }
    if labels == 0:
        figures["bn_only"] = _bn_only(logits["generic"], result, personal, user)
        figures["operating_points"] = _operating_points(job, result.bundle_path, folders["test"])
    if labels == 0 and job.settings.whole_network and job.settings.costs:
        trained_on, views = trained_photos(result), result.metrics["cache"]["views"]
        figures["whole_network"] = whole_network(job, user, personal, trained_on, views)
        figures["seconds"] |= personalise_bounds(job, user, result, trained_on)
    return figures


def personalise_bounds(job: UserJob, user, result, trained_on: np.ndarray) -> dict[str, Any]:
    """bench.bound's two bounds: the strict one timed on the trained photos' two views; the method
    one (BN adaptation included) scaled from that pass to every photo `ee personalise` saw."""
    from bench import bound
    from ee_cli.base import compat, photos

    generic = compat.keras().models.load_model(job.generic, compile=False)
    trained_pass = bound.timed_pass(generic, photos.resized(user.unlabelled[trained_on], int(generic.input_shape[1])).astype(np.float32))
    views, adapted, photo_count = result.metrics["cache"]["views"], result.metrics["adapted_bn"], len(user.unlabelled)
    holdout_share = 1 - len(trained_on) / photo_count
    passes = bound.method_passes(adapted["passes"], views, holdout_share)
    return {"forward_pass_bound": 2 * views * trained_pass,  # one plain batched pass per trained photo per view (weak and strong)
            "method_bound": passes * trained_pass * photo_count / len(trained_on), "method_bound_passes": passes}


def personalise_user(job: UserJob, folders: dict, attached: Path, labels: int):
    """`ee personalise` with its defaults on the user's photo folder (and labelled folder, if `labels`),
    as a command of its own where costs are measured (its peak RSS then measured too)."""
    from bench import command

    options = {"data": str(folders["unlabelled"]), "labelled": str(folders["labelled"]) if labels else None, "bundle": str(attached),
               "out": f"personal-L{labels}", "epochs": job.settings.epochs, "seed": job.seed}
    return command.personalise(options, own_process=job.settings.costs)


def trained_photos(result) -> np.ndarray:
    """The unlabelled photos personalise trained its heads on (not held out), by index: write_user names them so."""
    return np.array([int(Path(p).stem) for p in json.loads((result.run_dir / "split.json").read_text())["train"]])


def _operating_points(job: UserJob, personal: Path, test: Path) -> dict[str, Any]:
    """`ee evaluate` calibrates each labelled point on half the test photos; each point, and the
    label-free one `ee personalise` chose, is exported and timed on the other half."""
    from ee_cli.base.config import EvaluateConfig
    from ee_cli.commands.evaluate import evaluate

    found, evaluated = {}, None
    for point in [p for p in job.settings.points if p != LABEL_FREE]:
        evaluated = evaluate(EvaluateConfig(data=str(test), bundle=str(personal), use=point, out=f"calibrated-{point}", seed=job.seed, quiet=True))
        found[point] = _point_figures(evaluated.metrics, evaluated.metrics["operating_points"][point])
        if job.settings.costs and _timed_point(job.settings, point):
            found[point]["litert"] = _timed(job, evaluated.bundle_path, point, evaluated.run_dir)
    if LABEL_FREE in job.settings.points:
        if evaluated is None:  # the report split comes from an `ee evaluate` run; its own thresholds are not used
            evaluated = evaluate(EvaluateConfig(data=str(test), bundle=str(personal), out="evaluated", seed=job.seed, quiet=True))
        stored = evaluated.metrics["as_stored"]
        found[LABEL_FREE] = _point_figures(evaluated.metrics, stored | {"reference_accuracy": evaluated.metrics["final_accuracy"]})
        if job.settings.costs and _timed_point(job.settings, LABEL_FREE):
            found[LABEL_FREE]["litert"] = _timed(job, personal, LABEL_FREE, evaluated.run_dir)
    return found


def _timed_point(settings: Settings, point: str) -> bool:
    return settings.timed_points is None or point in settings.timed_points


def _timed(job: UserJob, source: Path, point: str, evaluate_run: Path) -> dict[str, Any]:
    """`source` exported in each timed mode, each run in LiteRT on the evaluate run's report photos."""
    from bench import latency

    return {mode: latency.measure(_export(job, source, f"{point}-{mode}", mode), evaluate_run, job.settings.latency_threads) for mode in job.settings.quant}


def _point_figures(metrics: dict, chosen: dict) -> dict[str, Any]:
    return {"accuracy": chosen["accuracy"], "reference_accuracy": chosen["reference_accuracy"], "mean_mflops": chosen["mean_mflops"],
            "plain_mflops": metrics["plain_mflops"], "shares": chosen["shares"], "thresholds": chosen["thresholds"],
            "generic_accuracy_report": metrics["baselines"]["generic"]["accuracy"],
            "restricted_accuracy_report": metrics["baselines"]["restricted"]["accuracy"]}


def _export(job: UserJob, source: Path, name: str, mode: str) -> Path:
    from ee_cli.base.config import ExportConfig
    from ee_cli.commands.export import ValidationFailed, export

    config = ExportConfig(bundle=str(source), quant=mode, out=f"export-{name}", seed=job.seed, quiet=True,
                          calibration_photos=job.settings.export_photos, validation_photos=job.settings.export_photos, max_accuracy_drop=100.0)
    try:
        return export(config).out
    except ValidationFailed as failed:  # kept and reported: the bench states what it measured
        return failed.result.out


def whole_network(job: UserJob, user, personal: list[int], trained_on: np.ndarray, views: int) -> dict[str, Any]:
    """Like for like: the photos `ee personalise` trained its heads on, and the views its cache holds."""
    from bench.whole_network import Photos, Recipe, finetune_whole_network

    same = Photos(user.unlabelled[trained_on], trained_on, user.labelled[:0], np.zeros(0, np.int32))
    epochs = job.settings.epochs
    timed = min(job.settings.whole_network_epochs or epochs, epochs)
    model, seconds, per_epoch = finetune_whole_network(job.generic, same, personal, Recipe(timed, learning_rate=job.settings.whole_network_lr, seed=job.seed, views=views))
    if timed < epochs:  # the first epoch (tracing included), then every later one as the last timed; no accuracy, it would mislead
        return {"accuracy": None, "seconds": per_epoch[0] + (epochs - 1) * per_epoch[-1], "timed_epochs": timed, "timed_seconds": seconds}
    logits = predict(model, model.layers[-1].name, user.test)
    return {"accuracy": restricted_accuracy(logits, personal, user.test_y), "seconds": seconds}
