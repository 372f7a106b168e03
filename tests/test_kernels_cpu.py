"""Fused C++ CPU kernels against the layers they replace (float32, relative error < 1e-5 against
float64), their fallbacks, their custom ops, and optimize's use of them.

The kernels are built once per source, torch version and ISA (about half a minute the first time,
then loaded from the user's cache directory)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
import conftest
from conftest import randomized, rel_err
from leanconv.demo.teacher import fmnist_resnet
from leanconv.kernels.cpu import build, cpu_alternatives
from leanconv.kernels.cpu.op import CpuKernelOp
from leanconv.methods.sic.cpu import CpuSplitOp, CpuSplitTopoOp
from leanconv.methods.sic.cpu_stack import CpuStackOp, CpuStackTopoOp
from leanconv.methods.topo import cpu as topo_cpu
from leanconv.methods.topo.op import TopoOp
from leanconv.methods import SICLayer, SICStack, TopoConv2d, Topology, UnraveledConv
from leanconv.optimize import autotune, portable
from leanconv.optimize.freeze import alternatives, freeze
from leanconv.methods.split import SplitOp
from leanconv.optimize.ops import ConvOp, StackOp

pytestmark = pytest.mark.skipif(not build.available(), reason="the CPU kernels cannot be built here")
TOL = 1e-5


def kernel_ops(op) -> list[CpuKernelOp]:
    """The CPU-kernel alternatives ``optimize`` is offered for ``op`` (through freeze.alternatives)."""
    found = [a for a in alternatives(op) if isinstance(a, CpuKernelOp)]
    assert found, f"no CPU kernel offered for {op.impl_name()}"
    return found


def compiled_graph(module, x):
    """``module(x)`` through ``torch.compile(fullgraph=True)``, and the one FX graph it compiled."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    y = torch.compile(module, backend=backend, fullgraph=True)(x)
    return y, graphs[0]


def launched(monkeypatch, op_class=None) -> list:
    """``conftest.launched`` of ``op_class`` (default ``CpuSplitOp``)."""
    return conftest.launched(monkeypatch, op_class or CpuSplitOp)


def check(layer: nn.Module, shape, epilogues, monkeypatch, band_bytes=None) -> None:
    """Every CPU-kernel alternative of ``layer`` frozen, against the layer in float64, per (residual, relu)."""
    calls = launched(monkeypatch, topo_cpu.CpuTopoOp if isinstance(layer, TopoConv2d) else None)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        out_shape = layer(x).shape
    for residual, relu in epilogues:
        res = torch.randn(out_shape, generator=g) if residual else None
        scale = torch.rand(out_shape[1], generator=g) + 0.5
        op = freeze(layer)
        op.relu = relu
        if residual:
            op.res_scale = scale.clone()
        with torch.no_grad():
            ref = copy.deepcopy(layer).double()(x.double())
            if residual:
                ref = ref + res.double() * scale.double().view(1, -1, 1, 1)
            ref = F.relu(ref) if relu else ref
        for f in kernel_ops(op):
            if band_bytes is not None:
                f.band_bytes = band_bytes
            n = len(calls)
            with torch.no_grad():
                y = f(x.contiguous(memory_format=torch.channels_last),
                      None if res is None else res.contiguous(memory_format=torch.channels_last))
            assert len(calls) == n + 1, "the kernel did not run"
            assert y.dtype == torch.float32 and y.shape == ref.shape
            assert y.is_contiguous(memory_format=torch.channels_last)
            err = rel_err(y, ref)
            assert err < TOL, f"{f.impl_name()} residual={residual} relu={relu}: rel err {err:.2e}"


