"""Where exits can go on a backbone, what each costs, and grafting them into one flat model.

Candidate graft points are block outputs: layers every input-to-output path passes through (so a
staged cascade can cut the network there and hand on a single tensor), before the global pooling,
that end a block: a residual add, a concatenation, a pooling step, or an activation (a plain
stack's conv-BN-activation unit, or the activation after a resolution change) that is not the wide
inside of an inverted-residual block, plus the last feature map. Where no single layer separates
the blocks (NASNet's cells read the two previous cells), a cell output that the rest of the network
reads only together with one other layer is a candidate too; it is packed into one tensor when
grafted (handoff.py). Following Shallow-Deep Networks, exits sit at chosen fractions of the
backbone's compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from ee_cli.base import compat
from ee_cli.graph import flops, heads
from ee_cli.graph.backbones import PREPROCESS_LAYER
from ee_cli.base.errors import UserError

FINAL_OUTPUT = "final"
_POOLS = {"MaxPooling2D", "AveragePooling2D"}
_MERGES = {"Add", "Concatenate", "Average", "Maximum"}
# Nonlinear layers without an `activation` attribute; Multiply gates (hard-swish, squeeze-excite).
_NONLINEAR = {"ReLU", "LeakyReLU", "PReLU", "ELU", "ThresholdedReLU", "Multiply"}
# Where the spatial feature maps end and the classifier begins (also when they keep 1x1 dims).
_GLOBAL_POOLS = {"GlobalAveragePooling2D", "GlobalMaxPooling2D"}


@dataclass(frozen=True)
class LayerGraph:
    order: tuple[str, ...]  # topological
    producers: dict[str, tuple[str, ...]]
    consumers: dict[str, tuple[str, ...]]
    kinds: dict[str, str]
    layers: dict[str, Any] = field(default_factory=dict)  # by name: model.get_layer scans every layer


@dataclass(frozen=True)
class GraftPoint:
    layer: str
    relative_depth: float  # share of the backbone's MACs spent before this point
    macs: int  # cumulative backbone MACs up to and including this layer
    shape: tuple[int, ...]
    kind: str = ""  # the layer's class, e.g. Add, ReLU, MaxPooling2D
    # A layer whose output the rest of the network also reads (NASNet's previous cell): the cut
    # hands on both, packed into one tensor when grafted (see handoff.py).
    carries: str | None = None


@dataclass(frozen=True)
class Placement:
    points: list[GraftPoint]  # shallowest first
    notes: list[str]  # where an exit could not go to the point nearest its fraction, why


def layer_graph(model) -> LayerGraph:
    config = model.get_config()
    names = [entry["name"] for entry in config["layers"]]
    known = set(names)
    producers = {entry["name"]: tuple(_inbound_names(entry["inbound_nodes"], known)) for entry in config["layers"]}
    consumers: dict[str, list[str]] = {name: [] for name in names}
    for name, sources in producers.items():
        for source in sources:
            consumers[source].append(name)
    layers = {layer.name: layer for layer in model.layers}
    kinds = {name: type(layer).__name__ for name, layer in layers.items()}
    order = _topological(names, producers, consumers)
    return LayerGraph(order, producers, {k: tuple(v) for k, v in consumers.items()}, kinds, layers)


def model_nodes(model) -> dict:
    """Each layer's call inside `model`. A layer also called elsewhere (in a sub-model, or before a
    handoff was packed) has more calls, and `layer.output` is its first one's."""
    return {node.layer.name: node for nodes in model._nodes_by_depth.values() for node in nodes}


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


def ancestors(graph: LayerGraph, names: list[str]) -> set[str]:
    """The layers `names` and every layer they depend on."""
    seen, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.producers[name])
    return seen


def cumulative_macs(graph: LayerGraph, layer_name: str | list[str]) -> int:
    """MACs of every layer the named layer (or layers, each counted once) depends on, itself included."""
    names = [layer_name] if isinstance(layer_name, str) else layer_name
    return sum(flops.layer_macs(graph.layers[name]) for name in ancestors(graph, names))


