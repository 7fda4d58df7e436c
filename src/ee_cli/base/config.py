"""One frozen dataclass per command. Values resolve as: defaults < TOML file < command-line flags."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from ee_cli.base.errors import UserError

ConfigT = TypeVar("ConfigT")


@dataclasses.dataclass(frozen=True)
class AttachConfig:
    backbone: str = "resnet50"
    weights: str | None = None  # None: imagenet for ImageNet backbones, random for cifar_resnet9
    input_size: int | None = None  # None: the backbone's native size
    num_classes: int | None = None
    classes: str | None = None  # "a,b,c" or a file with one name per line
    exits: tuple[float, ...] = (0.25, 0.5, 0.75)
    exit_layers: tuple[str, ...] = ()
    head: str = "light"  # light | conv
    out: str | None = None
    exist_ok: bool = False
    seed: int = 0
    trust_model_code: bool = False  # load a model file even if it carries code (Lambda, custom layers, a SavedModel)
    quiet: bool = False


def resolve(cls: type[ConfigT], section: str, toml_path: Path | None, flags: dict[str, Any]) -> ConfigT:
    """Build `cls` from its defaults, then `[section]` of the TOML file, then the flags given.

    Flags whose value is None were not given on the command line and do not override anything.
    """
    names = {field.name for field in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(_read_section(toml_path, section, names))
    values.update({key: value for key, value in flags.items() if value is not None})
    for field in dataclasses.fields(cls):
        if isinstance(field.default, tuple) and field.name in values:
            values[field.name] = tuple(values[field.name])
    return cls(**values)


def _read_section(path: Path, section: str, names: set[str]) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except OSError as error:
        raise UserError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from None
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise UserError(f"config file {path}: [{section}] must be a table")
    table = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(table) - names)
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) in [{section}]: {', '.join(unknown)}")
    return table


def as_dict(config: Any) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}


@dataclasses.dataclass(frozen=True)
class PersonaliseConfig:
    data: str | None = None  # folder of unlabelled photos
    bundle: str | None = None  # None: the latest bundle written here
    labelled: str | None = None  # folder with one sub-folder per class
    out: str | None = None
    exist_ok: bool = False
    seed: int = 0
    method: str = "ee"  # ee | source | bn | tent | eata (lame: the benchmark applies it at test time)
    adapt_bn: str = "auto"  # N | auto | 0
    personal_classes: str = "auto"  # auto | all | a,b,c
    class_share: float = 0.2  # auto: a class stays personal at this fraction of an even share (1/classes) of the estimated mix
    class_prior: bool = True  # auto: shift the kept classes' logits by the estimated mix (EM's label-shift correction)
    prior_temperature: float = 1.5  # divides the generic logits before the mix is estimated (calibration; dev users: bench.class_set_study)
    views: int = 1  # weak/strong view pairs cached per photo
    epochs: int = 30
    batch: int = 64
    learning_rate: float = 1e-3
    pseudo_label_confidence: float = 0.9  # teacher confidence for pseudo-labels and FixMatch targets (not an exit threshold)
    temperature: float = 2.0
    distill_weight: float = 1.0
    pseudo_weight: float = 1.0
    fixmatch_weight: float = 1.0
    supervised_weight: float = 1.0
    exit_teacher: str = "generic"  # what the early exits distil from: generic (the frozen classifier) | final (the personalised final exit)
    holdout: float = 0.2  # share of the photos kept out of training; exit thresholds are chosen on them
    max_drop: float = 0.5  # points of held-out agreement with the final exit the exits may cost (label-free "keep")
    margin_z: float = 1.645  # one-sided margin in standard errors of the paired difference (95 %)
    cache: bool = True
    engine: str = "tensorflow"  # tensorflow | litert: train through personalise.tflite in LiteRT, as a phone would
    resume: bool = False
    quiet: bool = False
    trust_model_code: bool = False  # read a bundle whose model carries code


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    data: str | None = None  # labelled folder (one sub-folder per class), or unlabelled photos
    bundle: str | None = None
    out: str | None = None
    exist_ok: bool = False
    seed: int = 0
    threshold_share: float = 0.5  # share of the labelled photos that chooses the thresholds; the rest reports
    max_drop: float = 0.5  # points of accuracy the "keep" operating point may lose to the final exit
    use: str = "keep"  # operating point whose thresholds go into the bundle: keep | match-generic | match-restricted | label-free
    margin_z: float = 1.645  # one-sided margin in standard errors of the paired difference (95 %)
    criterion: str = "maxprob"  # maxprob | entropy
    unlabelled: str | None = None  # held-out unlabelled photos for label-free calibration
    generic_bundle: str | None = None  # default: the bundle this one was made from (its provenance)
    timed_runs: int = 30
    export: str | None = None  # an `ee export` folder: also time each exit's .tflite in LiteRT
    threads: int = 1  # LiteRT threads
    quiet: bool = False
    trust_model_code: bool = False  # read bundles whose model carries code


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    bundle: str | None = None
    out: str | None = None  # folder for the .tflite files (default: exports/<bundle name>-<mode>)
    exist_ok: bool = False
    seed: int = 0
    quant: str = "int8_full"  # none | fp16 | dynamic | int8 | int8_full
    input_type: str = "uint8"  # int8_full only: uint8 | int8 (raw pixels either way)
    calibration: str | None = None  # photos for int8 calibration (default: the bundle's personal photos)
    calibration_photos: int = 200
    validate: str | None = None  # held-out photos for validation (labelled adds accuracy)
    validation_photos: int = 300
    max_accuracy_drop: float = 1.0  # points: fail if a quantised exit loses more than this against float Keras
    qat: bool = False  # quantisation-aware training of the exit heads before an int8 export
    qat_steps: int = 200
    policy: str = "measured"  # measured: re-choose the exits on LiteRT's measured stage costs | recorded: the bundle's thresholds as they are
    trainable: bool = False  # also write personalise.tflite: the exits and early BN statistics trainable on the phone
    threads: int = 1
    quiet: bool = False
    trust_model_code: bool = False  # read a bundle whose model carries code


@dataclasses.dataclass(frozen=True)
class RunConfig:
    export: str | None = None  # an `ee export` folder
    data: str | None = None  # labelled photos (one sub-folder per class) for accuracy, or unlabelled
    threads: int = 1  # LiteRT threads
    limit: int | None = None  # at most this many photos, drawn with --seed
    timed_runs: int = 200  # timed calls per stage and per exit path in the latency profile
    seed: int = 0
    quiet: bool = False
