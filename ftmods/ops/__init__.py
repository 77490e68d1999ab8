"""Shared pure tensor functions used by several methods."""

from ftmods.ops.params import freeze_all_but, match_parameters, proportional_layer
from ftmods.ops.tokens import (
    masked_mean,
    next_token_targets,
    segment_ids_from_position_ids,
    split_prompt_and_target,
    supervised_positions,
)

__all__ = [
    "freeze_all_but",
    "match_parameters",
    "proportional_layer",
    "masked_mean",
    "next_token_targets",
    "segment_ids_from_position_ids",
    "split_prompt_and_target",
    "supervised_positions",
]
