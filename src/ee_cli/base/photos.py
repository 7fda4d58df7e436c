"""Photo folders as people have them: any nesting, JPEG/PNG/..., any size and mode.

Scanning decodes every file with Pillow (EXIF orientation honoured; grey, RGBA, palette and
16-bit images converted to 8-bit RGB) and counts what it skips; tf.data then streams the
validated list. One corrupt file never kills the run.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ee_cli.base import compat
from ee_cli.base.errors import UserError


@dataclass(frozen=True)
class PhotoSet:
    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None = None  # index into the class names, for labelled folders
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def scan_unlabelled(root: Path) -> PhotoSet:
    files = _files(root)
    paths, skipped = _validate(files)
    if not paths:
        raise UserError(f"{root} holds no readable photos ({_describe(skipped)})")
    return PhotoSet(root, tuple(paths), None, dict(skipped))


def scan_labelled(root: Path, class_names: list[str]) -> PhotoSet:
    """One sub-folder per class; every sub-folder name must be one of `class_names`."""
    folders = [root / name for name in subfolder_names(root)]
    unknown = [folder.name for folder in folders if folder.name not in class_names]
    if unknown:
        raise UserError(f"{root}: sub-folder(s) {', '.join(unknown[:5])} match no class of the bundle ({', '.join(class_names[:10])}...)")
    paths, labels, skipped = [], [], Counter()
    for folder in folders:
        valid, skips = _validate(_files(folder))
        paths += valid
        labels += [class_names.index(folder.name)] * len(valid)
        skipped.update(skips)
    if not paths:
        raise UserError(f"{root} holds no readable labelled photos (one sub-folder per class expected)")
    return PhotoSet(root, tuple(paths), tuple(labels), dict(skipped))


def scan_folder(root: Path, class_names: list[str]) -> PhotoSet:
    """Labelled when every sub-folder is named after a class, unlabelled when none is; a mix is a mistake."""
    folders = subfolder_names(root)
    matching = [name for name in folders if name in class_names]
    if matching and len(matching) < len(folders):
        strangers = sorted(set(folders) - set(matching))
        raise UserError(f"{root}: sub-folder(s) {', '.join(strangers[:5])} match no class of the bundle")
    return scan_labelled(root, class_names) if matching else scan_unlabelled(root)


def label_names(found: PhotoSet, class_names: list[str]) -> np.ndarray | None:
    """Each photo's class name, or None for unlabelled photos."""
    return None if found.labels is None else np.array([class_names[i] for i in found.labels])


def subfolder_names(root: Path) -> list[str]:
    """The photo folder's visible sub-folders, sorted: its classes when it is labelled."""
    check_folder(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_folder(root: Path) -> None:
    if not root.exists():
        raise UserError(f"photo folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of photos")


def _files(root: Path) -> list[Path]:
    check_folder(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _validate(files: list[Path]) -> tuple[list[Path], Counter]:
    valid, skipped = [], Counter()
    for path in files:
        reason = _unreadable_reason(path)
        if reason:
            skipped[reason] += 1
        else:
            valid.append(path)
    return valid, skipped


def _unreadable_reason(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt or truncated"
    return None


def _describe(skipped: Counter | dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "empty folder"


def load_photo(path: Path, size: int) -> np.ndarray:
    """uint8 RGB (size, size, 3): EXIF-rotated, converted to 8-bit RGB, centre-cropped to square, resized."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    return fit_square(rgb, size)


def fit_square(rgb, size: int) -> np.ndarray:
    """An RGB Pillow image centre-cropped to square and resized to `size`: uint8 (size, size, 3)."""
    from PIL import Image, ImageOps

    return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR), np.uint8)


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w, 3) photos as the loader would give them at `size` (fit_square each); as they are when already that size."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    return np.stack([fit_square(Image.fromarray(image), size) for image in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)


def to_rgb(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values to white: keep the top 8 bits instead.
        bits = 8 if image.mode != "I" or np.asarray(image).max() > 255 else 0
        grey = (np.asarray(image).astype(np.uint32) >> bits).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_array(paths, size: int) -> np.ndarray:
    """All photos as one uint8 array: for sets small enough to hold (calibration, tests)."""
    return np.stack([load_photo(Path(p), size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


# A forward pass without gradients may use what is left of issue 22's 1.0 GB cap once TensorFlow and
# the model are in memory. Measured here (peak RSS): TensorFlow's import 566 MB; then 315 MB more
# for ResNet50 (29.0M weights with its exits; loaded, plus one pass) and 89 MB for Lite1 (5.3M;
# loaded), which the line through both gives as 39 MB + 9.5 bytes a weight, erring high. A batch adds
# ~21.5 MB a ResNet50 photo at 224 px (its BatchNorm passes peaked 86 MB higher at 8 photos a batch
# than at 4) and ~16 MB a Lite1 photo at 240 px (its command, 63 MB higher): up to 430 bytes an
# input pixel.
MEMORY_CAP = 1000e6
LOADED_BYTES = 566e6 + 39e6
LOADED_BYTES_PER_WEIGHT = 9.5
BATCH_BYTES_PER_PIXEL = 430


def inference_batch(size: int, weights: int = 0) -> int:
    """Photos per forward pass without gradients for a model of `weights` weights at `size` px: as
    many as the memory left after the model loads holds (above), rounded down to a power of two,
    2 to 128. ResNet50 at 224 px gets 4, Lite1 at 240 px 8, a ResNet-9 at 32 px 128. The pixel rule
    before it (4 a batch at 224-240 px) slowed Lite1, nowhere near the cap, against 8: on a dev
    user's command, alternated three times each, 59.0-71.9 s against 57.6-59.4 s, the feature cache
    14.5-20.5 s against 12.6-14.8 s."""
    left = MEMORY_CAP - LOADED_BYTES - LOADED_BYTES_PER_WEIGHT * weights
    fits = max(1, int(left // (BATCH_BYTES_PER_PIXEL * size * size)))
    return max(2, min(128, 1 << (fits.bit_length() - 1)))


def decoded_batches(paths, size: int, batch: int) -> Iterator[np.ndarray]:
    """The photos as uint8 batches, in order, decoded here rather than by tf.data (`dataset`): through
    tf.data a 32-px user's command, whose passes take a few hundred milliseconds, took ~1 s longer
    (best of three: 15.0 against 14.0 s)."""
    for start in range(0, len(paths), batch):
        yield load_array(paths[start : start + batch], size)


def dataset(paths, size: int, batch: int):
    """A tf.data pipeline that decodes, resizes and batches the validated photos, in order."""
    tf = compat.tf()
    files = [str(p) for p in paths]

    def decoded():
        for path in files:
            yield load_photo(Path(path), size)

    signature = tf.TensorSpec((size, size, 3), tf.uint8)
    return tf.data.Dataset.from_generator(decoded, output_signature=signature).batch(batch).prefetch(2)
