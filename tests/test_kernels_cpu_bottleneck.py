"""The fused C++ CPU kernels of spatial bottleneck layers (``cpu:bottleneck``) and of whole stacks of
them (``cpu:bottleneck-stack``) against the layers they replace (float32, relative error < 1e-5
against float64), their fallbacks, custom ops, and optimize's use of them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
from conftest import launched, randomized, rel_err
from leanconv.kernels.cpu import build, cpu_alternatives
from leanconv.methods import SICStack, Topology
from leanconv.methods.bottleneck.cpu import CpuBottleneckOp
from leanconv.methods.bottleneck.cpu_stack import CpuBottleneckStackOp
from leanconv.methods.bottleneck.layer import SpatialBottleneck
from leanconv.optimize import portable
from leanconv.optimize.freeze import alternatives, freeze
from leanconv.optimize.ops import StackOp

pytestmark = pytest.mark.skipif(not build.available(), reason="the CPU kernels cannot be built here")
TOL = 1e-5
CL = torch.channels_last


def layer_kernel(op) -> CpuBottleneckOp:
    found = [a for a in alternatives(op) if isinstance(a, CpuBottleneckOp)]
    assert len(found) == 1, f"no bottleneck kernel offered for {op.impl_name()}"
    return found[0]


LAYER_CASES = {  # in, out, k, offset, topology rank, (H, W), batch
    "k2-off0-odd": (20, 20, 2, 0, 0, (7, 9), 2),
    "k2-off1-odd": (20, 20, 2, 1, 0, (9, 7), 1),
    "k2-off1-even": (32, 32, 2, 1, 0, (8, 10), 2),
    "k2-off0-even-tail-channels": (37, 21, 2, 0, 0, (12, 6), 1),
    "k3-off0": (17, 17, 3, 0, 0, (10, 11), 2),
    "k3-off1": (24, 24, 3, 1, 0, (9, 9), 1),
    "k3-off2": (19, 33, 3, 2, 0, (8, 13), 1),
    "k4-off3-generic-k": (16, 16, 4, 3, 0, (9, 10), 1),
    "1-pixel-off0": (16, 24, 2, 0, 0, (1, 1), 3),
    "1-pixel-off1": (16, 16, 2, 1, 0, (1, 1), 1),
    "2-pixel-off1": (17, 17, 2, 1, 0, (2, 2), 2),
    "2-pixel-k3-off2": (16, 16, 3, 2, 0, (2, 2), 1),
    "1-row": (17, 9, 2, 1, 0, (1, 12), 2),
    "topological": (32, 32, 2, 1, 2, (7, 6), 2),
}
EPILOGUES = ((False, False), (True, True), (True, False), (False, True))


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_kernel_matches_the_layer(case, monkeypatch):
    ci, co, k, off, rank, hw, batch = LAYER_CASES[case]
    topo = Topology.auto(ci, co, rank) if rank else None
    layer = randomized(SpatialBottleneck(ci, co, k, off, topo))
    calls = launched(monkeypatch, CpuBottleneckOp)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, ci, *hw, generator=g)
    for residual, relu in EPILOGUES:
        if residual and ci != co:
            continue
        res = torch.randn(batch, co, *hw, generator=g) if residual else None
        scale = torch.rand(co, generator=g) + 0.5
        op = freeze(layer)
        op.relu = relu
        if residual:
            op.res_scale = scale.clone()
        with torch.no_grad():
            ref = copy.deepcopy(layer).double()(x.double())
            if residual:
                ref = ref + res.double() * scale.double().view(1, -1, 1, 1)
            ref = F.relu(ref) if relu else ref
        fused = layer_kernel(op)
        for band in (1, 1 << 20):
            fused.band_bytes = band
            n = len(calls)
            with torch.no_grad():
                y = fused(x.contiguous(memory_format=CL), None if res is None else res.contiguous(memory_format=CL))
            assert len(calls) == n + 1, "the kernel did not run"
            assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
            err = rel_err(y, ref)
            assert err < TOL, f"residual={residual} relu={relu} band={band}: rel err {err:.2e}"


def test_layer_kernel_without_a_residual_scale_and_on_two_threads(monkeypatch):
    op = freeze(randomized(SpatialBottleneck(24, 24, 2, 1)))
    op.relu = True
    x, r = torch.randn(3, 24, 15, 13), torch.randn(3, 24, 15, 13)
    fused = layer_kernel(op)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fused.band_bytes = 1
        with torch.no_grad():
            assert rel_err(fused(x, r), op(x, r)) < TOL
    finally:
        torch.set_num_threads(before)


def test_layer_kernel_falls_back_exports_and_repacks(monkeypatch):
    op = freeze(randomized(SpatialBottleneck(16, 16, 2, 1)))
    fused = layer_kernel(op)
    calls = launched(monkeypatch, CpuBottleneckOp)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = op(x)
        with portable():
            program = torch.export.export(fused, (x,))
            assert torch.equal(fused(x), ref)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("leanconv" in t for t in targets), targets
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()
    assert xg.grad is not None and calls == [], "portable, export and autograd must not launch the kernel"
    with torch.no_grad():
        args = fused.kernel_args(x, torch.randn(1, 16, 5, 5))
        torch.library.opcheck(fused.kernel, args, test_utils=("test_schema", "test_faketensor"))
    a, b = torch.rand(16) + 0.5, torch.randn(16)
    fused.scale_output(a, b)  # weights changed after packing: repacked
    with torch.no_grad():
        assert rel_err(fused(x), fused.ref(x)) < TOL


def test_offered_only_where_the_kernel_computes_the_op():
    op = freeze(randomized(SpatialBottleneck(16, 16, 2, 1)))
    assert [a.impl_name() for a in cpu_alternatives(op)] == ["cpu:bottleneck"]
    assert cpu_alternatives(copy.deepcopy(op).double()) == [], "float32 only"


# --------------------------------------------------------------------------- fused stacks

def stack_kernel(op: StackOp) -> CpuBottleneckStackOp:
    found = [a for a in alternatives(op) if isinstance(a, CpuBottleneckStackOp)]
    assert len(found) == 1, f"no fused bottleneck stack offered for {[o.impl_name() for o in op.ops]}"
    return found[0]


def check_stack(frozen: StackOp, ref_fn, shape, monkeypatch) -> None:
    """The fused stack of ``frozen`` against ``ref_fn(x)`` (float64), for band buffers of one row and
    of the whole map, on 1 and 2 threads."""
    calls = launched(monkeypatch, CpuBottleneckStackOp)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_fn(x.double())
    fused = stack_kernel(frozen)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for band in (1, 3 << 10, 1 << 20):
                fused.band_bytes = band
                n = len(calls)
                with torch.no_grad():
                    y = fused(x.contiguous(memory_format=CL))
                assert len(calls) == n + 1, "the kernel did not run"
                assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
                err = rel_err(y, ref)
                assert err < TOL, f"threads={threads} band={band}: rel err {err:.2e}"
    finally:
        torch.set_num_threads(before)


STACK_CASES = {  # in, out, depth, bottleneck_k, topology rank, (H, W), batch
    "two-pairs-odd-batch1": (24, 24, 2, 2, 0, (13, 11), 1),
    "two-pairs-channels-change": (20, 36, 2, 2, 0, (15, 12), 2),
    "one-pair-k3": (19, 19, 1, 3, 0, (10, 9), 1),
    "two-pairs-1-pixel": (17, 17, 2, 2, 0, (1, 1), 3),
    "two-pairs-2-pixel": (16, 16, 2, 2, 0, (2, 2), 2),
    "two-pairs-topological": (32, 32, 2, 2, 2, (9, 8), 1),
}


@pytest.mark.parametrize("case", list(STACK_CASES))
def test_fused_stack_matches_the_stack(case, monkeypatch):
    ci, co, depth, k, rank, hw, batch = STACK_CASES[case]
    stack = randomized(SICStack.from_conv(nn.Conv2d(ci, co, 3, padding=1), depth=depth, bottleneck="full",
                                          bottleneck_k=k, topology_rank=rank))
    frozen = freeze(copy.deepcopy(stack).float())
    frozen.relu = True
    check_stack(frozen, lambda x: F.relu(copy.deepcopy(stack).double()(x)), (batch, ci, *hw), monkeypatch)


def test_fused_stack_with_relus_residual_scales_and_no_last_relu(monkeypatch):
    layers = [freeze(randomized(SpatialBottleneck(24, 24, 2, i % 2))) for i in range(4)]
    for i, op in enumerate(layers):
        op.relu = i in (0, 2)
        op.res_scale = torch.rand(24) + 0.5 if i in (1, 3) else None
    frozen = StackOp(layers, (False, True, False, True))
    check_stack(frozen, lambda x: copy.deepcopy(frozen).double()(x), (2, 24, 11, 14), monkeypatch)


def test_fused_stack_refuses_what_it_does_not_compute():
    sic = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2)))
    assert not any(isinstance(a, CpuBottleneckStackOp) for a in cpu_alternatives(sic))
    half = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2, bottleneck="half")))
    assert not any(isinstance(a, CpuBottleneckStackOp) for a in cpu_alternatives(half)), "a SIC layer in it"
    single = StackOp([freeze(randomized(SpatialBottleneck(16, 16, 2, 0)))], (False,))
    assert cpu_alternatives(single) == [], "one layer is the per-layer kernel's"


def test_fused_stack_falls_back_and_compiles_to_one_custom_op(monkeypatch):
    frozen = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2, bottleneck="full")))
    fused = stack_kernel(frozen)
    calls = launched(monkeypatch, CpuBottleneckStackOp)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = frozen(x)
        with portable():
            assert torch.equal(fused(x), ref)
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()
    assert xg.grad is not None and calls == [], "portable and autograd run the StackOp"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    with torch.no_grad():
        y = torch.compile(fused, backend=backend, fullgraph=True)(x)
        torch.library.opcheck(fused.kernel, fused.kernel_args(x, None), test_utils=("test_schema", "test_faketensor"))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is not getattr]
    assert targets == [torch.ops.leanconv.cpu_bottleneck_stack.default], targets
    assert rel_err(y, ref) < TOL
    a, b = torch.rand(16) + 0.5, torch.randn(16)
    fused.fold_affine(a, b)
    with torch.no_grad():
        assert rel_err(fused(x), fused.ref(x)) < TOL


def test_optimize_names_the_kernels_and_keeps_outputs(monkeypatch, one_thread):
    from leanconv.optimize import autotune

    real = autotune._fastest

    def prefer(fns, *args):  # timed as usual, then a kernel kept wherever there is one
        best, seconds = real(fns, *args)
        kernel = [i for i, fn in enumerate(fns) if isinstance((fn.__defaults__ or (None,))[0],
                                                               (CpuBottleneckOp, CpuBottleneckStackOp))]
        return (kernel[-1] if kernel else best), seconds

    monkeypatch.setattr(autotune, "_fastest", prefer)
    autotune.clear_timings()
    try:
        model = randomized(nn.Sequential(
            SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2, bottleneck="full"), nn.ReLU(),
            SICStack.from_conv(nn.Conv2d(16, 24, 3, padding=1), depth=2, bottleneck="half")))
        x = torch.randn(1, 16, 11, 10)  # batch 1: no chunked candidates, whose choice is by timing
        with torch.no_grad():
            ref = model.double()(x.double())
            model.float()
            opt = leanconv.optimize(model, x, repeats=1, guard=False)
            y = opt(x)
    finally:
        autotune.clear_timings()
    chosen = {c.name: c.chosen for c in leanconv.implementation_choices(opt)}
    assert isinstance(opt[0], CpuBottleneckStackOp) and chosen["0"] == "cpu:bottleneck-stack x4", chosen
    assert chosen["2.ops.1"] == "cpu:bottleneck" and chosen["2.ops.2"] == "cpu:bottleneck", chosen
    assert rel_err(y, ref) < TOL
