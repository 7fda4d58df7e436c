"""An exported cascade against its plain model in LiteRT, photo by photo and taking turns a block
of photos at a time (as `ee run` does), on the photos `ee evaluate` reported on (never those it
calibrated on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli import litert, photos, policy
from ee_cli.engine import run_in_turns


def report_photos(test: Path, classes: list[str], seed: int, calibrate_split: float = 0.5):
    """The report half of `ee evaluate --data test --seed seed`: same scan, same split."""
    found = photos.scan_folder(test, classes)
    labels = photos.label_names(found, classes)
    _, report = policy.split(len(found.paths), calibrate_split, seed)
    return [found.paths[i] for i in report], labels[report]


def measure(export_dir: Path, test: Path, all_classes: list[str], seed: int, threads: int, warmup: int = 20) -> dict[str, Any]:
    """`all_classes`: the bundle's (what `ee evaluate` scanned with); the export's are the personal ones."""
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    classes = manifest["classes"]
    paths, labels = report_photos(test, list(all_classes), seed)
    images = photos.load_array(paths, int(manifest["input"]["shape"][1])).astype(np.float32)
    engine = litert.CascadeEngine(Path(export_dir) / "cascade.tflite", manifest["cascade"]["thresholds"], threads)
    plain = litert.Runner(litert.interpreter(Path(export_dir) / "final.tflite", threads), "serving_default")
    cascade, plain_s, plain_pred = run_in_turns(engine, plain, images, warmup=warmup)
    cascade_s, exits = cascade.seconds, cascade.exit_index
    cascade_pred = [probabilities.argmax() for probabilities in cascade.probabilities]
    names = np.array(classes)
    cascade_ms, plain_ms = 1000 * float(np.mean(cascade_s)), 1000 * float(np.mean(plain_s))
    return {
        "photos": len(images),
        "cascade_ms": cascade_ms,
        "plain_ms": plain_ms,
        "speedup": plain_ms / cascade_ms,
        "cascade_accuracy": float(np.mean(names[cascade_pred] == labels)),
        "plain_accuracy": float(np.mean(names[plain_pred] == labels)),
        "histogram": {name: int(np.sum(np.array(exits) == i)) for i, name in enumerate(manifest["cascade"]["stops_after"])},
        "cascade_bytes": manifest["files"]["cascade.tflite"],
    }
