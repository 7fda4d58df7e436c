"""`ee evaluate`: the profiler and orchestrator — what each exit is worth on a person's photos,
and the exit thresholds that keep accuracy while cutting compute.

The model runs once over the photos; every exit's probabilities are cached; thresholds are then
searched on a calibration split and reported on a disjoint report split (MSDNet's cache-then-sweep).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import atomic, compat, photos, runs
from ee_cli.graph import flops, inference
from ee_cli.exits import policy
from ee_cli.files import bundle
from ee_cli.runtime import litert
from ee_cli.base.config import EvaluateConfig, as_dict
from ee_cli.base.errors import UserError
from ee_cli.graph.personal_model import generic_output

OPERATING_POINTS = ("keep", "match-generic", "match-restricted", "label-free")


@dataclass(frozen=True)
class Photos:
    paths: tuple[Path, ...]
    labels: np.ndarray | None  # class names per photo, None for unlabelled photos
    skipped: int


@dataclass(frozen=True)
class EvaluateResult:
    bundle_path: Path
    run_dir: Path
    metrics: dict[str, Any]
    plot: Path
    source: Path
    source_implicit: bool


@dataclass(frozen=True)
class Profile:
    """One pass of the model over the photos: what every later step reads."""

    meta: dict[str, Any]
    outputs: list[str]  # the exits, then "final"
    confidences: np.ndarray  # (exits, photos)
    correct: np.ndarray  # (exits + 1, photos): right, or agreeing with the final exit when unlabelled
    references: dict[str, np.ndarray]  # per reference model, per photo: right?
    baselines: dict[str, dict]
    calibrate: np.ndarray  # photo indices that choose thresholds
    report: np.ndarray  # disjoint photo indices that report
    costs: policy.StageCosts

    @property
    def labelled(self) -> bool:
        return bool(self.baselines)

    def all_exits(self) -> np.ndarray:
        return self.costs.leaving(np.ones(len(self.outputs) - 1, bool))


def evaluate(config: EvaluateConfig, progress=None) -> EvaluateResult:
    progress = progress or (lambda stage, fraction, info: None)
    _check(config)
    source, implicit = bundle.input_bundle(config.bundle, config.trust_model_code)
    out = Path(config.out) if config.out else bundle.default_output(f"{source.path.name.removesuffix('-calibrated')}-calibrated")
    bundle.check_output(out, config.exist_ok)
    found = _read_photos(Path(config.data), source.meta)
    _refuse_training_photos(Path(config.data), source.meta)
    model = source.load_model()
    progress("Running the model once over the photos", 0.0, "")
    profile = _profile(config, source, model, found)
    progress("Running the model once over the photos", 1.0, "")
    points, evidence = _operating_points(config, profile, model)
    if config.use not in points:
        raise UserError(f"--use {config.use}: that operating point needs {'labelled photos' if config.use.startswith('match') else '--unlabelled'}")
    progress("Measuring latency", 0.0, "")
    latency = _latency(model, profile.outputs[:-1], bundle.input_size(source.meta), config.timed_runs)
    lite_latency = _litert_latency(Path(config.export), profile.outputs, bundle.input_size(source.meta), config.threads, config.timed_runs) if config.export else {}
    progress("Measuring latency", 1.0, "")
    per_exit = [row | lite_latency.get(row["exit"], {}) for row in _per_exit(profile, latency, points[config.use]["thresholds"])]
    run_dir = runs.new_run_dir("evaluate")
    metrics = {"bundle": str(source.path)} | _metrics(found, profile, points, per_exit, latency, config.use) | {"as_stored": _as_stored(profile, config.criterion)}
    _write_run(run_dir, config, metrics, profile, _sweep_latency(latency, lite_latency), found)
    new_meta = _calibrated_meta(source.meta, source.path, config, points[config.use], evidence[config.use])
    bundle.write_bundle(out, None, new_meta, config.exist_ok, model_file=source.path / source.meta["model_file"], evidence=evidence[config.use])
    return EvaluateResult(out, run_dir, metrics, Path(metrics["plot"]), source.path, implicit)


def _sweep_latency(keras: dict, lite: dict) -> dict:
    """Per exit, the latency the plot's curve is drawn with: LiteRT's where every exit was timed there."""
    if keras and all(name in lite for name in keras):
        return {name: {"p50": lite[name]["litert_p50_ms"]} for name in keras}
    return keras


def _profile(config: EvaluateConfig, source, model, found: Photos) -> Profile:
    meta = source.meta
    outputs = bundle.head_outputs(meta)
    confidences, correct = _exit_evidence(model, meta, found.paths, found.labels, config.criterion)
    baselines = _baselines(config, source, meta, found, bundle.input_size(meta)) if found.labels is not None else {}
    references = {"final": correct[-1]} | {name: values["correct"] for name, values in baselines.items()}
    calibrate, report = policy.split(len(found.paths), config.threshold_share, config.seed)
    return Profile(meta, outputs, confidences, correct, references, baselines, calibrate, report, bundle.stage_costs(meta))


def _metrics(found: Photos, profile: Profile, points, per_exit, latency, used: str) -> dict[str, Any]:
    report, correct, meta = profile.report, profile.correct, profile.meta
    oracle = policy.oracle(correct[:, report], profile.all_exits())
    baselines = {name: {k: v for k, v in values.items() if k != "correct"} | {"accuracy": float(values["correct"][report].mean())}
                 for name, values in profile.baselines.items()}
    return {
        "photos": {"count": len(found.paths), "skipped": found.skipped, "calibrate": len(profile.calibrate), "report": len(report)},
        "measure": "accuracy" if found.labels is not None else "agreement with the final exit",
        "final_accuracy": float(correct[-1, report].mean()),
        "baselines": baselines,
        "exits": per_exit,
        "operating_points": points,
        "used": used,
        "oracle": {"accuracy": oracle.accuracy, "mean_mflops": flops.mflops(oracle.mean_cost), "cut": _cut(meta, oracle.mean_cost), "shares": oracle.shares.tolist()},
        "plain_mflops": meta["final"]["cumulative_mflops"],
        "latency_ms": latency,
    }


def _write_run(run_dir: Path, config: EvaluateConfig, metrics: dict, profile: Profile, latency, found: Photos) -> None:
    """metrics.json, config.json, exits.csv, the plot, and which photos calibrated and which reported."""
    from ee_cli.commands.plots import plot_operating_curve

    plot = run_dir / "accuracy_vs_cost.png"
    metrics["plot"] = str(plot)
    sweep = _shared_threshold_sweep(profile.confidences[:, profile.report], profile.correct[:, profile.report], profile.all_exits(), latency)
    plot_operating_curve(plot, sweep, metrics)
    atomic.write_json(run_dir / "metrics.json", metrics)
    atomic.write_json(run_dir / "config.json", as_dict(config))
    atomic.write_json(run_dir / "split.json", {part: [str(found.paths[i]) for i in indices] for part, indices in (("calibrate", profile.calibrate), ("report", profile.report))})
    _write_csv(run_dir / "exits.csv", metrics["exits"])


def _check(config: EvaluateConfig) -> None:
    if not config.data:
        raise UserError("--data is required: a folder of labelled photos (one sub-folder per class) or of unlabelled photos")
    if not 0 < config.threshold_share < 1:
        raise UserError("--threshold-share must be in (0, 1)")
    if config.use not in OPERATING_POINTS:
        raise UserError(f"--use must be one of {', '.join(OPERATING_POINTS)}")
    if config.criterion not in ("maxprob", "entropy"):
        raise UserError("--criterion must be maxprob or entropy")
    if config.max_drop < 0:
        raise UserError("--max-drop must be 0 or more (points of accuracy)")


def _read_photos(root: Path, meta) -> Photos:
    found = photos.scan_folder(root, meta["classes"])
    return Photos(found.paths, photos.label_names(found, meta["classes"]), found.skipped_total)


def _refuse_training_photos(root: Path, meta) -> None:
    used = meta.get("personal_photos") or {}
    if str(root.resolve()) in {used.get("data"), used.get("labelled")}:
        raise UserError(f"{root} personalised this bundle: evaluate on photos it has not seen")


def _probabilities(model, outputs: list[str], paths, size: int) -> list[np.ndarray]:
    return [compat.tf().nn.softmax(logits).numpy() for logits in inference.outputs_of(model, outputs, paths, size)]


def _cut(meta, mean_cost: float) -> float:
    """How many times fewer MACs than the plain model (the backbone without any exit head)."""
    return float(meta["final"]["cumulative_macs"] / mean_cost)


def _generic_source(config, source, meta) -> tuple[Any, str]:
    """The generic model's bundle: given, else the first bundle in this one's provenance."""
    if config.generic_bundle:
        return bundle.read_bundle(Path(config.generic_bundle), config.trust_model_code), "given"
    for step in meta["provenance"]:
        if step.get("from") and Path(step["from"]).is_dir():
            return bundle.read_bundle(Path(step["from"]), config.trust_model_code), "provenance"
    return source, "this bundle"


def _baselines(config, source, meta, found: Photos, size: int) -> dict[str, dict]:
    """The generic model, and the generic model restricted to the person's classes (free)."""
    generic_bundle, how = _generic_source(config, source, meta)
    model = generic_bundle.load_model()
    output = generic_output(model)
    logits = _probabilities(model, [output], found.paths, size)[0]
    classes = np.array(generic_bundle.meta["classes"])
    personal = sorted(set(found.labels), key=list(classes).index)  # the person's true classes: those of their labelled photos
    keep = np.isin(classes, personal)
    restricted = classes[np.where(keep[None, :], logits, -np.inf).argmax(axis=1)]
    note = f"{generic_bundle.path} ({how})"
    return {
        "generic": {"correct": (classes[logits.argmax(axis=1)] == found.labels).astype(np.int8), "model": note},
        "restricted": {"correct": (restricted == found.labels).astype(np.int8), "model": note, "classes": list(personal)},
    }


