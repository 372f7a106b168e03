"""convert(): every family converts (or refuses with reasons), plans add up, untouched layers stay."""
import importlib
import math
import warnings

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import leanconv
from conftest import StdConv
from leanconv.methods import Topology
from leanconv.passes import LeafTracer, trace
from leanconv.recipes import LayerSpec, Method, Selection, list_recipes

RECIPES = [r.name for r in list_recipes()]


def tv(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kw).eval()


def converts(model, recipe, size=32, expect_some=True):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    converted, plan = leanconv.convert(model, recipe, x)
    converted.train()
    out = converted(x)
    logits = out[0] if isinstance(out, tuple) else out
    logits.square().mean().backward()
    assert all(p.grad is not None for n, p in converted.named_parameters() if p.requires_grad
               and any(n.startswith(l.name + ".") for l in plan.converted))
    converted.eval()
    with torch.no_grad():
        assert converted(x).shape == ref.shape
    assert all(l.converted or l.reason for l in plan.layers)
    if expect_some:
        assert plan.converted and plan.macs_after < plan.macs_before
    return converted, plan


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_families_convert_with_every_recipe(name, recipe):
    converts(tv(name), recipe)


@pytest.mark.parametrize("name", ["resnet50", "vgg13", "densenet121", "googlenet",
                                  "inception_v3"])
@pytest.mark.parametrize("recipe", ["sic-m2", "sic-topo2d", "sic-bottleneck"])
def test_other_families_convert(name, recipe):
    size = 80 if name == "inception_v3" else 32
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    converts(tv(name, **kw), recipe, size)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x0_5", "resnext50_32x4d",
                                  "regnet_x_400mf"])
def test_models_without_dense_kxk_convs_are_refused_layer_by_layer(name):
    _, plan = converts(tv(name), "sic-m2", expect_some=False)
    assert not plan.converted and plan.layers
    assert all(l.reason for l in plan.layers)


def test_untouched_layers_keep_keys_and_values():
    model = tv("resnet18")
    converted, plan = leanconv.convert(model, "sic-m2", torch.randn(1, 3, 32, 32))
    old, new = model.state_dict(), converted.state_dict()
    done = [l.name + "." for l in plan.converted]
    for k, v in old.items():
        if not any(k.startswith(p) for p in done):
            assert k in new and torch.equal(new[k], v), k
    assert type(converted) is type(model)
    assert all(isinstance(model.get_submodule(l.name), nn.Conv2d) for l in plan.converted)  # not in place


@pytest.mark.parametrize("recipe", ["sic-m2", "sic-topo2d", "sic-bottleneck", "topo3d"])
def test_converted_model_traces_again(recipe):
    converted, _ = leanconv.convert(tv("resnet18"), recipe, torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 33, 31)
    gm = trace(converted)
    assert torch.allclose(gm(x), converted(x))
    assert any(n.op == "call_module" and type(gm.get_submodule(n.target)).__module__.startswith("leanconv")
               for n in gm.graph.nodes)
    plain = torch.fx.symbolic_trace(converted)  # the replacement layers trace with the default tracer too
    assert torch.allclose(plain(x), converted(x))
    assert isinstance(LeafTracer(), torch.fx.Tracer)


def test_plan_totals_add_up_and_match_a_recount():
    model = tv("resnet18")
    x = torch.randn(1, 3, 64, 64)
    converted, plan = leanconv.convert(model, "sic-m3", x)
    conv = plan.converted
    assert plan.macs_after == plan.macs_before - sum(l.macs_before for l in conv) + sum(l.macs_after for l in conv)
    assert plan.params_after == plan.params_before - sum(l.params_before for l in conv) + sum(
        l.params_after for l in conv)
    assert plan.macs_after == leanconv.measure.count(converted, x).macs
    d = plan.to_dict()
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        assert key in d["totals"]
    for key in ("name", "method", "in_channels", "out_channels", "stride", "macs_before", "macs_after",
                "params_before", "params_after", "converted", "reason"):
        assert all(key in l for l in d["layers"])


