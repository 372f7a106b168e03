"""Compile leanconv's Triton kernels for a GPU that is not here (Hopper, sm_90, by default): Triton's own
compiler and its bundled ptxas, no driver needed. Catches what the interpreter does not (types, layouts,
register pressure). Prints one JSON line per compiled variant: seconds, registers, spills, shared memory.

    python tests/compile_kernels.py            # a few variants (what the test runs)
    python tests/compile_kernels.py --all      # every variant x block config the kernels can be launched with

Run in its own process: the kernels must be defined compiled, not under ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills
_CACHE = tempfile.TemporaryDirectory(prefix="leanconv-triton-")  # never a cache hit (it prints no ptxas log)
os.environ["TRITON_CACHE_DIR"] = _CACHE.name
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from leanconv.methods.bottleneck import triton as bottleneck  # noqa: E402
from leanconv.methods.sic import triton as sic  # noqa: E402
from leanconv.kernels.triton_util import DENSE_CONFIGS, GPU_SPARSE_TILES, SPARSE_CONFIG  # noqa: E402

TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
INDEX_PTRS = ("ksrc_ptr", "kt_ptr", "kt_idx_ptr", "nout_ptr")
DATA_PTRS = ("x_ptr", "dww_ptr", "w_ptr", "res_ptr", "y_ptr", "up_ptr")
FP32_PTRS = ("bias_ptr", "rs_ptr", "pbias_ptr")
ALIGNED_INTS = ("N", "K", "C_in")


def variants(everything: bool):
    """(name, kernel, constexprs, num_warps, dtype) to compile: with ``everything``, every dtype and
    block config the kernels launch with; else one config of each kernel in bfloat16."""
    sic_flags = dict(KH=3, KW=3, MULT=1, HAS_DW=True, GATHER_K=False, SCATTER_N=False, SPARSE=False)
    bottleneck_flags = dict(KS=2, GATHER_K=False, SCATTER_N=False, SPARSE=False)
    perm = dict(GATHER_K=True, SCATTER_N=True, SPARSE=True)
    block_m, warps = SPARSE_CONFIG
    sparse = [({"BLOCK_M": block_m, "BLOCK_K": bk, "BLOCK_N": bn}, warps) for bk, bn in GPU_SPARSE_TILES]
    out = []
    for dtype in (("bfloat16", "float16", "float32") if everything else ("bfloat16",)):
        size = 4 if dtype == "float32" else 2

        def dense(family):
            cfgs = [({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, w) for m, n, k, w in DENSE_CONFIGS[(family, size)]]
            return cfgs if everything else cfgs[1:2]
        for prec in (("tf32", "ieee") if everything and dtype == "float32" else ("tf32",)):
            for cfg, w in dense("sic"):
                out.append(("sic", sic._sic_kernel, {**sic_flags, **cfg, "PRECISION": prec}, w, dtype))
            for cfg, w in dense("bottleneck"):
                out.append(("bottleneck", bottleneck._bottleneck_kernel, {**bottleneck_flags, **cfg, "PRECISION": prec},
                            w, dtype))
            for cfg, w in (sparse if everything else sparse[:1]):
                out.append(("sic-topo", sic._sic_kernel, {**sic_flags, **perm, **cfg, "PRECISION": prec}, w, dtype))
                out.append(("topo", sic._sic_kernel, {**sic_flags, "KH": 1, "KW": 1, "HAS_DW": False, **perm, **cfg,
                                                      "PRECISION": prec}, w, dtype))
                out.append(("bottleneck-topo", bottleneck._bottleneck_kernel,
                            {**bottleneck_flags, **perm, **cfg, "PRECISION": prec}, w, dtype))
            if everything:
                cfg, w = dense("sic")[0]
                out.append(("unravel-5x5", sic._sic_kernel, {**sic_flags, "KH": 5, "KW": 5, "MULT": 4, **cfg,
                                                             "PRECISION": prec}, w, dtype))
    return out


def compile_one(kernel, constexprs: dict, num_warps: int, dtype: str, arch: int, num_stages: int = 3) -> dict:
    t = TYPES[dtype]
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX_PTRS:
            sig[name] = "*i32"
        elif name in DATA_PTRS:
            sig[name] = f"*{t}"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    # what a launch specializes on: aligned pointers (torch allocates at 256 bytes) and channel counts
    # that are multiples of 16 (every layer of VGG / ResNet); pixel counts are never specialized
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if sig[name].startswith("*") or name in ALIGNED_INTS}
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=aligned),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    ptx = compiled.asm["ptx"]
    return {"seconds": round(seconds, 2), "stages": num_stages, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None, "shared": compiled.metadata.shared,
            "tensor_core_ops": ptx.count("wgmma.mma_async") + ptx.count("mma.sync")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper, 80: Ampere)")
    a = ap.parse_args()
    for name, kernel, constexprs, warps, dtype in variants(a.all):
        info = compile_one(kernel, constexprs, warps, dtype, a.arch)
        blocks = "x".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        print(json.dumps({"kernel": name, "dtype": dtype, "precision": constexprs["PRECISION"], "blocks": blocks,
                          "warps": warps, **info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
