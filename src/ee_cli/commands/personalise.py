"""`ee personalise`: adapt early BatchNorm statistics, infer the person's classes and their prior,
cache features, train the exit heads (frozen backbone), switch on the exits that pay, check that the
result does no harm, write a bundle.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import atomic, compat, photos, runs
from ee_cli.graph import inference
from ee_cli.exits import policy, safety
from ee_cli.files import bundle, schemas
from ee_cli.adaptation import adapt, baselines
from ee_cli.base.config import PersonaliseConfig, as_dict
from ee_cli.base.errors import UserError
from ee_cli.graph.graft import FINAL_OUTPUT
from ee_cli.graph.personal_model import GENERIC_OUTPUT, build_personal_model, generic_output
from ee_cli.adaptation.stepping import Stepping
from ee_cli.adaptation.training import EXIT_TEACHERS, Job, Progress, Roles, Trained, train


@dataclass(frozen=True)
class PersonaliseResult:
    bundle_path: Path
    run_dir: Path
    meta: dict[str, Any]
    metrics: dict[str, Any]
    source: Path
    source_implicit: bool


@dataclass(frozen=True)
class Found:
    """The person's photos: unlabelled ones first, then labelled ones."""

    unlabelled: photos.PhotoSet
    labelled: photos.PhotoSet | None

    @property
    def paths(self) -> list[Path]:
        return [*self.unlabelled.paths, *(self.labelled.paths if self.labelled else ())]


@dataclass(frozen=True)
class Adapted:
    """The source model with the person's early-BatchNorm statistics, and their classes."""

    model: Any
    layers: list[str]
    of: int
    seconds: float  # the BatchNorm passes
    shares: np.ndarray  # estimated class mix over the bundle's classes
    personal: list[int]
    classes_seconds: float  # the pass that estimates the class mix
    note: str | None = None  # said when `auto` stopped short of its deepest depth
    tried: tuple[int, ...] = ()  # the depths whose generic predictions were computed, in order
    passes: float = 0.0  # the BatchNorm and class-mix passes, in whole passes' MACs (stepping.Stepping.passes)
    logit_shift: np.ndarray | None = None  # over `personal`: the class prior's shift of the generic logits (None: restricted only)


@dataclass(frozen=True)
class Outcome:
    """Everything one run found, from the photos to the exit policy: what metrics and meta report."""

    found: Found
    adapted: Adapted
    trained: Trained
    scores: dict[str, Any]  # held-out accuracy or agreement per exit
    chosen: bundle.ExitPolicy


def personalise(config: PersonaliseConfig, progress: Progress | None = None) -> PersonaliseResult:
    progress = progress or (lambda stage, fraction, info: None)
    _check_numbers(config)
    source, source_implicit = bundle.input_bundle(config.bundle, config.trust_model_code)
    run_dir = _run_dir(config)
    out = Path(config.out) if config.out else _planned_output(run_dir, source.path)
    bundle.check_output(out, config.exist_ok)
    meta = source.meta
    found = Found(photos.scan_unlabelled(Path(config.data)), photos.scan_labelled(Path(config.labelled), meta["classes"]) if config.labelled else None)
    if config.method != "ee":
        return _baseline(config, source, source_implicit, found, run_dir, out, progress)
    adapted = adapt_step(config, source, found, progress)
    compat.seed_everything(config.seed)
    personal_model, heads = build_personal_model(adapted.model, bundle.output_classes(meta), meta["classes"], adapted.personal,
                                                 adapted.logit_shift)
    job = Job(personal_model, heads, found.paths, _roles(len(found.unlabelled), found.labelled, adapted.personal, config), np.array(adapted.personal),
              tuple(adapted.layers), adapted.logit_shift)
    start = personal_model.get_layer(f"{FINAL_OUTPUT}_logits").get_weights()
    trained = _train(config, job, run_dir, progress)
    started = time.perf_counter()
    scores, evidence, verdict = _holdout_evidence(job)
    scores["seconds"] = round(time.perf_counter() - started, 2)
    if verdict is not None and verdict.harm:  # do no harm: the model it started from ships instead, exits off
        personal_model.get_layer(f"{FINAL_OUTPUT}_logits").set_weights(start)
        evidence, chosen = None, _kept_start_policy(meta, verdict)
    else:
        chosen = _label_free_policy(evidence, meta, config)
    scores["do_no_harm"] = None if verdict is None else dataclasses.asdict(verdict)
    outcome = Outcome(found, adapted, trained, scores, chosen)
    metrics = _metrics(config, meta["classes"], outcome)
    new_meta = _personalised_meta(meta, source.path, config, outcome)
    atomic.write_json(run_dir / "metrics.json", metrics)
    atomic.write_json(run_dir / "split.json", _split(job))
    bundle.write_bundle(out, personal_model, new_meta, config.exist_ok, evidence=evidence if outcome.chosen.predicted else None)
    atomic.write_json(run_dir / "state.json", {"status": "done", "bundle": str(out)})
    return PersonaliseResult(out, run_dir, new_meta, metrics, source.path, source_implicit)