def layer_formula(recipe: str, n: int, h: int, w: int) -> int:
    """The paper's cost of a converted n->n stride-1 3x3 layer at h x w, per image."""
    hw = h * w

    def bottleneck(offset):  # dw 2x2 s2, projection and transposed dw on ceil((o+h)/2) cells per axis
        cells = math.ceil((offset + h) / 2) * math.ceil((offset + w) / 2)
        return (4 * n + n * n + 4 * n) * cells

    sic = (9 * n + n * n) * hw
    c2 = Topology.auto(n, n, 2).connections
    c3 = Topology.auto(n, n, 3).connections
    return {"unravel-b4": 4 * (9 * n + n * n) * hw, "sic-m2": 2 * sic, "sic5-m2": 2 * (25 * n + n * n) * hw,
            "sic-m3": 3 * sic, "topo2d": 2 * 9 * n * c2 * hw, "topo3d": 2 * 9 * n * c3 * hw,
            "group4": 2 * 9 * n * n // 4 * hw, "sic-topo2d": 4 * (9 * n + n * c2) * hw,
            "sic-bottleneck-half": sic + bottleneck(0) + bottleneck(1),
            "sic-bottleneck": 2 * (bottleneck(0) + bottleneck(1))}[recipe]


# the paper's complexities (Tables 3, 5, 6); they leave out the depthwise and edge-cell terms
PAPER_RATIO = {"unravel-b4": 4 / 9, "sic-m2": 2 / 9, "sic-m3": 1 / 3, "topo2d": 1 / 2, "topo3d": 15 / 32,
               "group4": 1 / 2}


@pytest.mark.parametrize("recipe", RECIPES)
def test_resnet18_layer_macs_equal_the_paper_formulas(recipe):
    _, plan = leanconv.convert(tv("resnet18"), recipe, torch.randn(1, 3, 224, 224))
    same = [l for l in plan.converted if l.in_channels == l.out_channels and l.stride == [1, 1]]
    assert len(same) == 13  # 4 in layer1, 3 in each later stage
    for l in same:
        assert l.macs_after == layer_formula(recipe, l.in_channels, *l.output_shape[1:]), l.name
    ratio = sum(l.macs_after for l in same) / sum(l.macs_before for l in same)
    if recipe in PAPER_RATIO:
        assert ratio == pytest.approx(PAPER_RATIO[recipe], rel=0.10)


def test_selection_rules():
    model = tv("resnet18")
    x = torch.randn(1, 3, 32, 32)
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(exclude=("layer4.*",), convert_strided=False,
                                                                   min_channels=128))
    by = {l.name: l for l in plan.layers}
    assert "first conv" in by["conv1"].reason
    assert "excluded" in by["layer4.1.conv1"].reason
    assert "stride" in by["layer3.0.conv1"].reason
    assert "min_channels" in by["layer1.0.conv1"].reason
    assert by["layer3.0.conv2"].converted
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(skip_first=False, min_channels=0))
    assert {l.name: l for l in plan.layers}["conv1"].converted


def test_pattern_matching_nothing_warns():
    with pytest.warns(UserWarning, match="matches no conv"):
        leanconv.convert(tv("resnet18"), "sic-m2", torch.randn(1, 3, 32, 32), select=Selection(include=("nope.*",)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = self.body(x)
        return self.head(x)


def test_untraceable_model_falls_back_to_module_swap_and_says_so():
    with pytest.warns(UserWarning, match="cannot trace"):
        converted, plan = leanconv.convert(Untraceable(), "sic-m2", torch.randn(1, 3, 16, 16))
    assert not plan.traced and "cannot trace" in plan.trace_note
    assert [l.name for l in plan.converted] == ["body", "head"]
    assert converted(torch.randn(1, 3, 16, 16)).shape == (1, 16, 16, 16)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x)) + self.b.weight.mean()


class UntraceableReadsWeight(Untraceable):
    def forward(self, x):
        return super().forward(x) * self.head.weight.mean()


