"""Samplers whose order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler
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


class EpochSequentialSampler(SequentialSampler):
    """File order, with the ``epoch`` that :class:`ResumableDataLoader` needs to tell how Lightning resumes a run.

    Example:
        >>> list(EpochSequentialSampler(range(3), epoch=2)), EpochSequentialSampler(range(3), epoch=2).epoch
        ([0, 1, 2], 2)
    """

    def __init__(self, data_source: Sized, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (the order does not depend on it)."""
        self.epoch = epoch


class ResumableDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose resumed run sees the uninterrupted run's batches, whatever epoch it resumes in.

    The saved state also holds the sampler epoch the position belongs to (``"ftmods_epoch"``) and how far Lightning's
    epoch ran ahead of it (``"ftmods_epoch_shift"``, see the third case). On a restore, the sampler was built with
    Lightning's resumed epoch (``trainer.current_epoch``) and there are three cases:

    * same epoch (up to the saved shift), unfinished position: an ordinary mid-epoch resume; the rest of that epoch
      is yielded.
    * same epoch, finished position (a checkpoint taken at the last batch of an epoch, which stores "all N batches
      yielded"): Lightning (2.6) resumes in the next epoch as a mid-epoch restart, without rebuilding the loader, so
      the stored position is dropped and the sampler moves on to the next epoch (restoring it as is replayed the
      finished epoch's order from its end). Found by a kill-and-resume test that crashed right after an epoch boundary.
    * Lightning's epoch is *ahead* of the stored one: the run stopped at ``max_steps`` and the checkpoint was written
      after Lightning closed the (possibly unfinished) epoch (``ModelCheckpoint.on_train_end`` / ``on_train_epoch_end``
      write ``last.ckpt`` after the fit loop ran its epoch-end bookkeeping). Lightning then resumes epoch ``e + 1``
      with its batch counter still at the stored position, i.e. it expects exactly the stopped epoch's remaining
      batches before its next epoch. So the rest of the stored epoch is yielded there (nothing if it was finished),
      and every later epoch Lightning sets is shifted back by the difference, so the data epochs follow on as in an
      uninterrupted run. Without this, ``--trainer.max_steps M --ckpt_path last.ckpt`` after a run to ``max_steps N``
      skipped the rest of epoch ``e`` and the first batches of ``e + 1`` (or, stopped at an epoch end, trained epoch
      ``e + 2`` in place of ``e + 1``).
    """

    _EPOCH_KEY, _SHIFT_KEY = "ftmods_epoch", "ftmods_epoch_shift"
    # the data epoch of the current pass (None before any), and how far Lightning's epochs run ahead of the data's;
    # class defaults, so that Lightning's re-instantiation of the loader (its saved __init__ arguments) is unaffected
    _data_epoch: int | None = None
    _epoch_shift: int = 0

    @property
    def data_epoch(self) -> int | None:
        """The sampler epoch of the pass being yielded (None before the first): Lightning's epoch minus the shift."""
        return self._data_epoch

    def _epoch_sampler(self) -> Any:
        """The sampler Lightning calls ``set_epoch`` on (and that has an ``epoch``), or None."""
        for sampler in (getattr(self.batch_sampler, "sampler", None), self.sampler):
            if sampler is not None and hasattr(sampler, "set_epoch") and hasattr(sampler, "epoch"):
                return sampler
        return None

    def __iter__(self) -> Any:
        """Start (or continue, after a restore) a pass, in the data epoch of the epoch Lightning has set."""
        sampler = self._epoch_sampler()
        if sampler is not None:
            if self._epoch_shift and sampler.epoch != self._data_epoch:  # Lightning set a new epoch: shift it
                sampler.set_epoch(sampler.epoch - self._epoch_shift)
            self._data_epoch = sampler.epoch
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        """The position, with the data epoch it belongs to."""
        fresh = self._iterator is None  # super() then describes a fresh pass of the sampler's current epoch
        state = super().state_dict()
        sampler = self._epoch_sampler()
        if sampler is None:
            return state
        epoch = sampler.epoch if fresh or self._data_epoch is None else self._data_epoch
        return {**state, self._EPOCH_KEY: epoch, self._SHIFT_KEY: self._epoch_shift}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position in its own epoch; see the class docstring for the finished and max_steps cases."""
        state = dict(state_dict)
        stored, shift = state.pop(self._EPOCH_KEY, None), int(state.pop(self._SHIFT_KEY, 0))
        try:
            finished = state.get("_num_yielded", 0) >= len(self)
        except TypeError:  # an iterable dataset without a length
            finished = False
        sampler = self._epoch_sampler()
        if sampler is None:
            if not finished:
                super().load_state_dict(state)
            return
        current = sampler.epoch  # Lightning's resumed epoch: the ftmods samplers are built with trainer.current_epoch
        stored = current - shift if stored is None else int(stored)
        self._epoch_shift = shift
        if current > stored + shift:  # Lightning closed the stored epoch at a max_steps stop: finish it, then shift
            sampler.set_epoch(stored)
            super().load_state_dict(state)  # a finished position yields nothing, as Lightning expects
            self._epoch_shift = current - stored
        elif finished:
            sampler.set_epoch(stored + 1)
        else:
            sampler.set_epoch(stored)
            super().load_state_dict(state)
        self._data_epoch = sampler.epoch  # the restored pass: not a new epoch to shift


def data_epoch(module: Any) -> int:
    """The epoch of the training data a LightningModule is on, for randomness keyed by epoch (rollouts, noise).

    Lightning's ``current_epoch``, except after extending a run that stopped at ``max_steps``: Lightning has then
    closed the stopped epoch and counts one ahead while the :class:`ResumableDataLoader` still yields the rest of it.
    Keyed on this, the extended run draws what an uninterrupted run draws. 0 for a module without a trainer.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return 0
    loader = getattr(trainer, "train_dataloader", None)
    epoch = loader.data_epoch if isinstance(loader, ResumableDataLoader) else None
    return int(trainer.current_epoch if epoch is None else epoch)


def resumable_loader(dataset: Any, **kwargs: Any) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` (the loader of every ftmods DataModule)."""
    return ResumableDataLoader(dataset, **kwargs)


class EpochShardSampler(DistributedSampler):
    """This rank's share of the ``(seed + epoch)`` permutation (or of file order), built by ftmods under DDP / FSDP.

    The same order as Lightning's own ``DistributedSampler`` would give, with two differences: the seed is the
    DataModule's (Lightning's takes ``seed_everything``'s), so N ranks see the single-process permutation whatever the
    two seeds are; and it starts at ``epoch`` (``trainer.current_epoch``), which :class:`ResumableDataLoader` needs to
    tell that a run stopped at ``max_steps`` is being extended. Being a ``DistributedSampler``, Lightning keeps it.

    Example:
        >>> shares = [list(EpochShardSampler(range(5), num_replicas=2, rank=r, seed=0, epoch=1)) for r in (0, 1)]
        >>> single = list(EpochShuffleSampler(range(5), seed=0, epoch=1))
        >>> shares[0] == single[0::2] and shares[1] == single[1::2] + single[:1]  # padded to equal shares
        True
    """

    def __init__(
        self, dataset: Sized, *, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True, epoch: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.set_epoch(epoch)


def epoch_sampler(dataset: Sized, *, trainer: Any, seed: int, shuffle: bool) -> Any:
    """The training sampler of a map-style dataset, starting at ``trainer.current_epoch``.

    :class:`EpochShuffleSampler` / :class:`EpochSequentialSampler` on one process, :class:`EpochShardSampler` when the
    trainer's strategy shards data over several ranks (unless ``use_distributed_sampler=False``).
    """
    epoch = trainer.current_epoch if trainer is not None else 0
    shard = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) if trainer else None
    use = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    if shard and use and int(shard.get("num_replicas", 1)) > 1:
        return EpochShardSampler(dataset, seed=seed, shuffle=shuffle, epoch=epoch, **shard)
    return EpochShuffleSampler(dataset, seed=seed, epoch=epoch) if shuffle else EpochSequentialSampler(dataset, epoch)


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
    sampler = epoch_sampler(dataset, trainer=trainer, seed=seed, shuffle=shuffle)
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
