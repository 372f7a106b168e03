"""Replacement layers: exactness where the math is exact, monotonic error, shapes, refusals."""
import itertools

import pytest
import torch
from torch import nn

from conftest import rel_err
from leanconv.errors import ConfigError
from leanconv.layers import ConvGeometry
from leanconv.methods import (SICStack, SpatialBottleneck, TopoConv2d, Topology, UnraveledConv,
                              grouped_stack, topological_stack)
from leanconv.registry import layer_config, layer_from_config
from leanconv.layers import functional as LF
from leanconv.measure import count

GEOMETRIES = [  # (ci, co, k, stride, padding, dilation)
    (16, 16, 3, 1, 1, 1),
    (16, 32, 3, 2, 1, 1),
    (16, 24, 5, 1, 2, 1),
    (16, 16, 3, 1, 2, 2),
    (16, 16, 3, 1, 0, 1),
    (16, 16, 3, (2, 1), (1, 0), 1),
]
SIZES = [(9, 7), (8, 8), (15, 12)]


def conv_of(ci, co, k, s, p, d, bias=True):
    return nn.Conv2d(ci, co, k, s, p, d, bias=bias)


def test_unravel_exact_at_full_rank():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 9, 7)
    err = rel_err(UnraveledConv.from_conv(conv, 9)(x), conv(x))
    assert err < 1e-5, f"max rel err {err}"


def test_unravel_error_non_increasing_in_b():
    w = nn.Conv2d(16, 16, 3).weight.detach()
    errs = []
    for b in range(1, 10):
        dw, proj = LF.unravel_svd(w, b)  # (16*b, 1, 3, 3), (16, 16*b)
        approx = (proj.view(16, 16, b, 1, 1) * dw.view(1, 16, b, 3, 3)).sum(2)  # (16, 16, 3, 3)
        errs.append(rel_err(approx, w))
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5 and errs[0] > 0.1


@pytest.mark.parametrize("dims", [(16,), (4, 4), (2, 4, 2)])
def test_topo_full_neighbourhood_is_exact(dims):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = TopoConv2d.from_conv(conv, Topology(dims, dims, dims))
    x = torch.randn(2, 16, 9, 7)
    err = rel_err(layer(x), conv(x))
    assert err < 1e-5, f"max rel err {err}"


def test_topo_matches_its_dense_equivalent_with_permutations():
    topo = Topology((4, 4), (4, 8), (2, 2))
    layer = TopoConv2d(16, 32, 3, topo, stride=2, padding=1)
    g = torch.Generator().manual_seed(1)
    layer.set_assignment(torch.randperm(16, generator=g), torch.randperm(32, generator=g))
    x = torch.randn(2, 16, 9, 9)
    dense = nn.functional.conv2d(x, layer.dense_weight(), layer.bias, 2, 1)
    assert (layer(x) - dense).abs().max() < 1e-5
    mask = layer.connection_mask()
    assert mask.sum() == 32 * 4 and (mask.sum(1) == 4).all()
    reloaded = TopoConv2d(16, 32, 3, topo, stride=2, padding=1)
    reloaded.set_assignment(layer.in_perm, layer.out_perm)
    reloaded.load_dense(layer.dense_weight().double())  # a fit in another dtype (or on another device)
    assert reloaded.weight.dtype == torch.float32 and torch.equal(reloaded.weight, layer.weight)


def test_grid_neighbours_follow_algorithm_3():
    out_dims, nbhd = (3, 4), (2, 3)
    idx = LF.grid_neighbours(out_dims, out_dims, nbhd)
    for j1, j2 in itertools.product(range(3), range(4)):
        # paper, 1-based: input (j + i - 2) % d + 1 for i = 1..c  ->  0-based (j + i) % d
        expect = {((j1 + i1) % 3) * 4 + (j2 + i2) % 4 for i1 in range(2) for i2 in range(3)}
        assert set(idx[j1 * 4 + j2].tolist()) == expect


def test_topology_refuses_bad_grids():
    with pytest.raises(ConfigError, match="hold"):
        Topology((4, 4), (4, 4), (2, 2)).check_channels(32, 16)
    with pytest.raises(ConfigError, match="does not fit"):
        Topology((4, 4), (4, 4), (5, 2))
    with pytest.raises(ConfigError, match="hold"):
        TopoConv2d(20, 16, 1, Topology((4, 4), (4, 4), (2, 2)))


def test_topology_auto_uses_paper_table_4():
    t = Topology.auto(256, 256, 2)
    assert (t.in_dims, t.nbhd) == ((16, 16), (8, 8))
    t = Topology.auto(512, 512, 3)
    assert (t.in_dims, t.nbhd) == ((8, 8, 8), (4, 5, 6))
    t = Topology.auto(64, 64, 2)  # not in the table: computed
    assert t.in_dims == (8, 8) and t.density == 0.25