def test_untraceable_model_that_breaks_after_swapping_is_one_clear_error():
    with pytest.raises(leanconv.ModelError, match="does not run after conversion.*exclude"):
        with pytest.warns(UserWarning):
            leanconv.convert(UntraceableReadsWeight(), "sic-m2", torch.randn(1, 3, 16, 16))


def test_conv_whose_weight_is_read_elsewhere_is_kept():
    _, plan = leanconv.convert(ReadsWeight(), "sic-m2", torch.randn(1, 16, 8, 8),
                               select=Selection(skip_first=False))
    by = {l.name: l for l in plan.layers}
    assert by["a"].converted and not by["b"].converted and "read outside" in by["b"].reason


def test_replacement_that_cannot_represent_a_layer_is_skipped_with_its_reason():
    model = nn.Sequential(nn.Conv2d(3, 18, 3, padding=1), nn.Conv2d(18, 18, 3, padding=1))
    _, plan = leanconv.convert(model, "group4", torch.randn(1, 3, 8, 8), select=Selection(min_channels=0))
    assert "groups do not divide" in plan.layers[1].reason



def test_replacement_costing_more_than_the_conv_is_refused():
    """A topological stack on a conv that widens 16 -> 256 channels: its second layer is 256 wide."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 256, 3, padding=1), nn.Conv2d(256, 256, 3))
    _, plan = leanconv.convert(model, "topo2d", torch.randn(1, 3, 8, 8))
    by = {l.name: l for l in plan.layers}
    assert not by["1"].converted and "not fewer than the conv's" in by["1"].reason
    assert by["2"].converted and by["2"].macs_after < by["2"].macs_before
    exact = LayerSpec(Method.UNRAVEL, multiplier=9)  # costs more than the conv, but asked for by name
    _, plan = leanconv.convert(model, "topo2d", torch.randn(1, 3, 8, 8), layers={"1": exact})
    assert plan.layers[1].converted and plan.layers[1].macs_after > plan.layers[1].macs_before
    _, plan = leanconv.convert(model, "topo2d", torch.randn(1, 3, 8, 8), select=Selection(only_cheaper=False))
    assert plan.layers[1].converted


def test_min_speedup_keeps_convs_whose_replacement_is_not_measured_faster(monkeypatch):
    """The selection rule, with the timings set: below the threshold the conv is kept with the
    measurement as its reason; at or above it the layer converts and the plan records the timing."""
    from leanconv.measure.latency import LayerSpeed

    convert_module = importlib.import_module("leanconv.convert")  # the module; leanconv.convert is the function

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1),
                          nn.Conv2d(32, 32, 3, padding=1))
    timed = []

    def fake(conv, new, shape, batch):
        timed.append((tuple(shape), batch))
        return LayerSpeed(conv_ms=2.0, new_ms=4.0 if conv.in_channels == 16 else 1.0, batch=batch, threads=1,
                          device="cpu")

    monkeypatch.setattr(convert_module, "layer_speed", fake)
    x = torch.randn(2, 3, 8, 8)
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(min_speedup=1.5))
    by = {l.name: l for l in plan.layers}
    assert timed == [((16, 8, 8), 2), ((32, 8, 8), 2)]
    assert not by["1"].converted and "0.50x the conv's speed" in by["1"].reason and "min_speedup" in by["1"].reason
    assert by["2"].converted and by["2"].speed["speedup"] == 2.0 and by["2"].speed["batch"] == 2
    assert "measured 2.00x" in plan.table()
    assert plan.recipe_config["select"]["min_speedup"] == 1.5  # the selection used, not the recipe's
    assert leanconv.ConversionPlan.from_dict(plan.to_dict()).layers[2].speed == by["2"].speed
    timed.clear()
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(min_speedup=1.5, speed_batch=8),
                               layers={"1": LayerSpec(Method.SIC, depth=2)})  # named: taken as asked, not timed
    assert timed == [((32, 8, 8), 8)] and plan.layers[1].converted and plan.layers[1].speed is None
    timed.clear()
    _, plan = leanconv.convert(model, "sic-m2", x)  # off by default: nothing timed
    assert timed == [] and all(l.speed is None for l in plan.layers)


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["sic-m2", "unravel-b4", "sic-bottleneck", "sic-topo2d"])
def test_a_model_on_cuda_is_converted_and_timed_there(recipe):
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    converted, plan = leanconv.convert(model, recipe, x, select=Selection(min_speedup=1e-3, speed_batch=2))
    assert plan.converted and all(p.is_cuda for p in converted.parameters())
    assert all(l.speed["device"].startswith("cuda") for l in plan.layers if l.converted)
    with torch.no_grad():
        assert converted.eval()(x).shape == (2, 10)


def test_min_speedup_times_real_layers():
    """Real timings: every replacement is slower than 99x its conv's speed, and every one is
    faster than 0.001x; the recorded times are positive and at the asked batch."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(min_speedup=99))
    assert not plan.layers[1].converted and "min_speedup = 99" in plan.layers[1].reason
    _, plan = leanconv.convert(model, "sic-m2", x, select=Selection(min_speedup=0.001, speed_batch=2))
    s = plan.layers[1].speed
    assert plan.layers[1].converted and s["conv_ms"] > 0 and s["new_ms"] > 0 and s["batch"] == 2