def _baseline(config: PersonaliseConfig, source, implicit: bool, found: Found, run_dir: Path, out: Path, progress: Progress) -> PersonaliseResult:
    """A label-free baseline's bundle (`--method`): the source model with its BatchNorm layers
    adapted as the method does, its exits as they were, switched off."""
    started = time.perf_counter()
    model, steps = source.load_model(), None
    if config.method in ("tent", "eata"):
        order = np.random.default_rng([config.seed, 17]).permutation(len(found.unlabelled))
        shuffled = [found.unlabelled.paths[i] for i in order]
        progress(f"{config.method}: one epoch of entropy minimisation", 0.0, f"{len(shuffled)} photos")
        steps = baselines.minimise_entropy(model, generic_output(model), photos.decoded_batches(shuffled, bundle.input_size(source.meta), config.batch), config.method, config.seed)
    layers = [layer.name for layer in adapt.backbone_batchnorms(model)]
    if config.method != "source":
        every = dataclasses.replace(config, adapt_bn=str(len(layers)), personal_classes="all")
        model = adapt_step(every, source, found, progress, model=model).model
    metrics = {"method": config.method, "changes_backbone": baselines.CHANGES_BACKBONE[config.method],
               "photos": {"unlabelled": len(found.unlabelled), "skipped": dict(found.unlabelled.skipped)},
               "adapted_bn": {"layers": layers if config.method != "source" else [], "of": len(layers)},
               "entropy_steps": dataclasses.asdict(steps) if steps else None, "seconds": round(time.perf_counter() - started, 2)}
    why = f"--method {config.method} adapts the backbone's BatchNorm layers only: the exits are the input bundle's, off"
    off = bundle.ExitPolicy((None,) * len(source.meta["exits"]), "personalise", f"{config.method} (baseline)", 0, {}, reason=why)
    kept = {k: v for k, v in source.meta.items() if k not in ("format_version", "model_file", "model_format")}
    new_meta = bundle.with_exit_policy(kept | {
        "method": {"name": config.method, "changes_backbone": metrics["changes_backbone"]},
        "adapted_bn": {"layers": metrics["adapted_bn"]["layers"], "photos": len(found.unlabelled)},
        "personal_photos": {"data": str(Path(config.data).resolve()), "labelled": None},
        "provenance": [*source.meta["provenance"], bundle.provenance("personalise", as_dict(config), source.path)],
    }, off)
    atomic.write_json(run_dir / "metrics.json", metrics)
    bundle.write_bundle(out, model, new_meta, config.exist_ok)
    atomic.write_json(run_dir / "state.json", {"status": "done", "bundle": str(out)})
    return PersonaliseResult(out, run_dir, new_meta, metrics, source.path, implicit)


def _train(config: PersonaliseConfig, job: Job, run_dir: Path, progress: Progress) -> Trained:
    if config.engine != "litert":
        return train(config, job, run_dir, progress)
    from ee_cli.runtime.litert_trainer import personalise_heads  # through personalise.tflite in LiteRT, in a child process without TensorFlow

    started = time.perf_counter()
    features, history = personalise_heads(job, config, run_dir, progress)
    return Trained(features, history, time.perf_counter() - started)


