"""The contract every registered replacement method meets, checked for each (the built-in ones and
``tests/example_method.py``, a method registered from outside the package): config round trip, build
from a conv, exactness where the method can be exact, MACs against a hand count, calibration does
not worsen the fit, optimize keeps the outputs, save/load, ONNX export."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import example_method  # noqa: F401  (registers the third-party "lowrank" method)
import leanconv
from leanconv import registry
from leanconv.calibrate.api import calibrate_block
from leanconv.calibrate.config import CalibrationConfig
from leanconv.errors import ConfigError
from leanconv.layers import ConvGeometry
from leanconv.measure import count
from leanconv.optimize.freeze import alternatives, freeze
from leanconv.recipes import LayerSpec, Recipe
from leanconv.registry import layer_config, layer_from_config

C, HW = 16, 8  # channels of the replaced conv, input size


def _ho(g: ConvGeometry, hw: int) -> int:
    return g.output_hw((hw, hw))[0]


def _topo_connections(n: int, rank: int, density) -> int:
    from leanconv.methods import Topology

    return Topology.auto(n, n, rank, density).connections


# Reference MACs per image of each method's replacement of a C -> C conv of geometry g (counted by
# hand here, independently of leanconv.measure): every registered method needs one.
def _ref_macs(spec: LayerSpec, g: ConvGeometry) -> int:
    p = _ho(g, HW) ** 2
    k2 = g.kernel_size[0] * g.kernel_size[1]
    if spec.name == "unravel":
        proj = C * spec.multiplier if not spec.topology else _topo_connections(C * spec.multiplier, spec.topology,
                                                                                 spec.density)
        return (C * spec.multiplier * k2 + C * proj) * p
    if spec.name == "sic":
        assert spec.bottleneck.value == "none" and not spec.topology, "contract config: plain SIC layers"
        return spec.depth * (C * spec.kernel ** 2 + C * C) * p
    if spec.name == "topo":
        return spec.depth * C * _topo_connections(C, spec.topology, spec.density) * k2 * p
    if spec.name == "group":
        return spec.depth * C * (C // spec.groups) * k2 * p
    if spec.name == "lowrank":
        return (C * k2 * spec.rank + spec.rank * C) * p
    raise AssertionError(f"no reference MAC count for method {spec.name!r}: add one to tests/test_methods.py")


# Settings under which a method is exact on any conv (None: it never is).
EXACT = {"unravel": {"multiplier": 9}, "topo": {"depth": 2, "topology": 1, "density": 1.0},
         "lowrank": {"rank": C * 9}, "sic": None, "group": None}


def _spec(cls) -> LayerSpec:
    """The method's first preset, else its defaults."""
    return cls.from_dict(dict(cls.presets[0].params)) if cls.presets else cls()


METHODS = [pytest.param(m, id=m.name) for m in registry.methods()]


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(C, C, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.mul_(3)
        conv.bias.normal_()
    return conv


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, C, HW, HW, generator=g), 3, 1, 1) * 3  # correlated pixels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_example_method_is_registered_from_outside():
    assert "lowrank" in [m.name for m in registry.methods()]
    assert example_method.LowRankConv in registry.layer_types()
    assert not example_method.__name__.startswith("leanconv")


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trip(method):
    spec = _spec(method)
    d = spec.to_dict()
    assert d["method"] == method.name
    assert LayerSpec.from_dict(d) == spec and LayerSpec(method.name, **spec.params()) == spec
    r = Recipe("x", "", spec)
    assert Recipe.from_dict(r.to_dict()).layer == spec
    with pytest.raises(ConfigError, match=r"layer\.no_such_field"):
        LayerSpec.from_dict({**d, "no_such_field": 1})


@pytest.mark.parametrize("method", METHODS)
def test_build_from_a_conv(method):
    conv, x = _conv(), _images(2, 1)
    block = _spec(method).build(conv)
    assert registry.is_layer(block)
    assert block(x).shape == conv(x).shape
    strided = nn.Conv2d(C, C, 3, stride=2, padding=1)
    assert _spec(method).build(strided)(x).shape == strided(x).shape


@pytest.mark.parametrize("method", METHODS)
def test_exact_where_the_method_can_be(method):
    exact = EXACT[method.name]
    if exact is None:
        pytest.skip(f"{method.name} is never exact")
    conv, x = _conv(), _images(4, 2)
    block = method.derive(_spec(method), **exact).build(conv).eval()
    with torch.no_grad():
        assert _rel(block(x), conv(x)) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_macs_match_a_hand_count(method):
    spec, conv = _spec(method), _conv()
    x = _images(1, 0)
    assert count(spec.build(conv), x).macs == _ref_macs(spec, ConvGeometry.of(conv))


@pytest.mark.parametrize("method", METHODS)
def test_calibration_does_not_worsen_the_fit(method):
    conv = _conv()
    block = _spec(method).build(conv).eval()
    with torch.no_grad():
        pairs = [(x, conv(x)) for x in (_images(8, s) for s in (3, 4))]
        before = sum(_rel(block(x), y) ** 2 for x, y in pairs)
    calibrate_block("conv", conv, block, pairs, CalibrationConfig(steps=30, seed=0))
    with torch.no_grad():
        after = sum(_rel(block(x), y) ** 2 for x, y in pairs)
    assert math.isfinite(after) and after <= before * (1 + 1e-6), (before, after)


def _model(method) -> tuple[nn.Module, torch.Tensor]:
    conv = _conv()
    net = nn.Sequential(nn.Conv2d(C, C, 1), _spec(method).build(conv), nn.BatchNorm2d(C), nn.ReLU()).eval()
    with torch.no_grad():
        net[2].running_mean.normal_()
        net[2].running_var.uniform_(0.5, 2)
    return net, _images(2, 5)


@pytest.mark.parametrize("method", METHODS)
def test_optimize_keeps_the_outputs(method):
    net, x = _model(method)
    with torch.no_grad():
        ref = net(x)
        fast = leanconv.optimize(net, x, autotune=False)
        assert _rel(fast(x), ref) < 1e-5
        block = net[1]
        y = block(x)
        for alt in alternatives(freeze(block)):  # every implementation autotune may choose
            assert _rel(alt(x), y) < 1e-5, alt.impl_name()


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load(method, tmp_path):
    from safetensors.torch import load_file, save_file

    block = _spec(method).build(_conv()).eval()
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, tmp_path / "w.safetensors")
    again = layer_from_config(layer_config(block)).eval()
    again.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert type(again) is type(block) and layer_config(again) == layer_config(block)
    x = _images(2, 6)
    with torch.no_grad():
        assert torch.equal(again(x), block(x))


@pytest.mark.parametrize("method", METHODS)
def test_onnx_export(method, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from leanconv.export import export_onnx

    net, x = _model(method)
    res = export_onnx(net, x, tmp_path / "m.onnx")
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
