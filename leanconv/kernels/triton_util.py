"""Triton plumbing shared by every fused layer: where kernels can run, when a call may use them,
block-size configs for ``@triton.autotune``, and custom-op registration."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable

import torch
from torch import Tensor

from leanconv.optimize import ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STATE = threading.local()


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works here (it ships with CUDA builds of torch; ``pip install triton``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an import error, or a broken install: no kernels, never a crash
        return False
    return True


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (kernels defined now run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_MODULES: list[str] = []      # modules defining fused kernels (imported on first use)
_INTERPRETED: list[bool] = []  # fixed by the first kernel module imported


def kernel_module(name: str) -> None:
    """Register a module that defines fused kernels (and registers them with
    ``fused.fused_alternative`` on import): a method's home calls this, so that the kernels (and
    Triton) are imported only where ``fused.gpu_alternatives`` is asked for them."""
    if name not in _MODULES:
        _MODULES.append(name)


def load_kernels() -> None:
    """Import every registered kernel module (each registers its builders on first import)."""
    import importlib

    for name in list(_MODULES):
        importlib.import_module(name)


def kernels_interpreted() -> bool:
    """Whether leanconv's Triton kernels are (or will be) defined under Triton's interpreter:
    ``TRITON_INTERPRET`` at the first call, which each kernel module makes on import."""
    if not _INTERPRETED:
        _INTERPRETED.append(interpreter_requested())
    return _INTERPRETED[0]


@contextlib.contextmanager
def cpu_interpreter():
    """Within the block, CPU tensors count as a device the kernels run on, where they were
    defined under Triton's interpreter: how the kernels and their integration are tested
    without a GPU. Outside it the interpreter is never offered to ``optimize`` (it is slow).
    ``TRITON_INTERPRET`` is set for the block too (the interpreter checks it while it runs)."""
    old, env = getattr(_STATE, "cpu", False), os.environ.get("TRITON_INTERPRET")
    _STATE.cpu = True
    if triton_importable() and kernels_interpreted():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        _STATE.cpu = old
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


_RUNS_ON: dict[tuple[str, int | None], bool] = {}  # a plain dict: torch.compile traces lookups in it


def _probe(device: torch.device) -> bool:
    if not triton_importable():
        return False
    if device.type == "cpu":
        return kernels_interpreted()
    if not torch.cuda.is_available() or kernels_interpreted():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)  # bf16 tensor-core dots need sm_80


def runs_on(device: torch.device) -> bool:
    """Whether the fused kernels run on tensors on ``device`` here: a CUDA device of compute
    capability 8.0 or newer with Triton, or the CPU under ``cpu_interpreter()``."""
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not getattr(_STATE, "cpu", False)):
        return False
    key = (device.type, device.index)
    hit = _RUNS_ON.get(key)
    if hit is None:
        hit = _RUNS_ON[key] = _probe(device)
    return hit


def kernel_path(x: Tensor) -> bool:
    """Whether this call may run a fused kernel: an inference input (no autograd) of a supported
    dtype on a device the kernels run on, outside ``portable()``, ONNX export, TorchScript and
    ``torch.jit.trace``. ``torch.compile`` and ``torch.export`` see the kernels as one custom op."""
    if x.requires_grad or x.dtype not in DTYPES or getattr(ops._STATE, "portable", False):
        return False
    if torch.compiler.is_compiling():
        return runs_on(x.device)
    if torch._C._get_tracing_state() is not None or torch.jit.is_scripting() or ops._onnx_exporting():
        return False
    return runs_on(x.device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for float32 operands: TF32 tensor cores where torch's own
    convolutions use them (``torch.backends.cudnn.allow_tf32``, on by default), else exact."""
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


# --------------------------------------------------------------------------- block sizes

# (BLOCK_K, BLOCK_N) tiles the block-sparse schedule is built for; each is one alternative that
# optimize times. Smaller tiles skip more of a topological projection, larger N tiles recompute
# the depthwise prologue less often (once per N tile). Computed share of the dense tiles for the
# paper's topologies (projection.live_fraction): 2-D grids at density 1/4, 128 / 256 / 512
# channels: 0.88 / 0.69 / 0.56 at 16x64, 0.75 / 0.62 / 0.50 at 32x32; 3-D: 0.75 / 0.62 / 0.50
# and 0.50 / 0.50 / 0.50. A dense product per tile cannot do better than about 1/2 at density 1/4.
GPU_SPARSE_TILES = ((16, 64), (32, 32))
INTERPRETER_TILE = 16  # every block dimension under the interpreter: fast tests, masks exercised


