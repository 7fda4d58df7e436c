"""`ee export --tflite`: the personalised model as TFLite files a phone can run, with a real
early-exit cascade, validated against the Keras model in LiteRT.

Files: `exit_K.tflite` (the network up to exit K only) per enabled exit, `final.tflite` (the plain
model), `multi_exit.tflite` (every exit at once) and `cascade.tflite` (one signature per stage:
activations in, next activations and the exit's probabilities out; weights shared between
signatures). Quantisation modes follow TF Model Garden's export_tflite_lib: none (float32), fp16,
dynamic (Model Garden's "default"), int8 (float fallback), int8_full (integer only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ee_cli.base import atomic, compat, photos
from ee_cli.graph import stages
from ee_cli.files import bundle, schemas
from ee_cli.runtime import deploy, litert
from ee_cli.base.config import ExportConfig, as_dict
from ee_cli.base.errors import UserError

MODES = ("none", "fp16", "dynamic", "int8", "int8_full")
INT8_MODES = ("int8", "int8_full")
POLICIES = ("measured", "recorded")
MIN_INT8_CALIBRATION_PHOTOS = 100
DEFAULT_ROOT = Path("exports")


class ValidationFailed(Exception):
    """The export was written but breaks a validation bound (exit code 1)."""

    def __init__(self, message: str, result: "ExportResult"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    source: Path
    source_implicit: bool


@dataclass(frozen=True)
class ExportPhotos:
    calibration: np.ndarray | None  # float pixels the int8 converter calibrates on
    validation: np.ndarray  # held-out pixels LiteRT is checked on
    labels: np.ndarray | None  # class names of the validation photos, where known
    note: str  # which photos validated, for the manifest


@dataclass(frozen=True)
class Written:
    files: dict[str, int]  # file name -> bytes
    enabled: list[dict]  # the exits the cascade uses, each with its threshold
    deployment: deploy.Deployment


@dataclass
class Signature:
    key: str
    model: Any  # Keras model with dict outputs
    names: dict[str, str]  # model output key -> signature output name
    calibration: np.ndarray | None = None  # float inputs for int8 calibration
    takes_pixels: bool = True  # False: a later cascade stage, fed the previous stage's activations

    @property
    def hands_on(self) -> bool:
        return "features" in self.names.values()


def export(config: ExportConfig, progress=None) -> ExportResult:
    progress = progress or (lambda stage, fraction, info: None)
    _check(config)
    source, implicit = bundle.input_bundle(config.bundle, config.trust_model_code)
    meta = source.meta
    out = Path(config.out) if config.out else _default_out(source.path.name, config.quant)
    _check_output(out, config.exist_ok)
    size = bundle.input_size(meta)
    chosen = _photos(config, meta, size)
    model = source.load_model()
    exported = model
    if config.qat:
        from ee_cli.runtime.qat import quantisation_aware_heads

        progress("Quantisation-aware training of the heads", 0.0, f"{config.qat_steps} steps")
        exported = quantisation_aware_heads(model, meta, chosen.calibration, config.qat_steps, seed=config.seed)
    with atomic.staged_folder(out, config.exist_ok) as staging:
        written = _write_tflite(staging, source, exported, chosen, config, progress)
        progress("Validating in LiteRT", 0.0, "")
        validation_report = validate(model, staging / "multi_exit.tflite", chosen, meta, config)
        progress("Validating in LiteRT", 1.0, "")
        manifest = _manifest(source, config, written, staging, validation_report)
        if config.trainable:  # personalise.tflite: the phone trains its exits in LiteRT (builtin ops only)
            from ee_cli.runtime.ondevice import write_trainable

            manifest["trainable"] = write_trainable(model, meta, staging)
        atomic.write_json(staging / "manifest.json", manifest)
    result = ExportResult(out, manifest, source.path, implicit)
    if not validation_report["passed"]:
        raise ValidationFailed(f"export written to {out} but {validation_report['failure']}", result)
    return result


def _write_tflite(staging: Path, source, exported, chosen: ExportPhotos, config: ExportConfig, progress) -> Written:
    """The plain and multi-exit files, the cascade whose exits are chosen on measured costs, and a
    file per exit the cascade uses."""
    meta, calibration = source.meta, chosen.calibration
    exit_names = [e["name"] for e in meta["exits"]]
    files: dict[str, int] = {}

    def write(filename: str, signatures: list[Signature] | bytes) -> None:
        progress("Converting to TFLite", len(files) / (len(exit_names) + 3), filename)
        (staging / filename).write_bytes(signatures if isinstance(signatures, bytes) else convert(signatures, config))
        files[filename] = (staging / filename).stat().st_size

    for filename, signatures in _whole_model_jobs(exported, exit_names, calibration):
        write(filename, signatures)
    progress("Choosing the cascade's exits on LiteRT's measured costs", 0.0, "")
    runtime = deploy.Runtime(
        convert_cascade=lambda exits: convert(_cascade_signatures(exported, [meta["exits"][i] for i in exits], calibration), config),
        convert_heads=lambda exits: convert(_head_signatures(exported, [meta["exits"][i] for i in exits], calibration), config),
        plain=staging / "final.tflite",
        pixels=(calibration if calibration is not None else chosen.validation)[0],
        threads=config.threads,
        scratch=staging,
    )
    deployment = deploy.choose(source, runtime, measured=config.policy == "measured")
    enabled = [meta["exits"][i] | {"threshold": t} for i, t in zip(deployment.exits, deployment.thresholds)]
    write("cascade.tflite", deployment.cascade)
    for exit_ in enabled:
        prefix = stages.segment(exported, None, [exit_["name"]], exit_["name"], softmax=(exit_["name"],))
        write(f"{exit_['name']}.tflite", [Signature("serving_default", prefix, {exit_["name"]: "probabilities"}, calibration)])
    progress("Converting to TFLite", 1.0, "")
    return Written(files, enabled, deployment)


def _check(config: ExportConfig) -> None:
    if config.quant not in MODES:
        raise UserError(f"--quant must be one of {', '.join(MODES)}")
    if config.input_type not in ("uint8", "int8"):
        raise UserError("--input-type must be uint8 or int8")
    if config.policy not in POLICIES:
        raise UserError(f"--policy must be one of {', '.join(POLICIES)}")
    if config.threads < 1:
        raise UserError("--threads must be at least 1")
    if config.qat and config.quant not in INT8_MODES:
        raise UserError("--qat trains for int8: use it with --quant int8 or int8_full")


def _default_out(name: str, mode: str) -> Path:
    candidate, number = DEFAULT_ROOT / f"{name}-{mode}", 2
    while candidate.exists():
        candidate, number = DEFAULT_ROOT / f"{name}-{mode}-{number}", number + 1
    return candidate


def _check_output(out: Path, exist_ok: bool) -> None:
    if out.exists() and not exist_ok:
        raise UserError(f"{out} already exists: choose another --out, or pass --exist-ok to replace it")
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "manifest.json").is_file()):
        raise UserError(f"{out} exists and is not an ee export: refusing to replace it even with --exist-ok")


def _photos(config: ExportConfig, meta, size: int) -> ExportPhotos:
    """Calibration photos (the person's own) and disjoint held-out validation photos."""
    folder = config.calibration or (meta.get("personal_photos") or {}).get("data")
    if config.quant in INT8_MODES and not folder:
        raise UserError("int8 export needs calibration photos: pass --calibration DIR (at least 100 of the person's photos)")
    calibration_paths: list[Path] = []
    spare: list[Path] = []
    if folder:
        found = list(photos.scan_unlabelled(Path(folder)).paths)
        order = np.random.default_rng([config.seed, 5]).permutation(len(found))
        calibration_paths = [found[i] for i in order[: config.calibration_photos]]
        spare = [found[i] for i in order[config.calibration_photos :]]
        if config.quant in INT8_MODES and len(calibration_paths) < MIN_INT8_CALIBRATION_PHOTOS:
            raise UserError(f"int8 calibration needs at least {MIN_INT8_CALIBRATION_PHOTOS} usable photos; {folder} has {len(found)}")
    labels = None
    if config.validate:
        root = Path(config.validate)
        found = photos.scan_folder(root, meta["classes"])
        validation_paths, labels = list(found.paths), photos.label_names(found, meta["classes"])
        note = f"{len(validation_paths)} photos from {root}"
    elif spare:
        validation_paths, note = spare, f"{len(spare[: config.validation_photos])} held-out photos of the calibration folder (not used to calibrate)"
    elif calibration_paths:
        validation_paths, note = calibration_paths, "the calibration photos (no held-out photos were available)"
    else:
        raise UserError("nothing to validate on: pass --validate DIR or --calibration DIR")
    keep = np.random.default_rng([config.seed, 6]).permutation(len(validation_paths))[: config.validation_photos]
    validation = photos.load_array([validation_paths[i] for i in keep], size).astype(np.float32)
    labels = labels[keep] if labels is not None else None
    calibration = photos.load_array(calibration_paths, size).astype(np.float32) if calibration_paths else None
    return ExportPhotos(calibration, validation, labels, note)


def _whole_model_jobs(model, exit_names, calibration) -> list[tuple[str, list[Signature]]]:
    """Every exit at once, and the plain model: files that do not depend on the exit policy."""
    outputs = [*exit_names, "final"]
    multi = stages.segment(model, None, outputs, "multi_exit", softmax=tuple(outputs))
    plain = stages.segment(model, None, ["final"], "final", softmax=("final",))
    return [
        ("multi_exit.tflite", [Signature("serving_default", multi, {name: name for name in outputs}, calibration)]),
        ("final.tflite", [Signature("serving_default", plain, {"final": "probabilities"}, calibration)]),
    ]


def _cascade_signatures(model, enabled: list[dict], calibration) -> list[Signature]:
    """One signature per stage; each int8 stage calibrated on what the previous stage hands on."""
    cascade = stages.cascade_stages(model, [e["graft_layer"] for e in enabled], [e["name"] for e in enabled])
    signatures, carried = [], calibration
    for index, stage in enumerate(cascade):
        is_last = index == len(cascade) - 1
        names = {"final": "probabilities"} if is_last else {enabled[index]["graft_layer"]: "features", enabled[index]["name"]: "probabilities"}
        signatures.append(Signature(f"stage_{index}", stage, names, carried, takes_pixels=index == 0))
        if carried is not None and not is_last:
            carried = _batched(stage, carried, enabled[index]["graft_layer"])
    return signatures


def _head_signatures(model, enabled: list[dict], calibration) -> list[Signature]:
    """Each head alone, from its graft point's activations: what it costs, for the exit policy."""
    grafts = [e["graft_layer"] for e in enabled]
    features = stages.segment(model, None, grafts, "graft_points")
    signatures = []
    for index, exit_ in enumerate(enabled):
        head = stages.segment(model, exit_["graft_layer"], [exit_["name"]], f"head_{index}", softmax=(exit_["name"],))
        carried = _batched(features, calibration, exit_["graft_layer"]) if calibration is not None else None
        signatures.append(Signature(f"head_{index}", head, {exit_["name"]: "probabilities"}, carried, takes_pixels=False))
    return signatures


def _batched(model, inputs: np.ndarray, output: str, batch: int = 100) -> np.ndarray:
    return np.concatenate([model(inputs[i : i + batch], training=False)[output].numpy() for i in range(0, len(inputs), batch)])


def convert(signatures: list[Signature], config: ExportConfig) -> bytes:
    """One .tflite file holding every signature (weights shared between them)."""
    tf = compat.tf()
    functions = [_tf_function(signature) for signature in signatures]
    module = tf.Module()
    # The converter saves a SavedModel of `module` first: tracking the variables alone keeps tf_keras
    # from tracing every layer of every model for it (half of an export's time).
    module.variables_used = [v for signature in signatures for v in signature.model.variables]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function() for f in functions], module)
    mode = config.quant
    if mode != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in INT8_MODES:
        converter.representative_dataset = lambda: _representative(signatures)
    if mode == "int8_full":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with compat.native_logs_silenced((1, 2)):
        model = converter.convert()
    if mode != "int8_full":
        return model
    io_type = tf.uint8 if config.input_type == "uint8" else tf.int8
    # Pixels in and probabilities out in the user's type; activations handed from stage to stage
    # stay in the network's int8: a uint8 hand-off put a uint8<->int8 QUANTIZE pass on both sides
    # of every boundary, 7 % of ResNet50@224's latency per boundary.
    keys = [s.key for s in signatures] if len(signatures) > 1 else ["serving_default"]  # as the converter names a lone function
    inputs = {key: io_type if s.takes_pixels else tf.int8 for key, s in zip(keys, signatures)}
    outputs = {key: tf.int8 if s.hands_on else io_type for key, s in zip(keys, signatures)}
    return compat.retype_signature_io(model, inputs, outputs)


