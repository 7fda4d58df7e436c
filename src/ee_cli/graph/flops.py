"""Compute of a tf_keras model, counted layer by layer from its real shapes.

MACs are multiply-adds of convolutions and dense layers (the figure papers quote); FLOPs = 2 x MACs,
as TF's profiler counts them. Elementwise layers (BatchNorm, activations, adds) are not counted.
"""

from __future__ import annotations

import math


def layer_macs(layer) -> int:
    kind = type(layer).__name__
    if kind in ("Conv2D", "Conv1D", "Conv3D"):
        return _outputs(layer) * math.prod(layer.kernel_size) * (int(layer.input_shape[-1]) // layer.groups)
    if kind == "DepthwiseConv2D":
        return _outputs(layer) * math.prod(layer.kernel_size)
    if kind == "SeparableConv2D":
        spatial = math.prod(int(d) for d in layer.output_shape[1:-1])
        depthwise_channels = int(layer.input_shape[-1]) * layer.depth_multiplier
        return spatial * depthwise_channels * (math.prod(layer.kernel_size) + int(layer.output_shape[-1]))
    if kind == "Conv2DTranspose":
        return math.prod(int(d) for d in layer.input_shape[1:]) * math.prod(layer.kernel_size) * layer.filters
    if kind == "Dense":
        return _outputs(layer) * int(layer.input_shape[-1])
    return 0


def _outputs(layer) -> int:
    return math.prod(int(d) for d in layer.output_shape[1:])


def model_macs(model) -> int:
    return sum(layer_macs(layer) for layer in model.layers)


def mflops(macs: float) -> float:
    return float(2 * macs / 1e6)
