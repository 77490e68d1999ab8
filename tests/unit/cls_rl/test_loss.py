import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

import ftmods.ops.grpo as ops
from ftmods.cls_rl import (
    NO_THINK_EVAL_PROMPT,
    NO_THINK_PROMPT,
    REWARDS,
    THINK_EVAL_PROMPT,
    THINK_PROMPT,
    CLSRLDefaults,
    cls_rl_defaults,
    group_advantages,
    grpo_loss,
)
from ftmods.cls_rl import loss as cls_rl_loss


def test_reexports_are_the_shared_ops():
    assert cls_rl_loss.grpo_loss is ops.grpo_loss
    assert cls_rl_loss.group_advantages is ops.group_advantages
    assert cls_rl_loss.GRPOLossOutput is ops.GRPOLossOutput


def test_paper_defaults():
    """Spec §1.5: G = 4, T = 1.0, beta = 0.04, lr 1e-6, mu = 1, grpo reduction, group std + 1e-4, 1024 new tokens,
    1 prompt x 2 accumulation x 8 GPUs = 16 prompts per step; the modes differ only in prompts and rewards (§1.6)."""
    think, no_think = cls_rl_defaults("think"), cls_rl_defaults("no_think")
    for d in (think, no_think):
        assert (d.num_generations, d.temperature, d.beta, d.learning_rate, d.num_iterations) == (4, 1.0, 0.04, 1e-6, 1)
        assert (d.loss_type, d.scale_rewards, d.advantage_eps) == ("grpo", "group", 1e-4)
        assert (d.max_completion_length, d.prompts_per_step, d.image_size) == (1024, 16, 384)
        assert all(name in REWARDS for name in d.rewards)
    assert think == CLSRLDefaults()
    assert think.rewards == ("accuracy", "format")
    assert no_think.rewards == ("equality",)
    assert (think.prompt_template, think.eval_prompt_template) == (THINK_PROMPT, THINK_EVAL_PROMPT)
    assert (no_think.prompt_template, no_think.eval_prompt_template) == (NO_THINK_PROMPT, NO_THINK_EVAL_PROMPT)
    differing = {
        f.name for f in dataclasses.fields(CLSRLDefaults) if getattr(think, f.name) != getattr(no_think, f.name)
    }
    assert differing == {"mode", "rewards", "prompt_template", "eval_prompt_template"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        think.beta = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="mode"):
        cls_rl_defaults("direct")  # type: ignore[arg-type]


def test_prompt_strings_are_verbatim():
    """The training prompts put the instruction on a second line that starts with a space (spec §1.2, §1.6)."""
    problem = "What type of object is in the photo?\nPlease choose one from list [ cat, dog]."
    assert THINK_PROMPT.format(problem=problem).endswith(
        "].\n Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    )
    assert NO_THINK_PROMPT.format(problem=problem).endswith("].\n Please directly output the answer.")
    assert NO_THINK_EVAL_PROMPT.format(problem=problem).endswith("]. Please directly output the answer name.")


def test_one_cls_rl_step_by_hand():
    """One prompt, G = 4 completions scored by accuracy + format: rewards (2, 1, 0, 1).
    mean 1, deviations (1, 0, -1, 0), unbiased std = sqrt(2/3), A = (a, 0, -a, 0) with a = 1 / (sqrt(2/3) + 1e-4).
    mu = 1, no KL difference (policy == reference): grpo gradient = -A_i / (n_i * 4) per real token, so only
    completions 0 and 2 move, in opposite directions, and the loss value is -mean(A) = 0.
    """
    d = cls_rl_defaults()
    completions = [
        "<think>whiskers</think><answer>cat</answer>",  # accuracy 1 + format 1
        "<think>whiskers</think><answer>dog</answer>",  # 0 + 1
        "a dog",  # 0 + 0
        "cat",  # 1 + 0: the whole stripped completion is the answer
    ]
    labels = ["cat"] * 4
    per_fn = [REWARDS[name](completions, labels) for name in d.rewards]  # accuracy, format
    rewards = torch.tensor(per_fn).sum(0)  # (4,)
    assert rewards.tolist() == [2.0, 1.0, 0.0, 1.0]
    adv = group_advantages(rewards, d.num_generations, scale=d.scale_rewards, eps=d.advantage_eps)
    a = 1 / (math.sqrt(2 / 3) + 1e-4)
    assert_close(adv, torch.tensor([a, 0.0, -a, 0.0]))
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    out = grpo_loss(logp, None, logp.detach(), adv, mask, beta=d.beta, loss_type=d.loss_type)
    out.loss.backward()
    assert_close(out.loss, torch.tensor(0.0))
    expected = torch.zeros(4, 3)
    expected[0] = -a / (3 * 4)
    expected[2, 0] = a / (1 * 4)
    assert_close(logp.grad, expected)