def _tf_function(signature: Signature):
    tf = compat.tf()
    model, names = signature.model, signature.names

    def run(x):
        outputs = model(x, training=False)
        return {names[key]: value for key, value in outputs.items()}

    run.__name__ = signature.key
    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32, name="x")
    return tf.function(run, input_signature=[spec], autograph=False)


def _representative(signatures: list[Signature]) -> Iterator:
    for signature in signatures:
        for sample in signature.calibration:
            if len(signatures) == 1:
                yield [sample[None]]
            else:
                yield signature.key, {"x": sample[None]}


def validate(model, path: Path, chosen: ExportPhotos, meta, config: ExportConfig) -> dict[str, Any]:
    """Per exit: top-1 agreement of LiteRT with float Keras, and the accuracy delta where labels exist."""
    images, labels = chosen.validation, chosen.labels
    outputs = bundle.head_outputs(meta)
    keras = compat.keras()
    tf = compat.tf()
    reference = keras.Model(model.inputs, [model.get_layer(name).output for name in outputs])
    keras_probs = [tf.nn.softmax(logits).numpy() for logits in reference.predict(images, batch_size=100, verbose=0)]
    runner = litert.Runner(litert.interpreter(path, config.threads), "serving_default")
    lite = [runner(image[None]) for image in images]
    classes = np.array(bundle.output_classes(meta))
    report, failure = {}, None
    for index, name in enumerate(outputs):
        lite_probs = np.concatenate([row[name] for row in lite])
        entry = {
            "finite": bool(np.isfinite(lite_probs).all()),
            "top1_agreement": float(np.mean(lite_probs.argmax(1) == keras_probs[index].argmax(1))),
            "max_probability_difference": float(np.abs(lite_probs - keras_probs[index]).max()),
        }
        if labels is not None:
            keras_accuracy = float(np.mean(classes[keras_probs[index].argmax(1)] == labels))
            lite_accuracy = float(np.mean(classes[lite_probs.argmax(1)] == labels))
            entry |= {"keras_accuracy": keras_accuracy, "tflite_accuracy": lite_accuracy, "accuracy_delta_points": 100 * (lite_accuracy - keras_accuracy)}
        report[name] = entry
        if not entry["finite"]:
            failure = f"{name} returns non-finite values in LiteRT"
        elif "accuracy_delta_points" in entry and -entry["accuracy_delta_points"] > config.max_accuracy_drop and failure is None:
            failure = f"{name} loses {-entry['accuracy_delta_points']:.2f} points against float Keras (bound {config.max_accuracy_drop})"
    return {"photos": len(images), "labelled": labels is not None, "on": chosen.note, "exits": report, "passed": failure is None, "failure": failure}