def test_sic_refuses_even_kernel():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with pytest.raises(ConfigError, match="odd"):
        SICStack.from_conv(conv, kernel=4)


def builders():
    return {
        "unravel": lambda c: UnraveledConv.from_conv(c, 2),
        "unravel-topo": lambda c: UnraveledConv.from_conv(c, 2, Topology.auto(c.in_channels * 2, c.out_channels, 2)),
        "sic": lambda c: SICStack.from_conv(c, 3, 2),
        "sic5": lambda c: SICStack.from_conv(c, 5, 2),
        "sic-topo": lambda c: SICStack.from_conv(c, 3, 2, topology_rank=2),
        "sic-bottleneck": lambda c: SICStack.from_conv(c, 3, 2, bottleneck="full"),
        "sic-bottleneck-half": lambda c: SICStack.from_conv(c, 3, 2, bottleneck="half"),
        "topo3d": lambda c: topological_stack(c, 3),
        "group": lambda c: grouped_stack(c, 4),
    }


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("kind", list(builders()))
def test_output_shape_matches_conv(kind, geom):
    conv = conv_of(*geom)
    layer = builders()[kind](conv)
    for hw in SIZES:
        x = torch.randn(1, conv.in_channels, *hw)
        assert layer(x).shape == conv(x).shape, (kind, geom, hw)


@pytest.mark.parametrize("kind", list(builders()))
def test_config_round_trip_and_macs(kind):
    conv = nn.Conv2d(16, 32, 3, 2, 1)
    layer = builders()[kind](conv).eval()
    again = layer_from_config(layer_config(layer))
    again.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 11, 9)
    assert torch.equal(again.eval()(x), layer(x))
    assert layer_config(again) == layer_config(layer)
    # layers that state their own MACs agree with the hook counter
    if hasattr(layer, "macs"):
        assert layer.macs((11, 9)) == count(layer, x[:1]).macs


def test_bottleneck_keeps_odd_sizes_and_straddles():
    for offset in (0, 1):
        b = SpatialBottleneck(8, 8, 2, offset)
        for hw in [(7, 7), (1, 1), (2, 5), (14, 14)]:
            x = torch.randn(1, 8, *hw)
            assert b(x).shape == x.shape
    # the two offsets pool different 2x2 cells
    b0, b1 = SpatialBottleneck(1, 1, 2, 0, bias=False), SpatialBottleneck(1, 1, 2, 1, bias=False)
    for b in (b0, b1):
        b.init_smooth(torch.ones(1, 1))
    x = torch.zeros(1, 1, 4, 4)
    x[..., 1, 1] = 4.0
    assert b0(x)[0, 0, 0, 0] == 1.0 and b0(x)[0, 0, 2, 2] == 0.0
    assert b1(x)[0, 0, 0, 0] == 0.0 and b1(x)[0, 0, 1, 1] == 1.0 and b1(x)[0, 0, 2, 2] == 1.0


def test_sic_stack_structure_follows_algorithm_2():
    conv = nn.Conv2d(16, 32, 3, 2, 1)
    s = SICStack.from_conv(conv, 3, 3)
    assert s.residual == (False, True, True)  # first layer changes channels and stride
    assert s.layers[0].stride == (2, 2) and s.layers[1].stride == (1, 1)
    assert (s.in_channels, s.out_channels, s.kernel_size, s.stride) == (16, 32, (3, 3), (2, 2))
    s = SICStack.from_conv(nn.Conv2d(16, 16, 3, 1, 1), 3, 2)
    assert s.residual == (True, True)


def test_stack_starts_as_its_first_layer_when_relu_is_linear():
    """With a large shift the inner ReLUs are linear: the stack equals layer 0's fit of the conv."""
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    stack = SICStack.from_conv(conv, 3, 3, shift=torch.full((16,), 1e3))
    single = SICStack.from_conv(conv, 3, 1)
    assert (stack(x) - single(x)).abs().max() < 1e-3
    # and layer 0 of a residual stack fits conv - identity
    ident = SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1, bias=False), 3, 1)
    with torch.no_grad():
        ident.layers[0].project.weight.zero_()
    assert torch.allclose(ident(x), x)


def test_geometry_of_string_padding():
    g = ConvGeometry.of(nn.Conv2d(4, 4, 3, padding="same", dilation=2))
    assert g.padding == (2, 2)
    with pytest.raises(ConfigError):
        ConvGeometry.of(nn.Conv2d(4, 4, 4, padding="same"))


def test_layers_keep_dtype_and_padding_mode():
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect").double()
    for kind, build in builders().items():
        if kind in ("unravel-topo", "sic-topo", "topo3d"):
            continue  # grids of 8 channels: covered elsewhere
        layer = build(conv)
        assert next(layer.parameters()).dtype == torch.float64, kind
    u = UnraveledConv.from_conv(conv, 9)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    assert rel_err(u(x), conv(x)) < 1e-10
