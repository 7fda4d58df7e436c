"""Bundles: a directory holding one multi-exit model (`model.h5`) and its description (`ee.json`).

Commands never modify their input bundle; each writes a new one atomically (a temporary folder
beside the target, then a rename) and records it as the workspace's latest, which the next
command takes by default.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import atomic, compat
from ee_cli.graph import trust
from ee_cli.exits import policy
from ee_cli.files import schemas
from ee_cli.base.errors import UserError, first_line

FORMAT_VERSION = schemas.BUNDLE_VERSION
MODEL_FILE = "model.h5"
MODEL_FORMAT = "tf_keras HDF5 (.h5)"
META_FILE = "ee.json"
EVIDENCE_FILE = "exit_evidence.npz"  # the per-photo evidence the thresholds were chosen from
DEFAULT_ROOT = Path("bundles")
LATEST_FILE = DEFAULT_ROOT / "latest.json"


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict[str, Any]

    def load_model(self):
        """The model; `read_bundle` has vetted its file (or the user trusted it)."""
        try:
            return compat.keras().models.load_model(self.path / self.meta["model_file"], compile=False)
        except Exception as error:  # h5py and Keras errors alike: the file is damaged past its configuration
            raise UserError(f"{self.path / self.meta['model_file']} cannot be loaded: {first_line(error)}") from None

    def evidence(self) -> policy.Evidence | None:
        path = self.path / EVIDENCE_FILE
        if not path.is_file():
            return None
        with np.load(path) as stored:
            return policy.Evidence(stored["confidences"], stored["correct"], stored["reference"])


@dataclass(frozen=True)
class ExitPolicy:
    """Which exits a cascade uses and where each lets photos out: the one record of a bundle's exit
    state. An exit is off exactly when its threshold is None."""

    thresholds: tuple[float | None, ...]
    set_by: str  # the command that chose them: personalise | evaluate
    operating_point: str  # e.g. keep (label-free)
    photos: int  # how many photos the thresholds were chosen on
    constraint: dict[str, float | str]  # {"kind": "max_drop" | "at_least", "drop": ..., "z": ...}
    criterion: str = "maxprob"
    reason: str = ""  # one line: why these exits, or why none
    predicted: dict[str, Any] = field(default_factory=dict)  # expected cost, plain cost, unit, speed-up

    @classmethod
    def from_choice(cls, choice: policy.Choice, **fields) -> "ExitPolicy":
        thresholds = tuple(None if t >= policy.NEVER else float(t) for t in choice.thresholds)
        return cls(thresholds=thresholds, predicted=choice.prediction(), **fields)



def exit_policy(meta: dict[str, Any]) -> ExitPolicy | None:
    stored = meta.get("policy")
    if not stored or "thresholds" not in stored:
        return None
    return ExitPolicy(**{**stored, "thresholds": tuple(stored["thresholds"])})


def input_size(meta: dict[str, Any]) -> int:
    """The side of the square photos the model takes."""
    return int(meta["input"]["shape"][0])


def output_classes(meta: dict[str, Any]) -> list[str]:
    """The classes the exits predict: the personal ones once personalised, else every class."""
    return list(meta.get("output_classes") or meta["classes"])


def head_outputs(meta: dict[str, Any]) -> list[str]:
    """The model's personal outputs in cascade order: every early exit, then the final exit."""
    return [e["name"] for e in meta["exits"]] + ["final"]


def stage_costs(meta: dict[str, Any]) -> policy.StageCosts:
    """The MACs cost model of a bundle's cascade: each exit's backbone prefix and head."""
    exits = meta["exits"]
    heads = [e.get("head_macs", 0) for e in exits]
    return policy.costs_from_macs([e["cumulative_macs"] - head for e, head in zip(exits, heads)], heads, meta["final"]["cumulative_macs"])


def thresholds(meta: dict[str, Any]) -> list[float | None]:
    """Each exit's threshold; None for an exit that is off (also every exit of a bundle without a policy)."""
    chosen = exit_policy(meta)
    return list(chosen.thresholds) if chosen else [None] * len(meta["exits"])


def with_exit_policy(meta: dict[str, Any], chosen: ExitPolicy | None) -> dict[str, Any]:
    """`meta` with `chosen` as its exit state (None clears it: every exit off)."""
    values = chosen.thresholds if chosen else (None,) * len(meta["exits"])
    exits = [e | {"threshold": t, "enabled": t is not None} for e, t in zip(meta["exits"], values)]
    stored = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(chosen).items()} if chosen else None
    return {k: v for k, v in meta.items() if k != "policy"} | {"exits": exits, "policy": stored}


