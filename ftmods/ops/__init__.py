"""Shared pure tensor functions used by several methods."""

from ftmods.ops.tokens import (
    masked_mean,
    next_token_targets,
    segment_ids_from_position_ids,
    split_prompt_and_target,
    supervised_positions,
)

__all__ = [
    "masked_mean",
    "next_token_targets",
    "segment_ids_from_position_ids",
    "split_prompt_and_target",
    "supervised_positions",
]
