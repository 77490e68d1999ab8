"""CLS-RL and No-Thinking-CLS-RL: rule-based GRPO for image classification with a vision-language model.

"CLS-RL: Image Classification with Rule-Based Reinforcement Learning", arXiv:2503.16188
(https://arxiv.org/abs/2503.16188); later versions are titled "Think or Not Think: A Study of Explicit Thinking in
Rule-Based Visual Reinforcement Fine-Tuning". The GRPO math is shared in :mod:`ftmods.ops.grpo`.
"""

from ftmods.cls_rl.loss import (
    NO_THINK_EVAL_PROMPT,
    NO_THINK_PROMPT,
    THINK_EVAL_PROMPT,
    THINK_EVAL_PROMPT_B2N,
    THINK_PROMPT,
    CLSRLDefaults,
    GRPOLossOutput,
    cls_rl_defaults,
    group_advantages,
    grpo_loss,
)
from ftmods.cls_rl.module import CLSRLModule, Rollout, harmonic_mean, resolve_reward
from ftmods.cls_rl.rewards import (
    REWARDS,
    accuracy_reward,
    accuracy_rewards,
    equality_reward,
    equality_rewards,
    extract_answer,
    extract_eval_answer,
    format_reward,
    format_rewards,
    ground_truth,
    lenient_match,
)

__all__ = [
    "NO_THINK_EVAL_PROMPT",
    "NO_THINK_PROMPT",
    "REWARDS",
    "Rollout",
    "THINK_EVAL_PROMPT",
    "THINK_EVAL_PROMPT_B2N",
    "THINK_PROMPT",
    "CLSRLDefaults",
    "CLSRLModule",
    "GRPOLossOutput",
    "accuracy_reward",
    "accuracy_rewards",
    "cls_rl_defaults",
    "equality_reward",
    "equality_rewards",
    "extract_answer",
    "extract_eval_answer",
    "format_reward",
    "format_rewards",
    "ground_truth",
    "harmonic_mean",
    "group_advantages",
    "grpo_loss",
    "lenient_match",
    "resolve_reward",
]
