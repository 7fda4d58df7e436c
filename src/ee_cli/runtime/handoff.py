"""Pack a two-tensor cut into one tensor, so that a staged cascade can cut there too.

A graft point that carries a second layer (NASNet: a cell reads the two previous cells' outputs)
becomes one tensor holding both outputs side by side on the channel axis, from which two channel
slices feed the rest of the network as before. The computation is unchanged; the handoff is an
articulation layer, so the cascade hands on a single tensor and the exit head sees both.

The handoff adds the two outputs zero-padded to the joint width rather than concatenating them:
int8 converters give a concatenation and its inputs one scale taken from one input, and a ReLU
cell output's range clipped the other tensor's negative values (int8 top-1 agreement with float
fell to 74 % on a NASNet-style model); an Add quantises each input on its own scale.
"""

from __future__ import annotations

from ee_cli.base import compat
from ee_cli.graph import graft, stages

HANDOFF_PREFIX = "ee_handoff_"


def pack(model, points: list[graft.GraftPoint]):
    """The model, rebuilt with a handoff at each point that carries a second layer, and the points
    moved onto their handoff layers. Layers upstream of every handoff keep their original calls."""
    carrying = [point for point in points if point.carries]
    if not carrying:
        return model, points
    keras = compat.keras()
    graph = graft.layer_graph(model)
    nodes = graft.model_nodes(model)
    tensors: dict = {}
    changed: set[str] = set()
    for point in carrying:
        _rebuild(graph, nodes, graft.ancestors(graph, [point.layer]), tensors, changed)
        handoff = _side_by_side(tensors[point.layer], tensors[point.carries], f"{HANDOFF_PREFIX}{point.layer}")
        split = int(tensors[point.layer].shape[-1])
        tensors[point.layer], tensors[point.carries] = handoff[..., :split], handoff[..., split:]
        changed |= {point.layer, point.carries}
    _rebuild(graph, nodes, set(graph.order), tensors, changed)
    output = tensors[graph.order[-1]]
    packed = keras.Model(model.inputs, output, name=model.name)
    moved = {point.layer: f"{HANDOFF_PREFIX}{point.layer}" for point in carrying}
    return packed, [_moved(point, moved) for point in points]


def _side_by_side(first, second, name: str):
    tf, keras = compat.tf(), compat.keras()
    width, extra = int(first.shape[-1]), int(second.shape[-1])
    padded_first = tf.pad(first, [[0, 0], [0, 0], [0, 0], [0, extra]])
    padded_second = tf.pad(second, [[0, 0], [0, 0], [0, 0], [width, 0]])
    return keras.layers.Add(name=name)([padded_first, padded_second])


def _rebuild(graph: graft.LayerGraph, nodes: dict, names: set[str], tensors: dict, changed: set[str]) -> None:
    """Fill `tensors` for `names` in topological order: a layer downstream of a handoff is called
    again on the new tensors; any other keeps its original output."""
    for name in graph.order:
        if name not in names or name in tensors:
            continue
        if changed.intersection(graph.producers[name]):
            tensors[name] = stages.replay(nodes[name], tensors)
            changed.add(name)
        else:
            tensors[name] = nodes[name].outputs


def _moved(point: graft.GraftPoint, moved: dict[str, str]) -> graft.GraftPoint:
    if point.layer not in moved:
        return point
    return graft.GraftPoint(moved[point.layer], point.relative_depth, point.macs, point.shape, "Add", point.carries)