def _split(job: Job) -> dict[str, list[str]]:
    """Which photos trained the heads and which were held out to choose the exits' thresholds."""
    roles = job.roles
    train = np.concatenate([roles.train_unlabelled, roles.train_labelled])
    holdout = np.concatenate([roles.holdout_unlabelled, roles.holdout_labelled])
    return {"train": [str(job.paths[i]) for i in train], "holdout": [str(job.paths[i]) for i in holdout]}


def adapt_step(config: PersonaliseConfig, source, found: Found, progress: Progress | None = None, model=None) -> Adapted:
    """The person's early-BatchNorm statistics (forward passes only), then their classes: the
    "BN only" model, before any head trains (the benchmark reports it as a baseline). `model`:
    the source bundle's model, already loaded (and changed, by an entropy baseline)."""
    progress = progress or (lambda stage, fraction, info: None)
    meta, size = source.meta, bundle.input_size(source.meta)
    compat.seed_everything(config.seed)
    model = model if model is not None else source.load_model()
    layers = adapt.backbone_batchnorms(model)
    count = adapt.resolve_adapt_count(config.adapt_bn, len(layers))
    generic_statistics = adapt.statistics_of(layers)
    progress("Adapting BatchNorm statistics", 0.0, f"{'up to ' if config.adapt_bn == 'auto' else ''}{count} of {len(layers)} layers")
    adapted: adapt.Statistics = []
    seconds = {"batchnorm": 0.0, "classes": 0.0}
    tried: list[int] = []
    with tempfile.TemporaryDirectory(prefix="ee-stones-") as stones:
        paths, batch = found.unlabelled.paths, photos.inference_batch(size, model.count_params())
        stepping = Stepping(model, generic_output(model), lambda: photos.decoded_batches(paths, size, batch), Path(stones))

        seen: dict[int, np.ndarray] = {}

        def logits_at(depth: int) -> np.ndarray:  # statistics are nested: only layers beyond the deepest yet need passes
            if depth > len(adapted):
                started = time.perf_counter()
                adapted.extend(stepping.deepen(depth))
                seconds["batchnorm"] += time.perf_counter() - started
            adapt.set_statistics(layers, adapted, generic_statistics, depth)
            tried.append(depth)
            started = time.perf_counter()
            logits = seen[depth] = stepping.read(depth)
            seconds["classes"] += time.perf_counter() - started
            progress("Adapting BatchNorm statistics", min(1.0, depth / max(count, 1)), f"{depth} of {len(layers)} layers")
            return logits

        if config.adapt_bn == "auto":  # the user's own N is taken as given
            count, shares, note = adapt.auto_depth(logits_at, adapt.auto_depths(len(layers)))
        else:
            shares, note = adapt.class_shares(logits_at(count)), None
        if config.prior_temperature != 1.0:  # the mix at the depth kept, re-estimated from calibrated probabilities
            shares = adapt.class_shares(seen[count], temperature=config.prior_temperature)
    adapt.set_statistics(layers, adapted, generic_statistics, count)
    personal, shift = _personal_classes(config, meta["classes"], shares, found.labelled)
    progress("Adapting BatchNorm statistics", 1.0, f"{count} layers; personal classes: {', '.join(meta['classes'][i] for i in personal)}")
    return Adapted(model, [layer.name for layer in layers[:count]], len(layers), seconds["batchnorm"], shares, personal, seconds["classes"], note, tuple(tried),
                   sum(stepping.passes), shift)


