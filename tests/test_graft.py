"""Graft points, compute counting and exit placement."""

from __future__ import annotations

import pytest

from ee_cli import backbones, flops, graft
from ee_cli.errors import UserError


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
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    assert [point.layer for point in points] == ["layer1_pool", "layer1_add", "layer2_pool", "layer3_pool", "layer3_add"]
    depths = [point.relative_depth for point in points]
    assert depths == sorted(depths) and depths[-1] == pytest.approx(95_256_576 / 95_259_136)
    assert [point.shape for point in points][:2] == [(16, 16, 64), (16, 16, 64)]


def test_fractions_take_the_nearest_block_output():
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    chosen = graft.choose_by_fraction(points, (0.8, 0.2, 0.4))
    assert [point.layer for point in chosen] == ["layer1_pool", "layer1_add", "layer3_pool"]


@pytest.mark.parametrize("fractions", [(0.0,), (1.5,), (-0.2,)])
def test_fractions_outside_the_unit_interval_are_refused(fractions):
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    with pytest.raises(UserError, match="fraction"):
        graft.choose_by_fraction(points, fractions)


def test_two_fractions_on_one_block_output_are_refused():
    points = graft.graft_points(backbones.cifar_resnet9(32, 10))
    with pytest.raises(UserError, match="both land on"):
        graft.choose_by_fraction(points, (0.2, 0.22))


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



@pytest.mark.parametrize(("side", "channels", "grid"), [(16, 64, 4), (8, 128, 4), (4, 256, 4), (14, 96, 3), (28, 512, 2), (14, 1024, 2), (7, 2048, 1)])
def test_light_heads_keep_a_4x4_grid_on_narrow_maps_and_bound_wide_ones(side, channels, grid):
    from ee_cli.heads import MAX_FEATURES, light_pool_size

    pool = light_pool_size(side, channels)
    assert side // pool == grid and grid * grid * channels <= max(MAX_FEATURES, channels)
    if channels >= 512:
        assert grid * pool == side  # the coarser grid of a wide map still covers all of it
