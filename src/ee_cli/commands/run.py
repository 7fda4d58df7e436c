"""`ee run`: the exported cascade on photos, photo by photo, in LiteRT — the real early-exit latency
beside the plain model's, measured in the same process with the same threads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import photos
from ee_cli.runtime import litert
from ee_cli.base.config import RunConfig
from ee_cli.base.errors import UserError


def run_cascade(config: RunConfig) -> dict[str, Any]:
    if not config.export or not config.data:
        raise UserError("--export DIR and --data DIR are required")
    if config.threads < 1 or (config.limit is not None and config.limit < 1) or config.timed_runs < 1:
        raise UserError("--threads, --limit and --timed-runs must be at least 1")
    folder, threads = Path(config.export), config.threads
    photos.check_folder(Path(config.data))  # the user's own mistake first, before the export is read
    manifest = litert.read_manifest(folder)
    classes = manifest["classes"]
    engine, full = open_export(folder, manifest, threads)
    images, labels = _photos(Path(config.data), classes, int(manifest["input"]["shape"][1]), config)
    cascade, full_seconds, full_predictions = run_in_turns(engine, full, images)
    names = manifest["cascade"]["stops_after"]
    predictions = np.array([p.argmax() for p in cascade.probabilities])
    report = {
        "export": str(folder),
        "quant": manifest["quant"],
        "threads": threads,
        "timed_runs": config.timed_runs,
        "photos": len(images),
        "histogram": {name: int(np.sum(cascade.exit_index == i)) for i, name in enumerate(names)},
        "cascade_ms": _stats(cascade.seconds),
        "full_ms": _stats(np.array(full_seconds)),
        "accuracy": None,
    }
    report["speedup"] = report["full_ms"]["mean"] / report["cascade_ms"]["mean"]
    report["profile"] = stage_profile(engine, full, images[0], manifest, report, config.timed_runs)
    if labels is not None:
        outside = {name: int(np.sum(labels == name)) for name in sorted(set(labels) - set(classes))}
        report["photos_of_classes_outside_the_export"] = outside  # counted as wrong
        report["accuracy"] = float(np.mean(np.array(classes)[predictions] == labels))
        report["full_accuracy"] = float(np.mean(np.array(classes)[np.array(full_predictions)] == labels))
    return report


def open_export(folder: Path, manifest: dict[str, Any], threads: int):
    """The cascade engine and the plain model of an export, each checked against the manifest."""
    cascade_path, plain_path = folder / manifest["cascade"]["file"], folder / litert.PLAIN_FILE
    loaded = litert.interpreter(cascade_path, threads)
    litert.check_stages(loaded, cascade_path, manifest["cascade"]["signatures"])
    plain = litert.interpreter(plain_path, threads)
    litert.check_plain(plain, plain_path)
    engine, full = litert.CascadeEngine(loaded, manifest["cascade"]["thresholds"]), litert.Runner(plain, "serving_default")
    for runner, path in [*((stage, cascade_path) for stage in engine.stages), (full, plain_path)]:
        if int(runner.outputs["probabilities"]["shape"][-1]) != len(manifest["classes"]):
            raise UserError(f"{path} does not match its manifest: {runner.outputs['probabilities']['shape'][-1]} classes out, the manifest names {len(manifest['classes'])}")
    return engine, full


def run_in_turns(engine, plain, images: np.ndarray, block: int = 25, warmup: int = 10):
    """The cascade and the plain model over the same photos, taking turns a block of photos at a
    time, so drift in the machine's speed hits both alike, after both ran `warmup` photos untimed.
    Each call is timed like the engine's: quantise, run, dequantise. Returns the cascade's run, the
    plain model's seconds and predictions."""
    for image in images[:warmup]:
        engine.classify(image)
        plain(image[None])
    turns, plain_seconds, plain_predictions = [], [], []
    for start in range(0, len(images), block):
        chunk = images[start : start + block]
        turns.append(engine.run(chunk))
        for image in chunk:
            started = time.perf_counter()
            probabilities = plain(image[None])["probabilities"][0]
            plain_seconds.append(time.perf_counter() - started)
            plain_predictions.append(probabilities.argmax())
    exits = np.concatenate([turn.exit_index for turn in turns])
    seconds = np.concatenate([turn.seconds for turn in turns])
    cascade = litert.CascadeRun(exits, [p for turn in turns for p in turn.probabilities], seconds)
    return cascade, plain_seconds, plain_predictions


def stage_profile(engine, full, image: np.ndarray, manifest: dict, report: dict, runs: int) -> dict[str, Any]:
    """Per-stage latency (signature calls alone); the engine's latency to each exit (a photo made to
    leave there) as a share of the plain model's on the same photo, timed in turns with it, beside
    its MFLOPs share; and the cascade latency predicted from that profile and the exit histogram,
    beside the measured one."""
    stage_ms = [1000 * float(np.median(times)) for times in engine.stage_seconds(image, runs)]
    names = manifest["cascade"]["stops_after"]
    paths = {name: (lambda leaving=engine.leaving_at(index): engine.classify(image, leaving)) for index, name in enumerate(names)}
    timed = litert.alternating_wall_times({"plain": lambda: full(image[None]), **paths}, runs)
    plain_ms = 1000 * float(np.median(timed["plain"]))
    cumulative = np.array([1000 * float(np.median(timed[name])) for name in names])
    mflops = {e["name"]: e["cumulative_mflops"] for e in manifest["exits"]}
    final_mflops = manifest.get("final_mflops") or max(mflops.values(), default=1.0)
    shares = np.array([report["histogram"][name] for name in names]) / report["photos"]
    predicted = float(np.sum(shares * cumulative))
    return {
        "stage_ms": stage_ms,
        "cumulative_ms": dict(zip(names, cumulative.tolist())),
        "plain_ms": plain_ms,
        "latency_share": {name: float(c / plain_ms) for name, c in zip(names, cumulative)},
        "mflops_share": {name: float(mflops[name] / final_mflops) for name in names[:-1]} | {"final": 1.0},
        "cascade_to_final_vs_plain": float(cumulative[-1] / plain_ms),
        "predicted_cascade_ms": predicted,
        "predicted_speedup": float(plain_ms / predicted),
    }


def _stats(seconds: np.ndarray) -> dict[str, float]:
    return {"mean": 1000 * float(seconds.mean()), "p50": 1000 * float(np.percentile(seconds, 50)), "p90": 1000 * float(np.percentile(seconds, 90))}


def _photos(data: Path, classes: list[str], size: int, config: RunConfig):
    """The photos, labelled by their sub-folders. Sub-folders of classes the export cannot predict
    (its personal classes missed one) count as photos it gets wrong, as they would on the phone."""
    folders = photos.subfolder_names(data)
    known = [name for name in folders if name in classes]
    names = classes + [name for name in folders if name not in classes] if known else classes
    found = photos.scan_folder(data, names)
    labels = photos.label_names(found, names)
    keep = np.random.default_rng(config.seed).permutation(len(found.paths))[: config.limit] if config.limit else np.arange(len(found.paths))
    images = photos.load_array([found.paths[i] for i in keep], size).astype(np.float32)
    return images, labels[keep] if labels is not None else None
