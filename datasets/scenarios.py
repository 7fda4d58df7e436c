"""Users for experiments: k classes and a personal condition the generic model never saw, drawn
with a seed; unlabelled and labelled photos from CIFAR-10's train split, test photos from its test
split (same classes, same condition). Written as folders of photos, as a person would have them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import cifar10

CONDITIONS = ("colour_cast", "low_light", "blur", "jpeg", "rotation")  # drawn with the seed when none is given
TEST_ONLY_CONDITIONS = ("noise", "haze")  # no dev user meets these: the benchmark's test users only


@dataclass(frozen=True)
class User:
    seed: int
    classes: tuple[int, ...]
    condition: str
    unlabelled: np.ndarray  # uint8 (N, 32, 32, 3), condition applied
    labelled: np.ndarray
    labelled_y: np.ndarray  # CIFAR-10 class indices
    test: np.ndarray
    test_y: np.ndarray
    names: tuple[str, ...] = cifar10.CLASSES  # every class of the data set

    @property
    def class_names(self) -> list[str]:
        return [self.names[c] for c in self.classes]


def make_user(data: dict, seed: int, k: int = 3, condition: str | None = None, unlabelled: int = 1500, labelled_per_class: int = 0,
              names: tuple[str, ...] = cifar10.CLASSES) -> User:
    rng = np.random.default_rng([seed, 1234])
    classes = tuple(sorted(int(c) for c in rng.choice(10, size=k, replace=False)))
    condition = condition or CONDITIONS[int(rng.integers(len(CONDITIONS)))]
    train_pool = np.flatnonzero(np.isin(data["y_train"], classes))
    rng.shuffle(train_pool)
    labelled_index = np.concatenate([train_pool[data["y_train"][train_pool] == c][:labelled_per_class] for c in classes]).astype(int)
    rest = train_pool[~np.isin(train_pool, labelled_index)]
    unlabelled_index = rest[:unlabelled]
    test_index = np.flatnonzero(np.isin(data["y_test"], classes))
    apply = condition_function(condition, seed)
    return User(
        seed,
        classes,
        condition,
        apply(data["x_train"][unlabelled_index]),
        apply(data["x_train"][labelled_index]),
        data["y_train"][labelled_index],
        apply(data["x_test"][test_index]),
        data["y_test"][test_index],
        names,
    )


def condition_function(condition: str, seed: int):
    from PIL import Image, ImageFilter

    rng = np.random.default_rng([seed, 99])
    if condition == "colour_cast":
        casts = np.array([[1.0, 0.72, 0.38], [0.45, 0.8, 1.0], [0.55, 1.0, 0.5], [1.0, 0.5, 0.9]])
        cast = casts[rng.integers(len(casts))]
        return lambda x: (x.astype(np.float32) * cast + 20).clip(0, 255).astype(np.uint8)
    if condition == "low_light":
        return lambda x: ((x.astype(np.float32) / 255) ** 1.6 * 255 * 0.45).clip(0, 255).astype(np.uint8)
    if condition == "blur":
        return lambda x: np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.3))) for i in x]) if len(x) else x
    if condition == "jpeg":
        return lambda x: np.stack([_jpeg(i, 10) for i in x]) if len(x) else x
    if condition == "rotation":
        return lambda x: np.rot90(x, k=1, axes=(1, 2)).copy()
    if condition == "noise":  # a small sensor in poor light: grain on every pixel, drawn with the seed
        return lambda x: (x.astype(np.float32) + rng.normal(0, 18, x.shape)).clip(0, 255).astype(np.uint8)
    if condition == "haze":  # a bright veil: contrast cut to 55 %, lifted toward white
        return lambda x: (x.astype(np.float32) * 0.55 + 105).clip(0, 255).astype(np.uint8)
    raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS + TEST_ONLY_CONDITIONS}")


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def write_user(user: User, root: Path, held_out: int = 0) -> dict[str, Path]:
    """root/unlabelled/*.png, root/labelled/<class>/*.png, root/test/<class>/*.png, and with
    `held_out` the last that many unlabelled photos in root/heldout/ instead (for label-free
    calibration: never used to personalise)."""
    from PIL import Image

    folders = {"unlabelled": root / "unlabelled", "labelled": root / "labelled", "test": root / "test", "heldout": root / "heldout"}
    cut = len(user.unlabelled) - held_out
    for index, image in enumerate(user.unlabelled):
        _save(Image.fromarray(image), folders["unlabelled" if index < cut else "heldout"] / f"{index:05d}.png")
    for split, images, labels in (("labelled", user.labelled, user.labelled_y), ("test", user.test, user.test_y)):
        for index, (image, label) in enumerate(zip(images, labels)):
            _save(Image.fromarray(image), folders[split] / user.names[label] / f"{index:05d}.png")
    return folders


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write one user's photo folders from CIFAR-10.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=3, help="number of classes")
    parser.add_argument("--condition", choices=CONDITIONS + TEST_ONLY_CONDITIONS, default=None, help="default: drawn with the seed")
    parser.add_argument("--unlabelled", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=0, help="extra unlabelled photos written to heldout/")
    parser.add_argument("--labels", type=int, default=0, help="labelled photos per class")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    user = make_user(cifar10.load(), args.seed, args.k, args.condition, args.unlabelled + args.held_out, args.labels)
    write_user(user, args.out, args.held_out)
    print(json.dumps({"classes": user.class_names, "condition": user.condition, "unlabelled": args.unlabelled, "held_out": args.held_out,
                      "labelled": len(user.labelled), "test": len(user.test)}))


if __name__ == "__main__":
    main()
