"""Stronger early exits, measured on dev users (issue 17): which ingredient raises the exits'
accuracy or the label-free `keep` cut. Cache-then-sweep (as MSDNet's evaluation): each user is
personalised once per teacher through the commands a user types, every exit's probabilities are
computed once, then each ingredient is a pure function of those probabilities.

    PYTHONPATH=. .venv/bin/python -m bench.exits_ablation --generic ~/.cache/ee/models/cifar_resnet9.h5 \
        --users k2-low_light:100,k3-colour_cast:101,k5-blur:102,k2-jpeg:100 --out bench/results/exits-ablation-cifar-dev-<date>

Per user and teacher (`--exit-teacher generic`, the default, and `final`): `ee attach`, `ee personalise`
(0 labels, defaults). The user's test photos are split in two: thresholds are chosen label-free on
the first half (agreement with the personalised final exit, `keep`: at most 0.5 pt below it with a
one-sided 1.645 margin, MACs costs, the product's own `policy.cheapest_cascade`) and reported with
labels on the second half. Ingredients, each on top of the teacher's exits:
- maxprob: what the product ships (an exit's own top probability).
- entropy: 1 - normalised entropy as the confidence.
- ensemble: exit k answers with the geometric mean of exits 0..k (Zero Time Waste's ensembling,
  without learned weights).
- gate: a logistic gate per exit, fitted label-free on the personalisation photos, predicts whether
  the exit agrees with the final exit from its top probability, margin, entropy and agreement with
  the previous exit (failure prediction in place of max-softmax).
Writes <out>.jsonl (one row per user and teacher) and <out>.md (mean ± std over users).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from bench.exits_acceptance import ee, user_arguments, user_photos
from bench.protocol import predict, restricted_accuracy
from ee_cli.adaptation.adapt import softmax

TEACHERS = ("generic", "final")
INGREDIENTS = ("maxprob", "entropy", "ensemble", "gate")


def ensembled(probabilities: list[np.ndarray]) -> list[np.ndarray]:
    """Exit k's answer as the normalised geometric mean of exits 0..k."""
    logs = np.cumsum([np.log(np.clip(p, 1e-12, 1.0)) for p in probabilities], axis=0)
    return [softmax(total / (k + 1)) for k, total in enumerate(logs)]


def gate_features(probabilities: list[np.ndarray], index: int) -> np.ndarray:
    """Per photo: top probability, top-2 margin, normalised entropy, agreement with the previous exit."""
    from ee_cli.exits import policy

    p = probabilities[index]
    top2 = np.sort(p, axis=1)[:, -2:]
    entropy = 1.0 - policy.confidence(p, "entropy")
    previous = probabilities[index - 1].argmax(1) if index else p.argmax(1)
    return np.stack([top2[:, 1], top2[:, 1] - top2[:, 0], entropy, (previous == p.argmax(1)).astype(float)], axis=1)