def sparse_tiles() -> tuple[tuple[int, int], ...]:
    """(BLOCK_K, BLOCK_N) of the block-sparse alternatives."""
    t = INTERPRETER_TILE
    return ((t, t),) if kernels_interpreted() else GPU_SPARSE_TILES


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the dense projection, per kernel family and operand size
# in bytes. Few, because each is compiled (about two seconds) for every kernel variant a network
# uses and a lent GPU's time is short; pruned at launch to the output's width (one config for 64
# channels, two for 128, three from 256 on: a 256-wide N tile runs the depthwise prologue once for
# 256 outputs). Compiled for sm_90 here (tests/compile_kernels.py), all without register spills:
# float32 takes K tiles of 16 (at 32, three pipeline stages of nine shifted input tiles need up to
# 338 KB of shared memory, over the H100's 227 KB); the bottleneck, whose epilogue writes k*k output
# tiles, takes M tiles of 32 reduced pixels from 128 channels on (64 spilled up to 1.4 KB).
DENSE_CONFIGS = {
    ("sic", 2): ((64, 64, 16, 4), (128, 128, 32, 8), (64, 256, 32, 8)),
    ("sic", 4): ((64, 64, 16, 4), (128, 128, 16, 8), (64, 256, 16, 8)),
    ("bottleneck", 2): ((64, 64, 16, 4), (32, 128, 32, 4), (32, 256, 32, 8)),
    ("bottleneck", 4): ((64, 64, 16, 4), (32, 128, 16, 4), (32, 256, 16, 8)),
}
SPARSE_CONFIG = (32, 4)  # BLOCK_M, num_warps of block-sparse launches (64 spilled with gathered channels)


def gemm_configs(sparse: bool, family: str = "sic") -> list:
    """``triton.Config`` list of the projection GEMM: block sizes for a dense projection (every
    operand size's; ``prune_gemm_configs`` picks); for a block-sparse one BLOCK_K / BLOCK_N are
    fixed by its schedule and only BLOCK_M is set. One small config under the interpreter."""
    import triton

    if kernels_interpreted():
        t = INTERPRETER_TILE
        return [triton.Config({"BLOCK_M": t} if sparse else {"BLOCK_M": t, "BLOCK_N": t, "BLOCK_K": t},
                              num_warps=1, num_stages=1)]
    if sparse:
        return [triton.Config({"BLOCK_M": SPARSE_CONFIG[0]}, num_warps=SPARSE_CONFIG[1], num_stages=3)]
    sizes = dict.fromkeys(c for (fam, _), cs in DENSE_CONFIGS.items() if fam == family for c in cs)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
            for m, n, k, w in sizes]


def prune_gemm_configs(family: str) -> Callable:
    """Autotune's ``early_config_prune`` for ``family``: the configs of the input's operand size whose
    N tile is no wider than the output needs (a 64-channel layer never runs 256-wide tiles)."""
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        n, size = named_args["N"], named_args["x_ptr"].element_size()
        widest = max(64, 1 << max(0, (n - 1).bit_length()))  # the power of two that covers N
        allowed = set(DENSE_CONFIGS[(family, 4 if size >= 4 else 2)])
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= widest and
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) in allowed]
        return kept or configs[:1]
    return prune


def quick_bench(kernel_call: Callable, quantiles=None):
    """Triton's autotune benchmark, shortened (5 ms warm-up, 20 ms of runs per config instead of
    25 / 100): a network has dozens of layer shapes and each is tuned once per process."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotuned(fn, sparse: bool, family: str = "sic", key: tuple[str, ...] = ("M", "N", "K")):
    """``fn`` (a ``triton.jit`` function) under ``triton.autotune`` with ``gemm_configs(sparse, family)``."""
    import triton

    prune = None if sparse or kernels_interpreted() else {"early_config_prune": prune_gemm_configs(family)}
    return triton.autotune(configs=gemm_configs(sparse, family), key=list(key), prune_configs_by=prune,
                           do_bench=quick_bench)(fn)


# --------------------------------------------------------------------------- custom ops

def channels_last_empty(shape: tuple[int, int, int, int], like: Tensor) -> Tensor:
    """An uninitialized NHWC ``(B, C, H, W)`` tensor of ``like``'s dtype and device (fake tensors too)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def custom_op(name: str, fake: Callable) -> Callable:
    """Register ``fn`` as the functional custom op ``leanconv::<name>`` (no mutated inputs) with
    ``fake`` as its shape function, so ``torch.compile``, CUDA graphs and ``torch.export`` see one op."""
    def register(fn: Callable):
        op = torch.library.custom_op(f"leanconv::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return register