def _operating_points(config, profile: Profile, model) -> tuple[dict[str, dict], dict[str, policy.Evidence]]:
    """Each operating point chosen on the calibration split and reported on the report split, with
    the evidence it was chosen from."""
    z, calibrate = config.margin_z, profile.calibrate
    keep = {"kind": "max_drop", "drop": config.max_drop / 100, "z": z}
    wanted = {"keep": ("final", keep)}
    if profile.labelled:
        wanted |= {name: (reference, {"kind": "at_least", "z": z}) for name, reference in (("match-generic", "generic"), ("match-restricted", "restricted"))}
    evidence = {name: policy.Evidence(profile.confidences[:, calibrate], profile.correct[:, calibrate], profile.references[reference][calibrate])
                for name, (reference, _) in wanted.items()}
    if config.unlabelled:
        evidence["label-free"] = _label_free_evidence(config, model, profile.meta)
        wanted["label-free"] = ("final", keep)
    points = {name: _point(profile, name, reference, constraint, evidence[name]) for name, (reference, constraint) in wanted.items()}
    return points, evidence


def _as_stored(profile: Profile, criterion: str) -> dict[str, Any] | None:
    """The input bundle's own thresholds (e.g. `ee personalise`'s label-free ones) on the report split;
    None where it has none, or chose them on another confidence criterion."""
    stored = bundle.exit_policy(profile.meta)
    if stored is None or stored.criterion != criterion:
        return None
    thresholds = np.array([policy.NEVER if t is None else t for t in stored.thresholds])
    taken = policy.exit_taken(profile.confidences[:, profile.report], thresholds)
    result = policy.outcome(taken, profile.correct[:, profile.report], profile.costs.leaving(thresholds < policy.NEVER))
    return {"set_by": stored.set_by, "operating_point": stored.operating_point, "thresholds": [float(t) for t in thresholds], "accuracy": result.accuracy,
            "mean_mflops": flops.mflops(result.mean_cost), "cut": _cut(profile.meta, result.mean_cost), "shares": result.shares.tolist()}


