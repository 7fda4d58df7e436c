"""Early exits on users of a data set, through the commands exactly as a user types them (no labels).

    PYTHONPATH=. .venv/bin/python -m bench.exits_acceptance --generic ~/.cache/ee/models/cifar_resnet9.h5 \
        --users k2-low_light:0,k3-colour_cast:1 --out bench/results/exits.jsonl [--ablate exit-teacher=final]
    PYTHONPATH=. .venv/bin/python -m bench.exits_acceptance --data fashion --generic models/fashion_resnet9.h5 ...

Per user, in a scratch folder: `ee attach --backbone GENERIC --classes ...` (default exits),
`ee personalise --data unlabelled` (defaults: label-free thresholds on its held-out photos),
`ee export --tflite --quant none` and `ee export --tflite` (int8_full, the default), each followed by
`ee run` on the user's test photos, which nothing above has seen; then, as its own labelled row,
`ee evaluate --data test` (thresholds calibrated with labels on half the test photos, reported on
the other half: the cut at the restricted baseline's accuracy). Beside them, on the same test
photos: every exit's accuracy, the label-free policy's accuracy and MACs cut against the final
exit's, and the generic model restricted to the user's true classes (the free baseline).
`--ablate KEY=VALUE` adds personalise flags (e.g. exit-teacher=final) to compare designs on dev users.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.protocol import Scenario, predict, restricted_accuracy

EE = [sys.executable, "-m", "ee_cli"]


def ee(*args: str, cwd: Path) -> dict:
    done = subprocess.run([*EE, *args, "--json"], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ee {' '.join(args)} failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout)


@dataclass(frozen=True)
class Job:
    generic: str  # the generic model file
    data: str  # cifar10 | fashion
    unlabelled: int
    test_per_class: int
    extra: tuple[str, ...]  # personalise flags
    modes: tuple[str, ...]  # export modes run with `ee run`
    labelled_row: bool  # also `ee evaluate` on the test photos: thresholds calibrated on half, reported on the other half


def load(source: str) -> tuple[dict, tuple[str, ...]]:
    from datasets import cifar10, fashion_mnist

    if source == "fashion":
        return fashion_mnist.load(), fashion_mnist.CLASSES
    return cifar10.load(), cifar10.CLASSES


def user_photos(data_name: str, scenario: str, seed: int, unlabelled: int, test_per_class: int, work: Path):
    """One bench user's photos written under work/photos: (user, folders, every class name)."""
    from datasets import scenarios

    named = Scenario.named(scenario)
    data, names = load(data_name)
    user = scenarios.make_user(data, seed, k=named.k, condition=named.condition, unlabelled=unlabelled, names=names)
    keep = np.sort(np.concatenate([np.flatnonzero(user.test_y == c)[:test_per_class] for c in user.classes]))
    user = replace(user, test=user.test[keep], test_y=user.test_y[keep])
    return user, scenarios.write_user(user, work / "photos"), names


