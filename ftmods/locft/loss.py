"""LocFT-BF and FT-M / FT-L objectives as pure functions.

All take ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)`` aligned with the input ids (the target tokens, EOS
included, hold their own ids; prompt and padding hold -100), as produced by
:class:`ftmods.datamodules.edits.EditCollator`; the next-token shift happens inside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ftmods.ops.tokens import IGNORE_INDEX, masked_mean, next_token_targets


class LocFTLossOutput(NamedTuple):
    """Loss and detached diagnostics."""

    loss: Tensor
    """() the reduced loss; differentiable."""
    per_sample: Tensor
    """(B,) mean target-token NLL of each edit, detached (what the skip / early-stop rule looks at per edit)."""
    num_tokens: Tensor
    """() supervised target tokens in the batch, detached."""


def _target_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    targets = next_token_targets(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (B, T)
    return nll, mask


def locft_sample_mean_loss(logits: Tensor, labels: Tensor) -> LocFTLossOutput:
    """The official LocFT-BF / EasyEdit FT-M loss: mean CE over each edit's target tokens, then mean over edits.

    Every edit weighs the same, whatever its target length. Edits with no target token count as 0 and are left out of
    the mean.
    """
    nll, mask = _target_nll(logits, labels)  # (B, T), (B, T)
    per_sample = masked_mean(nll, mask, dim=1)  # (B,)
    has_target = mask.any(1)  # (B,)
    loss = masked_mean(per_sample, has_target)  # ()
    return LocFTLossOutput(loss, per_sample.detach(), mask.sum().detach())


def locft_token_mean_loss(logits: Tensor, labels: Tensor) -> LocFTLossOutput:
    """Mean CE over all target tokens of the batch (the LlamaFactory port, paper §A.5): long targets weigh more."""
    nll, mask = _target_nll(logits, labels)  # (B, T), (B, T)
    loss = masked_mean(nll, mask)  # ()
    return LocFTLossOutput(loss, masked_mean(nll, mask, dim=1).detach(), mask.sum().detach())


def prompt_last_loss(logits: Tensor, labels: Tensor) -> LocFTLossOutput:
    """EasyEdit FT-L (``objective_optimization: prompt_last``): every target token scored from the last prompt position.

    For each edit, take the log-softmax at the last prompt token (the position predicting the first target token) and
    average ``-log p(y_j)`` over the edit's target tokens ``y_j``; then average over edits. Only the first target token
    is a true next-token prediction; the others are a bag-of-tokens objective, as in EasyEdit's ``ft_main``.
    """
    target_mask = labels != IGNORE_INDEX  # (B, T)
    first = target_mask.float().argmax(1)  # (B,) first target position (left padding: after the prompt)
    last_prompt = (first - 1).clamp(min=0)  # (B,)
    rows = torch.arange(labels.shape[0], device=labels.device)  # (B,)
    logp = logits[rows, last_prompt].float().log_softmax(-1)  # (B, V)
    target_ids = labels.clamp(min=0)  # (B, T) ignore positions are masked below
    token_logp = logp.gather(1, target_ids)  # (B, T)
    per_sample = -masked_mean(token_logp, target_mask, dim=1)  # (B,)
    loss = masked_mean(per_sample, target_mask.any(1))  # ()
    return LocFTLossOutput(loss, per_sample.detach(), target_mask.sum().detach())
