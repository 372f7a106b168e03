"""Build (once per source, torch version and ISA; cached on disk) and load leanconv's C++ CPU kernels."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES: list[Path] = []  # C++ sources of the methods' kernels (kernels.cpu.kernel_module), one extension
HERE = Path(__file__).parent
MODULE = HERE / "module.cpp"  # the extension's one PYBIND11_MODULE: binds what every source registered
HEADERS = sorted(HERE.glob("*.h"))  # shared by every source (kernels.h: vectors, band GEMM, registration)
DISABLE_ENV = "LEANCONV_CPU_KERNELS"  # "0": never build or offer the CPU kernels

# compiler flags per torch CPU capability (torch.backends.cpu.get_cpu_capability(): what this CPU
# runs, capped by ATEN_CPU_CAPABILITY); the kernels are written with 16-float vectors, which GCC
# maps to one zmm (AVX-512), two ymm (AVX2) or SSE registers (default)
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-DNDEBUG"]


def isa() -> str:
    """The instruction set the kernels are built for: ``AVX512``, ``AVX2`` or ``DEFAULT``."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_FLAGS else "DEFAULT"


def cache_root() -> Path:
    """``$LEANCONV_CACHE`` or the user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``) / leanconv."""
    if os.environ.get("LEANCONV_CACHE"):
        return Path(os.environ["LEANCONV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanconv"


def build_tag() -> str:
    """What a build depends on: the sources, the flags, torch's version and the ISA."""
    h = hashlib.sha256()
    for path in [MODULE, *HEADERS, *SOURCES]:
        h.update(path.read_bytes())
    flags = BASE_FLAGS + ISA_FLAGS.get(isa(), [])
    h.update(" ".join(flags).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return f"{isa().lower()}_{h.hexdigest()[:16]}"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


class BuildError(RuntimeError):
    """The kernels could not be built here (the message says why, in one line)."""


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its warning that no CUDA runtime exists
    (the kernels are CPU-only)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _linked(source: Path, where: Path) -> Path:
    """``source`` under a name unique in the build (``<method>_<file>``, a link in ``where``): the
    build names each object file after its source's file name, and two methods' ``cpu.cpp`` would
    both make ``cpu.o``. Includes are found through the include path, not the source's folder."""
    link = where / f"{source.parent.name}_{source.name}"
    if not (link.is_symlink() and link.resolve() == source.resolve()):
        link.unlink(missing_ok=True)
        link.symlink_to(source.resolve())
    return link


def _build() -> ModuleType:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        raise BuildError(f"switched off by {DISABLE_ENV}=0")
    if _compiler() is None:
        raise BuildError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH)")
    cpp_extension = _cpp_extension()
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed (pip install ninja)")
    tag = build_tag()
    where = cache_root() / "cpu-kernels" / f"torch{torch.__version__.split('+')[0]}" / tag
    where.mkdir(parents=True, exist_ok=True)
    if not SOURCES:
        raise BuildError("no method registered C++ kernel sources")
    src = [str(MODULE)] + [str(_linked(path, where)) for path in SOURCES]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=f"leanconv_cpu_{tag}", sources=src, build_directory=str(where),
                                      extra_include_paths=[str(HERE)],
                                      extra_cflags=BASE_FLAGS + ISA_FLAGS.get(isa(), []),
                                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a compiler error, a missing header, a linker failure: say it in one line
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise BuildError(f"the build failed ({first[:200]}); build log in {where}") from None


_RESULT: ModuleType | BuildError | None = None  # the build's outcome in this process, once tried


def load() -> ModuleType:
    """The compiled kernels (built on first use, then loaded from the cache).

    Raises:
        BuildError: where they cannot be built here (no compiler, no ninja, a failed build, or
        switched off by ``LEANCONV_CPU_KERNELS=0``); the failure is remembered for the process
        (never retried per call).
    """
    global _RESULT
    if _RESULT is None:
        try:
            _RESULT = _build()
        except BuildError as e:
            _RESULT = e
    if isinstance(_RESULT, BuildError):
        raise _RESULT
    return _RESULT


_WARNED = False


def available() -> bool:
    """Whether the kernels load here; the first time they do not, one warning says why."""
    global _WARNED
    try:
        load()
        return True
    except BuildError as e:
        if not _WARNED:
            _WARNED = True
            if not str(e).startswith("switched off"):
                warnings.warn(f"leanconv.optimize: CPU kernels unavailable: {e}; using the library "
                              "implementations", stacklevel=3)
        return False


def reset() -> None:
    """Forget the loaded (or failed) build and the warning (tests)."""
    global _RESULT, _WARNED
    _RESULT, _WARNED = None, False
