"""RepeatGroupSampler: GRPO's mu > 1 data order (each optimizer step's batches repeated), split over ranks."""

from __future__ import annotations

import pytest

from ftmods.datamodules.samplers import RepeatGroupSampler


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_groups_repeat_in_a_row_and_cover_the_rank_share() -> None:
    """10 items, 1 rank, groups of 4 (batch 2 x accumulation 2), mu 3: the share is padded 10 -> 12 by wrapping, so
    3 groups x 3 repeats x 4 = 36 indices, and every item appears (the 2 padding items once more per repeat)."""
    sampler = RepeatGroupSampler(range(10), group_size=4, repeats=3, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 36
    groups = _chunks(order, 4)
    for g in range(0, len(groups), 3):
        assert groups[g] == groups[g + 1] == groups[g + 2]
    assert set(order) == set(range(10))
    firsts = [i for g in groups[::3] for i in g]
    assert sorted(set(firsts)) == list(range(10))
    assert len(firsts) == 12


def test_ranks_get_disjoint_shares_and_epochs_reshuffle() -> None:
    shares = [
        set(RepeatGroupSampler(range(16), group_size=2, repeats=2, seed=0, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(range(16))
    sampler = RepeatGroupSampler(range(16), group_size=2, repeats=2, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(RepeatGroupSampler(range(16), group_size=2, repeats=2, seed=0, epoch=1)) == list(sampler)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        RepeatGroupSampler(range(4), group_size=0, repeats=2)
