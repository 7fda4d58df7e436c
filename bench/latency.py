"""An exported cascade against its plain model in LiteRT, photo by photo and taking turns a block
of photos at a time (as `ee run` does), on the photos `ee evaluate` reported on (never those it
calibrated on): its run folder's split.json names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import photos
from ee_cli.runtime import litert
from ee_cli.commands.run import run_in_turns, stage_profile

PROFILE_RUNS = 20  # timed calls per path for the per-exit latency profile


def report_photos(evaluate_run: Path) -> tuple[list[Path], np.ndarray]:
    """The photos an `ee evaluate` run reported on, and their classes (their folders' names)."""
    paths = [Path(p) for p in json.loads((Path(evaluate_run) / "split.json").read_text())["report"]]
    return paths, np.array([path.parent.name for path in paths])


def measure(export_dir: Path, evaluate_run: Path, threads: int, warmup: int = 20) -> dict[str, Any]:
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    classes = manifest["classes"]
    paths, labels = report_photos(evaluate_run)
    images = photos.load_array(paths, int(manifest["input"]["shape"][1])).astype(np.float32)
    engine = litert.CascadeEngine.from_file(Path(export_dir) / "cascade.tflite", manifest["cascade"]["thresholds"], threads)
    plain = litert.Runner(litert.interpreter(Path(export_dir) / "final.tflite", threads), "serving_default")
    cascade, plain_s, plain_pred = run_in_turns(engine, plain, images, warmup=warmup)
    cascade_s, exits = cascade.seconds, cascade.exit_index
    cascade_pred = [probabilities.argmax() for probabilities in cascade.probabilities]
    names = np.array(classes)
    cascade_ms, plain_ms = 1000 * float(np.mean(cascade_s)), 1000 * float(np.mean(plain_s))
    histogram = {name: int(np.sum(np.array(exits) == i)) for i, name in enumerate(manifest["cascade"]["stops_after"])}
    # each exit's latency share of the plain model beside its MFLOPs share (`ee run`'s own profile)
    profile = stage_profile(engine, plain, images[0], manifest, {"histogram": histogram, "photos": len(images)}, PROFILE_RUNS)
    return {
        "photos": len(images),
        "cascade_ms": cascade_ms,
        "plain_ms": plain_ms,
        "speedup": plain_ms / cascade_ms,
        "cascade_accuracy": float(np.mean(names[cascade_pred] == labels)),
        "plain_accuracy": float(np.mean(names[plain_pred] == labels)),
        "histogram": histogram,
        "profile": {key: profile[key] for key in ("latency_share", "mflops_share", "cascade_to_final_vs_plain")},
        "cascade_bytes": manifest["files"]["cascade.tflite"],
    }