def user_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every per-user bench script takes."""
    parser.add_argument("--generic", required=True)
    parser.add_argument("--data", choices=("cifar10", "fashion"), default="cifar10")
    parser.add_argument("--users", required=True, help="scenario:seed,... e.g. k2-low_light:0,k3-colour_cast:1 (dev users: seeds 100 and up)")
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=300)


def run_user(job: Job, scenario: str, seed: int, work: Path) -> dict:
    user, folders, names = user_photos(job.data, scenario, seed, job.unlabelled, job.test_per_class, work)
    started = time.perf_counter()
    ee("attach", "--backbone", job.generic, "--classes", ",".join(names), cwd=work)
    personalised = ee("personalise", "--data", str(folders["unlabelled"]), "--quiet", *job.extra, cwd=work)
    personalise_seconds = time.perf_counter() - started
    row = {"data": job.data, "scenario": scenario, "seed": seed, "classes": user.class_names, "extra": list(job.extra), "personalise_seconds": personalise_seconds,
           "personal_classes": personalised["metrics"]["personal_classes"], "policy": personalised["metrics"]["policy"]}
    row |= _on_test_photos(work / personalised["bundle"], user)
    for mode in job.modes:
        exported = ee("export", "--tflite", "--quant", mode, "--out", f"export-{mode}", "--quiet", cwd=work)
        ran = ee("run", "--export", f"export-{mode}", "--data", str(folders["test"]), cwd=work)
        row[mode] = {"policy": exported["manifest"]["cascade"]["policy"], "stops_after": exported["manifest"]["cascade"]["stops_after"],
                     "speedup": ran["speedup"], "accuracy": ran["accuracy"], "full_accuracy": ran["full_accuracy"], "histogram": ran["histogram"],
                     "cascade_ms": ran["cascade_ms"]["mean"], "full_ms": ran["full_ms"]["mean"],
                     "latency_share": ran["profile"]["latency_share"], "mflops_share": ran["profile"]["mflops_share"]}
    if job.labelled_row:  # last, to its own --out: the exports above took the personalised bundle
        evaluated = ee("evaluate", "--data", str(folders["test"]), "--out", "evaluated", "--quiet", cwd=work)
        points = evaluated["metrics"]["operating_points"]
        row["evaluate"] = {name: {key: point[key] for key in ("accuracy", "reference_accuracy", "drop_points", "cut", "calibration_photos")}
                           for name, point in points.items()}
    return row


def _on_test_photos(personal: Path, user) -> dict:
    """Each exit's accuracy, and the bundle's label-free thresholds applied to the test photos."""
    from ee_cli.base import compat
    from ee_cli.exits import policy
    from ee_cli.files import bundle

    found = bundle.read_bundle(personal)
    meta, model = found.meta, found.load_model()
    names = bundle.head_outputs(meta)
    classes = np.array([user.names.index(c) for c in meta["output_classes"]])
    logits = [predict(model, name, user.test) for name in names]
    correct = np.stack([(classes[l.argmax(1)] == user.test_y) for l in logits]).astype(np.int8)
    confidences = np.stack([policy.confidence(compat.tf().nn.softmax(l).numpy()) for l in logits[:-1]])
    thresholds = np.array([policy.NEVER if t is None else t for t in bundle.thresholds(meta)])
    exits = meta["exits"]
    costs = bundle.stage_costs(meta)
    result = policy.outcome(policy.exit_taken(confidences, thresholds), correct, costs.leaving(thresholds < policy.NEVER))
    oracle = policy.oracle(correct, costs.leaving(np.ones(len(exits), bool)))
    generic_logits = predict(model, "generic", user.test)
    return {
        "test_photos": len(user.test),
        "exit_accuracy": {name: float(c.mean()) for name, c in zip(names, correct)},
        "restricted": restricted_accuracy(generic_logits, user.classes, user.test_y),
        "label_free": {"accuracy": result.accuracy, "drop_points": 100 * (float(correct[-1].mean()) - result.accuracy),
                       "cut": costs.plain / result.mean_cost, "shares": result.shares.tolist()},
        "oracle_cut": costs.plain / oracle.mean_cost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    user_arguments(parser)
    parser.add_argument("--ablate", action="append", default=[], help="KEY=VALUE personalise flag, e.g. exit-teacher=final")
    parser.add_argument("--no-export", action="store_true", help="personalise and measure on the test photos only (for ablations)")
    parser.add_argument("--work", type=Path, default=Path("build/exits-acceptance"))
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one user per line (appended)")
    args = parser.parse_args()
    extra = tuple(part for item in args.ablate for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1]))
    job = Job(str(Path(args.generic).expanduser().resolve()), args.data, args.unlabelled, args.test_per_class, extra, () if args.no_export else ("none", "int8_full"), not args.no_export)
    for user in args.users.split(","):
        scenario, seed = user.split(":")
        work = args.work / f"{args.data}-{scenario}-{seed}-{'-'.join(args.ablate) or 'default'}"
        if work.exists():
            subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        row = run_user(job, scenario, int(seed), work)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("scenario", "seed", "exit_accuracy", "restricted", "label_free")}), flush=True)


if __name__ == "__main__":
    main()
