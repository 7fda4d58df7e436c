"""`ee attach`: graft early exits onto a backbone and write the multi-exit bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ee_cli.base import compat
from ee_cli.graph import backbones, flops, graft
from ee_cli.files import bundle
from ee_cli.runtime import handoff
from ee_cli.base.config import AttachConfig, as_dict
from ee_cli.base.errors import UserError
from ee_cli.graph.heads import HEAD_KINDS


@dataclass(frozen=True)
class AttachResult:
    bundle_path: Path
    meta: dict[str, Any]
    candidates: list[graft.GraftPoint]
    placement: graft.Placement  # where the exits went (before any handoff), with notes where not as asked
    model: Any  # the in-memory multi-exit model that was saved

    def as_json(self) -> dict[str, Any]:
        rows = graft_point_rows(self.candidates, self.placement.points)
        return {"bundle": str(self.bundle_path), **self.meta, "notes": self.placement.notes, "graft_points": rows}


@dataclass(frozen=True)
class Survey:
    backbone: backbones.Backbone
    candidates: list[graft.GraftPoint]
    placement: graft.Placement  # where the asked exits would go

    def as_json(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "input_shape": list(self.backbone.input_shape),
            "graft_points": graft_point_rows(self.candidates, self.placement.points),
            "notes": self.placement.notes,
        }


def attach(config: AttachConfig) -> AttachResult:
    if config.head not in HEAD_KINDS:
        raise UserError(f"unknown --head {config.head!r}: choose one of {', '.join(HEAD_KINDS)}")
    out = Path(config.out) if config.out else bundle.default_output(_stem(config.backbone))
    bundle.check_output(out, config.exist_ok)
    names = read_class_names(config.classes)
    compat.seed_everything(config.seed)
    num_classes = config.num_classes if config.num_classes is not None else (len(names) if names else None)
    backbone = backbones.build_backbone(config.backbone, config.weights, config.input_size, num_classes, config.trust_model_code)
    if config.num_classes is not None and config.num_classes != backbone.num_classes:
        raise UserError(f"--num-classes {config.num_classes} but the classifier has {backbone.num_classes} outputs")
    names = names or default_class_names(backbone)
    if len(names) != backbone.num_classes:
        raise UserError(f"{len(names)} class names given but the classifier has {backbone.num_classes} outputs")
    candidates = graft.graft_points(backbone.model)
    placement = place_exits(backbone.model, candidates, config)
    packed, points = handoff.pack(backbone.model, placement.points)
    model, exits = graft.graft_exits(packed, points, config.head, backbone.num_classes)
    meta = describe(backbone, exits, config.head, names, as_dict(config))
    bundle.write_bundle(out, model, meta, config.exist_ok)
    return AttachResult(out, meta, candidates, placement, model)


def survey(config: AttachConfig) -> Survey:
    """A backbone's graft points and where the asked exits would go; writes nothing. Built-in
    backbones are built without weights: the points don't depend on them."""
    weights = "none" if config.backbone in backbones.BUILTIN_BACKBONES else config.weights
    backbone = backbones.build_backbone(config.backbone, weights, config.input_size, config.num_classes, config.trust_model_code)
    candidates = graft.graft_points(backbone.model)
    return Survey(backbone, candidates, place_exits(backbone.model, candidates, config))


def place_exits(model, candidates: list[graft.GraftPoint], config: AttachConfig) -> graft.Placement:
    if config.exit_layers:
        return graft.Placement(graft.choose_by_name(model, candidates, config.exit_layers), [])
    # The default fractions adapt to a backbone with fewer graft points; fractions the user gave don't.
    return graft.choose_by_fraction(candidates, config.exits, fewer_ok=config.exits == AttachConfig().exits)


def graft_point_rows(candidates: list[graft.GraftPoint], chosen: list[graft.GraftPoint]) -> list[dict[str, Any]]:
    """Every candidate with its cumulative compute, for --list-graft-points and --json."""
    exits = dict(zip((point.layer for point in chosen), graft.exit_names(len(chosen))))
    return [
        {
            "layer": point.layer,
            "kind": point.kind,
            "feature_shape": list(point.shape),
            "relative_depth": round(point.relative_depth, 4),
            "cumulative_mflops": round(flops.mflops(point.macs), 3),
            "carries": point.carries,
            "exit": exits.get(point.layer),
        }
        for point in candidates
    ]


def _stem(backbone: str) -> str:
    return Path(backbone).stem if Path(backbone).suffix or "/" in backbone else backbone


def read_class_names(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError("--classes needs at least 2 distinct names (comma-separated, or a file with one per line)")
    return names


def default_class_names(backbone: backbones.Backbone) -> list[str]:
    if backbone.weights == "imagenet":
        return compat.imagenet_class_names()
    return [str(index) for index in range(backbone.num_classes)]


def describe(backbone: backbones.Backbone, exits: list[graft.GraftedExit], head: str, names: list[str], config: dict) -> dict[str, Any]:
    total = flops.model_macs(backbone.model)
    return {
        "backbone": {
            "name": backbone.name,
            "source": backbone.source,
            "weights": backbone.weights,
            "macs": total,
            "mflops": round(flops.mflops(total), 3),
        },
        "input": {
            "shape": list(backbone.input_shape),
            "dtype": "float32",
            "pixels": "RGB, 0..255",
            "preprocessing": backbone.preprocessing,
        },
        "classes": names,
        "personal_classes": None,
        "exits": [
            {
                "name": grafted.name,
                "graft_layer": grafted.point.layer,
                "relative_depth": round(grafted.point.relative_depth, 4),
                "feature_shape": list(grafted.point.shape),
                "cumulative_macs": grafted.point.macs + grafted.head_macs,
                "head_macs": grafted.head_macs,
                "cumulative_mflops": round(flops.mflops(grafted.point.macs + grafted.head_macs), 3),
                "head": head,
                "head_params": grafted.head_params,
                "trained": False,
                "enabled": False,
                "threshold": None,
            }
            for grafted in exits
        ],
        "final": {
            "name": graft.FINAL_OUTPUT,
            "relative_depth": 1.0,
            "cumulative_macs": total,
            "cumulative_mflops": round(flops.mflops(total), 3),
            "trained": backbone.weights != "none",
        },
        "provenance": [bundle.provenance("attach", config, None)],
    }
