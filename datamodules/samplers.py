"""Samplers whose order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader


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


class ResumableDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` that restores mid-epoch positions, and starts the next epoch after a *finished* one.

    A checkpoint taken at the last batch of an epoch stores "all N batches yielded". Lightning (2.6) resumes such a run
    in the next epoch as a mid-epoch restart: it neither rebuilds the loader nor calls ``set_epoch`` for that epoch, and
    the loader was built with the checkpoint's (finished) epoch. Restoring the stored position as is would then replay
    the finished epoch's order from its end, i.e. train on the wrong permutation. Here a finished state is dropped and
    the sampler is moved on to the next epoch, which is what an uninterrupted run does. Found by a kill-and-resume test
    that crashed right after an epoch boundary.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a mid-epoch position; after a finished epoch, start the next one from its first batch."""
        try:
            finished = state_dict.get("_num_yielded", 0) >= len(self)
        except TypeError:  # an iterable dataset without a length
            finished = False
        if not finished:
            super().load_state_dict(state_dict)
            return
        sampler = getattr(self.batch_sampler, "sampler", None) or self.sampler
        if hasattr(sampler, "set_epoch") and hasattr(sampler, "epoch"):
            sampler.set_epoch(sampler.epoch + 1)


def resumable_loader(dataset: Any, **kwargs: Any) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` (the loader of every ftmods DataModule)."""
    return ResumableDataLoader(dataset, **kwargs)


def epoch_loader(
    dataset: Any,
    *,
    trainer: Any,
    seed: int,
    shuffle: bool,
    batch_size: int,
    collate_fn: Any,
    num_workers: int = 0,
) -> ResumableDataLoader:
    """The loader of a map-style dataset whose order is a pure function of ``(seed, epoch)`` (file order unshuffled).

    The sampler starts at ``trainer.current_epoch`` (restored from the checkpoint when ``train_dataloader()`` runs),
    so a resumed run visits the examples in the uninterrupted order (:class:`EpochShuffleSampler`,
    :class:`ResumableDataLoader`).
    """
    epoch = trainer.current_epoch if trainer is not None else 0
    sampler = EpochShuffleSampler(dataset, seed=seed, epoch=epoch) if shuffle else None
    return resumable_loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )


class RepeatGroupSampler(DistributedSampler):
    """A rank's share of a seeded per-epoch permutation, in groups of ``group_size`` indices yielded ``repeats`` times.

    For GRPO with mu = ``repeats`` policy updates per generation batch (TRL's ``RepeatSampler``): with ``group_size =
    batch_size * accumulate_grad_batches`` every optimizer step's micro-batches come back ``repeats`` times in a row,
    so the module can reuse their rollouts. Each rank's list is padded (wrapping around) to a whole number of groups,
    so groups never straddle batches or optimizer steps. It is a ``DistributedSampler``, so Lightning keeps it (and
    calls :meth:`set_epoch`) under DDP instead of swapping in its own.

    Example:
        >>> sampler = RepeatGroupSampler(range(5), group_size=2, repeats=2, seed=0)
        >>> order = list(sampler)
        >>> len(order), order[:2] == order[2:4], order[4:6] == order[6:8]
        (12, True, True)
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        group_size: int,
        repeats: int,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if group_size < 1 or repeats < 1:
            raise ValueError(f"group_size ({group_size}) and repeats ({repeats}) must be >= 1")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.group_size, self.repeats = group_size, repeats
        self.set_epoch(epoch)

    def _groups(self) -> list[list[int]]:
        indices = list(super().__iter__())  # this rank's share of the (seed + epoch) permutation
        pad = -len(indices) % self.group_size
        indices += (indices * (pad // max(len(indices), 1) + 1))[:pad]
        return [indices[i : i + self.group_size] for i in range(0, len(indices), self.group_size)]

    def __iter__(self) -> Iterator[int]:
        """Each group ``repeats`` times in a row."""
        return iter([i for group in self._groups() for _ in range(self.repeats) for i in group])

    def __len__(self) -> int:
        """Padded share times ``repeats``."""
        share = super().__len__()
        return -(-share // self.group_size) * self.group_size * self.repeats
