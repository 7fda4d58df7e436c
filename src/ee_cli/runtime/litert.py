"""LiteRT helpers: run .tflite signatures by name, quantise inputs, dequantise outputs, and the
on-device early-exit engine that runs a staged cascade photo by photo."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import compat
from ee_cli.exits import policy
from ee_cli.files import schemas
from ee_cli.base.errors import UserError, first_line

MANIFEST_FILE = "manifest.json"
PLAIN_FILE = "final.tflite"  # the plain model, beside the cascade in every export


def read_manifest(folder: Path) -> dict[str, Any]:
    """An export folder's manifest, validated, with every file it names present."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{folder} is not an `ee export` folder (no {MANIFEST_FILE})")
    manifest = schemas.read_json(manifest_path)
    schemas.check_manifest(manifest, manifest_path)
    missing = [name for name in [*manifest["files"], PLAIN_FILE] if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is incomplete: {', '.join(sorted(set(missing)))} missing")
    return manifest


class Runner:
    """One signature of a .tflite file; float arrays in and out, whatever the quantisation."""

    def __init__(self, interpreter, key: str):
        self.runner = interpreter.get_signature_runner(key)
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        (self.input_name, self.input_detail), = self.inputs.items()

    def raw(self, value: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner(**{self.input_name: value})

    def quantise(self, value: np.ndarray) -> np.ndarray:
        return quantise(value, self.input_detail)

    def __call__(self, value: np.ndarray) -> dict[str, np.ndarray]:
        raw = self.raw(self.quantise(value))
        return {name: dequantise(array, self.outputs[name]) for name, array in raw.items()}


def quantise(value: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return value.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)


def dequantise(value: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.floating):
        return value
    scale, zero = detail["quantization"]
    return (value.astype(np.float32) - zero) * scale


def stage_keys(loaded) -> list[str]:
    """A cascade's signatures in stage order. A cascade of one stage (no exit switched on) is a
    single-function model, which the converter names serving_default."""
    keys = list(loaded.get_signature_list())
    return keys if len(keys) == 1 else sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def same_encoding(produced: dict, wanted: dict) -> bool:
    """True when a tensor can pass unchanged: same dtype and the same scale and zero point. The
    converter stores the scale once per signature, so the same calibrated scale can differ in its
    last float32 bits between two stages; requantising ResNet50@224's 400k activations in numpy for
    that cost 13 % of the plain model's latency."""
    if produced["dtype"] != wanted["dtype"]:
        return False
    if np.issubdtype(produced["dtype"], np.floating):
        return True
    (scale_a, zero_a), (scale_b, zero_b) = produced["quantization"], wanted["quantization"]
    return zero_a == zero_b and abs(scale_a - scale_b) <= 1e-6 * max(abs(scale_a), abs(scale_b))


def hand_on(features: np.ndarray, produced: dict, wanted: dict) -> np.ndarray:
    """Activations encoded as `produced`, re-encoded as `wanted` (unchanged when they agree)."""
    if same_encoding(produced, wanted):
        return features
    return quantise(dequantise(features, produced), wanted)


def usable_threshold(threshold: float | None, detail: dict) -> float:
    """The threshold the engine compares with: policy.NEVER for an exit that is off, and at most the
    highest probability the output's type can hold, so that a calibrated exit can fire."""
    return policy.NEVER if threshold is None else min(threshold, highest_probability(detail))


def highest_probability(detail: dict) -> float:
    """The largest probability an output can hold: 1 in float, (max - zero point) x scale quantised."""
    if np.issubdtype(detail["dtype"], np.floating):
        return 1.0
    scale, zero = detail["quantization"]
    return float((np.iinfo(detail["dtype"]).max - zero) * scale)


def interpreter(path: Path, threads: int):
    """A LiteRT interpreter over `path`, ready to run; a file LiteRT cannot read is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        with compat.native_logs_silenced():
            loaded = compat.litert_interpreter_class()(model_path=str(path), num_threads=threads)
            loaded.allocate_tensors()
    except (ValueError, RuntimeError) as error:
        raise UserError(f"{path} is not a valid .tflite model ({first_line(error)})") from None
    return loaded


def check_stages(loaded, path: Path, expected: list[str]) -> None:
    """The cascade file has the stages its manifest names, each ending in probabilities (and
    handing features on, but for the last)."""
    signatures = loaded.get_signature_list()
    keys = list(signatures)
    if len(keys) > 1 and not all(re.fullmatch(r"\w+_[0-9]+", key) for key in keys):
        raise UserError(f"{path}: its stages must be numbered signatures (stage_0, stage_1, ...), not {sorted(keys)}")
    if sorted(keys) != sorted(expected):
        raise UserError(f"{path} does not match its manifest: signatures {sorted(keys)}, the manifest names {sorted(expected)}")
    for index, key in enumerate(stage_keys(loaded)):
        outputs = set(signatures[key]["outputs"])
        wanted = {"probabilities"} | ({"features"} if index < len(keys) - 1 else set())
        if not wanted <= outputs:
            raise UserError(f"{path}: stage {key} lacks the output(s) {', '.join(sorted(wanted - outputs))}")


def check_plain(loaded, path: Path) -> None:
    signatures = loaded.get_signature_list()
    if "probabilities" not in signatures.get("serving_default", {}).get("outputs", []):
        raise UserError(f"{path} is not an ee plain model: no serving_default signature with a probabilities output")


@dataclass
class CascadeRun:
    exit_index: np.ndarray  # per photo; len(thresholds) = the final exit
    probabilities: list[np.ndarray]
    seconds: np.ndarray  # wall time per photo


class CascadeEngine:
    """Runs stage after stage and stops at the first exit whose confidence reaches its threshold.

    Between stages the activations stay in the stage's own dtype: with int8 stages calibrated on
    the same photos, stage k's output encoding is stage k+1's input encoding (up to float32
    rounding), so they pass unchanged; otherwise they are requantised.
    """

    def __init__(self, loaded, thresholds: list[float | None] | None):
        self.interpreter = loaded
        self.stages = [Runner(self.interpreter, key) for key in stage_keys(self.interpreter)]
        thresholds = [None] * (len(self.stages) - 1) if thresholds is None else thresholds
        if len(thresholds) != len(self.stages) - 1:
            raise ValueError(f"{len(self.stages)} stages need {len(self.stages) - 1} thresholds")
        # None: never calibrated, never leaves. A uint8 probability tops out at 255/256: a threshold
        # above that (0.9975 was calibrated in float for the demo's first exit) would never fire.
        self.thresholds = [usable_threshold(t, stage.outputs["probabilities"]) for t, stage in zip(thresholds, self.stages)]

    @classmethod
    def from_file(cls, path: Path, thresholds: list[float | None] | None, threads: int) -> "CascadeEngine":
        return cls(interpreter(path, threads), thresholds)

    def classify(self, pixels: np.ndarray, thresholds: list[float] | None = None) -> tuple[int, np.ndarray]:
        thresholds = self.thresholds if thresholds is None else thresholds
        carried = self.stages[0].quantise(pixels[None].astype(np.float32))
        for index, stage in enumerate(self.stages):
            raw = stage.raw(carried)
            probabilities = dequantise(raw["probabilities"], stage.outputs["probabilities"])[0]
            if index == len(self.stages) - 1 or probabilities.max() >= thresholds[index]:
                return index, probabilities
            carried = hand_on(raw["features"], stage.outputs["features"], self.stages[index + 1].input_detail)
        raise AssertionError("unreachable")

    def stage_inputs(self, pixels: np.ndarray) -> list[np.ndarray]:
        """What each stage receives for this photo (already in the stage's dtype)."""
        carried, inputs = self.stages[0].quantise(pixels[None].astype(np.float32)), []
        for index, stage in enumerate(self.stages):
            inputs.append(carried)
            if index < len(self.stages) - 1:
                raw = stage.raw(carried)
                carried = hand_on(raw["features"], stage.outputs["features"], self.stages[index + 1].input_detail)
        return inputs

    def stage_seconds(self, pixels: np.ndarray, runs: int) -> list[np.ndarray]:
        """Per stage, wall times of `runs` calls on this photo's activations."""
        return [wall_times(lambda: stage.raw(carried), runs) for stage, carried in zip(self.stages, self.stage_inputs(pixels))]

    def leaving_at(self, index: int) -> list[float]:
        """Thresholds that make every photo leave at exit `index` (the engine's own path to it)."""
        return [policy.NEVER] * index + [-1.0] * (len(self.thresholds) - index)

    def every_exit(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Run all stages, ignoring thresholds: every exit's probabilities (for checks)."""
        carried, found = self.stages[0].quantise(pixels[None].astype(np.float32)), []
        for index, stage in enumerate(self.stages):
            raw = stage.raw(carried)
            found.append(dequantise(raw["probabilities"], stage.outputs["probabilities"])[0])
            if index < len(self.stages) - 1:
                carried = hand_on(raw["features"], stage.outputs["features"], self.stages[index + 1].input_detail)
        return found

    def run(self, images: np.ndarray) -> CascadeRun:
        exits, probabilities, seconds = [], [], []
        for image in images:
            started = time.perf_counter()
            index, probs = self.classify(image)
            seconds.append(time.perf_counter() - started)
            exits.append(index)
            probabilities.append(probs)
        return CascadeRun(np.array(exits), probabilities, np.array(seconds))


def wall_times(call, runs: int, warmup: int = 10) -> np.ndarray:
    """Seconds per call of `call()`, `runs` times after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return np.array(times)


def alternating_wall_times(calls: dict, runs: int, block: int = 20, warmup: int = 10) -> dict[str, np.ndarray]:
    """Seconds per call of each `calls[name]()`, `runs` times each, taking turns in blocks of
    `block` calls: drift in the machine's speed hits every call alike, and within a block each runs
    as it would alone on a device (alternating call by call instead evicts one model's working set
    with the other's, which is no one's deployment)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(found) for found in times.values()) < runs:
        for name, call in calls.items():
            # One untimed call first: the first call after a switch pays for the other model's.
            times[name].extend(wall_times(call, min(block, runs - len(times[name])), warmup=1))
    return {name: np.array(found) for name, found in times.items()}
