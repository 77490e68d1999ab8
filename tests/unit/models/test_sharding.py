"""Frozen parts kept out of checkpoints (ftmods.models.sharding): the state-dict hooks FSDP2 runs go through."""

from __future__ import annotations

import torch
from torch import nn

from ftmods.models.sharding import keep_frozen_parts_out_of_checkpoints


class _WithReference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 2)
        self.ref_model = nn.Linear(2, 2).requires_grad_(False)


def _reference(module: nn.Module) -> list[tuple[str, nn.Module | None]]:
    return [("ref_model.", getattr(module, "ref_model", None))]


def test_frozen_parts_leave_the_state_dict_and_come_back_from_the_live_module():
    """``state_dict()`` holds model.weight and model.bias only; a strict load of such a state (what the FSDP2 loader
    asks of a checkpoint) succeeds, sets the trained part and leaves the live reference as it is. Nested, the hooks
    use the module's prefix (outer.ref_model.* dropped too)."""
    torch.manual_seed(0)
    module = _WithReference()
    keep_frozen_parts_out_of_checkpoints(module, _reference)
    state = module.state_dict()
    assert sorted(state) == ["model.bias", "model.weight"]

    other = _WithReference()
    keep_frozen_parts_out_of_checkpoints(other, _reference)
    reference_before = other.ref_model.weight.clone()
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.model.weight, module.model.weight)
    assert torch.equal(other.ref_model.weight, reference_before)

    outer = nn.Module()
    outer.inner = module
    assert sorted(outer.state_dict()) == ["inner.model.bias", "inner.model.weight"]


class _Strategy:
    """What the helpers read of a trainer's strategy: its wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


class _Trainer:
    def __init__(self, world_size: int, model: nn.Module) -> None:
        self.world_size, self.strategy = world_size, _Strategy(model)


def test_forward_is_collective_only_with_several_ranks_of_a_sharding_strategy():
    """One process never needs synced generation; DDP (a plain module) neither; FSDP2 (DTensor parameters) and FSDP1
    (the strategy's model a FullyShardedDataParallel root) do when there are several ranks."""
    from ftmods.models.sharding import forward_is_collective, fsdp1_root, fsdp1_root_gathered, uses_fsdp1

    model = nn.Linear(2, 2)
    assert not forward_is_collective(None, model)
    assert not forward_is_collective(_Trainer(1, model), model)
    assert not forward_is_collective(_Trainer(2, model), model)  # DDP: every rank has the whole model
    assert fsdp1_root(_Trainer(2, model)) is None
    assert not uses_fsdp1(_Trainer(2, model))
    assert not uses_fsdp1(None)
    with fsdp1_root_gathered(_Trainer(2, model)):  # no FSDP1 root: nothing to gather
        assert model(torch.ones(1, 2)).shape == (1, 2)
