"""`ee run`: the exported cascade on photos, photo by photo, in LiteRT — the real early-exit latency
beside the plain model's, measured in the same process with the same threads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli import litert, photos
from ee_cli.errors import UserError


def run_cascade(folder: Path, data: Path, threads: int, limit: int | None = None, profile_runs: int = 200) -> dict[str, Any]:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{folder} is not an `ee export` folder (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    classes = manifest["classes"]
    images, labels = _photos(data, classes, int(manifest["input"]["shape"][1]), limit)
    thresholds = manifest["cascade"]["thresholds"]
    engine = litert.CascadeEngine(folder / "cascade.tflite", thresholds, threads)
    full = litert.Runner(litert.interpreter(folder / "final.tflite", threads), "serving_default")
    for image in images[:10]:  # warm up both
        engine.classify(image)
        full(image[None])
    cascade = engine.run(images)
    full_seconds, full_predictions = [], []
    for image in images:  # timed like the engine: quantise, run, dequantise
        started = time.perf_counter()
        probabilities = full(image[None])["probabilities"][0]
        full_seconds.append(time.perf_counter() - started)
        full_predictions.append(probabilities.argmax())
    names = manifest["cascade"]["stops_after"]
    predictions = np.array([p.argmax() for p in cascade.probabilities])
    report = {
        "tflite": str(folder),
        "quant": manifest["quant"],
        "threads": threads,
        "photos": len(images),
        "histogram": {name: int(np.sum(cascade.exit_index == i)) for i, name in enumerate(names)},
        "cascade_ms": _stats(cascade.seconds),
        "full_ms": _stats(np.array(full_seconds)),
        "accuracy": None,
    }
    report["speedup"] = report["full_ms"]["mean"] / report["cascade_ms"]["mean"]
    report["profile"] = _profile(engine, images[0], manifest, report, profile_runs)
    if labels is not None:
        report["accuracy"] = float(np.mean(np.array(classes)[predictions] == labels))
        report["full_accuracy"] = float(np.mean(np.array(classes)[np.array(full_predictions)] == labels))
    return report


def _profile(engine, image: np.ndarray, manifest: dict, report: dict, runs: int) -> dict[str, Any]:
    """Per-stage latency (signature calls alone); the engine's latency to each exit (a photo made to
    leave there) as a share of the plain model's, beside its MFLOPs share; and the cascade latency
    predicted from that profile and the exit histogram, beside the measured one."""
    stage_ms = [1000 * float(np.median(times)) for times in engine.stage_seconds(image, runs)]
    names = manifest["cascade"]["stops_after"]
    cumulative = np.array([1000 * float(np.median(engine.seconds_to_exit(image, index, runs))) for index in range(len(names))])
    mflops = {e["name"]: e["cumulative_mflops"] for e in manifest["exits"]}
    final_mflops = manifest.get("final_mflops") or max(mflops.values(), default=1.0)
    shares = np.array([report["histogram"][name] for name in names]) / report["photos"]
    predicted = float(np.sum(shares * cumulative))
    return {
        "stage_ms": stage_ms,
        "cumulative_ms": dict(zip(names, cumulative.tolist())),
        "latency_share": {name: float(c / report["full_ms"]["p50"]) for name, c in zip(names, cumulative)},
        "mflops_share": {name: float(mflops[name] / final_mflops) for name in names[:-1]} | {"final": 1.0},
        "cascade_to_final_vs_plain": float(cumulative[-1] / report["full_ms"]["p50"]),
        "predicted_cascade_ms": predicted,
        "predicted_speedup": float(report["full_ms"]["p50"] / predicted),
        "measured_speedup_p50": float(report["full_ms"]["p50"] / report["cascade_ms"]["p50"]),
    }


def _stats(seconds: np.ndarray) -> dict[str, float]:
    return {"mean": 1000 * float(seconds.mean()), "p50": 1000 * float(np.percentile(seconds, 50)), "p90": 1000 * float(np.percentile(seconds, 90))}


def _photos(data: Path, classes: list[str], size: int, limit: int | None):
    found = photos.scan_folder(data, classes)
    labels = photos.label_names(found, classes)
    keep = np.random.default_rng(0).permutation(len(found.paths))[:limit] if limit else np.arange(len(found.paths))
    images = photos.load_array([found.paths[i] for i in keep], size).astype(np.float32)
    return images, labels[keep] if labels is not None else None
