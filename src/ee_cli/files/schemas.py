"""JSON Schemas of the files ee reads back: a bundle's `ee.json` and an export's `manifest.json`.

Each file carries `format_version`; a schema per version says what a reader may rely on (types,
ranges, which keys must be there). Keys a schema does not name are allowed, so a newer ee can add
fields without breaking an older reader of the same version. Rules between fields that JSON Schema
cannot say (as many thresholds as exits, personal classes among the classes) follow each schema in
`check_bundle_meta` and `check_manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ee_cli.base.errors import UserError

BUNDLE_VERSION = 1
MANIFEST_VERSION = 1

_NAME = {"type": "string", "minLength": 1}
_FILE_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+\.tflite$", "not": {"pattern": r"^\.\.?"}}
_COUNT = {"type": "integer", "minimum": 0}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}
_THRESHOLD = {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 1}], "description": "a threshold: null (exit off) or a number in [0, 1]"}
_CLASSES = {"type": "array", "items": _NAME, "minItems": 2, "uniqueItems": True}
_SIZE = {"type": "integer", "minimum": 1}

_EXIT = {
    "type": "object",
    "required": ["name", "graft_layer", "relative_depth", "cumulative_macs", "cumulative_mflops", "threshold"],
    "properties": {
        "name": {"type": "string", "pattern": r"^exit_[0-9]+$"},
        "graft_layer": _NAME,
        "relative_depth": _SHARE,
        "feature_shape": {"type": "array", "items": _SIZE},
        "cumulative_macs": _COUNT,
        "head_macs": _COUNT,
        "cumulative_mflops": {"type": "number", "minimum": 0},
        "head": {"enum": ["light", "conv"]},
        "head_params": _COUNT,
        "trained": {"type": "boolean"},
        "enabled": {"type": "boolean"},
        "threshold": _THRESHOLD,
    },
}

BUNDLE_V1 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ee bundle (ee.json), format 1",
    "type": "object",
    "required": ["format_version", "model_file", "backbone", "input", "classes", "exits", "final"],
    "properties": {
        "format_version": {"const": 1},
        "model_file": {"const": "model.h5"},
        "backbone": {"type": "object", "required": ["name"], "properties": {"name": _NAME, "macs": _COUNT}},
        "input": {
            "type": "object",
            "required": ["shape"],
            "properties": {"shape": {"type": "array", "prefixItems": [_SIZE, _SIZE, {"const": 3}], "minItems": 3, "maxItems": 3}},
        },
        "classes": _CLASSES,
        "personal_classes": {"anyOf": [{"type": "null"}, {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True}]},
        "output_classes": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
        "generic_output": _NAME,
        "exits": {"type": "array", "items": _EXIT},
        "final": {
            "type": "object",
            "required": ["name", "cumulative_macs", "cumulative_mflops"],
            "properties": {"name": {"const": "final"}, "cumulative_macs": _COUNT, "cumulative_mflops": {"type": "number", "minimum": 0}},
        },
        "adapted_bn": {"type": "object", "properties": {"layers": {"type": "array", "items": _NAME}}},
        "class_prior": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["classes", "logit_shift"],
                    "properties": {"classes": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
                                   "logit_shift": {"type": "array", "items": {"type": "number"}}},
                },
            ]
        },
        "personal_photos": {"type": "object", "properties": {"data": {"type": ["string", "null"]}, "labelled": {"type": ["string", "null"]}}},
        "policy": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["thresholds", "set_by", "operating_point", "photos", "constraint"],
                    "properties": {
                        "thresholds": {"type": "array", "items": _THRESHOLD},
                        "set_by": _NAME,
                        "operating_point": {"type": "string"},
                        "photos": _COUNT,
                        "constraint": {"type": "object"},
                        "criterion": {"enum": ["maxprob", "entropy"]},
                        "reason": {"type": "string"},
                        "predicted": {"type": "object"},
                    },
                },
            ]
        },
        "provenance": {"type": "array", "items": {"type": "object", "properties": {"command": {"type": "string"}, "from": {"type": ["string", "null"]}}}},
    },
}

_STAGE_IO = {"type": "object", "required": ["input", "outputs"], "properties": {"outputs": {"type": "object", "required": ["probabilities"]}}}

MANIFEST_V1 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ee export (manifest.json), format 1",
    "type": "object",
    "required": ["quant", "input", "classes", "exits", "files", "cascade"],
    "properties": {
        "format_version": {"const": 1},
        "quant": {"enum": ["none", "fp16", "dynamic", "int8", "int8_full"]},
        "input": {
            "type": "object",
            "required": ["shape"],
            "properties": {"shape": {"type": "array", "prefixItems": [{"const": 1}, _SIZE, _SIZE, {"const": 3}], "minItems": 4, "maxItems": 4}},
        },
        "classes": _CLASSES,
        "exits": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "cumulative_mflops"], "properties": {"name": _EXIT["properties"]["name"], "cumulative_mflops": {"type": "number", "minimum": 0}, "threshold": _THRESHOLD}},
        },
        "final_mflops": {"type": "number", "exclusiveMinimum": 0},
        "files": {"type": "object", "propertyNames": _FILE_NAME, "additionalProperties": _COUNT, "minProperties": 1},
        "cascade": {
            "type": "object",
            "required": ["file", "signatures", "stops_after", "thresholds"],
            "properties": {
                "file": _FILE_NAME,
                "signatures": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
                "stops_after": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
                "thresholds": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                "stage_io": {"type": "array", "items": _STAGE_IO},
            },
        },
        "trainable": {"type": "object"},
    },
}


def read_json(path: Path) -> Any:
    """A JSON file as written by ee, strictly: NaN and Infinity (which Python's json accepts) are refused."""
    try:
        return json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror or error}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def validate(document: Any, schema: dict, path: Path) -> None:
    """Raise UserError naming the file and the first place where `document` breaks `schema`."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(document))
    if error is not None:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path).lstrip(".")
        described = error.schema.get("description") if isinstance(error.schema, dict) else None
        message = f"{_short(repr(error.instance), 60)} is not {described}" if described else error.message
        raise UserError(f"{path} is malformed{' at ' + where if where else ''}: {_short(message)}")


def _short(message: str, limit: int = 160) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def check_bundle_meta(meta: Any, path: Path) -> None:
    """`ee.json` against its version's schema and the rules between its fields."""
    _refuse_newer(meta, "bundle", BUNDLE_VERSION, path, unversioned=None)
    validate(meta, BUNDLE_V1, path)
    _cross_check_bundle(meta, path)


