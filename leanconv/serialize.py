"""save / load a converted model (a JSON manifest and safetensors weights: nothing is unpickled, nothing
named in a file runs unless the user trusts it), and writing files safely: atomic files, locked directories.

A model directory::

    manifest.json        what the directory holds: the layers, the plan, the weight file's name, size
                         and SHA-256 (checked on load)
    model.safetensors    the weights
    plan.json            a readable copy of the plan (``load_plan`` reads the manifest's)

Saving over a model writes the new weights under a name of their own (``model-<sha256[:16]>``), commits
by replacing the manifest (one rename), then moves them to ``model.safetensors`` by a hard link and a
second manifest: at every moment the manifest names a complete weight file, so an interruption leaves
the old model or the new one, never a mix.

Directories written by leanconv 0.1 (format ``leanconv-model/1``: ``model.safetensors``, no checksum,
plan.json) still load.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from leanconv.errors import ModelError, OutputError
from leanconv.registry import layer_from_config
from leanconv.models import ModelSource, apply_state_dict, check_trusted, dtype_kind
from leanconv.passes import replace_modules
from leanconv.plan import ConversionPlan

try:
    import fcntl
except ImportError:  # not POSIX: directories are not locked
    fcntl = None

FORMAT = "leanconv-model/2"
OLD_FORMAT = "leanconv-model/1"
MANIFEST, WEIGHTS, PLAN = "manifest.json", "model.safetensors", "plan.json"
LOCK = ".leanconv.lock"
_HASHED_WEIGHTS = re.compile(r"model-[0-9a-f]{16}\.safetensors")   # a new model's weights, until renamed
_OUR_TEMPS = re.compile(r"\.(model-.*|manifest\.json\..*|plan\.json\..*)\.tmp")


# --------------------------------------------------------------------------- writing files


def output_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """One line for an OSError while writing ``path``: what failed and what to do."""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space or write elsewhere"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable directory"
    else:
        hint = "check the path"
    return OutputError(f"cannot write {path}: {what}; {hint}")


def atomic_write(path: Path, write, durable: bool = False) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it in.

    With ``durable``, the data reaches the disk before the rename (fsync), so a power cut cannot
    leave an empty file under the name.

    Raises:
        OutputError: the directory cannot be written (read-only, full, a file in the way);
            ``path`` is unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; give the mode open() would
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError) and e.errno is not None:
            raise output_error(path, e) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict, durable: bool = False) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"), durable)


_HELD: dict[Path, int] = {}


@contextmanager
def locked(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive OS lock (flock) on ``directory`` while writing it, creating it if needed.

    Checks, before any work is done, that the directory can be written. Re-entrant within a process.
    When the block fails and the directory was created for it, the empty directory is removed.

    Raises:
        OutputError: a file in the way, a directory that cannot be written, or another job holding the lock.
    """
    d = Path(directory)
    key = d.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield d
        finally:
            _HELD[key] -= 1
        return
    if d.exists() and not d.is_dir():
        raise OutputError(f"{d} is a file, not a directory; choose a directory (it is created when missing)")
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except FileExistsError:
        raise OutputError(f"{d} is a file, not a directory; choose a directory") from None
    except NotADirectoryError:
        raise OutputError(f"cannot create {d}: part of its path is a file; choose another directory") from None
    except OSError as e:
        if created and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
        raise output_error(d, e) from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(f"{d} is being written by another leanconv job{f' (pid {holder})' if holder else ''}; "
                              f"wait for it to finish, or choose another directory") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # only informs a second job; the lock is what counts
    _HELD[key] = 1
    failed = False
    try:
        yield d
    except BaseException:
        failed = True
        raise
    finally:
        del _HELD[key]
        if failed and created and [p.name for p in d.iterdir()] == [LOCK]:
            os.unlink(d / LOCK)
            d.rmdir()
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- save


