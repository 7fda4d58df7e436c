"""Which class set, and which prior, should `ee personalise` keep at 0 labels? A study on dev users only.

For each dev field user and one generic model: `ee personalise`'s own first step (BatchNorm depth
by `--adapt-bn auto`) on the user's unlabelled photos, then the generic classifier's logits on the
unlabelled and test photos, adapted and unadapted, saved per user (`--cache`), so that each rule
below is judged on the same logits without re-running the model:

- `cut@s`: restrict to the classes holding at least s of the EM-estimated mix (today's rule at 0.10);
- `prior`: every class, the logits shifted by log(K · mix) (the EM prior correction, Saerens 2002);
- `hybrid@s`: restrict to the classes with at least s of the mix, and shift by the prior there;
each with the probabilities calibrated by a temperature T before EM (T = 1: none).

    PYTHONPATH=. python -m bench.class_set_study --generic ~/.cache/ee/models/cifar_resnet9.h5 --cache /tmp/class-set-resnet9
    PYTHONPATH=. python -m bench.class_set_study --compare /tmp/class-set-resnet9 [--out bench/results/class-set-dev-<model>-<date>.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ee_cli.adaptation.adapt import class_prior, class_shares, infer_classes

RULES = ("cut@0.10", "cut@0.05", "cut@0.02", "prior", "hybrid@0.05", "hybrid@0.02", "hybrid@0.01")
TEMPERATURES = (1.0, 1.5, 2.0, 3.0)


def predict_with(rule: str, logits: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Class indices predicted for `logits` (already divided by the temperature) under `rule`."""
    kind, _, share = rule.partition("@")
    if kind == "prior":
        classes, shift = np.arange(len(mix)), np.log(np.maximum(len(mix) * mix, 1e-12))
    elif kind == "hybrid":  # the rule `ee personalise` ships, its cut given here as a share of the mix
        prior = class_prior(mix, float(share) * len(mix))
        classes, shift = np.asarray(prior.classes), prior.logit_shift
    else:
        classes, shift = np.asarray(infer_classes(mix, float(share))), 0.0
    return classes[(logits[:, classes] + shift).argmax(axis=1)]


def judge(saved: dict, rule: str, temperature: float, adapted: bool = True) -> dict:
    which = "adapted" if adapted else "generic"
    mix = class_shares(saved[f"unlabelled_{which}"] / temperature)
    predicted = predict_with(rule, saved[f"test_{which}"] / temperature, mix)
    classes = set(saved["classes"].tolist())
    kept = set(np.flatnonzero(mix >= float(rule.partition("@")[2] or 0)).tolist())
    return {"accuracy": float(np.mean(predicted == saved["y_test"])), "missed": len(classes - kept), "added": len(kept - classes)}


def compare(cache: Path) -> dict:
    users = sorted(cache.glob("*.npz"))
    found: dict = {"users": [path.stem for path in users], "rules": {}}
    for path in users:
        saved = dict(np.load(path))
        logits = saved["test_adapted"]
        generic = float(np.mean(saved["test_generic"].argmax(1) == saved["y_test"]))
        restricted = float(np.mean(saved["classes"][logits[:, saved["classes"]].argmax(1)] == saved["y_test"]))
        found.setdefault("generic", []).append(generic)
        found.setdefault("restricted_adapted", []).append(restricted)
        for temperature in TEMPERATURES:
            for rule in RULES:
                found["rules"].setdefault(f"{rule} T={temperature:g}", []).append(judge(saved, rule, temperature))
    return found


def summary(found: dict) -> list[str]:
    generic, restricted = np.array(found["generic"]), np.array(found["restricted_adapted"])
    lines = [f"{len(generic)} dev users; generic {100 * generic.mean():.1f} %, restricted (BN adapted, true classes) {100 * restricted.mean():.1f} %",
             "rule | mean acc | median gain over generic | worst gain over generic | users below generic - 1 pt | missed / added classes"]
    for name, rows in found["rules"].items():
        accuracy = np.array([row["accuracy"] for row in rows])
        gain = 100 * (accuracy - generic)
        lines.append(f"{name} | {100 * accuracy.mean():.1f} | {np.median(gain):+.1f} | {gain.min():+.1f} | {int(np.sum(gain < -1))} | "
                     f"{sum(row['missed'] for row in rows)} / {sum(row['added'] for row in rows)}")
    return lines


def collect(args) -> None:
    import tempfile

    from bench.protocol import GENERIC_MODELS, Settings, UserJob, attach_generic, inside, predict, user_photos, users
    from ee_cli.base import photos
    from ee_cli.files import bundle
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.commands.personalise import Found, adapt_step

    args.cache.mkdir(parents=True, exist_ok=True)
    model = next(name for name, found in GENERIC_MODELS.items() if Path(found.path).name == args.generic.name)
    settings = Settings(unlabelled=args.unlabelled, labels=(0,), test_per_class=args.test_per_class)
    with tempfile.TemporaryDirectory(prefix="ee-classes-") as scratch:
        for position, user in enumerate(users("dev", 1)):
            if not GENERIC_MODELS[model].runs(position, every=False):  # the dev users make bench runs this model on
                continue
            target = args.cache / f"{model}-{user.seed}-{user.scenario.name}.npz"
            if target.exists():
                continue
            job = UserJob(str(args.generic), "cifar10", user, settings, str(Path(scratch) / str(user.seed)), model)
            photos_of, folders, names = user_photos(job)
            with inside(Path(job.work)):
                attached = attach_generic(job, names)
                source, _ = bundle.input_bundle(str(attached), False)
                found = Found(photos.scan_unlabelled(folders["unlabelled"]), None)
                adapted = adapt_step(PersonaliseConfig(data=str(folders["unlabelled"]), bundle=str(attached), seed=user.seed), source, found)
                generic = source.load_model()
                unlabelled = photos_of.unlabelled
                np.savez_compressed(target, unlabelled_adapted=predict(adapted.model, "final", unlabelled), test_adapted=predict(adapted.model, "final", photos_of.test),
                                    unlabelled_generic=predict(generic, "final", unlabelled), test_generic=predict(generic, "final", photos_of.test),
                                    y_test=photos_of.test_y, classes=np.array(photos_of.classes), depth=len(adapted.layers), of=adapted.of)
            print(json.dumps({"user": target.stem, "depth": f"{len(adapted.layers)}/{adapted.of}", "note": adapted.note}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path)
    parser.add_argument("--cache", type=Path, required=True, help="folder of per-user logits (written by a run, read by --compare)")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.compare:
        collect(args)
        return
    found = compare(args.cache)
    print("\n".join(summary(found)))
    if args.out:
        args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