def _point(profile: Profile, name: str, reference_name: str, constraint: dict, evidence: policy.Evidence) -> dict[str, Any]:
    decision = policy.decide(evidence, profile.costs, constraint, [e["name"] for e in profile.meta["exits"]], "photos to calibrate on",
                             "fewer MFLOPs than the plain model")
    if decision.choice is None:  # asked for explicitly: too few photos is the user's to fix
        raise UserError(f"{evidence.photos} photos to calibrate the {name} thresholds on: at least {policy.MIN_CALIBRATION_PHOTOS} are needed")
    chosen = decision.choice
    report, reference = profile.report, profile.references[reference_name]
    taken = policy.exit_taken(profile.confidences[:, report], chosen.thresholds)
    result = policy.outcome(taken, profile.correct[:, report], profile.costs.leaving(chosen.thresholds < policy.NEVER))
    differences = reference[report].astype(float) - result.correct
    low, high = policy.bootstrap_interval(differences)
    return {
        "reference": reference_name,
        "constraint": constraint,
        "thresholds": [float(t) for t in chosen.thresholds],
        "calibration_photos": evidence.photos,
        "accuracy": result.accuracy,
        "reference_accuracy": float(reference[report].mean()),
        "drop_points": 100 * float(differences.mean()),
        "drop_ci95_points": [100 * low, 100 * high],
        "mean_mflops": flops.mflops(result.mean_cost),
        "cut": _cut(profile.meta, result.mean_cost),
        "shares": result.shares.tolist(),
        "predicted_on_calibration": {"cut": chosen.speedup, "accuracy": chosen.accuracy},
    }


def _label_free_evidence(config, model, meta) -> policy.Evidence:
    """Held-out unlabelled photos: agreement of each exit with the final exit, as a phone would."""
    held = photos.scan_unlabelled(Path(config.unlabelled))
    confidences, agree = _exit_evidence(model, meta, held.paths, None, config.criterion)
    return policy.Evidence(confidences, agree, agree[-1])


