"""save / load a converted model: a JSON manifest and safetensors weights; nothing is unpickled."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from leanconv.errors import ModelError
from leanconv.layers.registry import layer_from_config
from leanconv.models import ModelSource, apply_state_dict
from leanconv.passes import replace_modules
from leanconv.plan import ConversionPlan

FORMAT = "leanconv-model/1"
MANIFEST, WEIGHTS, PLAN = "manifest.json", "model.safetensors", "plan.json"


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def save(model: nn.Module, plan: ConversionPlan, directory: str | os.PathLike,
         source: ModelSource | None = None) -> Path:
    """Save ``model`` (converted by ``plan``) into ``directory``: manifest, weights and plan.json.

    Args:
        source: how to build the base model again (default: the plan's); without one, ``load``
            needs ``base=``.
    Returns:
        The directory.
    """
    from safetensors.torch import save_model

    d = Path(directory)
    src = source.to_dict() if source else plan.source
    manifest = {"format": FORMAT, "source": src,
                "layers": {l.name: l.replacement for l in plan.converted}}
    atomic_write(d / WEIGHTS, lambda tmp: save_model(model, tmp))
    write_json(d / PLAN, plan.to_dict())
    write_json(d / MANIFEST, manifest)  # last: a directory with a manifest is complete
    return d


def read_record(path: Path, fmt: str, missing: str) -> dict:
    """A JSON record leanconv wrote (manifest, run.json, sweep.json), checked for its format.

    Raises:
        ModelError: ``missing`` when the file is absent; unreadable, corrupt or another format.
    """
    if not path.is_file():
        raise ModelError(missing)
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is unreadable or corrupt: {e}") from None
    if not isinstance(info, dict) or info.get("format") != fmt:
        got = info.get("format") if isinstance(info, dict) else None
        raise ModelError(f"{path} has format {got!r}, expected {fmt!r}")
    return info


def read_manifest(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{d} is not a directory; expected a leanconv run or model directory")
    return read_record(d / MANIFEST, FORMAT, f"{d} holds no saved model ({MANIFEST} is missing); save one with "
                                             f"`leanconv convert --out {d}` or leanconv.save")


def load_plan(directory: str | os.PathLike) -> ConversionPlan:
    """The ConversionPlan saved beside a model."""
    path = Path(directory) / PLAN
    try:
        return ConversionPlan.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is unreadable or corrupt: {e}") from None


def load(directory: str | os.PathLike, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved converted model: base model, replacement layers by name, then the weights.

    Args:
        base: a freshly built base model, required when the model was saved without a source.
    Raises:
        ModelError: missing or corrupt files, or weights that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = read_manifest(d)
    if base is None:
        if not manifest.get("source"):
            raise ModelError(f"{d} was saved without a model source; pass base=<a freshly built base model>")
        base = ModelSource.from_dict(manifest["source"]).build(with_weights=False)
    replace_modules(base, {name: layer_from_config(cfg) for name, cfg in manifest["layers"].items()})
    try:
        sd = load_file(str(d / WEIGHTS))
    except FileNotFoundError:
        raise ModelError(f"{d / WEIGHTS} is missing") from None
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{d / WEIGHTS} is unreadable or corrupt: {e}") from None
    own = base.state_dict()
    # tied tensors are stored once by save_model; fill the aliases from their twins
    for k in own:
        if k not in sd:
            twin = next((j for j in own if j != k and j in sd and own[j].data_ptr() == own[k].data_ptr()), None)
            if twin is not None:
                sd[k] = sd[twin]
    apply_state_dict(base, sd, str(d / WEIGHTS))
    base.eval()
    return base