def save(model: nn.Module, plan: ConversionPlan, directory: str | os.PathLike,
         source: ModelSource | None = None) -> Path:
    """Save ``model`` (converted by ``plan``) into ``directory``, replacing the model there as a whole.

    The manifest is the commit (see the module's notes): an interruption (a signal, a full disk, a
    power cut) leaves the old model or the new one, never a mix. Other files in the directory (a
    run's) are left alone.

    Args:
        source: how to build the base model again (default: the plan's); without one, ``load``
            needs ``base=``.
    Returns:
        The directory.
    Raises:
        OutputError: the directory cannot be written (it is then as it was), or another job writes it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    d = Path(directory)
    src = source.to_dict() if source else plan.source
    with locked(d):
        old = _previous_weights(d)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".model-", suffix=".tmp")
            os.close(fd)
            save_model(model, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            digest, size = file_sha256(tmp)
            name = f"model-{digest[:16]}.safetensors"
            os.replace(tmp, d / name)
            tmp = None
        except OSError as e:
            raise output_error(d / WEIGHTS, e) from e
        except SafetensorError as e:  # safetensors reports its I/O errors as its own
            no_space = "os error 28" in str(e) or "os error 122" in str(e)
            raise output_error(d / WEIGHTS, OSError(errno.ENOSPC if no_space else errno.EIO, str(e))) from e
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        manifest = {"format": FORMAT, "source": src, "layers": {l.name: l.replacement for l in plan.converted},
                    "weights": {"file": name, "sha256": digest, "bytes": size}, "plan": plan.to_dict()}
        try:
            write_json(d / MANIFEST, manifest, durable=True)  # the commit: from here on, the new model
        except BaseException:
            if name != old and _previous_weights(d) != name:  # (a signal may land just after the rename)
                (d / name).unlink(missing_ok=True)
            raise
        _fsync_dir(d)
        write_json(d / PLAN, plan.to_dict())
        # a model.safetensors beside a manifest is ours; beside none, it may be someone else's: keep it
        ours = old is not None or not (d / WEIGHTS).exists()
        if ours and _link_as(d / name, d / WEIGHTS):  # the usual name again; the manifest names a whole file throughout
            write_json(d / MANIFEST, {**manifest, "weights": {**manifest["weights"], "file": WEIGHTS}}, durable=True)
            name = WEIGHTS
        _remove_stale(d, keep=name, ours=ours)
    return d


def _link_as(src: Path, dst: Path) -> bool:
    """Put a hard link of ``src`` at ``dst`` in one rename; False where the filesystem has no hard links."""
    tmp = dst.with_name(f".{src.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _previous_weights(d: Path) -> str | None:
    """The weight file the directory's present manifest names (None without a readable one)."""
    try:
        return _weights_entry(read_manifest(d))["file"]
    except ModelError:
        return None


def _remove_stale(d: Path, keep: str, ours: bool) -> None:
    """The previous model's weights and leftovers of interrupted saves (only names leanconv writes)."""
    for p in d.iterdir():
        stale = _HASHED_WEIGHTS.fullmatch(p.name) or _OUR_TEMPS.fullmatch(p.name) or (ours and p.name == WEIGHTS)
        if stale and p.name != keep:
            p.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# --------------------------------------------------------------------------- records


def read_record(path: Path, fmt: str | tuple[str, ...], missing: str) -> dict:
    """A JSON record leanconv wrote (manifest, run.json, sweep.json), checked for its format.

    Raises:
        ModelError: ``missing`` when the file is absent; unreadable, corrupt or another format.
    """
    if not path.is_file():
        raise ModelError(missing)
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path} is unreadable or corrupt: {e}") from None
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not isinstance(info, dict) or info.get("format") not in formats:
        got = info.get("format") if isinstance(info, dict) else None
        raise ModelError(f"{path} has format {got!r:.80}, expected {' or '.join(map(repr, formats))}")
    return info