ALL_EPILOGUES = ((False, False), (True, True), (True, False), (False, True))
SIC_CASES = {  # in, out, k, stride, padding, dilation, multiplier b, (H, W), batch
    "3x3-odd-channels": (20, 24, 3, 1, 1, 1, 1, (7, 9), 2),
    "3x3-vector-and-tail-channels": (37, 21, 3, 1, 1, 1, 1, (11, 13), 1),
    "5x5-stride2-batch1": (19, 33, 5, 2, 2, 1, 1, (9, 7), 1),
    "3x3-stride2-unpadded": (32, 16, 3, 2, 0, 1, 1, (8, 7), 2),
    "3x3-stride2-even": (48, 40, 3, 2, 1, 1, 1, (16, 10), 1),
    "1-pixel-map": (16, 24, 3, 1, 1, 1, 1, (1, 1), 3),
    "1-pixel-map-5x5-b4": (5, 7, 5, 1, 2, 1, 4, (1, 1), 1),
    "1-row": (17, 9, 3, 1, 1, 1, 1, (1, 12), 2),
    "unravel-b4-dilated": (12, 20, 3, 1, 2, 2, 4, (7, 7), 1),
    "unravel-b2-5x5": (10, 18, 5, 1, 2, 1, 2, (5, 7), 1),
    "unravel-b4-stride2": (16, 32, 3, 2, 1, 1, 4, (9, 9), 2),
}


