"""scripts/check_imports.py passes on leanconv and catches each kind of violation."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_imports.py"


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=120)


def test_leanconv_passes():
    res = run(SCRIPT.parent.parent / "leanconv")
    assert res.returncode == 0, res.stdout + res.stderr


def test_each_violation_is_one_line(tmp_path):
    pkg = tmp_path / "leanconv"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "calibrate").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "calibrate" / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "methods" / "mine.py").write_text("from leanconv.registry import register_layer\n\n\n"
                                             "@register_layer\nclass MyLayer:\n    pass\n")
    (pkg / "registry.py").write_text("def register_layer(c):\n    return c\n")
    # a stage importing a later one (convert -> calibrate is fine; calibrate -> methods is not) and naming a layer
    (pkg / "calibrate" / "steps.py").write_text("from leanconv.methods.mine import MyLayer\n")
    # a cycle through a lazy import
    (pkg / "data.py").write_text("import leanconv.models\n")
    (pkg / "models.py").write_text("def f():\n    import leanconv.data\n")
    # a cycle through an import by a literal name (the registry importing what registers in it)
    (pkg / "methods" / "other.py").write_text("import leanconv.registry\n")
    (pkg / "registry.py").write_text("import importlib\n\n\ndef register_layer(c):\n    return c\n\n\n"
                                     "def load():\n    importlib.import_module('leanconv.methods.other')\n")
    res = run(pkg)
    lines = res.stdout.splitlines()
    assert res.returncode == 1
    assert any("later stage" in l and "leanconv.methods.mine" in l for l in lines), lines
    assert any("names the layer class MyLayer" in l for l in lines), lines
    assert any(l.startswith("import cycle:") and "leanconv.data" in l and "leanconv.models" in l for l in lines), lines
    assert any(l.startswith("import cycle:") and "leanconv.registry" in l and "leanconv.methods.other" in l
               for l in lines), lines