def _metrics(config: PersonaliseConfig, class_names, outcome: Outcome) -> dict[str, Any]:
    found, adapted, trained = outcome.found, outcome.adapted, outcome.trained
    labelled = found.labelled
    return {
        "photos": {"unlabelled": len(found.unlabelled), "labelled": len(labelled) if labelled else 0, "skipped": _merge_skips(found.unlabelled, labelled)},
        "adapted_bn": {"layers": adapted.layers, "of": adapted.of, "photos": len(found.unlabelled), "seconds": round(adapted.seconds, 2), "note": adapted.note,
                       "tried": list(adapted.tried), "passes": round(adapted.passes, 3)},
        "class_shares": {class_names[i]: round(float(s), 4) for i, s in enumerate(adapted.shares)},
        "personal_classes": [class_names[i] for i in adapted.personal],
        "cache": None if trained.features is None else {"bytes": trained.features.bytes, "build_seconds": round(trained.features.seconds, 2), "views": config.views},
        "train_seconds": round(trained.seconds, 2),
        "phases_seconds": _phases(outcome),
        "epochs": config.epochs,
        "last_epoch": trained.history[-1] if trained.history else None,
        "holdout": outcome.scores,
        "policy": {k: v for k, v in vars(outcome.chosen).items() if k != "constraint"},
    }


def _phases(outcome: Outcome) -> dict[str, float]:
    """Wall seconds per phase, for the forward-pass bound (a reused cache counts its first build)."""
    adapted, trained = outcome.adapted, outcome.trained
    cache_seconds = trained.features.seconds if trained.features is not None else 0.0
    return {"batchnorm": round(adapted.seconds, 2), "classes": round(adapted.classes_seconds, 2), "cache": round(cache_seconds, 2),
            "heads": round(trained.seconds - cache_seconds, 2), "holdout": outcome.scores.get("seconds", 0.0)}


def _check_numbers(config: PersonaliseConfig) -> None:
    if not config.data:
        raise UserError("--data is required: a folder of the person's photos")
    checks = [
        (config.views >= 1, "--views must be at least 1"),
        (config.epochs >= 0, "--epochs must be 0 or more"),
        (config.batch >= 2, "--batch must be at least 2"),
        (0 <= config.holdout < 1, "--holdout must be in [0, 1)"),
        (0 < config.pseudo_label_confidence <= 1, "--pseudo-label-confidence must be in (0, 1]"),
        (0 < config.class_share <= 1, "--class-share must be in (0, 1]"),
        (config.prior_temperature > 0, "--prior-temperature must be positive"),
        (config.max_drop >= 0, "--max-drop must be 0 or more (points of agreement with the final exit)"),
        (config.exit_teacher in EXIT_TEACHERS, f"--exit-teacher must be one of {', '.join(EXIT_TEACHERS)}"),
        (config.temperature > 0, "--temperature must be positive"),
        (config.engine in ("tensorflow", "litert"), "--engine must be tensorflow or litert"),
        (config.method in baselines.METHODS, f"--method must be one of {', '.join(baselines.METHODS)}"),
        (config.method != "lame", "--method lame corrects each test batch's outputs and changes no model, so it has no bundle to write: the benchmark applies it at test time (python -m bench.run)"),
        (config.method == "ee" or config.engine == "tensorflow", "--engine litert trains ee's exits; the baselines run in TensorFlow"),
        (config.cache or config.engine == "tensorflow", "--no-cache compares TensorFlow paths; the LiteRT engine trains from its cache"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _run_dir(config: PersonaliseConfig) -> Path:
    """A new run directory, or with --resume the latest unfinished one (whose config must match)."""
    resolved = {k: v for k, v in as_dict(config).items() if k not in ("resume", "quiet")}
    if config.resume:
        for candidate in sorted(runs.DEFAULT_ROOT.glob("personalise-*"), key=lambda p: runs._number(p.name, "personalise"), reverse=True):
            state = candidate / "state.json"
            if state.is_file() and _run_file(state, "status") == "running":
                if schemas.read_json(candidate / "config.json") != resolved:
                    raise UserError(f"--resume: the unfinished run {candidate} was started with other settings")
                return candidate
        raise UserError("--resume: no unfinished personalise run in runs/")
    run_dir = runs.new_run_dir("personalise")
    atomic.write_json(run_dir / "config.json", resolved)
    atomic.write_json(run_dir / "state.json", {"status": "running"})
    return run_dir


def _run_file(path: Path, key: str) -> str:
    """One string field of a run folder's JSON file, or a one-line error naming the file."""
    document = schemas.read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get(key), str):
        raise UserError(f"{path} is damaged (no {key!r}): remove that run folder or start a new run without --resume")
    return document[key]


def _planned_output(run_dir: Path, source: Path) -> Path:
    """The default output, fixed in the run dir on first use so that --resume writes the same one."""
    planned = run_dir / "output.json"
    if planned.is_file():
        return Path(_run_file(planned, "out"))
    stem = source.name if source.name.endswith("-personal") else f"{source.name}-personal"
    out = bundle.default_output(stem)
    atomic.write_json(planned, {"out": str(out)})
    return out


def _personal_classes(config, class_names: list[str], shares: np.ndarray, labelled) -> tuple[list[int], np.ndarray | None]:
    """The personal classes, and the class prior's logit shift where they were inferred (None where
    the user's labels or --personal-classes fix the set outright)."""
    spec = config.personal_classes
    if spec == "all":
        return list(range(len(class_names))), None
    if spec == "auto":
        if labelled is not None:
            return sorted(set(labelled.labels)), None
        prior = adapt.class_prior(shares, config.class_share, config.prior_temperature)
        return prior.classes, prior.logit_shift if config.class_prior else None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in class_names]
    if unknown or len(names) < 2:
        raise UserError(f"--personal-classes: give auto, all, or at least 2 of the bundle's classes (unknown: {', '.join(unknown) or 'none'})")
    return sorted(class_names.index(name) for name in names), None


