"""Cut a flat multi-exit model into sub-models: the network up to an exit, and the stages of a
cascade (stage k: the previous graft point's activations in -> the next graft point's activations
and exit k's probabilities out), so an engine can stop early without recomputing shared layers.

The sub-models reuse the bundle's layer objects (weights shared, nothing copied).
"""

from __future__ import annotations

from ee_cli.base import compat
from ee_cli.graph.graft import LayerGraph, ancestors, layer_graph, model_nodes


def _resolve(graph: LayerGraph, name: str) -> str:
    """A layer's name, or that of its tfmot wrapper (quantize_apply renames wrapped layers quant_*)."""
    return name if name in graph.producers else f"quant_{name}"


def segment(model, start: str | None, ends: list[str], name: str, softmax: tuple[str, ...] = ()):
    """A Keras model from the output of layer `start` (or the model input) to the layers `ends`.

    Outputs listed in `softmax` get a softmax, so engines threshold probabilities.
    """
    keras = compat.keras()
    inputs, tensors = segment_tensors(model, start, ends)
    outputs = {}
    for end, tensor in zip(ends, tensors):
        if end in softmax:
            tensor = keras.layers.Softmax(name=f"{end}_probabilities")(tensor)
        outputs[end] = tensor
    return keras.Model(inputs, outputs, name=name)


def segment_tensors(model, start: str | None, ends: list[str], graph: LayerGraph | None = None, inputs=None):
    """The layers `ends` computed from the output of layer `start` (or from the model input) by
    calling the model's layers again, and that input: `inputs` if given (a tensor, traced or eager),
    else a new Keras input (`graph`: the model's, if already built)."""
    keras = compat.keras()
    graph = graph or layer_graph(model)
    start = _resolve(graph, start) if start is not None else None
    resolved = [_resolve(graph, end) for end in ends]
    needed = ancestors(graph, resolved)
    if start is None:
        start_layer = model.layers[0]
        inputs = keras.Input(tuple(model.input_shape[1:]), name="pixels") if inputs is None else inputs
        skip = {start_layer.name}
    else:
        inputs = keras.Input(tuple(model.get_layer(start).output.shape[1:]), name="features") if inputs is None else inputs
        skip = ancestors(graph, [start])
    tensors = {start or model.layers[0].name: inputs}
    nodes = model_nodes(model)
    for layer_name in graph.order:
        if layer_name not in needed or layer_name in skip:
            continue
        tensors[layer_name] = replay(nodes[layer_name], tensors)
    return inputs, [tensors[end] for end in resolved]


def replay(node, tensors: dict):
    """Call the node's layer again as it was called, with `tensors` (by producing layer name) in
    place of its input tensors: TFOpLambda layers (MobileNetV3's `x + 3`, slices) keep their
    constants in the call's arguments, not in the layer's config."""
    tf = compat.tf()

    def swap(value):
        history = getattr(value, "_keras_history", None)
        if history is None:
            return value
        produced = tensors[history.layer.name]
        return produced[history.tensor_index] if isinstance(produced, (list, tuple)) else produced

    args = tf.nest.map_structure(swap, node.call_args)
    kwargs = tf.nest.map_structure(swap, node.call_kwargs)
    return node.layer(*args, **kwargs)


def cascade_stages(model, graft_layers: list[str], exit_names: list[str]):
    """One stage per enabled exit, then a last stage to the final exit."""
    stages, start = [], None
    for index, (graft, exit_name) in enumerate(zip(graft_layers, exit_names)):
        stages.append(segment(model, start, [graft, exit_name], f"stage_{index}", softmax=(exit_name,)))
        start = graft
    stages.append(segment(model, start, ["final"], f"stage_{len(graft_layers)}", softmax=("final",)))
    return stages
