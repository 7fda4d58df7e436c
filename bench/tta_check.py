"""The baselines checked against their published behaviour on dev users (issue 38's first acceptance
line): on all-10-class users, one per CIFAR-10-C corruption at severity 5, `bn` should cut the
generic model's error by at least a third (TENT's paper: 43.5 -> 20.4 % on WRN-28) and `tent` should
do no worse than `bn`; on label-shift-only users `lame` should do no worse than `source`.

    python -m bench.tta_check --generic ~/.cache/ee/models/cifar_resnet9.h5 --out bench/results/FILE.json

Each method runs as `ee personalise --method NAME` with its defaults on the user's 500 unlabelled
photos; accuracy is the bundle's final exit on the user's 1,000 test photos (disjoint, every photo
from CIFAR-10's test split). LAME corrects the source model's outputs on test batches of 128
(its features: the classifier's input). Dev seeds only (from 150): nothing here is a test user.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.protocol import lame_accuracy, predict_outputs
from bench.run import identity
from datasets import cifar10, corruptions, field_users
from datasets.scenarios import write_user
from ee_cli.files import bundle
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, PersonaliseConfig
from ee_cli.commands.personalise import personalise
from ee_cli.base.atomic import write_json

METHODS = ("source", "bn", "tent", "eata")


def dev_users() -> list[field_users.Spec]:
    every = tuple(range(10))
    corrupted = [field_users.Spec(f"check-all-{name}-5", 150 + i, every, name, 5) for i, name in enumerate(corruptions.CORRUPTIONS)]
    shifted = []
    for j in range(4):
        rng = np.random.default_rng([170 + j, 2019])
        classes = tuple(sorted(int(c) for c in rng.choice(10, size=int(rng.integers(2, 6)), replace=False)))
        shifted.append(field_users.Spec(f"check-label-shift-k{len(classes)}-seed{170 + j}", 170 + j, classes, None, None))
    return corrupted + shifted


def run(generic: Path, work: Path, limit: int | None = None) -> dict:
    data = cifar10.load()
    attach(AttachConfig(backbone=str(generic), out=str(work / "generic"), classes=",".join(cifar10.CLASSES)))
    rows = []
    users = dev_users()
    for spec in users[:limit] + (users[-1:] if limit else []):
        user = field_users.make_field_user(data, spec, unlabelled=500, test_per_class=1000 // len(spec.classes))
        folders = write_user(user, work / spec.name)
        row = {"user": spec.name, "classes": list(spec.classes), "condition": user.condition, "error": {}, "seconds": {}}
        for method in METHODS:
            started = time.perf_counter()
            result = personalise(PersonaliseConfig(data=str(folders["unlabelled"]), bundle=str(work / "generic"), method=method,
                                                   out=str(work / spec.name / method), quiet=True))
            row["seconds"][method] = round(time.perf_counter() - started, 2)
            model = bundle.read_bundle(result.bundle_path).load_model()
            logits = predict_outputs(model, ["final"], user.test)["final"]
            row["error"][method] = round(100 * float(np.mean(logits.argmax(1) != user.test_y)), 2)
            if method == "source":
                row["error"]["lame"] = round(100 * (1 - lame_accuracy(model, user.test, user.test_y, spec.seed)), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    corrupted = [r for r in rows if r["user"].startswith("check-all")]
    shifted = [r for r in rows if "label-shift" in r["user"]]
    table = {kind: {m: _mean_and_median([r["error"][m] for r in group]) for m in (*METHODS, "lame")}
             for kind, group in (("all-classes severity 5", corrupted), ("label-shift only", shifted))}
    severe = table["all-classes severity 5"]
    checks = {
        "bn cuts source's mean severity-5 error by at least a third": severe["bn"]["mean"] <= severe["source"]["mean"] * 2 / 3,
        "tent <= bn on the severity-5 users (mean error)": severe["tent"]["mean"] <= severe["bn"]["mean"],
        "lame >= source on the label-shift users (mean accuracy)": table["label-shift only"]["lame"]["mean"] <= table["label-shift only"]["source"]["mean"],
    }
    return {"users": rows, "mean_error_percent": table, "checks": checks}


def _mean_and_median(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 2), "median": round(float(np.median(values)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="the first N corrupted users and one label-shift user (a smoke run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ee-tta-check-") as work:
        summary = run(args.generic, Path(work), args.limit)
    summary["generic"] = identity(str(args.generic))
    report = args.generic.with_suffix(".json")
    if report.is_file():
        summary["generic"]["report"] = json.loads(report.read_text())
    write_json(args.out, summary)
    print(json.dumps({"mean_error_percent": summary["mean_error_percent"], "checks": summary["checks"]}, indent=2))


if __name__ == "__main__":
    main()
