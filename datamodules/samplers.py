"""Samplers whose order is a pure function of ``(seed, epoch)``, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from ``seed + epoch`` (like ``DistributedSampler``, on one replica).

    Lightning calls :meth:`set_epoch` at the start of every epoch (and restores the epoch on resume), and
    ``StatefulDataLoader`` fast-forwards within the epoch, so an interrupted and resumed run visits the examples in
    exactly the order of an uninterrupted one. Under DDP, Lightning splits this order across ranks.

    Example:
        >>> s = EpochShuffleSampler(4, seed=0)
        >>> s.set_epoch(1)
        >>> sorted(s)
        [0, 1, 2, 3]
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        """Indices of this epoch's permutation."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        """Number of indices per epoch."""
        return self.length