def read_bundle(path: Path, trust_code: bool = False) -> Bundle:
    """A bundle from disk, validated before use: `ee.json` against its schema, the model file
    openable, free of code (unless `trust_code`) and with the outputs `ee.json` describes."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not a bundle (no {META_FILE}); make one with `ee attach`")
    meta = schemas.read_json(meta_path)
    schemas.check_bundle_meta(meta, meta_path)
    model_path = path / meta["model_file"]
    if not model_path.is_file():
        raise UserError(f"{path} is incomplete: its model file {meta['model_file']} is missing")
    config = trust.read_model_config(model_path)
    if not trust_code:
        trust.refuse_code(config, model_path)
    _check_outputs(config, meta, model_path)
    return Bundle(path, meta)


def _check_outputs(config: dict[str, Any], meta: dict[str, Any], model_path: Path) -> None:
    """The model is the one ee.json describes: its outputs in order, its input size, its class counts."""
    expected = head_outputs(meta) + ([meta["generic_output"]] if meta.get("generic_output") else [])
    graph = config.get("config") if isinstance(config.get("config"), dict) else {}
    layers = graph.get("output_layers")
    found = [entry[0] for entry in layers] if isinstance(layers, list) and all(isinstance(e, list) and e for e in layers) else None
    if found != expected:
        raise UserError(f"{model_path} does not match {META_FILE}: its outputs are {found}, {META_FILE} describes {expected}")
    _check_input(graph, meta, model_path)
    _check_classes(config, found, meta, model_path)


def _check_input(graph: dict[str, Any], meta: dict[str, Any], model_path: Path) -> None:
    inputs = [layer for layer in graph.get("layers", []) if isinstance(layer, dict) and layer.get("class_name") == "InputLayer"]
    shape = (inputs[0].get("config") or {}).get("batch_input_shape") if len(inputs) == 1 else None
    if isinstance(shape, list) and shape[1:] != meta["input"]["shape"]:
        raise UserError(f"{model_path} does not match {META_FILE}: the model takes {shape[1:]}, {META_FILE} says {meta['input']['shape']}")


def _check_classes(config: dict[str, Any], outputs: list[str], meta: dict[str, Any], model_path: Path) -> None:
    personal, every = len(output_classes(meta)), len(meta["classes"])
    for name in outputs:
        units = _output_units(config, name)
        wanted = every if name == meta.get("generic_output") else personal
        if units is not None and units != wanted:
            raise UserError(f"{model_path} does not match {META_FILE}: output {name} has {units} classes, {META_FILE} names {wanted}")


def _output_units(config: dict[str, Any], name: str) -> int | None:
    """How many classes an output gives: the units of the Dense layer it comes from (None if unclear)."""
    layers = {layer.get("name"): layer for layer in config["config"].get("layers", []) if isinstance(layer, dict)}
    layer = layers.get(name)
    for _ in range(len(layers)):
        if not isinstance(layer, dict):
            return None
        units = (layer.get("config") or {}).get("units")
        if isinstance(units, int):
            return units
        try:
            layer = layers.get(layer["inbound_nodes"][0][0][0])
        except (KeyError, IndexError, TypeError):
            return None
    return None


def input_bundle(explicit: str | None, trust_code: bool = False) -> tuple[Bundle, bool]:
    """The bundle a command reads: the one given, else the latest written here. Also: was it implicit?"""
    if explicit is not None:
        return read_bundle(Path(explicit), trust_code), False
    if not LATEST_FILE.is_file():
        raise UserError("no bundle given and none written here yet: pass --bundle PATH or run `ee attach` first")
    latest = schemas.read_json(LATEST_FILE)
    if not isinstance(latest, dict) or not isinstance(latest.get("path"), str):
        raise UserError(f"{LATEST_FILE} is malformed: pass --bundle PATH")
    return read_bundle(Path(latest["path"]), trust_code), True


def default_output(stem: str) -> Path:
    """bundles/<stem>, or bundles/<stem>-2, -3, ... when taken (as Ultralytics names its runs)."""
    candidate, number = DEFAULT_ROOT / stem, 2
    while candidate.exists():
        candidate, number = DEFAULT_ROOT / f"{stem}-{number}", number + 1
    return candidate


def check_output(out: Path, exist_ok: bool) -> None:
    """Refuse, before any work is done, an output that would overwrite something."""
    if not out.exists() and not out.is_symlink():
        return
    if not exist_ok:
        raise UserError(f"{out} already exists: choose another --out, or pass --exist-ok to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file()):
        raise UserError(f"{out} exists and is not a bundle: refusing to replace it even with --exist-ok")


def write_bundle(out: Path, model, meta: dict[str, Any], exist_ok: bool, model_file: Path | None = None,
                 evidence: policy.Evidence | None = None) -> Path:
    """Write `model` (or link/copy an existing `model_file`, unchanged), `ee.json` and the exit
    policy's evidence, atomically."""
    check_output(out, exist_ok)
    with atomic.staged_folder(out, exist_ok) as staging:
        if model_file is not None:
            _link_or_copy(model_file, staging / MODEL_FILE)
        else:
            model.save(staging / MODEL_FILE, include_optimizer=False, save_format="h5")
        if evidence is not None:
            np.savez_compressed(staging / EVIDENCE_FILE, confidences=evidence.confidences, correct=evidence.correct, reference=evidence.reference)
        atomic.write_json(staging / META_FILE, {"format_version": FORMAT_VERSION, "model_file": MODEL_FILE, "model_format": MODEL_FORMAT, **meta})
    record_latest(out, meta.get("provenance", [{}])[-1].get("command", ""))
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # bundles never modify their files, so sharing one is safe
    except OSError:
        shutil.copy2(source, target)


def record_latest(path: Path, command: str) -> None:
    DEFAULT_ROOT.mkdir(parents=True, exist_ok=True)
    atomic.write_json(LATEST_FILE, {"path": str(path.resolve()), "command": command, "time": now()})


def provenance(command: str, config: dict[str, Any], source: Path | None) -> dict[str, Any]:
    return {
        "command": command,
        "from": str(Path(source).resolve()) if source else None,
        "config": config,
        "seed": config.get("seed"),
        "time": now(),
        "versions": compat.versions(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
