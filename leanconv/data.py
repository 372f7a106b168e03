"""Data: Fashion-MNIST (Debian's files, a path, or torchvision's download), ImageFolder, any Dataset.

Spec strings for the command line: ``fashion-mnist``, ``fashion-mnist:PATH``, ``imagefolder:PATH``.
Every loader yields ``(images, labels)`` batches; labels are None for unlabeled data.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from leanconv.errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
GET_FASHION_MNIST = ("install Debian's copy with `apt-get install -y dataset-fashion-mnist` "
                     "(files in /usr/share/datasets/fashion-mnist), or pass fashion-mnist:PATH to a "
                     "folder holding the four original .gz files")


class TensorImages(Dataset):
    """Grayscale uint8 images ``(N, H, W)`` with labels, served as normalized float tensors.

    Args:
        channels: 1, or 3 to repeat the gray channel for networks that expect RGB.
        size: resize to ``size x size`` (bilinear) when given.
    """

    def __init__(self, images: Tensor, labels: Tensor, channels: int = 1, size: int | None = None,
                 mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD) -> None:
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"expected (N, H, W) images and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images, self.labels = images, labels.long()
        self.channels, self.size, self.mean, self.std = channels, size, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = (self.images[i].float().div(255.0) - self.mean) / self.std  # (H, W)
        x = x.unsqueeze(0)  # (1, H, W)
        if self.size is not None and self.size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0]
        if self.channels != 1:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x, self.labels[i]


def _read_idx(path: Path) -> Tensor:
    """An IDX file (MNIST format, gzip) as a uint8 tensor."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    n = 1
    for d in dims:
        n *= d
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise DataError(f"{path} is truncated: {len(body)} bytes of data, header says {n}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder with Fashion-MNIST's .gz files: ``root``, else Debian's.

    Raises:
        DataError: nothing usable found, with how to get it.
    """
    candidates = [Path(root)] if root else [DEBIAN_FASHION_MNIST]
    for c in candidates:
        for sub in (c, c / "FashionMNIST" / "raw"):
            if all((sub / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
                return sub
    where = root or DEBIAN_FASHION_MNIST
    raise DataError(f"Fashion-MNIST not found in {where}: {GET_FASHION_MNIST}")


def fashion_mnist(root: str | os.PathLike | None = None, train: bool = True, channels: int = 1,
                  size: int | None = None, download: bool = False) -> TensorImages:
    """Fashion-MNIST's training (60k) or test (10k) split.

    Looks in ``root``, then Debian's ``/usr/share/datasets/fashion-mnist``; with ``download``,
    falls back to torchvision's download into ``root`` (or ``~/.cache/leanconv``).
    """
    try:
        folder = find_fashion_mnist(root)
    except DataError:
        if not download:
            raise
        folder = _download_fashion_mnist(Path(root) if root else Path.home() / ".cache" / "leanconv")
    img_file, lbl_file = FASHION_MNIST_FILES[train]
    images, labels = _read_idx(folder / img_file), _read_idx(folder / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
        raise DataError(f"Fashion-MNIST files in {folder} are inconsistent: {tuple(images.shape)} images, "
                        f"{tuple(labels.shape)} labels")
    return TensorImages(images, labels, channels, size)


def _download_fashion_mnist(root: Path) -> Path:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise DataError(f"Fashion-MNIST is not installed and the download failed ({e}); {GET_FASHION_MNIST}") from None
    return find_fashion_mnist(root)


def image_folder(path: str | os.PathLike, input_size: int = 224, train: bool = False) -> Dataset:
    """An ImageFolder with torchvision's standard ImageNet transforms for ``input_size``.

    Raises:
        DataError: missing folder, or no images in it.
    """
    from torchvision import datasets, transforms

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"image folder {p} does not exist")
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])
    else:
        resize = int(round(input_size / 0.875))
        tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(input_size),
                                 transforms.ToTensor(), norm])
    try:
        return datasets.ImageFolder(str(p), transform=tf, loader=read_image)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"image folder {p} holds no readable images in class subfolders: {e}") from None


def read_image(path: str) -> "PIL.Image.Image":  # noqa: F821
    """An image file as RGB (ImageFolder's loader).

    Raises:
        DataError: naming the file that is truncated, corrupt or not an image.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from None


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec string."""

    kind: str            # "fashion-mnist" | "imagefolder"
    path: str | None

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        if not isinstance(text, str):
            raise DataError(f"a data spec must be a string such as fashion-mnist or imagefolder:PATH, got {text!r:.80}")
        kind, _, path = text.partition(":")
        if kind in ("fashion-mnist", "fashionmnist", "fmnist"):
            return cls("fashion-mnist", path or None)
        if kind == "imagefolder":
            if not path:
                raise DataError("imagefolder needs a path: imagefolder:/data/imagenet")
            return cls("imagefolder", path)
        raise DataError(f"unknown data spec {text!r}; use fashion-mnist[:PATH] or imagefolder:PATH")

    def native_input(self) -> tuple[int, int | None]:
        """(channels, square size) of the images as stored; size None where images vary (ImageFolder)."""
        return (1, 28) if self.kind == "fashion-mnist" else (3, None)

    def dataset(self, train: bool, input_size: int | None = None, channels: int = 1,
                augment: bool | None = None) -> Dataset:
        """The training or validation split. An ImageFolder root with train/ and val/ uses them.

        ``augment`` (default: ``train``) picks the random training transforms of an ImageFolder;
        calibration wants the training split with the fixed evaluation transforms.
        """
        if self.kind == "fashion-mnist":
            return fashion_mnist(self.path, train=train, channels=channels,
                                 size=input_size if input_size not in (None, 28) else None)
        root = Path(self.path)
        sub = root / ("train" if train else "val")
        augment = train if augment is None else augment
        return image_folder(sub if sub.is_dir() else root, input_size or 224, train=augment)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, workers: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A DataLoader with a seeded shuffle."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the dataset is empty")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=drop_last)


def batches(data: "DataLoader | Dataset | Iterable", batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Normalize any data into ``(images, labels-or-None)`` batches.

    Accepts a DataLoader or iterable of batches (tensors, ``(x, y)`` pairs or dicts with
    'image'/'label'), or a map-style Dataset of ``(x, y)`` items (batched here).
    """
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
            and hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, DataLoader):
        data = loader(data, batch_size)
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
            yield item[0], y
        elif isinstance(item, dict) and isinstance(item.get("image"), Tensor):
            yield item["image"], item.get("label")
        else:
            raise DataError(f"cannot read a batch of type {type(item).__name__}; expected a tensor, an "
                            f"(images, labels) pair or a dict with 'image'")
