"""CLS-RL's objective: GRPO with group-normalised advantages and a k3 KL penalty (spec cls_rl §1.4–§1.6).

The math lives in :mod:`ftmods.ops.grpo` (shared with other GRPO-style methods); this module re-exports it under the
CLS-RL names and records the paper's defaults. CLS-RL uses ``loss_type="grpo"`` (per-sequence token mean, then mean
over sequences), ``scale="group"`` (unbiased std + 1e-4), ``beta=0.04`` and one update per generation batch
(``old_logp=None``), so the ratio is identically 1 and no clipping applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ftmods.ops.grpo import (
    AdvantageScale,
    GRPOLossOutput,
    LossType,
    completion_logprobs,
    completion_mask,
    expand_pixels_per_image,
    group_advantages,
    group_reward_std,
    grpo_loss,
    k3_kl,
)

Mode = Literal["think", "no_think"]

THINK_PROMPT = (
    "{problem}\n Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
"""Training user text of CLS-RL (``grpo.py``); the second line starts with a space."""
NO_THINK_PROMPT = "{problem}\n Please directly output the answer."
"""Training user text of No-Thinking-CLS-RL (``grpo_direct.py``)."""
THINK_EVAL_PROMPT = (
    "{problem} First output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
"""Evaluation user text for thinking models, few-shot setting (``test_qwen2vl_fewshot.py``)."""
THINK_EVAL_PROMPT_B2N = (
    "{problem} Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
"""Evaluation user text for thinking models, base-to-new setting (``test_qwen2vl_b2n_*.py``)."""
NO_THINK_EVAL_PROMPT = "{problem} Please directly output the answer name."
"""Evaluation user text for No-Thinking (and SFT) models."""


@dataclass(frozen=True)
class CLSRLDefaults:
    """The paper's training settings (official scripts on TRL 0.14 defaults; spec §1.5, §1.6). Reference values only.

    The module's own constructor defaults are the config schema; this records what they reproduce, for configs and
    tests to compare against.
    """

    mode: Mode = "think"
    """``think`` (CLS-RL) or ``no_think`` (No-Thinking-CLS-RL)."""
    model_name: str = "Qwen/Qwen2-VL-2B-Instruct"
    """Base model, fully fine-tuned in bf16."""
    num_generations: int = 4
    """G, completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature (hard-coded in the HF-generate path; no top-p / top-k)."""
    beta: float = 0.04
    """KL coefficient (TRL 0.14 default)."""
    learning_rate: float = 1e-6
    """AdamW learning rate (TRL 0.14 default); betas (0.9, 0.999), weight decay 0, linear decay, no warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (HF default)."""
    num_iterations: int = 1
    """mu, policy updates per generation batch; 1 means ``old_logp=None``, no clipping."""
    epsilon: float = 0.2
    """Clip range; unused at mu = 1."""
    loss_type: LossType = "grpo"
    """Per-sequence token mean, then mean over sequences."""
    scale_rewards: AdvantageScale = "group"
    """Advantages divided by the group's unbiased std."""
    advantage_eps: float = 1e-4
    """Added to the std."""
    max_completion_length: int = 1024
    """New-token limit of a rollout, the same in both modes."""
    max_prompt_length: int = 1024
    """2048 for StanfordCars (long choice lists); effectively unused by R1-V."""
    prompts_per_device: int = 1
    """Prompts per device per micro-batch."""
    accumulate_grad_batches: int = 2
    """Gradient accumulation steps."""
    world_size: int = 8
    """GPUs; with the two above, 16 prompts / 64 completions per optimizer step."""
    image_size: int = 384
    """Images resized to a square of this side (LANCZOS) before the processor, in training and evaluation."""
    min_pixels: int = 3136
    """Processor lower bound on pixels."""
    max_pixels: int = 401408
    """Processor upper bound on pixels (512 * 28 * 28)."""
    mask_truncated: bool = False
    """Completions without eos keep all their tokens."""
    rewards: tuple[str, ...] = ("accuracy", "format")
    """Names in :data:`ftmods.cls_rl.rewards.REWARDS`, summed."""
    prompt_template: str = THINK_PROMPT
    """Training user text, with a ``{problem}`` field."""
    eval_prompt_template: str = THINK_EVAL_PROMPT
    """Few-shot evaluation user text, with a ``{problem}`` field."""

    @property
    def prompts_per_step(self) -> int:
        """Prompts per optimizer step (16 in the paper)."""
        return self.prompts_per_device * self.accumulate_grad_batches * self.world_size


def cls_rl_defaults(mode: Mode = "think") -> CLSRLDefaults:
    """The paper's settings for CLS-RL (``"think"``) or No-Thinking-CLS-RL (``"no_think"``).

    The two differ only in the prompts and the rewards (``accuracy`` + ``format`` vs ``equality`` alone).

    Example:
        >>> d = cls_rl_defaults("no_think")
        >>> d.rewards, d.num_generations, d.beta, d.max_completion_length, d.prompts_per_step
        (('equality',), 4, 0.04, 1024, 16)
    """
    if mode == "think":
        return CLSRLDefaults()
    if mode == "no_think":
        return CLSRLDefaults(
            mode="no_think",
            rewards=("equality",),
            prompt_template=NO_THINK_PROMPT,
            eval_prompt_template=NO_THINK_EVAL_PROMPT,
        )
    raise ValueError(f"mode must be 'think' or 'no_think', got {mode!r}")


__all__ = [
    "NO_THINK_EVAL_PROMPT",
    "NO_THINK_PROMPT",
    "THINK_EVAL_PROMPT",
    "THINK_EVAL_PROMPT_B2N",
    "THINK_PROMPT",
    "CLSRLDefaults",
    "GRPOLossOutput",
    "Mode",
    "cls_rl_defaults",
    "completion_logprobs",
    "completion_mask",
    "expand_pixels_per_image",
    "group_advantages",
    "group_reward_std",
    "grpo_loss",
    "k3_kl",
]
