"""leanconv's Triton kernels compile for a Hopper GPU here, without one (Triton's compiler and its bundled
ptxas): what the interpreter cannot check (types, layouts, tensor-core lowering, register pressure)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_hopper_on_tensor_cores_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, in its own process
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"sic", "bottleneck", "sic-topo", "topo", "bottleneck-topo"}, rows
    for r in rows:
        assert r["tensor_core_ops"] > 0, f"{r}: no wgmma / mma instruction"
        assert r["spill_bytes"] == 0, f"{r}: registers spill to local memory"
