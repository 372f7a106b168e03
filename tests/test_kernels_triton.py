"""Fused Triton kernels against the layers they replace: Triton's interpreter on CPU tensors here and
in CI; the same tests on a GPU with ``pytest -m cuda`` (the kernels are then compiled for it).

The interpreter is chosen for this module only: ``TRITON_INTERPRET=1`` is set while the kernels are
first imported (when no CUDA device exists) and restored afterwards, and CPU tensors count as a
kernel device only inside ``cpu_interpreter()`` (so other tests' ``optimize`` calls never see it).
Float32 is compared with TF32 off (conftest), to 1e-4 relative; bfloat16 to 1e-2 against float32
arithmetic on the same rounded weights and inputs (the interpreter truncates float32 -> bfloat16
where the GPU rounds to nearest, so it sees about twice the GPU's rounding error).
"""
import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_saved = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from leanconv.methods.bottleneck import triton as bottleneck  # noqa: F401  (defined under the interpreter here)
    from leanconv.methods.sic import triton as sic  # noqa: F401
    from leanconv.methods.topo import triton as topo  # noqa: F401
    from leanconv.methods.topo import triton_projection as kt
    from leanconv.methods.topo.triton_projection import block_schedule, live_fraction
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import leanconv  # noqa: E402
from conftest import randomized, rel_err  # noqa: E402
from leanconv.kernels.fused import FusedOp, gpu_alternatives  # noqa: E402
from leanconv.kernels.triton_util import cpu_interpreter  # noqa: E402
from leanconv.methods import SICLayer, SICStack, SpatialBottleneck, TopoConv2d, Topology, UnraveledConv
from leanconv.optimize import autotune, portable  # noqa: E402
from leanconv.optimize.freeze import alternatives, freeze  # noqa: E402
from leanconv.methods.split import SplitOp  # noqa: E402
from leanconv.optimize.ops import StackOp  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not kt.INTERPRETED, reason="kernels compiled for CUDA")),
           pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def on(device: str):
    """Where the kernels run: the interpreter on CPU tensors, or the GPU."""
    return cpu_interpreter() if device == "cpu" else contextlib.nullcontext()


def reference(layer: nn.Module, x, residual, res_scale, relu: bool, dtype):
    """float32 result of the layer (its weights rounded to ``dtype`` first) and its epilogue."""
    ref_layer = copy.deepcopy(layer).to(dtype).float()
    with torch.no_grad():
        y = ref_layer(x.to(dtype).float())
        if residual is not None:
            y = y + residual.to(dtype).float() * res_scale.view(1, -1, 1, 1)
        return F.relu(y) if relu else y


def fused_ops(op, device: str) -> list[FusedOp]:
    """The fused alternatives ``optimize`` is offered for ``op`` (through freeze.alternatives)."""
    with on(device):
        found = [a for a in alternatives(op) if isinstance(a, FusedOp)]
    assert found, f"no fused alternative offered for {op.impl_name()}"
    return found


