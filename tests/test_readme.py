"""README's Python example runs as written (on Fashion-MNIST, which the tests need anyway)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_one_python_example():
    assert len(python_blocks()) == 1


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    from leanconv.data import find_fashion_mnist
    from leanconv.errors import DataError
    try:
        find_fashion_mnist()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    script = tmp_path / "example.py"
    script.write_text(python_blocks()[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steady on a shared machine (2 threads: ~20 s quiet, minutes under load)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "converted 6 of 7 listed convs" in out            # plan.table()
    assert "calibrated" in out and "fine-tuning:" in out    # the calibration report, the fine-tuning result
    assert (tmp_path / "runs" / "snippet" / "manifest.json").is_file()   # leanconv.save wrote the model