def _exit_evidence(model, meta, paths, labels, criterion: str) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: each early exit's confidence, and whether each exit (the final one too) is right,
    against `labels`, or without labels against the final exit's prediction."""
    outputs = bundle.head_outputs(meta)
    output_classes = np.array(bundle.output_classes(meta))
    probabilities = _probabilities(model, outputs, paths, bundle.input_size(meta))
    predictions = np.stack([output_classes[p.argmax(axis=1)] for p in probabilities])
    truth = labels if labels is not None else predictions[-1]
    correct = (predictions == truth[None, :]).astype(np.int8)
    confidences = np.stack([policy.confidence(p, criterion) for p in probabilities[:-1]]).reshape(len(outputs) - 1, -1)
    return confidences, correct


def _latency(model, exit_names: list[str], size: int, runs_count: int) -> dict[str, dict]:
    """Keras latency of the network up to each exit (every earlier head included), batch 1."""
    keras, tf = compat.keras(), compat.tf()
    sample = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32))
    measured = {}
    for index, name in enumerate([*exit_names, "final"]):
        wanted = exit_names[: index + 1] if name != "final" else [*exit_names, "final"]
        prefix = keras.Model(model.inputs, [model.get_layer(n).output for n in wanted])
        run = tf.function(lambda x, prefix=prefix: prefix(x, training=False), autograph=False)
        times = 1000 * litert.wall_times(lambda: [t.numpy() for t in tf.nest.flatten(run(sample))], runs_count, warmup=5)
        measured[name] = {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)), "threads": compat.thread_count()}
    return measured


def _litert_latency(folder: Path, outputs: list[str], size: int, threads: int, runs_count: int) -> dict[str, dict]:
    """LiteRT latency of each exported exit's network (`exit_K.tflite`, `final.tflite`), batch 1,
    quantise-run-dequantise as an engine would, after 10 warm-up runs."""
    litert.read_manifest(folder)
    sample = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    measured = {}
    for name in outputs:
        path = folder / f"{name}.tflite"
        if not path.is_file():
            continue  # exits that were off at export have no file of their own
        runner = litert.Runner(litert.interpreter(path, threads), "serving_default")
        times = 1000 * litert.wall_times(lambda: runner(sample), runs_count)
        measured[name] = {"litert_p50_ms": float(np.percentile(times, 50)), "litert_p90_ms": float(np.percentile(times, 90)), "litert_threads": threads}
    return measured


def _per_exit(profile: Profile, latency, thresholds) -> list[dict]:
    report, outputs = profile.report, profile.outputs
    taken = policy.exit_taken(profile.confidences[:, report], thresholds)
    shares = np.bincount(taken, minlength=len(outputs)) / len(report)
    depth = [e["relative_depth"] for e in profile.meta["exits"]] + [1.0]
    costs = profile.costs.leaving(np.asarray(thresholds) < policy.NEVER)
    return [
        {
            "exit": name,
            "relative_depth": depth[i],
            "accuracy": float(profile.correct[i, report].mean()),
            "cumulative_mflops": flops.mflops(costs[i]),
            "latency_p50_ms": latency[name]["p50"],
            "latency_p90_ms": latency[name]["p90"],
            "threshold": float(thresholds[i]) if i < len(thresholds) else None,
            "share_leaving": float(shares[i]),
        }
        for i, name in enumerate(outputs)
    ]


def _shared_threshold_sweep(confidences, correct, costs, latency) -> list[dict]:
    """One shared threshold for every exit, from 0 to 1: the curve the plot draws."""
    latencies = np.array([v["p50"] for v in latency.values()])
    points = []
    for threshold in np.linspace(0, 1, 101):
        taken = policy.exit_taken(confidences, [threshold] * len(confidences))
        result = policy.outcome(taken, correct, costs)
        points.append({"threshold": float(threshold), "accuracy": result.accuracy, "mean_mflops": flops.mflops(result.mean_cost), "latency_ms": float(latencies[taken].mean())})
    return points


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _calibrated_meta(meta, source: Path, config, point: dict, evidence: policy.Evidence) -> dict[str, Any]:
    thresholds = tuple(None if t >= policy.NEVER else t for t in point["thresholds"])
    used = [e["name"] for e, t in zip(meta["exits"], thresholds) if t is not None]
    reason = (f"{', '.join(used) or 'no exit'} on: predicted {point['cut']:.2f}× fewer MFLOPs than the plain model on the report split, "
              f"{-point['drop_points']:+.2f} pts against {point['reference']}")
    chosen = bundle.ExitPolicy(
        thresholds, "evaluate", config.use, evidence.photos, point["constraint"], criterion=config.criterion, reason=reason,
        predicted={"unit": "MACs", "cut_on_report": point["cut"], "accuracy_on_report": point["accuracy"], "reference": point["reference"]},
    )
    keep = {k: v for k, v in meta.items() if k not in ("format_version", "model_file", "model_format")}
    return bundle.with_exit_policy(keep | {"provenance": [*meta["provenance"], bundle.provenance("evaluate", as_dict(config), source)]}, chosen)
