"""Graft points, compute counting and exit placement."""

from __future__ import annotations

import numpy as np
import pytest

from ee_cli.graph import backbones, flops, graft
from ee_cli.base.errors import UserError


def graph(edges: dict[str, tuple[str, ...]], kinds: dict[str, str] | None = None) -> graft.LayerGraph:
    consumers = {name: tuple(c for c, sources in edges.items() if name in sources) for name in edges}
    order = graft._topological(list(edges), edges, consumers)
    return graft.LayerGraph(order, edges, consumers, kinds or {name: "Layer" for name in edges})


def test_articulation_layers_skip_the_inside_of_a_residual_block():
    # in -> a -> (b -> c) + a -> add -> d : b and c are bypassed by the skip edge a -> add.
    layers = graph({"in": (), "a": ("in",), "b": ("a",), "c": ("b",), "add": ("a", "c"), "d": ("add",)})
    assert graft.articulation_layers(layers) == {"in", "a", "add", "d"}


def test_articulation_layers_of_a_chain_are_every_layer():
    layers = graph({"in": (), "a": ("in",), "b": ("a",)})
    assert graft.articulation_layers(layers) == {"in", "a", "b"}


def test_cifar_resnet9_compute_matches_a_hand_count():
    model = backbones.cifar_resnet9(32, 10)
    conv = lambda cin, cout, side: cin * cout * 9 * side * side  # noqa: E731
    hand = (
        conv(3, 32, 32)  # prep
        + conv(32, 64, 32)  # layer1, then 2x2 max-pool
        + 2 * conv(64, 64, 16)  # layer1 residual
        + conv(64, 128, 16)  # layer2, then pool
        + conv(128, 256, 8)  # layer3, then pool
        + 2 * conv(256, 256, 4)  # layer3 residual
        + 256 * 10  # classifier
    )
    assert flops.model_macs(model) == hand == 95_259_136


def test_cifar_resnet9_graft_points_are_its_block_outputs():
    # prep_relu ends the stem's conv-BN-ReLU unit; layer1_relu..layer3_relu are skipped for the pool
    # right after them (no more compute, a smaller map).
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    assert [point.layer for point in points] == ["prep_relu", "layer1_pool", "layer1_add", "layer2_pool", "layer3_pool", "layer3_add"]
    depths = [point.relative_depth for point in points]
    assert depths == sorted(depths) and depths[-1] == pytest.approx(95_256_576 / 95_259_136)
    assert [point.shape for point in points][:3] == [(32, 32, 32), (16, 16, 64), (16, 16, 64)]


def test_fractions_take_the_nearest_block_output():
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    chosen = graft.choose_by_fraction(points, (0.8, 0.2, 0.4)).points
    assert [point.layer for point in chosen] == ["layer1_pool", "layer1_add", "layer3_pool"]


@pytest.mark.parametrize("fractions", [(0.0,), (1.5,), (-0.2,)])
def test_fractions_outside_the_unit_interval_are_refused(fractions):
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    with pytest.raises(UserError, match="fraction"):
        graft.choose_by_fraction(points, fractions)


def test_two_fractions_nearest_one_point_take_the_closest_distinct_points_and_say_so():
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))  # depths 0.01, 0.21, 0.41, 0.60, 0.80, 1.0
    placement = graft.choose_by_fraction(points, (0.22, 0.2))
    assert [point.layer for point in placement.points] == ["layer1_pool", "layer1_add"]
    assert len(placement.notes) == 1 and "0.22" in placement.notes[0] and "layer1_add" in placement.notes[0]
    assert graft.choose_by_fraction(points, (0.2, 0.4, 0.8)).notes == []


def test_more_exits_than_graft_points_is_refused_unless_the_fractions_are_the_defaults():
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))[:2]
    with pytest.raises(UserError, match="asks for 3 exits but this backbone has 2"):
        graft.choose_by_fraction(points, (0.25, 0.5, 0.75))
    placement = graft.choose_by_fraction(points, (0.25, 0.5, 0.75), fewer_ok=True)
    assert [point.layer for point in placement.points] == ["prep_relu", "layer1_pool"]
    assert "only 2 graft point" in placement.notes[0]


@pytest.mark.parametrize(
    ("fractions", "depths", "expected"),
    [
        ((0.5,), (0.4, 0.6), [0]),  # a tie goes to the shallower point
        ((0.25, 0.5, 0.75), (0.1, 0.45, 0.5, 0.55, 0.9), [0, 2, 4]),
        ((0.45, 0.5, 0.55), (0.1, 0.5, 0.6, 0.9), [0, 1, 2]),  # three want 0.5: least squares spreads them
        ((0.5, 0.5), (0.2, 0.49, 0.52, 0.8), [1, 2]),
        ((0.3, 0.6), (0.1, 0.2, 0.9), [1, 2]),
    ],
)
def test_exits_take_distinct_points_minimising_the_squared_distance(fractions, depths, expected):
    points = [graft.GraftPoint(f"p{index}", depth, int(depth * 100), (4, 4, 8)) for index, depth in enumerate(depths)]
    chosen = graft.choose_by_fraction(points, fractions).points
    assert [point.layer for point in chosen] == [f"p{index}" for index in expected]


def test_exit_layers_inside_a_block_are_refused():
    model = backbones.cifar_resnet9(32, 10)
    points = graft.graft_points(model)
    with pytest.raises(UserError, match="inside a block"):
        graft.choose_by_name(model, points, ("layer1_res1_relu",))
    with pytest.raises(UserError, match="no layer named"):
        graft.choose_by_name(model, points, ("nope",))
    assert [p.layer for p in graft.choose_by_name(model, points, ("layer2_relu", "layer1_pool"))] == ["layer1_pool", "layer2_relu"]