def _roles(unlabelled_count: int, labelled, personal: list[int], config: PersonaliseConfig) -> Roles:
    rng = np.random.default_rng([config.seed, 7])
    order = rng.permutation(unlabelled_count)
    held = int(round(config.holdout * unlabelled_count))
    labels = np.full(unlabelled_count + (len(labelled) if labelled else 0), -1)
    train_labelled = holdout_labelled = np.zeros(0, int)
    if labelled is not None:
        outside = sorted({labelled_class for labelled_class in labelled.labels} - set(personal))
        if outside:
            raise UserError("--personal-classes leaves out classes that have labelled photos")
        labels[unlabelled_count:] = [personal.index(label) for label in labelled.labels]
        labelled_order = unlabelled_count + rng.permutation(len(labelled))
        held_labelled = int(round(config.holdout * len(labelled)))
        holdout_labelled, train_labelled = np.sort(labelled_order[:held_labelled]), np.sort(labelled_order[held_labelled:])
    return Roles(np.sort(order[held:]), train_labelled, np.sort(order[:held]), holdout_labelled, labels)


def _holdout_evidence(job: Job):
    """Per exit, on every held-out photo: accuracy where a label exists, agreement with the
    personalised final exit elsewhere (labelled and unlabelled photos are evidence together, so a
    few labels never leave the thresholds too few photos); the per-photo evidence exit thresholds
    are chosen from; and the do-no-harm verdict on the final exit against the model it started from
    (safety.judge)."""
    personal_model, heads, roles = job.personal_model, job.heads, job.roles
    indices = np.concatenate([roles.holdout_labelled, roles.holdout_unlabelled]).astype(int)
    if len(indices) == 0:
        return {"kind": "none", "photos": 0, "scores": {}}, None, None
    *logits, generic = inference.outputs_of(personal_model, [h.name for h in heads] + [GENERIC_OUTPUT], [job.paths[i] for i in indices], job.size)
    start = generic[:, job.personal] + (0.0 if job.teacher_shift is None else job.teacher_shift)
    verdict = safety.judge(logits[-1].argmax(1), start.argmax(1))
    labels = roles.labels[indices]
    truth = np.where(labels >= 0, labels, logits[-1].argmax(1))
    correct = np.stack([(l.argmax(1) == truth) for l in logits]).astype(np.int8)
    probabilities = [compat.tf().nn.softmax(l).numpy() for l in logits[:-1]]
    evidence = policy.Evidence(np.stack([policy.confidence(p) for p in probabilities]).reshape(len(logits) - 1, -1), correct, correct[-1])
    scores = {head.name: round(float(correct[k].mean()), 4) for k, head in enumerate(heads)}
    labelled = int(np.sum(labels >= 0))
    kind = ("agreement with the personalised final exit" if not labelled else "accuracy" if labelled == len(indices)
            else f"accuracy on {labelled} labelled photos, agreement with the personalised final exit on {len(indices) - labelled} others")
    return {"kind": kind, "photos": int(len(indices)), "scores": scores}, evidence, verdict


