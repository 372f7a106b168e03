"""MACs and parameters of any model at a given input size, per layer and in total.

Convention: 1 MAC = one multiply-add = 2 FLOPs. Counted: ``nn.Conv2d`` (dense, grouped,
depthwise), ``nn.ConvTranspose2d``, ``nn.Linear`` and ``TopoConv2d`` (real connections only),
each as executed, per image. Not counted: normalization, activations, pooling, elementwise
adds and functional matmuls. Parameters: every parameter of the model, once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.registry import hooked, lookup

COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)  # and every layer type with a "macs" hook


@dataclass(frozen=True)
class LayerCount:
    """One counted module: MACs per image summed over its calls in one forward."""

    name: str
    kind: str
    macs: int
    params: int


@dataclass(frozen=True)
class Complexity:
    macs: int                       # per image
    params: int
    layers: tuple[LayerCount, ...]

    def macs_under(self, prefix: str) -> int:
        """MACs of the module named ``prefix`` and everything inside it."""
        return sum(l.macs for l in self.layers if l.name == prefix or l.name.startswith(prefix + "."))


def module_macs(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    """MACs of one call of a counted module, per image (batch dimension divided out)."""
    batch = inp.shape[0] if inp.dim() == 4 else 1
    own = lookup(module, "macs")
    if own is not None:
        return own(module, inp, out)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() // batch * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return inp.numel() // batch * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        rows = inp.numel() // module.in_features
        batch = inp.shape[0] if inp.dim() > 1 else 1
        return rows // batch * module.in_features * module.out_features
    raise TypeError(f"not a counted module: {type(module).__name__}")


def count(model: nn.Module, example_inputs: Tensor | tuple) -> Complexity:
    """Count MACs (per image) and parameters by running one forward pass in eval mode.

    Args:
        model: any module; its training mode is restored afterwards.
        example_inputs: a batch tensor ``(B, C, H, W)`` or a tuple of forward arguments.
    """
    macs: dict[str, int] = {}
    kinds: dict[str, str] = {}
    handles = []

    def hook(name: str):
        def fn(module, args, output):
            x = args[0] if args else None
            if isinstance(x, Tensor) and isinstance(output, Tensor):
                macs[name] = macs.get(name, 0) + module_macs(module, x, output)
        return fn

    for name, module in model.named_modules():
        if isinstance(module, COUNTED + hooked("macs")):
            kinds[name] = type(module).__name__
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = tuple(LayerCount(n, kinds[n], macs.get(n, 0),
                              sum(p.numel() for p in model.get_submodule(n).parameters()))
                   for n in kinds)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(sum(l.macs for l in layers), params, layers)


def flops(macs: int) -> int:
    """FLOPs of ``macs`` multiply-adds (2 per MAC)."""
    return 2 * macs