def feature_maps(graph: LayerGraph) -> list[str]:
    """Articulation layers with a 4-D output, from the backbone's first convolution to its global pooling."""
    cuts = articulation_layers(graph)
    maps = []
    for name in graph.order:
        layer = graph.layers[name]
        input_side = not maps and (name == PREPROCESS_LAYER or not flops.layer_macs(layer))  # rescaling, padding
        if name not in cuts or input_side:
            continue
        if graph.kinds[name] in _GLOBAL_POOLS or len(layer.output_shape) != 4:
            break
        maps.append(name)
    return maps


def graft_points(model) -> list[GraftPoint]:
    """Candidate graft points of a backbone, shallowest first."""
    graph = layer_graph(model)
    maps = feature_maps(graph)
    if not maps:
        raise UserError(f"model {model.name} has no feature map to graft an exit onto")
    candidates = _block_outputs(graph, maps)
    candidates -= _free_to_skip(graph, candidates)
    pairs = pair_cuts(graph, maps)
    total = cumulative_macs(graph, graph.order[-1])
    points = [_point(graph, name, total, pairs.get(name)) for name in graph.order if name in candidates or name in pairs]
    return sorted(points, key=lambda point: point.macs)


def _point(graph: LayerGraph, name: str, total: int, carries: str | None = None) -> GraftPoint:
    macs = cumulative_macs(graph, name)
    shape = tuple(int(d) for d in graph.layers[name].output_shape[1:])
    if carries is not None:
        shape = (*shape[:-1], shape[-1] + int(graph.layers[carries].output_shape[-1]))
    return GraftPoint(name, macs / total, macs, shape, graph.kinds[name], carries)


def pair_cuts(graph: LayerGraph, maps: list[str]) -> dict[str, str]:
    """Merges that are no articulation layer but where the network can still be cut, handing on
    one more tensor of the same spatial size: {merge: the other layer}.

    NASNet's cells each read the two previous cells' outputs, so no single layer separates them.
    """
    position = {name: index for index, name in enumerate(graph.order)}
    first, last = position[maps[0]], position[maps[-1]]
    articulated = set(maps)
    found = {}
    for name in graph.order[first:last]:
        if graph.kinds[name] not in _MERGES or name in articulated:
            continue
        upstream = ancestors(graph, [name])
        leaving = {layer for layer in upstream if any(consumer not in upstream for consumer in graph.consumers[layer])}
        others = leaving - {name}
        if len(leaving) == 2 and len(others) == 1:
            other = others.pop()
            if graph.layers[other].output_shape[1:3] == graph.layers[name].output_shape[1:3]:
                found[name] = other
    return found


def _block_outputs(graph: LayerGraph, maps: list[str]) -> set[str]:
    expanded = _inside_expansions(graph, maps)
    found = {maps[-1]}
    for name in maps:
        kind = graph.kinds[name]
        if kind in _MERGES or kind in _POOLS or any(graph.kinds[consumer] in _MERGES for consumer in graph.consumers[name]):
            found.add(name)
        elif _is_nonlinear(graph.layers[name]) and name not in expanded:
            found.add(name)
    return found


def _is_nonlinear(layer) -> bool:
    if type(layer).__name__ in _NONLINEAR:
        return True
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "") != "linear"


def _inside_expansions(graph: LayerGraph, maps: list[str]) -> set[str]:
    """Feature maps wider than the maps on both sides: the inside of an inverted-residual block.

    MobileNetV2/V3 and EfficientNet blocks widen, then project back; their wide activations are
    articulation layers, but an exit there sees what the narrow block output shows, at several
    times the size to cache and to hand from one cascade stage to the next.
    """
    widths = [(name, int(graph.layers[name].output_shape[-1])) for name in maps]
    runs = [(width, [name for name, _ in group]) for width, group in groupby(widths, key=lambda item: item[1])]
    return {
        name
        for (before, _), (width, names), (after, _) in zip(runs, runs[1:], runs[2:])
        if before < width > after
        for name in names
    }