def _kept_start_policy(meta, verdict: safety.Verdict) -> bundle.ExitPolicy:
    reason = (f"do no harm: {verdict.harm}, so the bundle keeps the generic classifier with the person's BatchNorm statistics "
              "and class prior, every exit off")
    return bundle.ExitPolicy((None,) * len(meta["exits"]), "personalise", "kept start (label-free)", verdict.photos, {}, reason=reason)


def _label_free_policy(evidence: policy.Evidence | None, meta, config: PersonaliseConfig) -> bundle.ExitPolicy:
    """Thresholds that keep the held-out agreement with the final exit within --max-drop points
    (one-sided margin), choosing the exits that cut the most compute; none below the photo floor."""
    constraint = {"kind": "max_drop", "drop": config.max_drop / 100, "z": config.margin_z}
    decision = policy.decide(evidence, bundle.stage_costs(meta), constraint, [e["name"] for e in meta["exits"]], "held-out photos",
                             "fewer MFLOPs than the plain model (label-free)")
    fields = {"set_by": "personalise", "operating_point": "keep (label-free)", "photos": evidence.photos if evidence is not None else 0, "constraint": constraint}
    if decision.choice is None:
        return bundle.ExitPolicy((None,) * len(meta["exits"]), reason=decision.reason + " (more photos or a larger --holdout; `ee evaluate` can set them)", **fields)
    return bundle.ExitPolicy.from_choice(decision.choice, reason=decision.reason, **fields)


def _merge_skips(unlabelled, labelled) -> dict[str, int]:
    merged = dict(unlabelled.skipped)
    for reason, count in (labelled.skipped if labelled else {}).items():
        merged[reason] = merged.get(reason, 0) + count
    return merged


def _class_prior_meta(config, names: list[str], adapted: Adapted) -> dict[str, Any] | None:
    """The class set's evidence and the prior the final exit and the teacher were shifted by."""
    if adapted.logit_shift is None:
        return None
    return {"classes": names, "logit_shift": [round(float(v), 5) for v in adapted.logit_shift], "min_share_of_even": config.class_share,
            "temperature": config.prior_temperature, "estimated_mix": [round(float(adapted.shares[i]), 5) for i in adapted.personal]}


def _personalised_meta(meta, source: Path, config, outcome: Outcome) -> dict[str, Any]:
    adapted, scores = outcome.adapted, outcome.scores
    names = [meta["classes"][i] for i in adapted.personal]
    exits = [e | {"trained": True, "holdout_score": scores["scores"].get(e["name"])} for e in meta["exits"]]
    final = meta["final"] | {"trained": True, "personalised": True, "holdout_score": scores["scores"].get("final")}
    keep = {k: v for k, v in meta.items() if k not in ("format_version", "model_file", "model_format")}
    personalised = keep | {
        "personal_classes": names,
        "output_classes": names,
        "generic_output": GENERIC_OUTPUT,
        "adapted_bn": {"layers": adapted.layers, "photos": len(outcome.found.unlabelled)},
        "class_prior": _class_prior_meta(config, names, adapted),
        "exits": exits,
        "final": final,
        "holdout": {"kind": scores["kind"], "photos": scores["photos"]},
        "personal_photos": {"data": str(Path(config.data).resolve()), "labelled": str(Path(config.labelled).resolve()) if config.labelled else None},
        "provenance": [*meta["provenance"], bundle.provenance("personalise", as_dict(config), source)],
    }
    return bundle.with_exit_policy(personalised, outcome.chosen)  # replaces any earlier command's thresholds
