"""Where exits can go on a backbone, what each costs, and grafting them into one flat model.

Candidate graft points are block outputs: layers every input-to-output path passes through (so a
staged cascade can cut the network there and hand on a single tensor) that end a residual block
or a pooling step, plus the last feature map. Following Shallow-Deep Networks, exits sit at chosen
fractions of the backbone's compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ee_cli import compat, flops, heads
from ee_cli.backbones import PREPROCESS_LAYER
from ee_cli.errors import UserError

FINAL_OUTPUT = "final"
_POOLS = {"MaxPooling2D", "AveragePooling2D"}
_MERGES = {"Add"}
_ACTIVATIONS = {"Activation", "ReLU"}


@dataclass(frozen=True)
class LayerGraph:
    order: tuple[str, ...]  # topological
    producers: dict[str, tuple[str, ...]]
    consumers: dict[str, tuple[str, ...]]
    kinds: dict[str, str]


@dataclass(frozen=True)
class GraftPoint:
    layer: str
    relative_depth: float  # share of the backbone's MACs spent before this point
    macs: int  # cumulative backbone MACs up to and including this layer
    shape: tuple[int, ...]


def layer_graph(model) -> LayerGraph:
    config = model.get_config()
    names = [entry["name"] for entry in config["layers"]]
    known = set(names)
    producers = {entry["name"]: tuple(_inbound_names(entry["inbound_nodes"], known)) for entry in config["layers"]}
    consumers: dict[str, list[str]] = {name: [] for name in names}
    for name, sources in producers.items():
        for source in sources:
            consumers[source].append(name)
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    order = _topological(names, producers, consumers)
    return LayerGraph(order, producers, {k: tuple(v) for k, v in consumers.items()}, kinds)


def _inbound_names(structure: Any, known: set[str]) -> list[str]:
    """Layer names in a serialized `inbound_nodes` entry, whatever its nesting."""
    if isinstance(structure, (list, tuple)):
        if len(structure) >= 3 and isinstance(structure[0], str) and structure[0] in known and isinstance(structure[1], int):
            return [structure[0]]
        return [name for item in structure for name in _inbound_names(item, known)]
    if isinstance(structure, dict):
        return [name for item in structure.values() for name in _inbound_names(item, known)]
    return []


def _topological(names, producers, consumers) -> tuple[str, ...]:
    waiting = {name: len(set(producers[name])) for name in names}
    ready = [name for name in names if waiting[name] == 0]
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for consumer in dict.fromkeys(consumers[name]):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    return tuple(order)


def articulation_layers(graph: LayerGraph) -> set[str]:
    """Layers that every input-to-output path passes through.

    In a topological order, a layer is such a cut exactly when no edge jumps over its position.
    """
    position = {name: index for index, name in enumerate(graph.order)}
    jumps = [0] * (len(graph.order) + 1)
    for name, sources in graph.producers.items():
        for source in sources:
            start, end = position[source] + 1, position[name]
            if start < end:
                jumps[start] += 1
                jumps[end] -= 1
    cuts, open_edges = set(), 0
    for index, name in enumerate(graph.order):
        open_edges += jumps[index]
        if open_edges == 0:
            cuts.add(name)
    return cuts


def cumulative_macs(model, graph: LayerGraph, layer_name: str) -> int:
    seen, stack = set(), [layer_name]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.producers[name])
    return sum(flops.layer_macs(model.get_layer(name)) for name in seen)


def _is_feature_map(model, name: str) -> bool:
    """A 4-D activation of the backbone proper (not its input or our preprocessing)."""
    layer = model.get_layer(name)
    is_backbone = type(layer).__name__ != "InputLayer" and layer.name != PREPROCESS_LAYER
    return is_backbone and len(layer.output_shape) == 4


def graft_points(model) -> list[GraftPoint]:
    """Candidate graft points of a backbone, shallowest first."""
    graph = layer_graph(model)
    cuts = [name for name in graph.order if name in articulation_layers(graph) and _is_feature_map(model, name)]
    if not cuts:
        raise UserError(f"model {model.name} has no feature map to graft an exit onto")
    candidates = {name for name in cuts if _ends_a_block(name, graph)} | {cuts[-1]}
    # Prefer the later tensor when reaching it costs nothing (add -> relu, relu -> pool).
    redundant = {
        name
        for name in candidates
        if len(graph.consumers[name]) == 1
        and graph.consumers[name][0] in candidates
        and not model.get_layer(graph.consumers[name][0]).weights
    }
    total = cumulative_macs(model, graph, graph.order[-1])
    points = []
    for name in cuts:
        if name in candidates and name not in redundant:
            macs = cumulative_macs(model, graph, name)
            shape = tuple(int(d) for d in model.get_layer(name).output_shape[1:])
            points.append(GraftPoint(name, macs / total, macs, shape))
    return points


def _ends_a_block(name: str, graph: LayerGraph) -> bool:
    kind = graph.kinds[name]
    if kind in _MERGES or kind in _POOLS:
        return True
    if any(graph.kinds[consumer] in _MERGES for consumer in graph.consumers[name]):
        return True
    return kind in _ACTIVATIONS and any(graph.kinds[source] in _MERGES for source in graph.producers[name])


def choose_by_fraction(points: list[GraftPoint], fractions: tuple[float, ...]) -> list[GraftPoint]:
    chosen: dict[str, float] = {}
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise UserError(f"exit position {fraction} must be a fraction of the backbone's compute in (0, 1]")
        nearest = min(points, key=lambda point: abs(point.relative_depth - fraction))
        if nearest.layer in chosen:
            raise UserError(
                f"--exits {chosen[nearest.layer]} and {fraction} both land on block output {nearest.layer}: "
                f"spread them further apart (this backbone has {len(points)} graft points)"
            )
        chosen[nearest.layer] = fraction
    return sorted((point for point in points if point.layer in chosen), key=lambda point: point.relative_depth)


def choose_by_name(model, points: list[GraftPoint], names: tuple[str, ...]) -> list[GraftPoint]:
    by_name = {point.layer: point for point in points}
    graph = layer_graph(model)
    cuts = articulation_layers(graph)
    chosen = []
    for name in dict.fromkeys(names):
        if name in by_name:
            chosen.append(by_name[name])
        elif name not in graph.kinds:
            raise UserError(f"--exit-layers: no layer named {name!r} in the backbone")
        elif name not in cuts or not _is_feature_map(model, name):
            raise UserError(f"--exit-layers: {name} is inside a block; graft onto a block output such as {', '.join(list(by_name)[:4])}")
        else:
            macs = cumulative_macs(model, graph, name)
            shape = tuple(int(d) for d in model.get_layer(name).output_shape[1:])
            chosen.append(GraftPoint(name, macs / cumulative_macs(model, graph, graph.order[-1]), macs, shape))
    return sorted(chosen, key=lambda point: point.relative_depth)


def exit_names(count: int) -> list[str]:
    width = 2 if count > 10 else 1
    return [f"exit_{index:0{width}d}" for index in range(count)]


@dataclass(frozen=True)
class GraftedExit:
    name: str
    point: GraftPoint
    head_macs: int
    head_params: int


def graft_exits(backbone_model, points: list[GraftPoint], head_kind: str, num_classes: int):
    """One flat model: the frozen backbone with a head per graft point; outputs exit_0..k-1, final."""
    keras = compat.keras()
    clashes = [layer.name for layer in backbone_model.layers if layer.name == FINAL_OUTPUT or layer.name.startswith("exit_")]
    if clashes:
        raise UserError(f"the backbone already has layers named {', '.join(clashes[:3])}: rename them before grafting")
    for layer in backbone_model.layers:
        layer.trainable = False
    names = exit_names(len(points))
    outputs = [
        heads.build_head(head_kind, backbone_model.get_layer(point.layer).output, num_classes, name)
        for name, point in zip(names, points)
    ]
    final = keras.layers.Activation("linear", name=FINAL_OUTPUT)(backbone_model.output)
    model = keras.Model(backbone_model.inputs, [*outputs, final], name=f"{backbone_model.name}_ee")
    grafted = []
    for name, point in zip(names, points):
        head_layers = [layer for layer in model.layers if heads.is_head_layer(layer.name, name)]
        grafted.append(
            GraftedExit(
                name,
                point,
                sum(flops.layer_macs(layer) for layer in head_layers),
                sum(layer.count_params() for layer in head_layers),
            )
        )
    return model, grafted