def check(layer: nn.Module, shape, device: str, dtype, epilogues=((False, False), (True, True))) -> list[str]:
    """Every fused alternative of ``layer`` frozen, against the layer, for each (residual, relu)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        out_shape = layer(x).shape
    seen = []
    for residual, relu in epilogues:
        res = torch.randn(out_shape, generator=g) if residual else None
        scale = torch.rand(out_shape[1], generator=g) + 0.5 if residual else torch.ones(out_shape[1])
        op = freeze(layer).to(device, dtype)
        op.relu = relu
        if residual:
            op.res_scale = scale.to(device, dtype)
        ref = reference(layer, x, res, scale.to(dtype).float(), relu, dtype)
        for f in fused_ops(op, device):
            xd = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
            rd = None if res is None else res.to(device, dtype).contiguous(memory_format=torch.channels_last)
            with on(device), torch.no_grad():
                y = f(xd, rd)
            assert y.dtype == dtype and y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
            err = rel_err(y, ref)
            assert err < TOL[dtype], f"{f.impl_name()} residual={residual} relu={relu} {dtype}: rel err {err:.2e}"
            seen.append(f.impl_name())
    return seen


# --------------------------------------------------------------------------- SIC and unravelled layers

SIC_CASES = {  # in, out, k, stride, padding, dilation, multiplier b, (H, W), batch
    "3x3-odd-channels": (20, 24, 3, 1, 1, 1, 1, (7, 9), 1),
    "5x5-stride2-batch1": (19, 33, 5, 2, 2, 1, 1, (9, 7), 1),
    "3x3-stride2-unpadded": (16, 16, 3, 2, 0, 1, 1, (8, 7), 2),
    "unravel-b4-dilated": (12, 20, 3, 1, 2, 2, 4, (7, 7), 1),
    "unravel-b2-5x5": (10, 18, 5, 1, 2, 1, 2, (5, 7), 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIC_CASES))
def test_sic_kernel_matches_the_layer(case, dtype, device):
    ci, co, k, s, p, d, b, hw, batch = SIC_CASES[case]
    layer = SICLayer(ci, co, k, s, p, d) if b == 1 else UnraveledConv(ci, co, k, b, s, p, d)
    seen = check(randomized(layer), (batch, ci, *hw), device, dtype)
    assert set(seen) == {"triton:sic"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [2, 3])
def test_sic_kernel_with_topological_projection(rank, dtype, device):
    layer = randomized(SICLayer(64, 64, 3, 1, 1, topology=Topology.auto(64, 64, rank)))
    seen = check(layer, (1, 64, 5, 5), device, dtype, epilogues=((True, True),))
    assert "triton:sic" in seen and any("sparse" in s for s in seen), seen


def test_block_schedule_lists_exactly_the_tiles_with_connections():
    layer = TopoConv2d(64, 48, 1, Topology.auto(64, 48, 2))
    mask = torch.zeros(64, 48, dtype=torch.bool)
    mask[layer.neighbours, torch.arange(48)[:, None].expand_as(layer.neighbours)] = True
    ptr, idx = block_schedule(mask, 16, 16)
    for j in range(3):
        listed = set(idx[ptr[j]:ptr[j + 1]].tolist())
        live = {t for t in range(4) if mask[t * 16:(t + 1) * 16, j * 16:(j + 1) * 16].any()}
        assert listed == live
    assert live_fraction(mask, 16, 16) < 1.0, "a density-1/4 topology must leave tiles out"
    paper = Topology.auto(512, 512, 2)  # 16 x 32 grid, 8 x 16 windows
    big = torch.zeros(512, 512, dtype=torch.bool)
    big[paper.neighbours(), torch.arange(512)[:, None].expand(512, paper.connections)] = True
    assert live_fraction(big, 16, 64) <= 0.6  # GPU tile: skips over 40% of the dense work


# --------------------------------------------------------------------------- spatial bottleneck

BOTTLENECK_CASES = {  # in, out, k, offset, (H, W), topology rank (0: dense projection)
    "k2-offset0-odd": (24, 20, 2, 0, (7, 9), 0),
    "k2-offset1": (24, 20, 2, 1, (8, 8), 0),
    "k3-offset1-uneven": (16, 24, 3, 1, (7, 10), 0),
    "k2-topological": (32, 32, 2, 1, (9, 7), 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(BOTTLENECK_CASES))
def test_bottleneck_kernel_matches_the_layer(case, dtype, device):
    ci, co, k, offset, hw, rank = BOTTLENECK_CASES[case]
    topo = Topology.auto(ci, co, rank) if rank else None
    layer = randomized(SpatialBottleneck(ci, co, k, offset, topology=topo))
    seen = check(layer, (2, ci, *hw), device, dtype)
    assert ("triton:bottleneck" in seen) and (not rank or any("sparse" in s for s in seen)), seen


# --------------------------------------------------------------------------- topological projection alone

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ci,co,rank", [(32, 48, 2), (64, 40, 3)])
def test_topological_projection_kernel_matches_the_layer(ci, co, rank, dtype, device):
    layer = randomized(TopoConv2d(ci, co, 1, Topology.auto(ci, co, rank)))
    seen = check(layer, (2, ci, 3, 5), device, dtype)
    assert seen and all("sparse" in s for s in seen), seen


# --------------------------------------------------------------------------- stacks, dtypes, fallbacks

@pytest.mark.parametrize("device", DEVICES)
def test_fused_stack_matches_the_stack_with_folded_norms(device):
    conv = nn.Conv2d(24, 24, 3, padding=1)
    stack = randomized(SICStack.from_conv(conv, depth=2, norm=True))
    x = torch.randn(2, 24, 6, 7)
    with torch.no_grad():
        ref = stack(x)
    frozen = freeze(stack).to(device)
    fused = StackOp([fused_ops(op, device)[0] for op in frozen.ops], frozen.residual)
    with on(device), torch.no_grad():
        y = fused(x.to(device).contiguous(memory_format=torch.channels_last))
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_float16(device):
    check(randomized(SICLayer(16, 20, 3, 1, 1)), (1, 16, 5, 6), device, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_portable_export_and_autograd_use_the_standard_ops(device):
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1))).to(device)
    fused = fused_ops(op, device)[0]
    x = torch.randn(1, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    with on(device):
        with torch.no_grad():
            ref = op(x)
            with portable():
                program = torch.export.export(fused, (x,))
                y_portable = fused(x)
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("leanconv" in t for t in targets), targets
        assert any("conv2d" in t or "convolution" in t for t in targets), targets
        assert torch.equal(y_portable, ref)
        xg = x.clone().requires_grad_()
        fused(xg).sum().backward()  # fine-tuning's path: the unfused ops, differentiable
        assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_compile_and_export_see_one_custom_op_per_layer(device):
    stack = randomized(SICStack.from_conv(nn.Conv2d(16, 16, 3, padding=1), depth=2))
    frozen = freeze(stack).to(device)
    fused = StackOp([fused_ops(op, device)[0] for op in frozen.ops], frozen.residual)
    x = torch.randn(1, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    with on(device), torch.no_grad():
        y = torch.compile(fused, backend=backend, fullgraph=True)(x)
        program = torch.export.export(fused, (x,))
        ref = frozen(x)
    calls = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.leanconv.sic_layer.default) == 2 and len(calls) == 2, calls
    exported = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert exported.count(torch.ops.leanconv.sic_layer.default) == 2, exported
    assert rel_err(y, ref) < 1e-4


def test_fake_implementations_check_out():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layers = [SICLayer(16, 24, 3, 2, 1, topology=Topology.auto(16, 24, 2)), SpatialBottleneck(16, 16, 2, 1),
              TopoConv2d(32, 32, 1, Topology.auto(32, 32, 2))]
    kernels = set()
    for layer in layers:
        op = freeze(randomized(layer))
        op.relu = True
        fused = fused_ops(op, "cpu")[-1]  # a block-sparse one: every optional operand is given
        x = torch.randn(1, layer.in_channels, 5, 7).contiguous(memory_format=torch.channels_last)
        with cpu_interpreter(), torch.no_grad():
            out = fused(x)
            args = fused.kernel_args(x, torch.randn_like(out))
            torch.library.opcheck(fused.kernel, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        with FakeTensorMode() as mode:
            fake = fused.kernel(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert (fake.shape, fake.stride(), fake.dtype) == (out.shape, out.stride(), out.dtype), fused.impl_name()
        kernels.add(fused.kernel)
    assert len(kernels) == 3


# --------------------------------------------------------------------------- optimize's choice

def _small_network() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    return randomized(nn.Sequential(SICStack.from_conv(conv, depth=2, topology_rank=2), nn.BatchNorm2d(16), nn.ReLU()))


def test_hook_offers_fused_ops_only_where_kernels_run():
    op = freeze(randomized(SICLayer(16, 16, 3, 1, 1)))
    assert not any(isinstance(a, FusedOp) for a in alternatives(op)), "the CPU without the interpreter has none"
    with cpu_interpreter():
        assert [f.impl_name() for f in gpu_alternatives(op)] == ["triton:sic"]
        assert gpu_alternatives(copy.deepcopy(op).double()) == [], "no kernels for float64"
        grouped = freeze(randomized(TopoConv2d(16, 16, 3, Topology.auto(16, 16, 2), padding=1)))
        assert gpu_alternatives(grouped) == [], "a 3x3 topological conv has no kernel of ours"
        reflect = freeze(randomized(SICLayer(16, 16, 3, 1, 1, padding_mode="reflect")))
        assert gpu_alternatives(reflect) == [], "padding_mode='reflect' is not fused"
        assert gpu_alternatives(fused_ops(op, "cpu")[0]) == [], "a fused op is not fused again"


def test_optimize_times_the_fused_ops_and_runs_the_one_it_keeps(monkeypatch):
    model = _small_network()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with cpu_interpreter():
        timed = leanconv.optimize(model, x, repeats=1, guard=False)
        names = {n for c in leanconv.implementation_choices(timed) for n, _ in c.timings}
        assert "triton:sic" in names and any(n.startswith("triton:sic/sparse") for n in names), names

        real = autotune._fastest

        def prefer_fused(fns, *args):  # time everything as usual, then keep the first fused candidate
            best, seconds = real(fns, *args)
            fused = [i for i, fn in enumerate(fns) if isinstance((fn.__defaults__ or (None,))[0], FusedOp)]
            return (fused[0] if fused else best), seconds

        monkeypatch.setattr(autotune, "_fastest", prefer_fused)
        autotune.clear_timings()
        opt = leanconv.optimize(model, x, repeats=1, guard=False)
        with torch.no_grad():
            y = opt(x)
    autotune.clear_timings()
    kept = [m for m in opt.modules() if isinstance(m, FusedOp)]
    assert len(kept) == 2, [type(m).__name__ for m in opt.modules()]
    assert rel_err(y, ref) < 1e-4
    with torch.no_grad():  # outside cpu_interpreter: the same modules run the standard ops
        assert rel_err(opt(x), ref) < 1e-4
    assert all(isinstance(m.ref, SplitOp) for m in kept)
