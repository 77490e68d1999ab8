"""Samplers whose order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochShuffleSampler(RandomSampler):
    """A fresh permutation each epoch, drawn from ``seed + epoch`` (like ``DistributedSampler`` on one replica).

    torch's ``RandomSampler`` draws every epoch from one running generator that ``StatefulDataLoader`` does not
    restore, so after a resume in epoch k it replays epoch 0's order. Here Lightning calls :meth:`set_epoch` at the
    start of every epoch (the epoch is restored from the checkpoint) and ``StatefulDataLoader`` skips the samples
    already yielded, so an interrupted and resumed run visits the examples in exactly the uninterrupted order. It
    subclasses ``RandomSampler`` so that Lightning still recognises a shuffled loader and swaps in a seeded
    ``DistributedSampler`` under DDP.

    Build it with ``epoch=trainer.current_epoch``: on a resume, ``StatefulDataLoader`` fast-forwards when Lightning
    first iterates the loader, which happens *before* Lightning's ``set_epoch`` call for the resumed epoch (Lightning
    2.6); the loop state is already restored when ``train_dataloader()`` runs, so the constructor gets it right.

    Example:
        >>> sampler = EpochShuffleSampler(range(4), seed=0)
        >>> first = list(sampler)
        >>> sampler.set_epoch(1)
        >>> sorted(sampler) == [0, 1, 2, 3] and list(sampler) != first
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        """This epoch's permutation."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())
