"""Conv2d subclasses with a forward of their own, as the plain convs they compute.

Libraries subclass ``nn.Conv2d`` to change what it computes: timm's ``StdConv2d`` and
``ScaledStdConv2d`` standardize the weight on every call, its ``Conv2dSame`` pads the input
by its size, quantization-aware convs fake-quantize the weight. Reading such a conv's
``weight`` attribute gives the wrong kernel. ``as_plain_conv`` runs the module once on a small
probe, records the ``conv2d`` call it makes, and returns the ``nn.Conv2d`` with the kernel that
call used, after checking that it computes the module's output; otherwise it says why not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from leanconv.errors import ConfigError
from leanconv.layers.functional import pair


def is_plain(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` computes what ``nn.Conv2d`` computes with its ``weight`` and ``bias``."""
    cls = type(conv)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


class _Conv2dCalls(TorchFunctionMode):
    """Records every ``conv2d`` call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            self.calls.append((args, kwargs))
        return func(*args, **kwargs)


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@torch.no_grad()
def as_plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` itself when it is plain, else a new ``nn.Conv2d`` computing what it computes.

    Raises:
        ConfigError: when the module does not compute one ``conv2d`` of its input (the message
            names the class and why; it is the reason the conv is not converted).
    """
    if is_plain(conv):
        return conv
    cls = type(conv).__name__
    k, s, d = pair(conv.kernel_size), pair(conv.stride), pair(conv.dilation)
    size = [d[a] * (k[a] - 1) + 1 + 2 * s[a] for a in (0, 1)]
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(1, conv.in_channels, *size, generator=g).to(conv.weight)
    was = conv.training
    conv.eval()
    rec = _Conv2dCalls()
    try:
        with rec:
            out = conv(probe)
    except Exception as e:
        raise ConfigError(f"{cls} (a Conv2d subclass with its own forward) fails on a probe input "
                          f"({type(e).__name__}: {e})") from e
    finally:
        conv.train(was)
    if len(rec.calls) != 1:
        raise ConfigError(f"{cls} (a Conv2d subclass with its own forward) makes {len(rec.calls)} conv2d calls, "
                          f"not one; leanconv cannot tell which kernel it applies")
    args, kwargs = rec.calls[0]
    call = dict(_CONV2D_DEFAULTS, **dict(zip(_CONV2D_ARGS, args)), **kwargs)
    if call["input"] is not probe:
        raise ConfigError(f"{cls} transforms its input before the convolution (e.g. padding it by its size, "
                          f"'same' style); a replacement could not reproduce that")
    weight, bias = call["weight"].detach(), call["bias"]
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[2:]), call["stride"], call["padding"],
                      call["dilation"], call["groups"], bias is not None, device=weight.device, dtype=weight.dtype)
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias.detach())
    expect = plain(probe)
    if not isinstance(out, Tensor) or out.shape != expect.shape or not torch.allclose(out, expect, rtol=1e-5,
                                                                                      atol=1e-6):
        raise ConfigError(f"{cls} changes the convolution's output in its forward; leanconv cannot tell "
                          f"which plain conv it equals")
    plain.train(conv.training)
    return plain