def fit_logistic(features: np.ndarray, target: np.ndarray, ridge: float = 1e-2, steps: int = 25) -> np.ndarray:
    """Weights (bias last) of a ridge-regularised logistic regression, by Newton's method."""
    x = np.hstack([features, np.ones((len(features), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        w -= np.linalg.solve(hessian, x.T @ (p - target) + ridge * w)
    return w


def gate_scores(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(features @ weights[:-1] + weights[-1])))


def confidences_for(ingredient: str, probabilities: list[np.ndarray], train: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each exit's answers (probabilities) and confidences (exits, photos) under one ingredient; `train`
    holds the same exits' probabilities on the personalisation photos (for fitted ingredients)."""
    from ee_cli.exits import policy

    early = probabilities[:-1]
    if ingredient == "ensemble":
        early = ensembled(early)
        return [*early, probabilities[-1]], np.stack([policy.confidence(p) for p in early])
    if ingredient == "entropy":
        return probabilities, np.stack([policy.confidence(p, "entropy") for p in early])
    if ingredient == "gate":
        scores = []
        for index in range(len(early)):
            agrees = (train[index].argmax(1) == train[-1].argmax(1)).astype(float)
            weights = fit_logistic(gate_features(train[:-1], index), agrees)
            scores.append(gate_scores(gate_features(early, index), weights))
        return probabilities, np.stack(scores)
    return probabilities, np.stack([policy.confidence(p) for p in early])


def sweep(probabilities: list[np.ndarray], train: list[np.ndarray], truth: np.ndarray, classes: np.ndarray, costs, seed: int) -> dict:
    """Per ingredient: exit accuracy on the report half, and the label-free keep point chosen on the
    calibration half, reported on the report half."""
    from ee_cli.exits import policy
    from ee_cli.base.config import PersonaliseConfig

    defaults = PersonaliseConfig()  # the keep point personalise chooses by default
    calibrate, report = policy.split(len(truth), 0.5, seed)
    found = {}
    for ingredient in INGREDIENTS:
        answers, confidences = confidences_for(ingredient, probabilities, train)
        predicted = np.stack([classes[p.argmax(1)] for p in answers])
        correct = (predicted == truth).astype(np.int8)
        agrees = (predicted == predicted[-1]).astype(np.int8)
        evidence = policy.Evidence(confidences[:, calibrate], agrees[:, calibrate], agrees[-1, calibrate])
        choice = policy.cheapest_cascade(evidence, policy.max_drop(defaults.max_drop / 100, defaults.margin_z), costs)
        used = choice.thresholds < policy.NEVER
        reported = policy.outcome(policy.exit_taken(confidences[:, report], choice.thresholds), correct[:, report], costs.leaving(used))
        found[ingredient] = {
            "exit_accuracy": [float(c[report].mean()) for c in correct[:-1]], "final_accuracy": float(correct[-1, report].mean()),
            "keep": {"accuracy": reported.accuracy, "drop_points": 100 * (float(correct[-1, report].mean()) - reported.accuracy),
                     "cut": costs.plain / reported.mean_cost, "shares": reported.shares.tolist(), "exits_used": np.flatnonzero(used).tolist()},
        }
    return found


def run_user(args: argparse.Namespace, scenario: str, seed: int, teacher: str, work: Path) -> dict:
    from ee_cli.files import bundle

    user, folders, names = user_photos(args.data, scenario, seed, args.unlabelled, args.test_per_class, work)
    ee("attach", "--backbone", str(Path(args.generic).expanduser().resolve()), "--classes", ",".join(names), cwd=work)
    personalised = ee("personalise", "--data", str(folders["unlabelled"]), "--exit-teacher", teacher, "--quiet", cwd=work)
    found = bundle.read_bundle(work / personalised["bundle"])
    model, meta = found.load_model(), found.meta
    outputs = bundle.head_outputs(meta)
    classes = np.array([names.index(c) for c in meta["output_classes"]])
    test = [softmax(predict(model, name, user.test)) for name in outputs]
    train = [softmax(predict(model, name, user.unlabelled)) for name in outputs]
    restricted = restricted_accuracy(predict(model, "generic", user.test), user.classes, user.test_y)
    return {"scenario": scenario, "seed": seed, "teacher": teacher, "classes_exact": sorted(classes.tolist()) == sorted(user.classes),
            "restricted": restricted, "ingredients": sweep(test, train, user.test_y, classes, bundle.stage_costs(meta), seed)}


def table(rows: list[dict]) -> str:
    lines = ["| teacher | ingredient | exit_0 | exit_1 | exit_2 | final | keep cut (MACs) | keep drop (pts) |", "|---|---|---|---|---|---|---|---|"]

    def cell(values, scale=100.0, digits=1, suffix=""):
        values = scale * np.asarray(values)
        return f"{values.mean():.{digits}f}{suffix} ± {values.std():.{digits}f}"

    for teacher in TEACHERS:
        chosen = [r for r in rows if r["teacher"] == teacher]
        for ingredient in INGREDIENTS if chosen else ():
            found = [r["ingredients"][ingredient] for r in chosen]
            exits = np.array([f["exit_accuracy"] for f in found])
            lines.append(f"| {teacher} | {ingredient} | " + " | ".join(cell(exits[:, i]) for i in range(exits.shape[1]))
                         + f" | {cell([f['final_accuracy'] for f in found])} | {cell([f['keep']['cut'] for f in found], 1.0, 2, '×')}"
                         + f" | {cell([f['keep']['drop_points'] for f in found], 1.0, 2)} |")
    return "\n".join(lines) + f"\n\n{len({(r['scenario'], r['seed']) for r in rows})} dev users; accuracy in %, mean ± std over users.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    user_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("build/exits-ablation"))
    parser.add_argument("--out", type=Path, required=True, help="stem: writes <out>.jsonl and <out>.md")
    args = parser.parse_args()
    rows = []
    for user in args.users.split(","):
        scenario, seed = user.split(":")
        if int(seed) < 100:
            parser.error(f"{user}: ablations run on dev users only (seeds 100 and up); 0-99 are reported users")
        for teacher in TEACHERS:
            work = args.work / f"{args.data}-{scenario}-{seed}-{teacher}"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            work.mkdir(parents=True)
            rows.append(run_user(args, scenario, int(seed), teacher, work))
            with args.out.with_suffix(".jsonl").open("a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps({k: rows[-1][k] for k in ("scenario", "seed", "teacher", "classes_exact")}
                             | {i: v["keep"]["cut"] for i, v in rows[-1]["ingredients"].items()}), flush=True)
    args.out.with_suffix(".md").write_text(table(rows))


if __name__ == "__main__":
    main()