def test_exit_names_are_zero_padded_beyond_ten():
    assert graft.exit_names(3) == ["exit_0", "exit_1", "exit_2"]
    assert graft.exit_names(11)[0] == "exit_00" and graft.exit_names(11)[-1] == "exit_10"


@pytest.mark.parametrize(
    ("name", "reference_gmacs"),
    # tf_keras' ResNet50 is ResNet v1 (3.86 GMACs; torchvision's v1.5 is the 4.1 often quoted).
    [("resnet50", 3.86), ("mobilenet_v2", 0.30), ("efficientnet_b0", 0.39)],
)
def test_imagenet_backbones_compute_matches_the_reference(name, reference_gmacs):
    backbone = backbones.build_backbone(name, "none", 224, None)
    total = flops.model_macs(backbone.model)
    assert total / 1e9 == pytest.approx(reference_gmacs, rel=0.03)
    points = graft.graft_points(backbone.model)
    macs = [point.macs for point in points]
    assert len(points) >= 4 and macs == sorted(macs) and macs[-1] <= total
    placement = graft.choose_by_fraction(points, (0.25, 0.5, 0.75))
    depths = [point.relative_depth for point in placement.points]
    assert not placement.notes and all(abs(asked - depth) <= 0.1 for asked, depth in zip((0.25, 0.5, 0.75), depths)), depths



@pytest.mark.parametrize(("side", "channels", "grid"), [(16, 64, 4), (8, 128, 4), (4, 256, 4), (14, 96, 3), (28, 512, 2), (14, 1024, 2), (7, 2048, 1)])
def test_light_heads_keep_a_4x4_grid_on_narrow_maps_and_bound_wide_ones(side, channels, grid):
    from ee_cli.graph.heads import MAX_FEATURES, light_pool_size

    pool = light_pool_size(side, channels)
    assert side // pool == grid and grid * grid * channels <= max(MAX_FEATURES, channels)
    if channels >= 512:
        assert grid * pool == side  # the coarser grid of a wide map still covers all of it


def test_segments_replay_tf_op_layers_with_their_constants():
    # MobileNetV3's hard-swish is x * relu6(x + 3) / 6: TFOpLambda layers keep the 3 and 1/6 in their
    # call, not in their config, so a segment must call them as the model did.
    from ee_cli.base import compat
    from ee_cli.graph import stages

    keras = compat.keras()
    pixels = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(pixels)
    x = keras.layers.Multiply(name="hard_swish")([x, keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(pixels, logits)
    pixels = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    whole = stages.segment(model, None, ["logits"], "whole")(pixels)["logits"].numpy()
    tail = stages.segment(model, "conv", ["logits"], "tail")(model.get_layer("conv")(pixels))["logits"].numpy()
    np.testing.assert_allclose(whole, model(pixels).numpy(), rtol=1e-6)
    np.testing.assert_allclose(tail, whole, rtol=1e-6)


def two_path_cells(cells: int = 3, size: int = 16, classes: int = 3):
    """NASNet in miniature: each cell reads the two previous cells' outputs."""
    from ee_cli.base import compat

    keras = compat.keras()
    layers = keras.layers
    pixels = keras.Input((size, size, 3))
    x = previous = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(layers.Rescaling(1 / 255)(pixels))
    for index in range(cells):
        a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 1, name=f"cell{index}_a")(x)))
        b = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 1, name=f"cell{index}_b")(previous)))
        x, previous = layers.Concatenate(name=f"cell{index}_out")([a, b]), x
    logits = layers.Dense(classes, name="logits")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(pixels, layers.Activation("softmax")(logits))


def test_cells_that_read_two_previous_cells_are_cut_with_both_tensors():
    points = graft.graft_points(two_path_cells())
    assert [(point.layer, point.carries) for point in points] == [("cell0_out", "stem"), ("cell1_out", "cell0_out"), ("cell2_out", None)]
    assert [point.shape for point in points] == [(8, 8, 24), (8, 8, 32), (8, 8, 16)]  # the handoff packs both


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # VGG-style: conv layers with a built-in ReLU end a unit; the ReLU right before a pool is skipped.
        (lambda k: k.Sequential([k.Input((16, 16, 3)), k.layers.Conv2D(4, 3, activation="relu", name="c1"),
                                 k.layers.Conv2D(4, 3, activation="relu", name="c2"), k.layers.MaxPooling2D(name="p1"),
                                 k.layers.Conv2D(8, 3, activation="relu", name="c3"), k.layers.Flatten(), k.layers.Dense(3)]),
         ["c1", "p1", "c3"]),
        # An inverted residual: the wide activations inside are no graft points, the narrow projection is.
        (lambda k: k.Sequential([k.Input((16, 16, 3)), k.layers.Conv2D(8, 3, name="stem"), k.layers.ReLU(name="stem_relu"),
                                 k.layers.Conv2D(48, 1, name="expand"), k.layers.ReLU(name="expand_relu"),
                                 k.layers.DepthwiseConv2D(3, name="dw"), k.layers.ReLU(name="dw_relu"),
                                 k.layers.Conv2D(8, 1, name="project"), k.layers.BatchNormalization(name="project_bn"),
                                 k.layers.Conv2D(16, 1, name="top"), k.layers.ReLU(name="top_relu"),
                                 k.layers.GlobalAveragePooling2D(keepdims=True), k.layers.Conv2D(3, 1, name="head")]),
         ["stem_relu", "top_relu"]),
    ],
)
def test_plain_stacks_graft_after_each_unit_but_not_inside_an_expansion(build, expected):
    from ee_cli.base import compat

    keras = compat.keras()
    stack = build(keras)
    assert [point.layer for point in graft.graft_points(keras.Model(stack.inputs, stack.outputs))] == expected
