"""Loading for LEAP distillation: the resumable (optionally distributed) sampler and the
DataLoader built on it.

* Resume: ``build_loader`` always uses a ``ResumableSampler``. Its order for a
  given ``(seed, epoch)`` is fixed (identical to ``DistributedSampler`` with the
  same seed/epoch/num_replicas/rank), and ``set_epoch(epoch, start=n)`` makes the
  next iteration begin at position ``n`` of that order, without loading the
  skipped samples. Use ``set_loader_epoch(loader, epoch, start_batch=b)`` which
  converts batches to samples. The sampler also attaches a per-sample seed
  derived from ``(seed, epoch, index)`` to each index (:class:`SeededIndex`), and the
  datasets of :mod:`leap.data.datasets` run their transform under that seed, so
  augmentations are bit-identical across runs, across ``num_workers`` settings and
  after a mid-epoch resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["mix64", "SeededIndex", "ResumableSampler", "build_loader", "set_loader_epoch", "default_num_workers"]

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """Deterministic 63-bit hash of a few ints (splitmix64 chain).

    Used instead of ``seed + epoch`` style sums so that nearby (seed, epoch, index)
    triples give unrelated seeds. Result fits ``torch.manual_seed``.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


# --------------------------------------------------------------------------- indices


class SeededIndex(int):
    """An ``int`` dataset index that carries the seed for that sample's augmentation.

    Yielded by ``ResumableSampler``; it travels through DataLoader's batch sampler
    and worker queues unchanged (it is an int, and it pickles). Datasets that know
    about it (the ones in this module) seed their transform with ``.seed``; any
    other dataset just sees an int.
    """

    seed: int

    def __new__(cls, index: int, seed: int):
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SeededIndex, (int(self), self.seed))

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, seed={self.seed})"


# --------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[int]):
    """Seeded, epoch-aware, optionally sharded sampler that can start mid-epoch.

    Order for ``(seed, epoch)``: ``torch.randperm(N)`` from a generator seeded with
    ``seed + epoch`` (or ``range(N)`` without shuffle), padded by repetition
    (``drop_last=False``) or truncated (``drop_last=True``) to a multiple of
    ``num_replicas``, then ``indices[rank::num_replicas]`` - exactly
    ``torch.utils.data.DistributedSampler``'s order, so it is a drop-in for it.
    ``set_epoch(epoch, start=n)`` makes the next ``__iter__`` yield this rank's
    order from position ``n`` on (``n`` in samples of this rank; see
    ``set_loader_epoch`` for batches). ``set_epoch(epoch)`` alone starts at 0, so
    the usual per-epoch call clears a resume offset.

    ``len(sampler)`` is the full per-rank epoch length (stable, so step counts
    derived from ``len(loader)`` do not change on resume); ``remaining`` is what
    the next iteration yields. Indices are ``SeededIndex`` (int subclass) carrying
    a seed from ``(seed, epoch, index)`` unless ``seed_samples=False``.
    """

    def __init__(
        self,
        data_source: Sequence | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        seed_samples: bool = True,
    ):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.seed_samples = seed_samples
        self.epoch = 0
        self.start = 0
        if drop_last and n % num_replicas:
            self.num_samples = math.ceil((n - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and the position (in samples) to start from."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        else:
            indices = list(range(self.n))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices += indices[:pad]
            else:
                indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    @property
    def remaining(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        for i in self.order()[self.start :]:
            yield SeededIndex(i, mix64(self.seed, epoch, i)) if self.seed_samples else i

    def __len__(self) -> int:
        return self.num_samples


def default_num_workers(world_size: int = 1) -> int:
    """CPU cores available to this process, shared between local ranks, capped at 8,
    minus one left for the training process itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, world_size) - 1))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int | None = None,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = True,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """DataLoader over ``dataset`` with a ``ResumableSampler`` as ``loader.sampler``.

    Per-epoch use (call before ``iter(loader)``)::

        set_loader_epoch(loader, epoch)                  # fresh epoch
        set_loader_epoch(loader, epoch, start_batch=n)   # resume after n batches

    Args:
        batch_size: per-process batch size.
        num_workers: default ``default_num_workers(world size)``.
        distributed: shard with ``num_replicas``/``rank`` (default: from the
            initialised ``torch.distributed`` process group).
        drop_last: drop the incomplete last batch, and (distributed) the tail
            that does not divide evenly between ranks instead of padding it.
        pin_memory: default ``torch.cuda.is_available()``.
    Persistent workers are used when ``num_workers > 0``; the loader's generator
    (worker base seeds) is seeded from ``seed`` and re-seeded per epoch by
    ``set_loader_epoch``.
    """
    if distributed:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs an initialised process group or explicit num_replicas and rank"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
    else:
        num_replicas, rank = 1, 0
    sampler = ResumableSampler(
        dataset, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last
    )
    if num_workers is None:
        num_workers = default_num_workers(num_replicas)
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=generator,
        collate_fn=collate_fn,
        **extra,
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select ``epoch``'s order and skip its first ``start_batch`` batches (cheaply:
    skipped samples are never loaded). Call before ``iter(loader)``."""
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        raise TypeError("loader was not built by build_loader (no ResumableSampler)")
    sampler.set_epoch(epoch, start=start_batch * loader.batch_size)
    if loader.generator is not None:
        loader.generator.manual_seed(mix64(sampler.seed, epoch, 1))
