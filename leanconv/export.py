"""Export optimized models: ONNX (checked against onnxruntime) and torch.export programs."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError, ModelError
from leanconv.optimize import optimize, portable
from leanconv.optimize.freeze import densify_topology


@dataclass(frozen=True)
class OnnxExport:
    """Where an ONNX file was written and how it compared with the PyTorch model."""

    path: str
    max_abs_diff: float | None   # vs onnxruntime on random inputs; None when not checked
    opset: int

    def to_dict(self) -> dict:
        return {"path": self.path, "max_abs_diff": self.max_abs_diff, "opset": self.opset}


def _args(example_inputs: Tensor | tuple) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def prepare(model: nn.Module, example_inputs: Tensor | tuple, optimized: bool, topo_tiles: bool = True) -> nn.Module:
    """The model an exporter sees: optimized (folded, fused, channels_last) unless told not to;
    without ``topo_tiles`` each topological layer becomes the dense conv it equals.

    Raises:
        ConfigError: example inputs the model does not take (naming the input shape it expects).
    """
    check_example(model, example_inputs)
    if not optimized:
        return model.eval()
    m = optimize(model, example_inputs, autotune=False)
    return m if topo_tiles else densify_topology(m)


@torch.no_grad()
def check_example(model: nn.Module, example_inputs: Tensor | tuple) -> None:
    """Run ``model`` once on the examples; a failure becomes one message naming the input it expects."""
    args = _args(example_inputs)
    was = model.training
    model.eval()
    try:
        model(*args)
    except Exception as e:
        first = next((m for m in model.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if first is not None and x is not None and x.dim() == 4 and x.shape[1] != first.in_channels:
            c = first.in_channels
            raise ConfigError(f"the model takes {c}-channel images, input shape (B, {c}, H, W); the example input is "
                              f"{tuple(x.shape)}: pass --in-chans {c}") from e
        got = tuple(x.shape) if x is not None else "the example"
        raise ModelError(f"the model does not run on an input of shape {got}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}; check --input-size and --in-chans") from e
    finally:
        model.train(was)


def export_program(model: nn.Module, example_inputs: Tensor | tuple, *, optimized: bool = True,
                   dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export`` of the (optimized) model, with standard operators only; the batch size is
    free (1 to 1024) unless ``dynamic_batch`` is False, as in the ONNX export.

    Raises:
        ModelError: when torch.export cannot capture the model.
    """
    m = prepare(model, example_inputs, optimized)
    args = _args(example_inputs)
    dyn = None
    if dynamic_batch:
        args = _batch2(args)
        dyn = tuple({0: torch.export.Dim("batch", min=1, max=1024)} if isinstance(a, Tensor) else None for a in args)
    try:
        with portable(), torch.no_grad():
            return torch.export.export(m, args, dynamic_shapes=dyn)
    except Exception as e:  # torch.export raises many kinds
        raise ModelError(f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def save_program(program: "torch.export.ExportedProgram", path: str | os.PathLike) -> Path:
    """Write an exported program (.pt2) atomically.

    torch warns "No complete tensor found in the group" for every channels_last weight (its check
    takes a non-contiguous tensor for a slice of a larger one); the weights are whole, so that one
    warning is silenced here.
    """
    import warnings

    from leanconv.serialize import atomic_write

    path = Path(path)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
            torch.export.save(program, tmp)

    atomic_write(path, write)
    return path


def export_onnx(model: nn.Module, example_inputs: Tensor | tuple, path: str | os.PathLike, *, optimized: bool = True,
                opset: int = 18, dynamic_batch: bool = True, check: bool = True, atol: float = 1e-4,
                topo_tiles: bool = False) -> OnnxExport:
    """Write the (optimized) model as ONNX; with ``check``, compare it with onnxruntime.

    Args:
        example_inputs: a batch at the input size to export (batch size free if ``dynamic_batch``).
        check: run onnxruntime (if installed) on random inputs and require max abs diff <= atol.
        topo_tiles: export topological layers as per-tile slices and matmuls (many small nodes,
            slow to export) instead of one dense conv each (no MAC saving in onnxruntime).
    Raises:
        ModelError: when the export fails or onnxruntime disagrees by more than ``atol``.
    """
    m = prepare(model, example_inputs, optimized, topo_tiles)
    args = _args(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"input{i}" if i else "input" for i in range(len(args))]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    try:
        with portable(), torch.no_grad():
            _onnx_export(m, args, tmp, names, opset, dynamic_batch)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600; give it the mode open() would, as other outputs
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    diff = None
    if check:
        diff = check_onnx(path, m, args)
        if diff is not None and diff > atol:
            raise ModelError(f"onnxruntime disagrees with the PyTorch model: max abs diff {diff:.3g} > {atol:g}")
    return OnnxExport(str(path), diff, opset)


def _batch2(args: tuple) -> tuple:
    """Tracing with batch 1 would specialize the batch dimension; trace with 2 instead."""
    return tuple(torch.cat([a, a]) if isinstance(a, Tensor) and a.shape[0] == 1 else a for a in args)


def _onnx_export(m: nn.Module, args: tuple, path: str, names: list[str], opset: int, dynamic_batch: bool) -> None:
    if dynamic_batch:
        args = _batch2(args)
    dyn_axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        dynamo = True
    except ImportError:
        dynamo = False
    if dynamo:
        dyn = tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in args) if dynamic_batch else None
        torch.onnx.export(m, args, path, input_names=names, output_names=["output"], opset_version=opset,
                          dynamo=True, dynamic_shapes=dyn, external_data=False, optimize=False, verbose=False)
    else:
        torch.onnx.export(m, args, path, input_names=names, output_names=["output"], opset_version=opset,
                          dynamo=False, dynamic_axes=dyn_axes)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimizations and no spin-waiting between runs.

    Raises:
        ConfigError: when onnxruntime is not installed (``pip install leanconv[export]``).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed; pip install 'leanconv[export]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no spin-waiting between runs: sessions timed side by side (original and converted) would
    # otherwise steal each other's cores (ResNet-50, batch 1, 2 threads: 75 -> 40 ms per run)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: tuple, seed: int = 0) -> float | None:
    """Max abs difference between onnxruntime and ``model`` on random inputs shaped like the
    examples (batch 2 where the batch is dynamic); None when onnxruntime is not installed."""
    try:
        sess = ort_session(path)
    except ConfigError:
        return None
    g = torch.Generator().manual_seed(seed)
    feeds, inputs = {}, []
    for meta, a in zip(sess.get_inputs(), example_inputs):
        shape = [s if isinstance(s, int) else 2 for s in meta.shape]
        t = torch.randn(shape, generator=g, dtype=a.dtype)
        inputs.append(t)
        feeds[meta.name] = t.numpy()
    out = sess.run(None, feeds)[0]
    ref = model(*inputs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    return float((torch.from_numpy(out) - ref.float()).abs().max())
