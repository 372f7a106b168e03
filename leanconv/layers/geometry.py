"""ConvGeometry: the shape-defining settings of a dense convolution, normalized to ints."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from leanconv.errors import ConfigError
from leanconv.layers.functional import conv_output_size, pair


@dataclass(frozen=True)
class ConvGeometry:
    """What a replacement must reproduce of an ``nn.Conv2d``: channels, kernel, stride, padding."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvGeometry":
        """Geometry of ``conv``; string paddings ('same', 'valid') become explicit ints.

        Raises:
            ConfigError: for a 'same' padding that torch pads asymmetrically (even kernel).
        """
        k, s, d = pair(conv.kernel_size), pair(conv.stride), pair(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                p = (0, 0)
            else:  # 'same' (torch allows it with stride 1 only)
                total = [dd * (kk - 1) for dd, kk in zip(d, k)]
                if any(t % 2 for t in total):
                    raise ConfigError(f"padding='same' with even kernel {k} pads asymmetrically; not supported")
                p = (total[0] // 2, total[1] // 2)
        else:
            p = pair(conv.padding)
        return cls(conv.in_channels, conv.out_channels, k, s, p, d, conv.groups,
                   conv.bias is not None, conv.padding_mode)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size for an input of size ``hw``."""
        return tuple(conv_output_size(hw[a], self.kernel_size[a], self.stride[a], self.padding[a],
                                      self.dilation[a]) for a in (0, 1))  # type: ignore[return-value]

    def padding_for(self, kernel: int) -> tuple[int, int]:
        """Padding that gives a ``kernel x kernel`` conv (same stride, dilation) this output size.

        Raises:
            ConfigError: when the kernels differ by an odd amount or the padding would be negative.
        """
        out = []
        for a in (0, 1):
            diff = self.dilation[a] * (kernel - self.kernel_size[a])
            if diff % 2:
                raise ConfigError(f"a {kernel}x{kernel} kernel cannot keep the output size of a "
                                  f"{self.kernel_size[0]}x{self.kernel_size[1]} conv (odd difference)")
            p = self.padding[a] + diff // 2
            if p < 0:
                raise ConfigError(f"a {kernel}x{kernel} kernel would need negative padding to keep the "
                                  f"output size of a {self.kernel_size[0]}x{self.kernel_size[1]} conv "
                                  f"with padding {self.padding}")
            out.append(p)
        return (out[0], out[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvGeometry":
        d = dict(d)
        for key in ("kernel_size", "stride", "padding", "dilation"):
            d[key] = tuple(d[key])
        return cls(**d)