def _stage_io(stage: litert.Runner) -> dict[str, Any]:
    """What a phone app feeds a stage and reads back: dtype, scale and zero point per tensor."""
    def spec(detail: dict) -> dict[str, Any]:
        scale, zero = detail["quantization"]
        return {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(d) for d in detail["shape"]], "scale": float(scale), "zero_point": int(zero)}

    return {"input": spec(stage.input_detail), "outputs": {name: spec(detail) for name, detail in stage.outputs.items()}}


def _cascade_weights(sizes: dict[str, int], enabled) -> str:
    """Stages are disjoint segments, so each weight belongs to one signature; say so with the sizes."""
    parts = sizes["final.tflite"] + sum(sizes.get(f"{e['name']}.tflite", 0) for e in enabled)
    return (
        f"not duplicated: the stages are disjoint segments, each weight is stored once "
        f"(cascade {sizes['cascade.tflite']:,} bytes; the plain model plus each enabled exit's own file {parts:,} bytes, "
        f"which count the shared backbone prefix again)"
    )


def _manifest(source: bundle.Bundle, config: ExportConfig, written: Written, staging: Path, validation: dict) -> dict[str, Any]:
    meta, enabled = source.meta, written.enabled
    cascade = litert.interpreter(staging / "cascade.tflite", 1)
    keys = litert.stage_keys(cascade)
    stage_io = [_stage_io(litert.Runner(cascade, key)) for key in keys]
    pixels = stage_io[0]["input"]
    sizes = dict(written.files)
    used = {e["name"]: e["threshold"] for e in enabled}
    return {
        "format_version": schemas.MANIFEST_VERSION,
        "bundle": str(source.path.resolve()),
        "quant": config.quant,
        "qat": config.qat,
        "input": {
            "shape": [1, *meta["input"]["shape"]],
            "dtype": pixels["dtype"],
            "scale": pixels["scale"],
            "zero_point": pixels["zero_point"],
            "pixels": "RGB 0..255 (preprocessing is inside the model)",
        },
        "classes": bundle.output_classes(meta),
        "exits": [
            {k: e.get(k) for k in ("name", "graft_layer", "relative_depth", "cumulative_mflops")} | {"threshold": used.get(e["name"]), "enabled": e["name"] in used}
            for e in meta["exits"]
        ],
        "final_mflops": meta["final"]["cumulative_mflops"],
        "files": sizes,
        "total_bytes": sum(sizes.values()),
        "cascade": {
            "file": "cascade.tflite",
            "signatures": keys,
            "stage_io": stage_io,
            "stops_after": [e["name"] for e in enabled] + ["final"],
            "thresholds": [e["threshold"] for e in enabled],
            "weights": _cascade_weights(sizes, enabled),
            "policy": written.deployment.record,
        },
        "validation": validation,
        "config": as_dict(config),
        "versions": compat.versions(),
    }
