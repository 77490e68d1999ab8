"""Shared pure tensor functions used by several methods."""

from ftmods.ops.flops import DecoderShape, forward_flops, matmul_params, mfu, sequence_lengths_of, train_flops
from ftmods.ops.grpo import (
    REDUCTIONS,
    GRPOLossOutput,
    completion_logprobs,
    completion_mask,
    expand_pixels_per_image,
    group_advantages,
    group_reward_std,
    grpo_loss,
    k3_kl,
    pooled_std,
)
from ftmods.ops.params import (
    freeze_all_but,
    match_names,
    match_parameters,
    proportional_layer,
    select_by_patterns,
    selection_hash,
)
from ftmods.ops.sampling import KeyedSampler, inverse_cdf_sample, keyed_uniform, row_keys
from ftmods.ops.tokens import (
    masked_mean,
    next_token_targets,
    segment_ids_from_position_ids,
    split_prompt_and_target,
    supervised_positions,
)

__all__ = [
    "DecoderShape",
    "forward_flops",
    "matmul_params",
    "mfu",
    "sequence_lengths_of",
    "train_flops",
    "REDUCTIONS",
    "GRPOLossOutput",
    "KeyedSampler",
    "completion_logprobs",
    "completion_mask",
    "expand_pixels_per_image",
    "freeze_all_but",
    "group_advantages",
    "group_reward_std",
    "grpo_loss",
    "inverse_cdf_sample",
    "keyed_uniform",
    "k3_kl",
    "masked_mean",
    "match_names",
    "match_parameters",
    "next_token_targets",
    "pooled_std",
    "proportional_layer",
    "row_keys",
    "segment_ids_from_position_ids",
    "select_by_patterns",
    "selection_hash",
    "split_prompt_and_target",
    "supervised_positions",
]
