"""How deep should `ee personalise` adapt BatchNorm statistics? A study on dev users only.

For each dev user (bench.protocol.users("dev", N)) and one generic model: adapt the first n of the
backbone's BN layers exactly (one adaptation; shallower depths are its prefixes), and at each
candidate depth record the label-free signals a default could choose by — the class mix estimated
from the unlabelled photos, the predictions' confidence, their agreement with the unadapted model
— beside what the choice is judged by: the test photos' accuracy with the inferred classes (the
"BN only" baseline) and whether the inferred classes are exact.

    PYTHONPATH=. python -m bench.bn_depth_study --generic ~/.cache/ee/models/cifar_resnet9.h5 [--per-scenario 1]
        [--unlabelled 500] [--test-per-class 300] [--max-users N] [--out bench/results/bn-depth-dev-<model>-<date>.jsonl]

One JSON line per (user, depth). `--compare FILE` prints, for a few label-free rules, the depth
each would choose per user and the BN-only accuracy and exact class sets that gives, beside the
oracle that picks by the test labels.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.protocol import restricted_accuracy, users
from ee_cli.adaptation.adapt import softmax

HERE = Path(__file__).resolve().parent
def signals(logits: np.ndarray, unadapted: np.ndarray, class_share: float) -> dict[str, float]:
    """Label-free figures of one depth's generic logits on the unlabelled photos."""
    from ee_cli.adaptation import adapt

    probabilities = softmax(logits)
    shares = adapt.class_shares(logits)
    inferred = adapt.infer_classes(shares, class_share)
    restricted = softmax(logits[:, inferred])
    before = softmax(unadapted)
    sure = before.max(1) >= adapt.CONFIDENT
    agree = probabilities.argmax(1) == before.argmax(1)
    return {
        "max_share": float(shares.max()),
        "mix_entropy": float(-(shares * np.log(np.clip(shares, 1e-12, 1))).sum()),
        "classes_inferred": len(inferred),
        "mean_confidence": float(probabilities.max(1).mean()),
        "mean_restricted_confidence": float(restricted.max(1).mean()),
        "agreement_with_unadapted": float(agree.mean()),
        "confident_agreement_with_unadapted": float(agree[sure].mean()) if sure.any() else None,
        "confident_unadapted_share": float(sure.mean()),
    }


def study_user(generic: str, user_spec, args, work: Path) -> list[dict]:
    from bench.protocol import Settings, UserJob, attach_generic, inside, user_photos
    from ee_cli.base import photos
    from ee_cli.graph import inference
    from ee_cli.files import bundle
    from ee_cli.adaptation import adapt, stepping
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.graph.personal_model import generic_output

    job = UserJob(generic, "cifar10", user_spec, Settings(unlabelled=args.unlabelled, labels=(0,), test_per_class=args.test_per_class), str(work))
    made, folders, names = user_photos(job)
    with inside(work):
        attached = attach_generic(job, names)
    source = bundle.read_bundle(work / attached)
    model, size = source.load_model(), bundle.input_size(source.meta)
    layers = adapt.backbone_batchnorms(model)
    depths = [0, *adapt.auto_depths(len(layers))]
    original = adapt.statistics_of(layers)
    unlabelled = sorted(folders["unlabelled"].glob("*.png"))
    test = sorted(folders["test"].rglob("*.png"))
    truth = np.array([names.index(path.parent.name) for path in test])
    started = time.perf_counter()
    adapted = stepping.adapt_batchnorm(model, lambda: photos.dataset(unlabelled, size, photos.inference_batch(size, model.count_params())), max(depths))
    adapt_seconds = time.perf_counter() - started
    class_share = PersonaliseConfig(data="").class_share
    rows, unadapted = [], None
    for depth in depths:
        adapt.set_statistics(layers, adapted, original, depth)
        logits, test_logits = (inference.outputs_of(model, [generic_output(model)], paths, size)[0] for paths in (unlabelled, test))
        unadapted = logits if depth == 0 else unadapted
        inferred = adapt.infer_classes(adapt.class_shares(logits), class_share)
        rows.append({
            "seed": user_spec.seed, "scenario": user_spec.scenario.name, "classes": list(made.classes), "depth": depth, "of": len(layers),
            "inferred": inferred, "classes_exact": inferred == list(made.classes),
            "bn_only_accuracy": restricted_accuracy(test_logits, inferred, truth),
            "restricted_accuracy": restricted_accuracy(test_logits, made.classes, truth),
            "adapt_seconds": round(adapt_seconds, 1), "unlabelled": len(unlabelled),
        } | signals(logits, unadapted, class_share))
    return rows


RULES = {
    "half (the deepest auto may go)": lambda rows: rows[-1],
    "none": lambda rows: rows[0],
    "most confident, restricted to the inferred classes": lambda rows: max(rows, key=lambda r: r["mean_restricted_confidence"]),
    "deepest keeping 90 % of confident predictions": lambda rows: [r for r in rows if (r["confident_agreement_with_unadapted"] or 1) >= 0.9][-1],
    "deepest keeping 95 % of confident predictions": lambda rows: [r for r in rows if (r["confident_agreement_with_unadapted"] or 1) >= 0.95][-1],
}


def compare_rules(lines: list[dict]) -> dict[str, dict[str, float]]:
    """Each rule's chosen depth per user, judged by the BN-only accuracy and exact class sets it gives."""
    users: dict[int, list[dict]] = {}
    for line in lines:
        users.setdefault(line["seed"], []).append(line)
    found = {}
    for name, rule in RULES.items():  # auto's own choice is what `ee personalise` records (adapted_bn.tried); not replayed here
        chosen = [rule(sorted(rows, key=lambda r: r["depth"])) for rows in users.values()]
        found[name] = {"bn_only_accuracy": float(np.mean([r["bn_only_accuracy"] for r in chosen])),
                       "classes_exact": int(sum(r["classes_exact"] for r in chosen)), "users": len(chosen), "depths": [r["depth"] for r in chosen]}
    best = [max(rows, key=lambda r: r["bn_only_accuracy"]) for rows in users.values()]
    found["oracle (labels)"] = {"bn_only_accuracy": float(np.mean([r["bn_only_accuracy"] for r in best])),
                                "classes_exact": int(sum(r["classes_exact"] for r in best)), "users": len(best), "depths": [r["depth"] for r in best]}
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bn_depth_study", description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, default=None)
    parser.add_argument("--per-scenario", type=int, default=1)
    parser.add_argument("--max-users", type=int, default=None, help="only the first N dev users (a 240 px model costs minutes a user)")
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compare", type=Path, default=None, help="a study's JSONL: print each depth rule's outcome instead of running")
    args = parser.parse_args(argv)
    if args.compare:
        lines = [json.loads(line) for line in args.compare.read_text().splitlines() if line.strip()]
        print(json.dumps(compare_rules(lines), indent=1))
        return
    if args.generic is None:
        parser.error("--generic is needed to run the study")
    out = args.out or HERE / "results" / f"bn-depth-dev-{args.generic.stem}-{date.today().isoformat()}.jsonl"
    with tempfile.TemporaryDirectory(prefix="ee-bn-") as scratch, out.open("a") as sink:
        for user_spec in users("dev", args.per_scenario)[: args.max_users]:
            for row in study_user(str(args.generic), user_spec, args, Path(scratch) / str(user_spec.seed)):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(json.dumps({k: row[k] for k in ("seed", "scenario", "depth", "bn_only_accuracy", "classes_exact", "max_share",
                                                      "mean_restricted_confidence", "confident_agreement_with_unadapted")}), flush=True)


if __name__ == "__main__":
    main()