def _refuse_newer(document: Any, kind: str, readable: int, path: Path, unversioned: int | None) -> None:
    """A file written by a newer ee is refused by name (its schema would only say 'malformed')."""
    version = document.get("format_version", unversioned) if isinstance(document, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > readable:
        raise UserError(f"{path} has {kind} format {version}; this ee reads up to {readable}: upgrade ee")


def _refuse_first(problems: list[tuple[bool, str]], path: Path) -> None:
    for broken, what in problems:
        if broken:
            raise UserError(f"{path} is malformed: {what}")


def _cross_check_bundle(meta: dict, path: Path) -> None:
    from ee_cli.graph.graft import exit_names

    names = [e["name"] for e in meta["exits"]]
    classes = set(meta["classes"])
    problems = [
        (names != exit_names(len(names)), "exits must be named exit_0, exit_1, ... in order"),
        (not set(meta.get("personal_classes") or []) <= classes, "personal_classes must be among classes"),
        (not set(meta.get("output_classes") or []) <= classes, "output_classes must be among classes"),
    ]
    prior = meta.get("class_prior")
    if prior is not None:
        problems.append((len(prior["logit_shift"]) != len(prior["classes"]), "class_prior.logit_shift needs one value per class"))
        problems.append((not set(prior["classes"]) <= classes, "class_prior.classes must be among classes"))
    chosen = meta.get("policy")
    if chosen is not None:
        problems.append((len(chosen["thresholds"]) != len(names), f"policy.thresholds has {len(chosen['thresholds'])} values for {len(names)} exits"))
    _refuse_first(problems, path)


def check_manifest(manifest: Any, path: Path) -> None:
    """`manifest.json` against its version's schema and the rules between its fields."""
    _refuse_newer(manifest, "export", MANIFEST_VERSION, path, unversioned=1)  # exports before format_version are format 1
    validate(manifest, MANIFEST_V1, path)
    cascade = manifest["cascade"]
    stops, exits = cascade["stops_after"], {e["name"] for e in manifest["exits"]}
    problems = [
        (len(cascade["thresholds"]) != len(stops) - 1, f"cascade.thresholds has {len(cascade['thresholds'])} values for {len(stops) - 1} early stops"),
        (stops[-1] != "final" or not set(stops[:-1]) <= exits, "cascade.stops_after must name exits of the export, then final"),
        (len(cascade["signatures"]) != len(stops), f"cascade.signatures has {len(cascade['signatures'])} stages for {len(stops)} stops"),
        (cascade["file"] not in manifest["files"], f"cascade.file {cascade['file']} is not among files"),
    ]
    _refuse_first(problems, path)