def require(record: dict, key: str, kind: type | tuple, path: str | os.PathLike, optional: bool = False):
    """``record[key]``, checked to be a ``kind`` (bools are not numbers here).

    Raises:
        ModelError: naming the file and the missing or mistyped field.
    """
    if key not in record or record[key] is None:
        if optional:
            return None
        raise ModelError(f"{path} is damaged: field {key!r} is missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ModelError(f"{path} is damaged: field {key!r} should be {names}, got {value!r:.80}")
    return value


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a model directory, every field checked for type.

    Raises:
        ModelError: not a model directory, or a damaged manifest.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{d} is not a directory; expected a leanconv run or model directory")
    path = d / MANIFEST
    info = read_record(path, (FORMAT, OLD_FORMAT), f"{d} holds no saved model ({MANIFEST} is missing); save one "
                                                   f"with `leanconv convert --out {d}` or leanconv.save")
    require(info, "source", dict, path, optional=True)
    layers = require(info, "layers", dict, path)
    for name, cfg in layers.items():
        if not name or not isinstance(cfg, dict):
            raise ModelError(f"{path} is damaged: layer {name!r:.80} has no config object")
    if info["format"] == FORMAT:
        require(info, "plan", dict, path)
        w = require(info, "weights", dict, path)
        file = require(w, "file", str, path)
        if file != WEIGHTS and not _HASHED_WEIGHTS.fullmatch(file):  # a bare name in this directory, never a path
            raise ModelError(f"{path} is damaged: weight file {file!r:.80} is not a name leanconv writes")
        if not re.fullmatch(r"[0-9a-f]{64}", require(w, "sha256", str, path)):
            raise ModelError(f"{path} is damaged: the weights' sha256 is not 64 hex digits")
        if require(w, "bytes", int, path) < 0:
            raise ModelError(f"{path} is damaged: negative weight file size")
    return info


def _weights_entry(manifest: dict) -> dict:
    return manifest["weights"] if manifest["format"] == FORMAT else {"file": WEIGHTS}


def weights_file(directory: str | os.PathLike) -> Path:
    """The weight file of the model saved in ``directory``."""
    return Path(directory) / _weights_entry(read_manifest(directory))["file"]


def load_plan(directory: str | os.PathLike) -> ConversionPlan:
    """The ConversionPlan saved with a model (from its manifest; plan.json for older directories)."""
    d = Path(directory)
    if (d / MANIFEST).is_file():
        manifest = read_manifest(d)
        if manifest["format"] == FORMAT:
            try:
                return ConversionPlan.from_dict(manifest["plan"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ModelError(f"{d / MANIFEST} is damaged: its plan is incomplete ({type(e).__name__}: {e})") from None
    path = d / PLAN
    try:
        return ConversionPlan.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{path} is unreadable or corrupt: {e}") from None


# --------------------------------------------------------------------------- load


def load(directory: str | os.PathLike, base: nn.Module | None = None, *,
         trust_source: bool | str = False) -> nn.Module:
    """Rebuild a saved converted model: base model, replacement layers by name, then the weights.

    A directory is data: the weight file must match its recorded SHA-256, every layer config and
    tensor shape is checked against the weight file's header before anything is allocated, and the
    base model is rebuilt only from torchvision's or timm's registry (names and plain arguments
    checked) or by leanconv's own builders. A ``package.module:factory`` the manifest names is imported
    and called only with ``trust_source``.

    Args:
        base: a freshly built base model; required when the model was saved without a source,
            and the way to load a model whose factory you do not want to run from the directory.
        trust_source: True to let the manifest's factory run, or the one spec you trust
            (e.g. ``"mypkg.models:net"``).
    Raises:
        ModelError: missing, damaged or altered files, weights that do not fit, or an untrusted factory.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    where = d / MANIFEST
    weights = d / _weights_entry(manifest)["file"]
    _verify(weights, manifest)
    header = _header(weights)
    if base is None:
        if not manifest.get("source"):
            raise ModelError(f"{d} was saved without a model source; pass base=<a freshly built base model>")
        source = ModelSource.from_dict(manifest["source"], str(where))
        check_trusted(source, trust_source, str(where))
        skeleton = source.build_meta()
        if skeleton is None:  # a builder that cannot run on the meta device
            base = skeleton = source.build(with_weights=False)
    else:
        skeleton = base
    layers = manifest["layers"]
    for name, cfg in layers.items():
        _check_config(cfg, f"{where}: layer {name!r}")
    _check_fits(skeleton, {n: _layer(cfg, n, where, meta=True) for n, cfg in layers.items()}, header, weights)
    if base is None:
        base = source.build(with_weights=False)
    replace_modules(base, {name: _layer(cfg, name, where) for name, cfg in layers.items()})
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{weights} is unreadable or corrupt: {e}") from None
    own = base.state_dict()
    # tied tensors are stored once by save_model; fill the aliases from their twins
    for k in own:
        if k not in sd:
            twin = next((j for j in own if j != k and j in sd and own[j].data_ptr() == own[k].data_ptr()), None)
            if twin is not None:
                sd[k] = sd[twin]
    apply_state_dict(base, sd, str(weights))
    base.eval()
    return base


def _verify(weights: Path, manifest: dict) -> None:
    """The weight file exists and (format 2) has the size and SHA-256 the manifest records."""
    if not weights.is_file():
        raise ModelError(f"{weights} is missing; the directory is incomplete: save the model again")
    if manifest["format"] != FORMAT:
        return
    entry = manifest["weights"]
    size = weights.stat().st_size
    if size != entry["bytes"] or file_sha256(weights)[0] != entry["sha256"]:
        what = f"has {size} bytes, the manifest records {entry['bytes']}" if size != entry["bytes"] else \
            "does not match the SHA-256 its manifest records"
        raise ModelError(f"{weights} {what}: it was changed or damaged after it was saved; save the model again "
                         f"or restore the file")


def _header(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype kind)} from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _header_kind(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{weights} is unreadable or corrupt: {e}") from None


def _header_kind(code: str) -> str:
    if code == "BOOL":
        return "bool"
    if code.startswith(("F", "BF")):
        return "float"
    return "complex" if code.startswith("C") else "int"


# a saved layer config describes at most this many channels (and this much kernel, stride, ...)
_MAX_CONFIG_INT = 2 ** 16


def _check_config(value, where: str, depth: int = 0) -> None:
    """Bounds on a layer config from a file, checked before anything is built from it: plain JSON,
    shallow, short lists, integers (and products of integer lists, e.g. grid dims) up to 65536."""
    if depth > 8:
        raise ModelError(f"{where}: the layer config is nested too deeply; the file is damaged")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_config(v, where, depth + 1)
    elif isinstance(value, list):
        if len(value) > 256:
            raise ModelError(f"{where}: a list of {len(value)} items in the layer config; the file is damaged")
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if ints and abs(math.prod(ints)) > _MAX_CONFIG_INT:
            raise ModelError(f"{where}: sizes {value!r:.80} describe a layer wider than {_MAX_CONFIG_INT} channels; "
                             f"the file is damaged or was edited")
        for v in value:
            _check_config(v, where, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_CONFIG_INT:
        raise ModelError(f"{where}: the layer config holds the size {value}, more than {_MAX_CONFIG_INT}; the file "
                         f"is damaged or was edited")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ModelError(f"{where}: the layer config holds {value}; the file is damaged")


def _layer(cfg: dict, name: str, where: Path, meta: bool = False) -> nn.Module:
    try:
        if meta:
            with torch.device("meta"):
                return layer_from_config(cfg)
        return layer_from_config(cfg)
    except Exception as e:  # a damaged config can fail in any constructor
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{where}: the saved config of layer {name!r} cannot be built ({type(e).__name__}: "
                         f"{first}); the file is damaged or was edited: save the model again") from e


def _check_fits(skeleton: nn.Module, layers: dict[str, nn.Module], header: dict, weights: Path) -> None:
    """Every tensor the model will have, against the weight file's header: names, shapes, dtype kinds.

    Runs on meta-device layers, so a damaged config that asks for terabytes is refused without
    allocating them. A tensor absent from the file passes only where another of its shape is there
    (safetensors stores tied tensors once); the strict check follows after loading.
    """
    for name in layers:
        try:
            skeleton.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{weights.parent / MANIFEST} replaces layer {name!r}, which the model does not have; "
                             f"the directory does not belong to this model") from None
    prefixes = tuple(f"{n}." for n in layers)
    expected = {k: (tuple(v.shape), dtype_kind(v.dtype)) for k, v in skeleton.state_dict().items()
                if not k.startswith(prefixes)}
    for n, layer in layers.items():
        expected.update({f"{n}.{k}": (tuple(v.shape), dtype_kind(v.dtype)) for k, v in layer.state_dict().items()})
    shapes = {s for s, _ in header.values()}
    problems = [f"{k} is not in the model" for k in header if k not in expected]
    problems += [f"{k}: {header[k][0]} {header[k][1]} in the file, {expected[k][0]} {expected[k][1]} in the model"
                 for k in header if k in expected and header[k] != expected[k]]
    problems += [f"{k} {expected[k][0]} is missing" for k in expected if k not in header and expected[k][0] not in shapes]
    if problems:
        raise ModelError(f"{weights} does not fit the model its manifest describes ({len(problems)} tensors, e.g. "
                         f"{'; '.join(problems[:2])}); the directory is damaged or was edited: save the model again")
