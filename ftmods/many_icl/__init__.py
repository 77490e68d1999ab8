"""ManyICL / ManyICFT: many-shot in-context fine-tuning, where every in-context answer is a training target.

"Many-Shot In-Context Fine-tuning for Large Language Model (ManyICL)", arXiv:2506.11103
(https://arxiv.org/abs/2506.11103). Not the multimodal many-shot ICL of arXiv:2405.09798.
"""

from ftmods.many_icl.loss import (
    SHOT_BUCKETS,
    ManyICLLossOutput,
    bucket_names,
    many_icl_nll,
    select_answers,
    shift_token_field,
    shot_weights,
)
from ftmods.many_icl.module import ManyICLModule

__all__ = [
    "SHOT_BUCKETS",
    "ManyICLLossOutput",
    "ManyICLModule",
    "bucket_names",
    "many_icl_nll",
    "select_answers",
    "shift_token_field",
    "shot_weights",
]
