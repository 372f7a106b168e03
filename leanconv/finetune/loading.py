"""Data loading for fine-tuning: rank-sharded, seeded, resumable mid-epoch, from a Dataset or a DataLoader.

Exactness on resume: the order of an epoch depends only on (seed, epoch); a resumed epoch skips the
samples already seen without loading them. Without worker processes, augmentation draws from the
global RNG, whose state the checkpoint keeps. With workers, every sample's RNGs are seeded from
(seed, epoch, index), so augmentation does not depend on workers or on where the epoch started.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from leanconv.data import batches
from leanconv.errors import DataError
from leanconv.finetune.rng import seed_all, sample_seed
from leanconv.finetune.runtime import Runtime

EVAL_EPOCH = -1  # the epoch number that seeds evaluation samples: the same every time


class SeededItems(Dataset):
    """``dataset[i]`` for keys ``(i, seed)``, with torch / python / numpy RNGs seeded from ``seed`` first.

    Used only in worker processes, whose global RNGs do not matter to the training process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_all(seed)
        return self.dataset[index]


class WorkerInit:
    """Worker start-up, then the user's: ignore SIGINT and SIGTERM. Ctrl-C (and SLURM's SIGTERM) reach
    the whole process group; the training process turns them into a checkpoint and needs its workers
    for the step it finishes. Workers still exit when told to, or when the training process dies."""

    def __init__(self, user: Callable | None) -> None:
        self.user = user

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.user is not None:
            self.user(worker_id)


class EpochSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch at any position and can hand out ``(index, seed)`` keys."""

    def __init__(self, dataset: Dataset, runtime: Runtime, seed: int, with_seeds: bool) -> None:
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed)
        self.with_seeds = with_seeds
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Serve ``epoch``'s samples from the ``start``-th (of this rank's) on."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator:
        indices = list(super().__iter__())[self.start:]
        if not self.with_seeds:
            return iter(indices)
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Every ``world_size``-th sample from ``rank`` on, in order, without padding (exact evaluation counts)."""

    def __init__(self, n: int, runtime: Runtime, seed: int, with_seeds: bool) -> None:
        self.indices = list(range(runtime.rank, n, runtime.world_size))
        self.seed, self.with_seeds = seed, with_seeds

    def __iter__(self) -> Iterator:
        if not self.with_seeds:
            return iter(self.indices)
        return iter([(i, sample_seed(self.seed, EVAL_EPOCH, i)) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class LoaderSettings:
    """What is kept of the user's DataLoader (or the defaults for a Dataset)."""

    batch_size: int
    workers: int
    collate_fn: Callable | None = None
    worker_init_fn: Callable | None = None

    @classmethod
    def of(cls, data, batch_size: int, workers: int) -> "LoaderSettings":
        if isinstance(data, DataLoader):
            return cls(data.batch_size or batch_size, data.num_workers, data.collate_fn, data.worker_init_fn)
        return cls(batch_size, workers)


def dataset_of(data, role: str) -> Dataset:
    """The map-style dataset behind ``data`` (a Dataset or a DataLoader over one).

    Raises:
        DataError: an iterable-style dataset or a plain iterable (they can be neither sharded nor resumed).
    """
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, IterableDataset) or not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise DataError(f"{role} data must be a map-style Dataset (with len() and indexing) or a DataLoader over "
                        f"one, so that it can be sharded across processes and resumed mid-epoch; got "
                        f"{type(ds).__name__}")
    if len(ds) == 0:
        raise DataError(f"the {role} dataset is empty")
    return ds


def default_workers(runtime: Runtime) -> int:
    """No workers on CPU (they would compete with the training threads); up to 8 per GPU."""
    if runtime.device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // runtime.local_world_size - 1))


class TrainData:
    """Training batches of one epoch at a time, resumable at any step."""

    def __init__(self, data, runtime: Runtime, batch_size: int, workers: int, seed: int) -> None:
        self.dataset = dataset_of(data, "training")
        s = LoaderSettings.of(data, batch_size, workers)
        self.batch_size = s.batch_size
        self.sampler = EpochSampler(self.dataset, runtime, seed, with_seeds=s.workers > 0)
        self.steps_per_epoch = self.sampler.num_samples // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the training data has {len(self.dataset)} samples: fewer than one batch of "
                            f"{self.batch_size} per process ({runtime.world_size} processes)")
        self.loader = _loader(self.dataset, self.sampler, s, runtime, seed, drop_last=True)

    def epoch(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(images, labels-or-None)`` of ``epoch`` from batch ``start_step`` on."""
        self.sampler.set_position(epoch, start_step * self.batch_size)
        return batches(self.loader)


class EvalData:
    """Evaluation batches: this rank's shard, in dataset order, with the positions of its samples."""

    def __init__(self, data, runtime: Runtime, batch_size: int, workers: int, seed: int) -> None:
        self.dataset = dataset_of(data, "validation")
        s = LoaderSettings.of(data, batch_size, workers)
        self.sampler = ShardSampler(len(self.dataset), runtime, seed, with_seeds=s.workers > 0)
        self.indices = torch.tensor(self.sampler.indices, dtype=torch.long)  # dataset positions, in order
        self.loader = _loader(self.dataset, self.sampler, s, runtime, seed, drop_last=False)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return batches(self.loader)


def _loader(dataset: Dataset, sampler: Sampler, s: LoaderSettings, runtime: Runtime, seed: int,
            drop_last: bool) -> DataLoader:
    kwargs = {}
    if s.workers > 0:
        dataset = SeededItems(dataset)
        kwargs = {"worker_init_fn": WorkerInit(s.worker_init_fn)}
    # a generator of its own, so that creating an iterator draws nothing from the global RNG
    return DataLoader(dataset, batch_size=s.batch_size, sampler=sampler, num_workers=s.workers,
                      collate_fn=s.collate_fn, pin_memory=runtime.device.type == "cuda", drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed), **kwargs)