@pytest.mark.parametrize("case", list(SIC_CASES))
def test_sic_kernel_matches_the_layer(case, monkeypatch):
    ci, co, k, s, p, d, b, hw, batch = SIC_CASES[case]
    layer = SICLayer(ci, co, k, s, p, d) if b == 1 else UnraveledConv(ci, co, k, b, s, p, d)
    check(randomized(layer), (batch, ci, *hw), ALL_EPILOGUES, monkeypatch)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_bands_and_threads(threads, monkeypatch):
    """Bands of one row (a tiny band buffer) and of many, split over threads and images alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = randomized(SICLayer(40, 36, 3, 1, 1))
        for band in (1, 1 << 20):
            check(layer, (3, 40, 13, 11), ((True, True),), monkeypatch, band_bytes=band)
    finally:
        torch.set_num_threads(before)


def test_topological_projection_runs_as_its_dense_matrix(monkeypatch):
    layer = randomized(SICLayer(32, 32, 3, 1, 1, topology=Topology.auto(32, 32, 2)))
    check(layer, (2, 32, 5, 6), ((True, True),), monkeypatch)


TOPO_CASES = {  # in, out, stride, multiplier b, topology, (H, W), batch; random channel assignments
    "2d-paper-256": (256, 256, 1, 1, Topology((16, 16), (16, 16), (8, 8)), (5, 7), 1),
    "3d-odd-size": (64, 64, 1, 1, Topology.auto(64, 64, 3), (9, 11), 2),
    "1d-ring-tail-channels": (21, 35, 1, 1, Topology((21,), (35,), (6,)), (7, 5), 2),
    "2d-unequal-grids-stride2": (48, 40, 2, 1, Topology((6, 8), (5, 8), (3, 5)), (9, 10), 1),
    "3d-full-nbhd-dim": (60, 24, 1, 1, Topology((3, 4, 5), (2, 3, 4), (3, 2, 4)), (4, 3), 1),
    "1-pixel-map": (32, 32, 1, 1, Topology.auto(32, 32, 2), (1, 1), 3),
    "unravel-b4-2d": (12, 20, 1, 4, Topology((6, 8), (4, 5), (3, 4)), (6, 7), 1),
    "unravel-b2-stride2": (16, 24, 2, 2, Topology.auto(32, 24, 3), (8, 7), 2),
}


@pytest.mark.parametrize("case", list(TOPO_CASES))
@pytest.mark.parametrize("group", (None, 1, 2, 4))
def test_sparse_topological_projection_matches_the_layer(case, group, monkeypatch):
    """cpu:sic-topo multiplies each output's own connections: exact against the layer, for every
    group size R of its plan."""
    ci, co, stride, b, topology, hw, batch = TOPO_CASES[case]
    if b == 1:
        layer = SICLayer(ci, co, 3, stride, 1, topology=topology)
    else:
        layer = UnraveledConv(ci, co, 3, b, stride, 1, topology=topology)
    layer = randomized(layer)
    if group is not None:
        monkeypatch.setattr(topo_cpu, "GROUP_SIZES", (group,))
    check(layer, (batch, ci, *hw), ALL_EPILOGUES, monkeypatch)
    sparse = [f for f in kernel_ops(freeze(layer)) if isinstance(f, CpuSplitTopoOp)]
    assert len(sparse) == 1 and sparse[0].impl_name() == "cpu:sic-topo"
    assert sparse[0].index[0].item() == (group or sparse[0].index[0].item())


TOPO_CONV_CASES = {  # in, out, kernel, stride, padding, dilation, topology, (H, W), batch; random assignments
    "3x3-2d-paper-64": (64, 64, 3, 1, 1, 1, Topology.auto(64, 64, 2), (9, 11), 2),
    "3x3-3d-odd-size": (64, 48, 3, 1, 1, 1, Topology.auto(64, 48, 3), (7, 5), 1),
    "3x3-1d-tail-channels": (21, 35, 3, 1, 1, 1, Topology((21,), (35,), (6,)), (6, 13), 2),
    "1x1-2d": (32, 32, 1, 1, 0, 1, Topology.auto(32, 32, 2), (5, 6), 2),
    "5x5-dilated-unpadded": (24, 20, 5, 1, 1, 2, Topology((4, 6), (4, 5), (2, 3)), (12, 11), 1),
    "3x3-unpadded": (16, 16, 3, 1, 0, 1, Topology.auto(16, 16, 2), (5, 4), 1),
    "1-pixel-map": (32, 32, 3, 1, 1, 1, Topology.auto(32, 32, 3), (1, 1), 3),
    "1-row-wide": (48, 48, 3, 1, 1, 1, Topology((4, 12), (4, 12), (2, 6)), (1, 70), 1),
    "wide-map-row-chunks": (16, 24, 3, 1, 1, 1, Topology.auto(16, 24, 2), (19, 37), 2),
    "stride-2-odd-size": (64, 48, 3, 2, 1, 1, Topology.auto(64, 48, 2), (13, 11), 2),
    "stride-2-3d-wide": (32, 32, 3, 2, 1, 1, Topology.auto(32, 32, 3), (9, 40), 1),
    "stride-2-batch-1-tail-channels": (21, 35, 3, 2, 1, 1, Topology((21,), (35,), (6,)), (14, 14), 1),
    "stride-2-1-pixel-map": (32, 32, 3, 2, 1, 1, Topology.auto(32, 32, 2), (1, 1), 3),
    "stride-2-5x5-dilated": (24, 20, 5, 2, 3, 2, Topology((4, 6), (4, 5), (2, 3)), (12, 11), 2),
    "stride-3-unpadded": (16, 16, 3, 3, 0, 1, Topology.auto(16, 16, 2), (10, 8), 2),
    # stride-1 'same' maps past the dense form's threshold (10 (H+1)(W+1) < 11 H W): the padded
    # flat layout (most stride-1 cases above are small enough to take the dense form)
    "padded-30x30-tail-channels": (21, 35, 3, 1, 1, 1, Topology((21,), (35,), (6,)), (30, 30), 2),
    "padded-28x28-2d-batch-1": (64, 64, 3, 1, 1, 1, Topology.auto(64, 64, 2), (28, 28), 1),
    # small maps, stride-1 'same': the flat kernel's dense form (bands across images, masked taps)
    "dense-7x7-batch-3": (48, 48, 3, 1, 1, 1, Topology.auto(48, 48, 2), (7, 7), 3),
    "dense-dilated-5x6-tail-channels": (24, 20, 3, 1, 2, 2, Topology((4, 6), (4, 5), (2, 3)), (5, 6), 3),
    "dense-14x14-3d-batch-1": (64, 64, 3, 1, 1, 1, Topology.auto(64, 64, 3), (14, 14), 1),
}


@pytest.mark.parametrize("case", list(TOPO_CONV_CASES))
@pytest.mark.parametrize("group", (None, 1, 4))
def test_topological_conv_kernel_matches_the_layer(case, group, monkeypatch):
    """cpu:topo (a TopoOp with exactly its MACs, any stride; the flat kernel at the cost model's R
    and forced to R = 1 / 4) and cpu:topo-rows (R = 2) against the layer, every epilogue."""
    ci, co, k, s, p, d, topology, hw, batch = TOPO_CONV_CASES[case]
    layer = randomized(TopoConv2d(ci, co, k, topology, stride=s, padding=p, dilation=d))
    if group is not None:
        monkeypatch.setattr(topo_cpu, "GROUP_SIZES", (group,))
    check(layer, (batch, ci, *hw), ALL_EPILOGUES, monkeypatch)
    check(layer, (batch, ci, *hw), ((True, True),), monkeypatch, band_bytes=1)  # one tile per band
    found = [f.impl_name() for f in kernel_ops(freeze(layer)) if isinstance(f, topo_cpu.CpuTopoOp)]
    assert found == ["cpu:topo", "cpu:topo-rows"]


def test_topological_kernels_export_and_fake_implementations():
    """cpu:topo and cpu:sic-topo: portable / export use the standard ops, torch.export sees the
    custom op, and the fake implementations pass opcheck."""
    topo = freeze(randomized(TopoConv2d(32, 32, 3, Topology.auto(32, 32, 2), padding=1)))
    topo.relu = True
    sic = freeze(randomized(SICLayer(32, 32, 3, 1, 1, topology=Topology.auto(32, 32, 3))))
    x = torch.randn(1, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    for fused, custom in ((kernel_ops(topo)[0], torch.ops.leanconv.cpu_topo_conv.default),
                          (kernel_ops(sic)[1], torch.ops.leanconv.cpu_sic_layer.default)):
        assert fused.impl_name() in ("cpu:topo", "cpu:sic-topo")
        with torch.no_grad():
            ref = fused.ref(x)
            with portable():
                program = torch.export.export(fused, (x,))
                assert torch.equal(fused(x), ref)
            targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
            assert not any("leanconv" in t for t in targets), targets
            exported = [n.target for n in torch.export.export(fused, (x,)).graph.nodes if n.op == "call_function"]
            assert custom in exported, exported
            out = fused(x)
            assert rel_err(out, ref) < TOL
            args = fused.kernel_args(x, torch.randn_like(out))
        torch.library.opcheck(fused.kernel, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_sparse_plan_multiplies_few_more_than_the_connections():
    """A group's union of windows: 2-D paper topologies multiply at most 1/8 more than their
    connections with R = 2, 1-D rings exactly them with R = 1."""
    for c in (128, 256, 512):
        op = freeze(SICLayer(c, c, 3, 1, 1, topology=Topology.auto(c, c, 2))).project
        plan = topo_cpu.sparse_plan(op, group=2)
        assert plan.connections == c * c // 4 and plan.multiplied <= 1.125 * plan.connections
    op = freeze(SICLayer(40, 40, 3, 1, 1, topology=Topology((40,), (40,), (9,)))).project
    plan = topo_cpu.sparse_plan(op, group=1)
    assert plan.multiplied == plan.connections == 40 * 9


def test_stack_with_folded_norms_and_residuals(monkeypatch):
    stack = randomized(SICStack.from_conv(nn.Conv2d(24, 24, 3, padding=1), depth=3, norm=True))
    x = torch.randn(2, 24, 6, 7)
    with torch.no_grad():
        ref = stack.double()(x.double())
    frozen = freeze(stack.float())
    assert any(frozen.residual), "the case should have a residual"
    calls = launched(monkeypatch)
    fused = StackOp([kernel_ops(op)[0] for op in frozen.ops], frozen.residual)
    with torch.no_grad():
        y = fused(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) == 3 and rel_err(y, ref) < TOL


def test_weights_changed_after_freezing_are_repacked():
    layer = randomized(SICLayer(16, 16, 3, 1, 1))
    op, fused = freeze(layer), kernel_ops(freeze(layer))[0]
    a, b, s = torch.rand(16) + 0.5, torch.randn(16), torch.rand(16) + 0.5
    for o in (op, fused):  # BatchNorm folding after freezing
        o.scale_output(a, b)
        o.scale_input(s)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(fused(x), op(x)) < TOL


def test_offered_only_where_the_kernel_computes_the_op():
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1)))
    assert [f.impl_name() for f in cpu_alternatives(op)] == ["cpu:sic"]
    assert cpu_alternatives(copy.deepcopy(op).double()) == [], "float32 only"
    reflect = freeze(randomized(SICLayer(16, 16, 3, 1, 1, padding_mode="reflect")))
    assert cpu_alternatives(reflect) == [], "padding_mode='reflect' is not fused"
    strided = freeze(randomized(TopoConv2d(16, 16, 3, Topology.auto(16, 16, 2), stride=2, padding=1)))
    assert [f.impl_name() for f in cpu_alternatives(strided)] == ["cpu:topo", "cpu:topo-rows"], "any stride"
    assert cpu_alternatives(cpu_alternatives(op)[0]) == [], "a kernel op is not fused again"


def test_portable_export_and_autograd_use_the_standard_ops(monkeypatch):
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1)))
    fused = kernel_ops(op)[0]
    calls = launched(monkeypatch)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = op(x)
        with portable():
            program = torch.export.export(fused, (x,))
            y_portable = fused(x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("leanconv" in t for t in targets), targets
    assert torch.equal(y_portable, ref)
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()  # fine-tuning's path: the unfused ops, differentiable
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert calls == [], "portable, export and autograd must not launch the kernel"


def test_compile_and_export_see_one_custom_op_per_layer():
    stack = randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2))
    frozen = freeze(stack)
    fused = StackOp([kernel_ops(op)[0] for op in frozen.ops], frozen.residual)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, graph = compiled_graph(fused, x)
        program = torch.export.export(fused, (x,))
        ref = frozen(x)
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function" and n.target is not getattr]
    assert calls.count(torch.ops.leanconv.cpu_sic_layer.default) == 2 and len(calls) == 2, calls
    exported = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert exported.count(torch.ops.leanconv.cpu_sic_layer.default) == 2, exported
    assert rel_err(y, ref) < TOL


def test_fake_implementation_checks_out():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = freeze(randomized(UnraveledConv(16, 24, 3, 2, 2, 1)))
    op.relu = True
    fused = kernel_ops(op)[0]
    x = torch.randn(1, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fused(x)
        args = fused.kernel_args(x, torch.randn_like(out))
        torch.library.opcheck(fused.kernel, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    with FakeTensorMode() as mode:
        fake = fused.kernel(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (fake.shape, fake.stride(), fake.dtype) == (out.shape, out.stride(), out.dtype)


# --------------------------------------------------------------------------- fused stacks

def stack_launches(monkeypatch) -> list:
    return launched(monkeypatch, CpuStackOp)


def stack_kernels(op: StackOp) -> list[CpuStackOp]:
    """The fused stacks offered for ``op``: the dense one, and with topological projections also
    the sparse one."""
    found = [a for a in alternatives(op) if isinstance(a, CpuStackOp)]
    topo = any(isinstance(o.project, TopoOp) for o in op.ops)
    assert [type(f) for f in found] == ([CpuStackOp, CpuStackTopoOp] if topo else [CpuStackOp]), \
        f"fused stacks offered for {[o.impl_name() for o in op.ops]}: {[f.impl_name() for f in found]}"
    return found


def stack_kernel(op: StackOp) -> CpuStackOp:
    return stack_kernels(op)[0]


def check_stack(stack: nn.Module, shape, monkeypatch, relu=True, residual=None) -> None:
    """The fused stack of ``stack`` (a layer whose ``freeze`` gives a StackOp), with the last ReLU
    ``relu`` and (optionally) other residual flags, against the stack in float64, for band buffers
    of one row and of the whole map, on 1 and 2 threads."""
    calls = stack_launches(monkeypatch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    frozen = freeze(copy.deepcopy(stack).float())
    if residual is not None:
        frozen.residual = tuple(residual)
    frozen.relu = relu
    with torch.no_grad():
        if residual is None:  # the layer it replaces, in float64
            ref = copy.deepcopy(stack).double()(x.double())
            ref = F.relu(ref) if relu else ref
        else:  # other residual flags than the layer's: the frozen stack, in float64
            ref = copy.deepcopy(frozen).double()(x.double())
    before = torch.get_num_threads()
    try:
        for fused in stack_kernels(frozen):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for band in (1, 1 << 20):
                    fused.band_bytes = band
                    n = len(calls)
                    with torch.no_grad():
                        y = fused(x.contiguous(memory_format=torch.channels_last))
                    assert len(calls) == n + 1, "the kernel did not run"
                    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
                    err = rel_err(y, ref)
                    assert err < TOL, f"{fused.impl_name()} threads={threads} band={band}: rel err {err:.2e}"
    finally:
        torch.set_num_threads(before)


STACK_CASES = {  # in, out, k, stride, padding, depth, first residual, (H, W), batch
    "m2-odd-size-batch1": (24, 24, 3, 1, 1, 2, True, (13, 11), 1),
    "m3-norms": (24, 24, 3, 1, 1, 3, True, (9, 7), 2),
    "m2-stride2-first": (20, 36, 3, 2, 1, 2, True, (15, 12), 2),
    "m3-5x5-tail-channels": (19, 37, 5, 1, 2, 3, True, (10, 9), 1),
    "m2-1-pixel": (17, 17, 3, 1, 1, 2, True, (1, 1), 3),
    "m2-first-residual-off": (32, 32, 3, 1, 1, 2, False, (14, 14), 2),
    # weights over 1 MiB and whole-image bands: several images a task (5 images: 5 / 3 + 2 / 1 each)
    "m2-512-images-grouped": (512, 512, 3, 1, 1, 2, True, (5, 4), 5),
    "m2-stride2-images-grouped": (256, 512, 3, 2, 1, 2, True, (9, 7), 3),
}


@pytest.mark.parametrize("case", list(STACK_CASES))
def test_fused_stack_matches_the_stack(case, monkeypatch):
    ci, co, k, s, p, depth, first, hw, batch = STACK_CASES[case]
    stack = randomized(SICStack.from_conv(nn.Conv2d(ci, co, k, s, p), kernel=k, depth=depth, first_residual=first,
                                          norm=case == "m3-norms"))
    check_stack(stack, (batch, ci, *hw), monkeypatch)


def test_fused_stack_without_residuals_or_last_relu(monkeypatch):
    stack = randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=3))
    check_stack(stack, (2, 16, 8, 9), monkeypatch, relu=False, residual=(False, False, False))
    check_stack(stack, (2, 16, 8, 9), monkeypatch, relu=False, residual=(True, False, True))


def test_fused_stack_of_unravelled_and_topological_layers(monkeypatch):
    unravel = [freeze(randomized(UnraveledConv(12, 20, 3, 4, 2, 1))), freeze(randomized(UnraveledConv(20, 20, 3, 2, 1, 1)))]
    unravel[0].relu = True
    stack = StackOp(unravel, (False, True))
    x = torch.randn(1, 12, 11, 9)
    with torch.no_grad():
        ref = copy.deepcopy(stack).double()(x.double())
        y = stack_kernel(stack)(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(y, ref) < TOL
    topo = randomized(SICStack.from_conv(nn.Conv2d(32, 32, 3, padding=1), depth=2, topology_rank=2))
    check_stack(topo, (1, 32, 6, 5), monkeypatch)
    topo = randomized(SICStack.from_conv(nn.Conv2d(64, 48, 3, stride=2, padding=1), depth=3, topology_rank=3))
    check_stack(topo, (2, 64, 11, 9), monkeypatch)


def test_fused_stack_refuses_what_it_does_not_compute():
    sic = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2)))
    assert [a.impl_name() for a in cpu_alternatives(sic)] == ["cpu:sic-stack x2"]
    single = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=1)))
    assert cpu_alternatives(single) == [], "one layer is the per-layer kernel's"
    dense = copy.deepcopy(sic)
    dense.ops[1] = ConvOp(torch.randn(16, 16, 3, 3), torch.zeros(16), padding=1)
    assert cpu_alternatives(dense) == [], "a layer that is no SIC layer: no fused stack"
    bottleneck = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2, bottleneck="full")))
    assert [a.impl_name() for a in cpu_alternatives(bottleneck)] == ["cpu:bottleneck-stack x4"], \
        "spatial bottleneck layers: their own fused stack only"
    reflect = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), depth=2)))
    assert cpu_alternatives(reflect) == []
    assert cpu_alternatives(copy.deepcopy(sic).double()) == [], "float32 only"
    with pytest.raises(ValueError, match="no residual"):
        cpu_alternatives(sic)[0](torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4))


def test_fused_stack_falls_back_and_compiles_to_one_custom_op(monkeypatch):
    frozen = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2)))
    fused = stack_kernel(frozen)
    calls = stack_launches(monkeypatch)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = frozen(x)
        with portable():
            assert torch.equal(fused(x), ref)
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()
    assert xg.grad is not None and calls == [], "portable and autograd run the StackOp"
    with torch.no_grad():
        y, graph = compiled_graph(fused, x)
        args = fused.kernel_args(x, None)
        torch.library.opcheck(fused.kernel, args, test_utils=("test_schema", "test_faketensor"))
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function" and n.target is not getattr]
    assert targets == [torch.ops.leanconv.cpu_sic_stack.default], targets
    assert rel_err(y, ref) < TOL


def test_fused_stack_repacks_after_a_folded_norm():
    frozen = freeze(randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2)))
    fused = stack_kernel(frozen)
    a, b = torch.rand(16) + 0.5, torch.randn(16)
    fused.fold_affine(a, b)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(fused(x), fused.ref(x)) < TOL


def test_optimize_keeps_the_fused_stack_where_it_is_fastest(prefer_kernels, one_thread):
    model = randomized(nn.Sequential(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2), nn.ReLU(),
                                     SICStack.from_conv(nn.Conv2d(16, 24, 3, stride=2, padding=1), depth=3)))
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        y = opt(x)
    assert [type(opt[0]), type(opt[2])] == [CpuStackOp, CpuStackOp] and opt[0].relu
    chosen = {c.name: c.chosen for c in leanconv.implementation_choices(opt)}
    assert chosen["0"] == "cpu:sic-stack x2" and chosen["2"] == "cpu:sic-stack x3", chosen
    assert rel_err(y, ref) < TOL


# --------------------------------------------------------------------------- no compiler

@pytest.fixture
def fresh_build():
    build.reset()
    yield
    build.reset()


def test_without_a_compiler_optimize_warns_once_and_uses_todays_path(monkeypatch, fresh_build):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    model = randomized(nn.Sequential(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2), nn.ReLU()))
    x = torch.randn(2, 16, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        leanconv.optimize(model, x, repeats=1, guard=False)
    said = [str(w.message) for w in caught if "CPU kernels" in str(w.message)]
    assert len(said) == 1 and "no C++ compiler" in said[0] and "\n" not in said[0], said
    assert not any(isinstance(m, CpuKernelOp) for m in opt.modules())
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < TOL


def test_an_optimized_model_runs_where_the_kernels_cannot_be_built(monkeypatch, fresh_build):
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1)))
    fused = kernel_ops(op)[0]
    calls = launched(monkeypatch)
    build.reset()
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # as if loaded on a machine without a compiler
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True), torch.no_grad():
        warnings.simplefilter("always")
        assert torch.equal(fused(x), op(x))
        fused(x)
    assert calls == []


def test_switched_off_by_the_environment_quietly(monkeypatch, fresh_build):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_alternatives(op) == []


def test_a_failed_build_is_one_line(monkeypatch, fresh_build, tmp_path):
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCES", [bad])
    monkeypatch.setenv("LEANCONV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError) as e:
        build.load()
    assert "\n" not in str(e.value) and "build failed" in str(e.value)


# --------------------------------------------------------------------------- optimize

RECIPES = [r.name for r in leanconv.list_recipes()]


@pytest.fixture
def prefer_kernels(monkeypatch):
    """optimize times everything as usual, then keeps a CPU-kernel candidate wherever there is one."""
    real = autotune._fastest

    def prefer(fns, *args):
        best, seconds = real(fns, *args)
        kernel = [i for i, fn in enumerate(fns) if isinstance((fn.__defaults__ or (None,))[0], CpuKernelOp)]
        return (kernel[0] if kernel else best), seconds

    monkeypatch.setattr(autotune, "_fastest", prefer)
    autotune.clear_timings()
    yield
    autotune.clear_timings()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_optimized_with_the_kernels_keeps_its_outputs(recipe, prefer_kernels, one_thread):
    torch.manual_seed(0)
    base = randomized(fmnist_resnet(width=16))
    x = torch.randn(2, 1, 28, 28)
    model = randomized(leanconv.convert(base, recipe, x[:1])[0])
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        y = opt(x)
    kept = [m for m in opt.modules() if isinstance(m, CpuKernelOp)]
    offered = [c for c in leanconv.implementation_choices(opt) if any(n.startswith("cpu:") for n in dict(c.timings))]
    assert len(kept) == len(offered)
    if recipe.startswith(("sic", "unravel", "topo")):
        assert kept, f"{recipe}: no CPU kernel kept"
    assert rel_err(y, ref) < TOL, f"{recipe}: rel err {rel_err(y, ref):.2e}"
