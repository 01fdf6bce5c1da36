"""Data-loading pieces shared by every task: a resumable distributed sampler and loader builders."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank, resumable mid-epoch.

    Every epoch draws a permutation from ``seed + epoch``, pads it (training) so that it splits
    evenly over `world_size` ranks, and gives rank `r` the slice ``perm[r::world_size]``.
    :meth:`set_start` skips the first samples of this rank's slice (resume after a checkpoint
    written mid-epoch). With ``pad=False`` (evaluation) ranks may get one sample fewer, so each
    sample is visited exactly once overall.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.n, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world, self.pad = rank, world_size, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and self.world > 1:
            total = math.ceil(self.n / self.world) * self.world
            idx = (idx * math.ceil(total / self.n))[:total]  # repeats wrap around (world > n too)
        return idx[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def build_loader(dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, num_workers: int,
                 collate_fn: Callable[[list[Any]], Any] | None, drop_last: bool, pin_memory: bool,
                 seed: int) -> DataLoader:
    """A DataLoader whose worker seeds depend only on (seed, epoch, start) — resumable."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sampler.epoch * 7919 + sampler.start)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=pin_memory,
                      generator=g, persistent_workers=False)
