"""Users from the field's protocol (CIFAR-10-C): every photo of a user — unlabelled, labelled and
test, disjoint — from CIFAR-10's *test* split, which no generic model trained on, with one of the 15
CIFAR-10-C corruptions at one severity (`datasets.corruptions`), or none.

Kinds of user, per split (dev users tune, test users only report; their seeds never meet):
- `personal`: k of the 10 classes (k drawn in 2..5) and one corruption at severity 3 or 5;
- `all-classes`: every class, one corruption at severity 5 (the TTA papers' own setting);
- `label-shift`: k classes, no corruption; `clean`: every class, no corruption.

    python -m datasets.field_users --split dev --out /tmp/users   # writes every dev user's folders
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets import cifar10, corruptions
from datasets.scenarios import User

SEVERITIES = (3, 5)
SPLIT_SEEDS = {"dev": 100, "test": 200}  # a user's seed is its split's base plus its index


@dataclass(frozen=True)
class Spec:
    """What a user is, before any photo is drawn."""

    name: str
    seed: int
    classes: tuple[int, ...]
    corruption: str | None
    severity: int | None


def specs(split: str, personal: int = 6, all_classes: int = 2) -> list[Spec]:
    """The users of a split: `personal` corrupted k-class users, `all_classes` corrupted 10-class
    users, one label-shift-only user and one clean user, each drawn with its own seed."""
    base = SPLIT_SEEDS[split]
    found = []
    for index in range(personal + all_classes + 2):
        seed = base + index
        rng = np.random.default_rng([seed, 2019])
        every = index >= personal and index != personal + all_classes
        if index < personal + all_classes:
            corruption = corruptions.CORRUPTIONS[int(rng.integers(len(corruptions.CORRUPTIONS)))]
            severity = 5 if index >= personal else SEVERITIES[int(rng.integers(len(SEVERITIES)))]
        else:
            corruption, severity = None, None
        found.append(_spec(f"{split}{index}", seed, rng, corruption, severity, every))
    return found


GRID_SEED_OFFSET = 50  # grid users' seeds start here within their split's range, apart from the sampled users'


def grid_specs(split: str) -> list[Spec]:
    """The full CIFAR-10-C grid of a split: a k-class user for every corruption at each severity
    (k drawn from the user's seed), an all-class user for every corruption at severity 5, then one
    label-shift-only and one clean user."""
    cells = [(c, s, False) for c in corruptions.CORRUPTIONS for s in SEVERITIES] + [(c, 5, True) for c in corruptions.CORRUPTIONS]
    cells += [(None, None, False), (None, None, True)]
    found = []
    for index, (corruption, severity, every) in enumerate(cells):
        seed = SPLIT_SEEDS[split] + GRID_SEED_OFFSET + index
        found.append(_spec(f"{split}-grid{index}", seed, np.random.default_rng([seed, 2019]), corruption, severity, every))
    return found


def _spec(prefix: str, seed: int, rng: np.random.Generator, corruption: str | None, severity: int | None, every: bool) -> Spec:
    """The user's k and classes, drawn from `rng` (the user's own, after any corruption draws)."""
    k = 10 if every else int(rng.integers(2, 6))
    classes = tuple(sorted(int(c) for c in rng.choice(10, size=k, replace=False)))
    kind = "all-classes" if every and corruption else "clean" if every else "personal" if corruption else "label-shift"
    return Spec(f"{prefix}-{kind}-k{k}" + (f"-{corruption}-{severity}" if corruption else ""), seed, classes, corruption, severity)


def make_field_user(data: dict, spec: Spec, unlabelled: int = 500, labelled_per_class: int = 0, test_per_class: int = 200) -> User:
    """The user's photos, all from the test split: per class, its labelled photos and test photos
    first, then a pool from which the unlabelled photos are drawn (so the three never share a photo)."""
    rng = np.random.default_rng([spec.seed, 1234])
    labelled_index, test_index, pool = [], [], []
    for c in spec.classes:
        order = rng.permutation(np.flatnonzero(data["y_test"] == c))
        labelled_index.append(order[:labelled_per_class])
        test_index.append(order[labelled_per_class : labelled_per_class + test_per_class])
        pool.append(order[labelled_per_class + test_per_class :])
    pool_all = rng.permutation(np.concatenate(pool))
    if len(pool_all) < unlabelled:
        raise ValueError(f"{spec.name}: {unlabelled} unlabelled photos asked, {len(pool_all)} left in the test split")
    parts = {"unlabelled": pool_all[:unlabelled], "labelled": np.concatenate(labelled_index).astype(int), "test": np.concatenate(test_index)}
    photos = {part: _corrupted(data["x_test"][index], spec, offset) for offset, (part, index) in enumerate(parts.items())}
    return User(spec.seed, spec.classes, f"{spec.corruption}-{spec.severity}" if spec.corruption else "none",
                photos["unlabelled"], photos["labelled"], data["y_test"][parts["labelled"]], photos["test"], data["y_test"][parts["test"]])


def _corrupted(images: np.ndarray, spec: Spec, offset: int) -> np.ndarray:
    if spec.corruption is None or len(images) == 0:
        return images
    return corruptions.corrupt(images, spec.corruption, spec.severity, spec.seed * 10 + offset)


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    from datasets.scenarios import write_user

    parser = argparse.ArgumentParser(description="Write the field's users (CIFAR-10 test split, CIFAR-10-C corruptions) as photo folders.")
    parser.add_argument("--split", choices=tuple(SPLIT_SEEDS), required=True)
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--labels", type=int, default=0, help="labelled photos per class")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = cifar10.load()
    for spec in specs(args.split):
        user = make_field_user(data, spec, args.unlabelled, args.labels, args.test_per_class)
        write_user(user, args.out / spec.name)
        print(json.dumps({"user": spec.name, "classes": user.class_names, "condition": user.condition, "unlabelled": len(user.unlabelled),
                          "labelled": len(user.labelled), "test": len(user.test)}), flush=True)


if __name__ == "__main__":
    main()
