"""Calibration and held-out images drawn once from the user's data and replayed pass after pass."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset

from leanconv.data import DataSpec, batches
from leanconv.errors import DataError

Batch = tuple[Tensor, Tensor | None]


def input_channels(model: nn.Module) -> int:
    """The channels of the images ``model`` takes (its first conv's input; 3 without a conv): what
    a data spec string's images are given."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


class ImageStream:
    """Fixed sets of calibration and held-out images, served in batches of ``batch_size``.

    ``data`` may be a data spec string (``fashion-mnist[:PATH]``, ``imagefolder:PATH``), a map-style
    Dataset (a seeded random subset is drawn), a DataLoader or any re-iterable of batches (its
    first images are used, the same ones every pass; a shuffling DataLoader is read through its
    dataset instead), or a one-shot iterator (its images are kept in memory). Held-out images come
    from ``holdout`` when given, else from the images after the calibration ones (for a spec
    string: its validation split).
    """

    def __init__(self, data, images: int, batch_size: int, holdout_images: int = 0, holdout=None,
                 seed: int = 0, channels: int = 1, input_size: int | None = None) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.count = 0  # calibration images, known after check()
        if isinstance(data, str):
            spec = DataSpec.parse(data)
            data = spec.dataset(train=True, input_size=input_size, channels=channels, augment=False)
            if holdout is None and holdout_images:
                holdout = spec.dataset(train=False, input_size=input_size, channels=channels)
        elif isinstance(holdout, str):
            holdout = DataSpec.parse(holdout).dataset(train=False, input_size=input_size, channels=channels)
        if data is None:
            raise DataError("no calibration data given")
        own = holdout is None
        parts = _sources(_unshuffled(data), [images, holdout_images if own else 0], batch_size, seed)
        self._calib = parts[0]
        self._hold = parts[1] if own else _sources(_unshuffled(holdout), [holdout_images], batch_size, seed)[0]

    def calibration(self) -> Iterator[Batch]:
        return self._calib()

    def holdout(self) -> Iterator[Batch]:
        return self._hold()

    def check(self) -> int:
        """Number of calibration images, reading the data once.

        Raises:
            DataError: the data yields no images.
        """
        n = getattr(self._calib, "count", None)  # known without reading for a Dataset
        if n is None:
            n = sum(len(x) for x, _ in self.calibration())
        if n == 0:
            raise DataError("the calibration data yielded no images")
        self.count = n
        return n



def _sources(data, counts: list[int], batch_size: int, seed: int) -> list[Callable[[], Iterator[Batch]]]:
    """One replayable batch source per consecutive slice of ``counts[k]`` images of ``data``."""
    skips = [sum(counts[:k]) for k in range(len(counts))]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise DataError("the calibration dataset is empty")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()

        def from_dataset(idx: list[int]):
            loader = DataLoader(Subset(data, idx), batch_size=batch_size, shuffle=False)

            def make() -> Iterator[Batch]:
                return _rebatch(loader, batch_size, len(idx), 0) if idx else iter(())
            make.count = len(idx)  # type: ignore[attr-defined]
            return make
        return [from_dataset(order[s:s + c]) for s, c in zip(skips, counts)]
    if iter(data) is data:  # a one-shot iterator: keep the images we need now
        stream = _rebatch(data, batch_size, sum(counts), 0)
        kept = [list(_rebatch(stream, batch_size, c, 0)) if c else [] for c in counts]
        return [(lambda b=b: iter(b)) for b in kept]
    return [(lambda s=s, c=c: _rebatch(data, batch_size, c, s) if c else iter(())) for s, c in zip(skips, counts)]


def _unshuffled(data):
    """A shuffling DataLoader gives other images every pass: read its dataset in our fixed order."""
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        return data.dataset
    return data


def _rebatch(data: Iterable, batch_size: int, count: int, skip: int) -> Iterator[Batch]:
    """Batches of exactly ``batch_size`` (the last may be smaller) of images ``skip .. skip+count``."""
    xs: list[Tensor] = []
    ys: list[Tensor | None] = []
    have, seen = 0, 0
    for x, y in _readable(batches(data, batch_size)):
        if x.ndim == 3:
            x = x[None]
            y = y.reshape(1) if isinstance(y, Tensor) else y
        lo = max(0, skip - seen)
        seen += len(x)
        if lo >= len(x):
            continue
        take = min(len(x) - lo, count - have)
        xs.append(x[lo:lo + take])
        ys.append(y[lo:lo + take] if isinstance(y, Tensor) and y.ndim >= 1 and len(y) == len(x) else None)
        have += take
        while sum(len(t) for t in xs) >= batch_size:
            yield _split(xs, ys, batch_size)
        if have >= count:
            break
    while xs and sum(len(t) for t in xs):
        yield _split(xs, ys, batch_size)


def _readable(it: Iterator[Batch]) -> Iterator[Batch]:
    """``it``, with a file that cannot be read (missing, corrupt image) turned into a DataError."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except OSError as e:  # includes PIL's UnidentifiedImageError
            raise DataError(f"cannot read the calibration images: {e}") from None
        yield item


def _split(xs: list[Tensor], ys: list, batch_size: int) -> Batch:
    """Pop the first ``batch_size`` images (and labels, when all pieces have them) off the lists."""
    x = torch.cat(xs)
    labelled = all(y is not None for y in ys)
    y = torch.cat(ys) if labelled else None
    xs[:] = [x[batch_size:]] if len(x) > batch_size else []
    ys[:] = ([y[batch_size:]] if labelled else [None]) if len(x) > batch_size else []
    return x[:batch_size], (y[:batch_size] if labelled else None)
