"""optimize(): outputs unchanged (folding, fusion, implementation choice); topological implementations exact."""
import copy
import importlib
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
from conftest import StdConv
from leanconv.demo.teacher import fmnist_resnet
from leanconv.errors import ConfigError
from leanconv.methods import SICStack, SpatialBottleneck, TopoConv2d, Topology
from leanconv.layers.functional import topo_conv_reference
from leanconv.methods.topo.impl import TopoImpl, band_candidates, band_plan, cyclic_cover
from leanconv.optimize.freeze import alternatives, freeze
from leanconv.optimize.ops import StackOp, portable

RECIPES = [r.name for r in leanconv.list_recipes()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def randomize_norms(model: nn.Module, negative: bool = False) -> nn.Module:
    """Non-trivial eval-mode BatchNorms (with some negative scales if asked)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                if negative:
                    m.weight[::3].neg_()
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def small_model():
    return randomize_norms(fmnist_resnet(width=16))


# --------------------------------------------------------------------------- topological implementations

@pytest.mark.parametrize("ci,co,rank,k,stride,pad", [(64, 64, 2, 1, 1, 0), (32, 64, 2, 1, 1, 0), (64, 32, 3, 1, 1, 0),
                                                   (24, 36, 1, 1, 1, 0), (32, 32, 2, 3, 1, 1), (32, 64, 3, 3, 2, 1)])
@pytest.mark.parametrize("permuted", [False, True])
def test_topo_impls_exact(ci, co, rank, k, stride, pad, permuted):
    layer = TopoConv2d(ci, co, k, Topology.auto(ci, co, rank), stride, pad)
    with torch.no_grad():
        layer.bias.normal_()
    if permuted:
        layer.set_assignment(torch.randperm(ci), torch.randperm(co))
    x = torch.randn(2, ci, 7, 9).to(memory_format=torch.channels_last)
    ref = topo_conv_reference(x, layer.weight, layer.sources, layer.out_perm, layer.bias, layer.stride,
                              layer.padding, layer.dilation)
    plans = band_candidates(layer.neighbours, ci)
    assert plans, "a topology at density <= 1/4 must have tilings that save MACs"
    tried = 0
    for impl in TopoImpl:
        tiled = impl in (TopoImpl.BANDS, TopoImpl.BATCHED, TopoImpl.GROUPED)
        if k != 1 and impl in (TopoImpl.BANDS, TopoImpl.BATCHED):
            with pytest.raises(ConfigError):
                layer.set_impl(impl)
            continue
        for plan in plans if tiled else [None]:
            if impl is TopoImpl.BATCHED and plan.step is None:
                continue
            layer.set_impl(impl, plan.tile if plan else None)
            y = layer(x)
            assert (y - ref).abs().max() < 1e-5, f"{impl} tile={plan and plan.tile}: {(y - ref).abs().max():.2e}"
            tried += 1
    assert tried >= 3


def test_tiled_impl_is_differentiable_like_the_reference():
    layer = TopoConv2d(64, 64, 1, Topology.auto(64, 64, 2))
    x = torch.randn(2, 64, 5, 5)
    grads = []
    for impl in ("gather", "bands"):
        layer.set_impl(impl)
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append(layer.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() < 1e-4


def test_band_plan_skips_connections():
    assert cyclic_cover([14, 15, 0, 1], 16) == (14, 4)
    assert cyclic_cover([3, 5], 16) == (3, 3)
    layer = TopoConv2d(256, 256, 1, Topology.auto(256, 256, 2))  # 16x16 grid, 8x8 windows
    plan = band_plan(layer.neighbours, 256, 16)  # one grid row of outputs per tile
    assert plan.width == 128 and plan.tiles == 16 and plan.step == 16
    assert plan.density == 0.5  # a dense product per tile multiplies half the connections
    assert all(p.width < 256 for p in band_candidates(layer.neighbours, 256))


# --------------------------------------------------------------------------- optimize keeps the function

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("recipe", ["original"] + RECIPES)
def test_optimize_matches_unoptimized(recipe, device):
    base = small_model()
    x = torch.randn(3, 1, 28, 28)
    model = base if recipe == "original" else randomize_norms(leanconv.convert(base, recipe, x[:1])[0])
    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        ref = model(x)
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        y = opt(x)
        with portable():
            y_portable = opt(x)
    assert type(opt) is type(model)
    assert rel_err(y, ref) < 1e-5, f"{recipe}: rel err {rel_err(y, ref):.2e}"
    assert rel_err(y_portable, ref) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.modules()), "every BN here follows a conv"
    assert model.training is False and ref.shape == y.shape
    assert all(p.device.type == device for p in opt.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimize_half_precision_on_cuda_stays_close(dtype):
    base = small_model()
    x = torch.randn(8, 1, 28, 28)
    model = randomize_norms(leanconv.convert(base, "sic-m2", x[:1])[0]).cuda()
    with torch.no_grad():
        ref = model(x.cuda())
        opt = leanconv.optimize(copy.deepcopy(model).to(dtype), x.cuda().to(dtype), repeats=1, guard=False)
        y = opt(x.cuda().to(dtype)).float()
    assert rel_err(y, ref) < (2e-2 if dtype is torch.bfloat16 else 5e-3), f"{dtype}: rel err {rel_err(y, ref):.2e}"


def test_negative_bn_scales_and_internal_norms_fold_exactly():
    conv = nn.Conv2d(32, 32, 3, padding=1)
    for kw in ({"depth": 3, "norm": True}, {"depth": 2, "bottleneck": "full"}):
        stack = SICStack.from_conv(conv, **kw)
        model = randomize_norms(nn.Sequential(stack, nn.BatchNorm2d(32), nn.ReLU()), negative=True)
        if stack.norms is not None:
            randomize_norms(stack, negative=True)
        x = torch.randn(2, 32, 9, 9)
        with torch.no_grad():
            ref = model(x)
            opt = leanconv.optimize(model, x, repeats=1, guard=False)
            # a ChunkedOp may wrap it, or the fused CPU stack kernel replace it (its ref: the StackOp)
            assert isinstance(getattr(opt[0], "inner", getattr(opt[0], "ref", opt[0])), StackOp)
            assert isinstance(opt[1], nn.Identity) and isinstance(opt[2], nn.Identity)
            assert opt[0].relu, "the ReLU after the BN is fused into the stack's last op"
            assert rel_err(opt(x), ref) < 1e-5


class SharedBN(nn.Module):
    """The conv's output is read twice: its BN must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(self.bn(y)) + y


def test_bn_stays_when_conv_output_is_shared():
    model = randomize_norms(SharedBN())
    x = torch.randn(2, 8, 6, 6)
    opt = leanconv.optimize(model, x, repeats=1, guard=False)
    assert isinstance(opt.bn, nn.BatchNorm2d) and isinstance(opt.relu, nn.ReLU)
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-6


def test_shared_relu_is_not_removed():
    model = small_model()  # its blocks call self.relu twice
    opt = leanconv.optimize(model, autotune=False)
    assert all(isinstance(b.relu, nn.ReLU) for b in opt.modules() if hasattr(b, "relu") and isinstance(b, nn.Module)
               and type(b).__name__ == "BasicBlock")


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (9, 9), (7, 10), (8, 9)])
@pytest.mark.parametrize("k, offset", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
def test_bottleneck_without_pad_copies_is_exact(size, k, offset):
    layer = SpatialBottleneck(16, 16, k, offset)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(2, 16, *size)
    res = torch.randn(2, 16, *size)
    with torch.no_grad():
        ref = layer(x)
        for alt in alternatives(freeze(layer)):  # oneDNN deconv, and a broadcast multiply-add
            assert rel_err(alt(x.to(memory_format=torch.channels_last)), ref) < 1e-5, alt.impl_name()
            alt.relu = True
            assert rel_err(alt(x, res), F.relu(ref + res)) < 1e-5, alt.impl_name()


def test_every_alternative_is_exact_and_choice_is_recorded():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    stack = SICStack.from_conv(conv, depth=2, topology_rank=2)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        op = freeze(stack.eval())
        ref = stack(x)
        for i, unit in enumerate(op.ops):
            inp = x if i == 0 else torch.randn_like(x)
            res = inp if op.residual[i] else None
            alts = alternatives(unit)
            assert len(alts) >= 4  # dense, split with topology tiled several ways, folded dense
            outs = [a(inp, res) for a in alts]
            for a, o in zip(alts, outs):
                assert rel_err(o, outs[0]) < 1e-5, a.impl_name()
        opt = leanconv.optimize(nn.Sequential(stack), x, repeats=1, guard=False)
        assert rel_err(opt(x), ref) < 1e-5
    choices = leanconv.implementation_choices(opt)
    assert all(c.chosen in dict(c.timings) for c in choices)
    # the layers' choices (the whole stack may then run in chunks, or as one fused CPU kernel)
    ops = [c for c in choices if ".ops." in c.name]
    assert len(ops) == 2 and all(len(c.timings) >= 4 for c in ops)


def test_optimize_does_not_touch_the_input_model():
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    leanconv.optimize(model, torch.randn(1, 1, 28, 28), repeats=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_untraceable_model_keeps_its_norms_and_warns():
    model = randomize_norms(Untraceable())
    x = torch.randn(2, 4, 5, 5)
    with pytest.warns(UserWarning, match="unfolded"):
        opt = leanconv.optimize(model, x, repeats=1)
    assert isinstance(opt.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-6



class WithConv3d(nn.Module):
    """A 2-D network with a Conv3d inside (as timm's lambda layers): 5-D weights stay as they are."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pos = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y + self.pos(y.unsqueeze(1)).mean(1)


def test_model_with_5d_weights_is_optimized():
    model = randomize_norms(WithConv3d())
    x = torch.randn(2, 4, 6, 6)
    opt = leanconv.optimize(model, x, repeats=1, guard=False)
    assert isinstance(opt.bn, nn.Identity) and opt.pos.weight.dim() == 5
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-5


# --------------------------------------------------------------------------- conv implementations, guard

@pytest.mark.parametrize("groups,k,stride", [(1, 3, 1), (16, 3, 2), (1, 1, 1)])
def test_conv_impls_exact_with_epilogue_and_packed_weight(groups, k, stride):
    from leanconv.optimize.ops import ConvOp

    g = torch.Generator().manual_seed(0)
    op = ConvOp(torch.randn(16, 16 // groups, k, k, generator=g), torch.randn(16, generator=g), stride, k // 2,
                groups=groups)
    x = torch.randn(2, 16, 9, 9, generator=g).to(memory_format=torch.channels_last)
    y0 = F.conv2d(x, op.weight, op.bias, stride, k // 2, 1, groups)
    res, scale = torch.randn_like(y0), torch.rand(16, generator=g) + 0.5
    with torch.no_grad():
        op(x)  # packs the weight
        packed = copy.deepcopy(op)  # the cached oneDNN weight is dropped by copies and rebuilt
        for alt in alternatives(op):
            assert rel_err(alt(x), y0) < 1e-5, alt.impl_name()
            alt.relu, alt.res_scale = True, scale
            assert rel_err(alt(x, res), F.relu(y0 + res * scale.view(1, -1, 1, 1))) < 1e-5, alt.impl_name()
        assert {a.impl for a in alternatives(op)} == set(ConvOp.IMPLS)
        packed.scale_output(torch.full((16,), 2.0), torch.zeros(16))  # and rebuilt after a weight change
        assert rel_err(packed(x), 2 * y0) < 1e-5


def test_guard_returns_the_unoptimized_model_when_it_is_faster(monkeypatch):
    pipeline = importlib.import_module("leanconv.optimize.pipeline")  # leanconv.optimize is the function
    model = small_model()
    x = torch.randn(2, 1, 28, 28)
    monkeypatch.setattr(pipeline, "_faster", lambda *a, **k: False)
    with pytest.warns(UserWarning, match="unoptimized model measured faster"):
        opt = leanconv.optimize(model, x, repeats=1)
    assert opt is not model and any(isinstance(m, nn.BatchNorm2d) for m in opt.modules()) and not opt.training
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-6


@pytest.mark.parametrize("kind", ["sic", "unravel", "bottleneck", "topo", "conv"])
def test_chunked_units_are_exact(kind):
    """A unit run a few images at a time (the last conv writing into the output) equals the unit."""
    from leanconv.methods import UnraveledConv
    from leanconv.optimize.ops import ChunkedOp

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = {"sic": lambda: SICStack.from_conv(conv, depth=2),
             "unravel": lambda: UnraveledConv.from_conv(conv, 2),
             "bottleneck": lambda: SICStack.from_conv(conv, depth=2, bottleneck="full"),
             "topo": lambda: SICStack.from_conv(nn.Conv2d(64, 64, 3, padding=1), depth=2, topology_rank=2),
             "conv": lambda: conv}[kind]()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        op = freeze(layer.eval())
        op.relu = True
        x = torch.randn(5, op.in_channels, 9, 9).to(memory_format=torch.channels_last)
        ref = op(x)
        for chunk in (1, 2, 4):
            y = ChunkedOp(op, chunk)(x)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert rel_err(y, ref) < 1e-5, (kind, chunk)


def test_unraveled_layer_split_into_multiplier_one_convs_is_exact():
    """b depthwise convs of multiplier 1, each projected and summed, equal the unraveled layer
    (with residual, residual scale, ReLU, and affine maps folded in afterwards)."""
    from leanconv.methods import UnraveledConv
    from leanconv.methods.split import SplitSumOp

    torch.manual_seed(0)
    layer = UnraveledConv.from_conv(nn.Conv2d(8, 12, 3, padding=1, stride=2), 3).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        op = freeze(layer)
        op.relu, op.res_scale = True, torch.rand(12) + 0.5
        summed = [a for a in alternatives(op) if isinstance(a, SplitSumOp)]
        assert len(summed) == 1 and len(summed[0].depthwise) == 3
        x = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
        res = torch.randn(2, 12, 5, 5)
        assert rel_err(summed[0](x, res), op(x, res)) < 1e-5
        a, b, s = torch.rand(12) + 0.5, torch.randn(12), torch.rand(8) + 0.5
        for o in (op, summed[0]):
            o.scale_output(a, b)
            o.scale_input(s)
        assert rel_err(summed[0](x, res), op(x, res)) < 1e-5
        assert SplitSumOp.from_split(freeze(SICStack.from_conv(nn.Conv2d(8, 8, 3, padding=1)).layers[0])) is None


def test_equal_ops_are_timed_once(monkeypatch):
    """Repeated blocks of the same shape reuse the first one's timing and choice."""
    autotune = importlib.import_module("leanconv.optimize.autotune")  # (leanconv.optimize is also a function)
    calls = []
    real = autotune.time_interleaved

    def counting(fns, **kw):
        calls.append(len(fns))
        return real(fns, **kw)

    monkeypatch.setattr(autotune, "time_interleaved", counting)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    counts = []
    for blocks in (1, 3):
        autotune.clear_timings()
        calls.clear()
        model = nn.Sequential(*[SICStack.from_conv(conv, depth=2) for _ in range(blocks)])
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        counts.append(len(calls))
        # every op still records what was measured for it (besides its whole stack's choice)
        choices = [c for c in leanconv.implementation_choices(opt) if ".ops." in c.name]
        assert len(choices) == 2 * blocks
    assert counts[0] > 0 and counts[1] == counts[0]
    autotune.clear_timings()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults():
    import resource

    from leanconv.optimize import keep_freed_memory

    def faults_of_one_64mib_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 2**20).fill_(1.0)
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory() and keep_freed_memory()  # applies, and again
    # without it, each 64 MiB tensor is a fresh mmap: 16384 page faults every time; with it, only
    # the first few, while the heap grows to hold them (small allocations may land in between)
    faulted = [faults_of_one_64mib_tensor() > 1000 for _ in range(12)]
    assert sum(faulted) <= 5 and not any(faulted[-4:])


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_impls_exact_and_linear_layers_are_swapped(shape, bias):
    from leanconv.optimize.ops import LinearOp

    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = lin(x)
        for impl in LinearOp.IMPLS:
            y = LinearOp.from_linear(lin).with_impl(impl)(x)
            assert y.shape == ref.shape
            assert ((y - ref).norm() / ref.norm()).item() < 1e-6, impl
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 24, bias=bias), nn.ReLU(), nn.Linear(24, 10)).eval()
    fast = leanconv.optimize(model, torch.randn(4, 40), repeats=1, guard=False)  # tiny: the guard may keep it
    assert all(isinstance(fast[i], LinearOp) for i in (1, 3))
    assert fast[1].in_features == 40 and fast[1].out_features == 24
    with torch.no_grad():
        assert torch.allclose(fast(x.reshape(-1, 40)), model(x.reshape(-1, 40)), rtol=1e-5, atol=1e-6)
    assert {c.name for c in leanconv.implementation_choices(fast)} == {"1", "3"}  # both timed


class NormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass that also applies an activation (as timm's BatchNormAct2d, which timm
    registers as a module fx must not trace into)."""

    def forward(self, x):
        return nn.functional.silu(super().forward(x))  # not traceable: registered as a leaf below


def test_norm_subclass_with_its_own_forward_is_not_folded(monkeypatch):
    monkeypatch.setattr(importlib.import_module("leanconv.passes.trace"), "library_hints", lambda: ((NormAct,), ()))
    model = randomize_norms(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), NormAct(8), nn.Conv2d(8, 8, 3, padding=1),
                                          nn.BatchNorm2d(8)))
    x = torch.randn(2, 4, 6, 6)
    opt = leanconv.optimize(model, x, repeats=1, guard=False)
    assert isinstance(opt[1], NormAct) and isinstance(opt[3], nn.Identity)
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-5


def test_conv_subclass_is_optimized_as_the_conv_it_computes():
    model = randomize_norms(nn.Sequential(StdConv(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 4, 6, 6)
    opt = leanconv.optimize(model, x, repeats=1, guard=False)
    assert isinstance(opt[1], nn.Identity) and not isinstance(opt[0], StdConv)
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-5