def _free_to_skip(graph: LayerGraph, candidates: set[str]) -> set[str]:
    """Candidates from which a later one is reached through weightless layers only (add -> relu,
    relu -> pad -> pool): the later tensor costs nothing more and is no bigger."""
    skipped = set()
    for name in candidates:
        current = name
        while len(graph.consumers[current]) == 1:
            current = graph.consumers[current][0]
            if graph.layers[current].weights:
                break
            if current in candidates:
                skipped.add(name)
                break
    return skipped


def choose_by_fraction(points: list[GraftPoint], fractions: tuple[float, ...], fewer_ok: bool = False) -> Placement:
    """Distinct points as close as possible to the fractions (least squares, order kept).

    With fewer points than fractions, every point is taken if `fewer_ok` (default fractions),
    else the request is refused.
    """
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise UserError(f"exit position {fraction} must be a fraction of the backbone's compute in (0, 1]")
    asked = sorted(fractions)
    depths = [point.relative_depth for point in points]
    if len(asked) <= len(points):
        pairs = list(zip(asked, _monotone_match(asked, depths)))
        notes = []
    elif fewer_ok:
        pairs = [(asked[index], column) for column, index in enumerate(_monotone_match(depths, asked))]
        notes = [f"this backbone has only {len(points)} graft point(s), so {len(points)} exit(s) instead of {len(asked)}"]
    else:
        raise UserError(
            f"--exits asks for {len(asked)} exits but this backbone has {len(points)} graft point(s) "
            "(see ee attach --list-graft-points): ask for fewer"
        )
    return Placement([points[column] for _, column in pairs], notes + _moved_notes(points, pairs))


def _monotone_match(rows: list[float], columns: list[float]) -> list[int]:
    """Increasing column indices, one per sorted row (len(rows) <= len(columns)), minimising the
    total squared distance: dynamic programming over (rows matched, columns seen)."""
    inf = float("inf")
    best = [[0.0] * (len(columns) + 1)] + [[inf] * (len(columns) + 1) for _ in rows]
    for i, row in enumerate(rows, 1):
        for j in range(i, len(columns) + 1):
            best[i][j] = min(best[i][j - 1], best[i - 1][j - 1] + (row - columns[j - 1]) ** 2)
    picks, j = [], len(columns)
    for i in range(len(rows), 0, -1):
        while best[i][j] == best[i][j - 1]:
            j -= 1
        picks.append(j - 1)
        j -= 1
    return picks[::-1]


def _moved_notes(points: list[GraftPoint], pairs: list[tuple[float, int]]) -> list[str]:
    notes = []
    for fraction, column in pairs:
        nearest = min(points, key=lambda point: abs(point.relative_depth - fraction))
        chosen = points[column]
        if chosen is not nearest and abs(chosen.relative_depth - fraction) > abs(nearest.relative_depth - fraction):
            notes.append(
                f"exit at {fraction:g}: the nearest graft point {nearest.layer} ({nearest.relative_depth:.2f}) "
                f"serves another exit, so this one goes to {chosen.layer} ({chosen.relative_depth:.2f})"
            )
    return notes


def choose_by_name(model, points: list[GraftPoint], names: tuple[str, ...]) -> list[GraftPoint]:
    by_name = {point.layer: point for point in points}
    graph = layer_graph(model)
    maps = set(feature_maps(graph))
    total = cumulative_macs(graph, graph.order[-1])
    chosen = []
    for name in dict.fromkeys(names):
        if name in by_name:
            chosen.append(by_name[name])
        elif name not in graph.kinds:
            raise UserError(f"--exit-layers: no layer named {name!r} in the backbone")
        elif name not in maps:
            raise UserError(f"--exit-layers: {name} is inside a block; graft onto a block output such as {', '.join(list(by_name)[:4])}")
        else:
            chosen.append(_point(graph, name, total))
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
    nodes = model_nodes(backbone_model)
    outputs = [heads.build_head(head_kind, nodes[point.layer].outputs, num_classes, name) for name, point in zip(names, points)]
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