@pytest.mark.parametrize("bad", [{"min_speedup": -1}, {"min_speedup": "fast"}, {"min_speedup": True},
                                 {"speed_batch": -2}, {"speed_batch": 1.5}])
def test_bad_speed_selection_is_refused(bad):
    with pytest.raises(leanconv.ConfigError, match="select\\."):
        Selection.from_dict(bad)


def test_data_free_start_keeps_a_bn_network_close():
    """SIC stacks start linear (BN-derived shift): the unravel-like start is a fair approximation."""
    model = tv("resnet18")
    x = torch.randn(4, 3, 32, 32)
    conv, _ = leanconv.convert(model, "unravel-b4", x)
    y0, y1 = model(x), conv(x)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()


class PadSameConv(nn.Conv2d):
    """Pads its input by its size (as timm's Conv2dSame): no fixed padding reproduces it."""

    def forward(self, x):
        pad = max((-(-x.shape[-1] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-1], 0)
        x = nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclass_is_converted_as_the_kernel_its_forward_applies():
    torch.manual_seed(0)
    std = StdConv(16, 16, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), std, nn.ReLU(),
                          PadSameConv(16, 16, 3, stride=2)).eval()
    x = torch.randn(2, 3, 12, 12)
    h = torch.randn(1, 16, 6, 6)
    with torch.no_grad():  # the kernel .weight holds is not the one applied
        assert not torch.allclose(std(h), nn.functional.conv2d(h, std.weight, std.bias, padding=1), atol=1e-3)
    exact = LayerSpec(Method.UNRAVEL, multiplier=9)  # 9 filters per input channel: any 3x3 kernel, exactly
    converted, plan = leanconv.convert(model, "unravel-b4", x, layers={"2": exact})
    by = {l.name: l for l in plan.layers}
    assert by["2"].converted
    assert not by["4"].converted and "PadSameConv transforms its input" in by["4"].reason
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > -1e9 else -x  # data-dependent control flow: not traceable


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate = nn.Conv2d(3, 16, 3, padding=1), Gate()
        self.body, self.bn = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(self.body(self.gate(self.stem(x))))


def test_library_registered_untraceable_modules_are_kept_whole(monkeypatch):
    """timm registers its untraceable modules; tracing falls back to keeping those whole."""
    trace_mod = importlib.import_module("leanconv.passes.trace")
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="cannot trace"):
        assert not leanconv.convert(GatedNet(), "sic-m2", x)[1].traced
    monkeypatch.setattr(trace_mod, "library_hints", lambda: ((Gate,), ()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, plan = leanconv.convert(GatedNet(), "sic-m2", x)
    assert plan.traced and [l.name for l in plan.converted] == ["body"]
