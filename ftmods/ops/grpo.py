"""GRPO building blocks as pure tensor functions: advantages, k3 KL, masks, log-probs, the clipped surrogate loss.

Layout conventions (shared with TRL and R1-V):

- A rollout batch holds ``N = B * G`` completions: ``G`` samples for each of ``B`` prompts, grouped contiguously in
  ``repeat_interleave`` order (rows ``0..G-1`` belong to prompt 0, and so on), as ``generate(num_return_sequences=G)``
  returns them.
- Per-token tensors are ``(N, T)`` over the completion tokens only; ``mask`` marks real completion tokens (up to and
  including the first eos, :func:`completion_mask`).
- ``logp`` / ``old_logp`` / ``ref_logp`` are log-probabilities of the sampled completion tokens under the current,
  sampling-time and reference policies (:func:`completion_logprobs`).

References: DeepSeekMath (GRPO, arXiv 2402.03300); TRL 0.14 ``GRPOTrainer`` as forked by R1-V / CLS-RL (the ``grpo``
reduction, unbiased group std plus 1e-4, k3 KL, mu = 1); DAPO (arXiv 2503.14476: ``epsilon_high``, token-level mean);
Dr. GRPO (arXiv 2503.20783: no std scaling, constant normaliser).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

_SCALES = ("group", "batch", "none")
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the {rewards.numel()} rewards")
    values = rewards if rewards.is_floating_point() else rewards.float()
    return values.view(-1, group_size)  # (B, G)


def _unbiased_std(values: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (N - 1, torch's default) standard deviation; 0 instead of NaN for a single value."""
    count = values.numel() if dim is None else values.shape[dim]
    if count < 2:
        return values.new_zeros(()) if dim is None else values.new_zeros(values.shape[:dim] + values.shape[dim + 1 :])
    return values.std() if dim is None else values.std(dim)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased standard deviation of the rewards of each group, for logging (``reward_std``, ``frac_reward_zero_std``).

    Args:
        rewards: ``(B*G,)`` rewards in ``repeat_interleave`` order.
        group_size: ``G``.

    Returns:
        ``(B,)``; 0 for a group of one.

    Example:
        >>> group_reward_std(torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4)
        tensor([0.8165, 0.0000])
    """
    return _unbiased_std(_grouped(rewards, group_size), dim=1)  # (B,)


def pooled_std(count: Tensor, total: Tensor, total_sq: Tensor) -> Tensor:
    """Unbiased std of values known only by their count, sum and sum of squares (summed over ranks, say).

    ``sqrt((total_sq - total**2 / count) / (count - 1))``, clamped at 0 for rounding; 0 for fewer than 2 values.

    Example:
        >>> pooled_std(torch.tensor(4.0), torch.tensor(3.0), torch.tensor(3.0))  # [1, 0, 1, 1]: var 0.75 / 3
        tensor(0.5000)
    """
    if float(count) < 2:
        return torch.zeros((), dtype=total.dtype, device=total.device)
    return ((total_sq - total * total / count) / (count - 1)).clamp(min=0).sqrt()


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    batch_std: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_group(r)) / (std + eps)``.

    The baseline is always the mean of the sample's own group. ``scale`` picks the divisor:

    - ``"group"`` (GRPO, TRL 0.14, R1-V, CLS-RL): the group's *unbiased* (N - 1) std, as ``torch.std`` computes it.
    - ``"batch"``: the unbiased std of all ``B*G`` rewards (TRL ``scale_rewards="batch"``).
    - ``"none"`` (Dr. GRPO): no division, ``A_i = r_i - mean``.

    A group whose rewards are all equal gets exactly 0 (not a rounding residue of ``r - mean``), so it contributes
    no policy gradient whatever ``eps`` is.

    Args:
        rewards: ``(B*G,)`` rewards in ``repeat_interleave`` order (any numeric dtype; integers become fp32).
        group_size: ``G``, the number of completions per prompt.
        scale: The divisor, see above.
        eps: Added to the std (TRL 0.14 and R1-V use 1e-4).
        batch_std: ``"batch"`` only: the std to divide by instead of this batch's, e.g. the std of the global batch
            over all ranks (:func:`pooled_std` of all-reduced sums), as TRL gathers the rewards before scaling.

    Returns:
        ``(B*G,)`` advantages, one per completion (the same value applies to each of its tokens).

    Example:
        >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
        tensor([ 0.8659, -0.8659,  0.8659, -0.8659,  0.0000,  0.0000,  0.0000,  0.0000])
        >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale="none")
        tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    grouped = _grouped(rewards, group_size)  # (B, G)
    centered = grouped - grouped.mean(1, keepdim=True)  # (B, G)
    constant = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)  # (B, 1)
    centered = centered.masked_fill(constant, 0.0)  # (B, G) dead groups: exactly 0
    if scale == "none":
        return centered.flatten()  # (B*G,)
    if scale == "group":
        std = _unbiased_std(grouped, dim=1).unsqueeze(1)  # (B, 1)
    else:
        std = _unbiased_std(grouped) if batch_std is None else batch_std.to(grouped)  # ()
    return (centered / (std + eps)).flatten()  # (B*G,)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): ``exp(d) - d - 1`` with ``d = ref_logp - logp`` (Schulman, 2020).

    Non-negative, 0 exactly where ``logp == ref_logp`` (where its gradient is 0 as well); computed with ``expm1`` for
    accuracy near 0.

    Example:
        >>> k3_kl(torch.tensor([-0.5, -1.0]), torch.tensor([-0.5, -2.0]))  # exp(-1) + 1 - 1
        tensor([0.0000, 0.3679])
    """
    delta = ref_logp - logp  # (...)
    return torch.expm1(delta) - delta  # (...)


def completion_mask(
    completion_ids: Tensor, eos_token_id: int | Sequence[int], *, mask_truncated: bool = False
) -> Tensor:
    """Mask of the real completion tokens: everything up to and including the first eos of each row.

    Args:
        completion_ids: ``(N, T)`` generated ids (without the prompt).
        eos_token_id: One id, or several (any of them ends a completion).
        mask_truncated: Zero the whole row of a completion with no eos (cut off at the length limit), so it adds
            nothing to the loss (TRL ``mask_truncated_completions``). Off by default: R1-V keeps such rows whole.

    Returns:
        ``(N, T)`` bool.

    Example:
        >>> completion_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), 2).long()
        tensor([[1, 1, 0, 0],
                [1, 1, 1, 1]])
        >>> completion_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), 2, mask_truncated=True).long()
        tensor([[1, 1, 0, 0],
                [0, 0, 0, 0]])
    """
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)  # (E,)
    is_eos = torch.isin(completion_ids, eos)  # (N, T)
    has_eos = is_eos.any(1)  # (N,)
    length = completion_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), length)  # (N,) index of the first eos, T if none
    mask = torch.arange(length, device=completion_ids.device) <= first.unsqueeze(1)  # (N, T)
    return mask & has_eos.unsqueeze(1) if mask_truncated else mask


def completion_logprobs(logits: Tensor, completion_ids: Tensor, prompt_len: int, *, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of the completion tokens under ``logits`` of one forward pass over prompt + completion.

    Position ``prompt_len - 1 + t`` predicts completion token ``t``. The log-softmax runs in fp32, one row at a
    time, so only a ``(T, V)`` fp32 copy exists at once. With ``logits_to_keep = T + 1`` (only the last ``T + 1``
    positions returned) pass ``prompt_len=1``.

    Args:
        logits: ``(N, prompt_len + T, V)``.
        completion_ids: ``(N, T)``.
        prompt_len: Length of the (left-padded) prompt part of the sequence, >= 1.
        temperature: Divides the logits first, to score completions at the sampling temperature (TRL does so; R1-V,
            with temperature 1.0, does not need to).

    Returns:
        ``(N, T)`` fp32 log-probabilities; differentiable through ``logits``.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))  # (1, P + T = 3, V = 2)
        >>> completion_logprobs(logits, torch.tensor([[1, 1]]), prompt_len=1).exp()  # positions 0, 1 predict
        tensor([[0.5000, 0.7500]])
    """
    if prompt_len < 1 or logits.dim() != 3 or logits.shape[1] != prompt_len + completion_ids.shape[1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (N, prompt_len + T, V) for prompt_len={prompt_len} >= 1 and "
            f"completion_ids {tuple(completion_ids.shape)}"
        )
    shifted = logits[:, prompt_len - 1 : -1]  # (N, T, V) position t predicts completion token t
    rows = []
    for row_logits, row_ids in zip(shifted, completion_ids, strict=True):
        row = row_logits.float() / temperature if temperature != 1.0 else row_logits.float()  # (T, V)
        rows.append(row.log_softmax(-1).gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (N, T)


def expand_pixels_per_image(pixel_values: Tensor, grid_thw: Tensor, group: int) -> Tensor:
    """Repeat each image's block of patches ``group`` times, in ``repeat_interleave`` order (Qwen2-VL layout).

    Qwen2-VL flattens the patches of all images of a batch into one ``(sum_i n_i, D)`` tensor, with ``n_i =
    prod(grid_thw[i])``. Scoring ``G`` completions per prompt needs each image's block repeated ``G`` times in place
    (``I0 I0 I1 I1``). R1-V's ``pixel_values.repeat(G, 1)`` gives ``I0 I1 I0 I1`` instead, which is right only for a
    single prompt (spec cls_rl §1.4 pitfall). Expand ``grid_thw`` with ``repeat_interleave(group, 0)`` to match.

    Args:
        pixel_values: ``(sum_i n_i, D)`` patches of ``I`` images, image after image.
        grid_thw: ``(I, 3)`` patch grid (t, h, w) of each image.
        group: ``G``.

    Returns:
        ``(G * sum_i n_i, D)``.

    Example:
        >>> pixels = torch.tensor([[0.0], [1.0], [10.0]])  # image 0: 2 patches, image 1: 1 patch
        >>> expand_pixels_per_image(pixels, torch.tensor([[1, 1, 2], [1, 1, 1]]), 2).flatten()
        tensor([ 0.,  1.,  0.,  1., 10., 10.])
    """
    sizes = grid_thw.prod(-1).tolist()  # (I,) patches per image
    if group < 1 or grid_thw.dim() != 2 or sum(sizes) != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw {tuple(grid_thw.shape)} (patches {sum(sizes)}) does not describe pixel_values "
            f"{tuple(pixel_values.shape)}, or group={group} < 1"
        )
    blocks = pixel_values.split(sizes)  # I blocks of (n_i, D)
    return torch.cat([block for block in blocks for _ in range(group)])  # (G * sum_i n_i, D)


class GRPOLossOutput(NamedTuple):
    """Loss and detached diagnostics of :func:`grpo_loss`."""

    loss: Tensor
    """() the reduced ``-(surrogate - beta * kl)``; differentiable."""
    policy_loss: Tensor
    """() the surrogate part alone, ``-surrogate``, with the same reduction; detached."""
    kl: Tensor
    """() mean per-token k3 KL over all masked tokens of the batch (0 without ``ref_logp``); detached."""
    clip_fraction: Tensor
    """() fraction of masked tokens where the clipped branch is active (ratio out of the band on the side that stops
    the gradient: ``ratio < 1 - epsilon`` with ``A < 0`` or ``ratio > 1 + epsilon_high`` with ``A > 0``); 0 when
    ``old_logp`` is None; detached."""
    num_tokens: Tensor
    """() number of masked tokens in this batch (sum it over ranks and steps for ``num_items`` of ``dapo``)."""


Reduce = Callable[[Tensor, Tensor, Tensor | float | None, int | None], Tensor]


def _sequence_mean(values: Tensor, mask: Tensor, num_items: Tensor | float | None, length: int | None) -> Tensor:
    per_seq = values.sum(1) / mask.sum(1).clamp(min=1)  # (N,) each sequence's token mean
    return per_seq.sum() / (values.shape[0] if num_items is None else num_items)  # ()


def _token_mean(values: Tensor, mask: Tensor, num_items: Tensor | float | None, length: int | None) -> Tensor:
    return values.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)  # ()


def _constant_length(values: Tensor, mask: Tensor, num_items: Tensor | float | None, length: int | None) -> Tensor:
    if length is None or length < 1:
        raise ValueError(f"loss_type='dr_grpo' needs max_completion_length >= 1, got {length}")
    return values.sum() / ((values.shape[0] if num_items is None else num_items) * length)  # ()


REDUCTIONS: dict[str, Reduce] = {
    "grpo": _sequence_mean,
    "bnpo": _token_mean,
    "dapo": _token_mean,
    "dr_grpo": _constant_length,
}
"""``loss_type`` -> reduction of a masked ``(N, T)`` per-token loss (masked entries already 0)."""


def _check_loss_inputs(logp: Tensor, others: Sequence[Tensor | None], advantages: Tensor, loss_type: str) -> None:
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (N, T), got {tuple(logp.shape)}")
    if any(other is not None and other.shape != logp.shape for other in others):
        raise ValueError(f"old_logp, ref_logp and mask must all have logp's shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (N,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
) -> GRPOLossOutput:
    """GRPO clipped-surrogate loss with a k3 KL penalty, per token, then reduced by ``loss_type``.

    Per token, with ratio ``rho = exp(logp - old_logp)`` and the sequence's advantage ``A``::

        surrogate = min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon_high) * A)
        loss_t    = -(surrogate - beta * k3_kl(logp, ref_logp))

    ``old_logp=None`` means one policy update per generation batch (mu = 1, R1-V / CLS-RL): the ratio is
    ``exp(logp - logp.detach()) == 1``, no clipping applies, and the gradient is the REINFORCE form ``-A * grad logp``
    per token. Reductions over the masked tokens (``n_i`` tokens in sequence ``i``, ``N`` sequences):

    - ``"grpo"`` (DeepSeekMath, TRL 0.14, R1-V): ``(1/N) sum_i (1/n_i) sum_t loss_t``.
    - ``"bnpo"`` / ``"dapo"``: ``sum_{i,t} loss_t / sum_i n_i``. They differ only in who supplies the normaliser: TRL's
      ``dapo`` divides by the token count of the whole global batch, pass it as ``num_items`` (already divided by
      the number of ranks when gradients are averaged over ranks).
    - ``"dr_grpo"``: ``sum_{i,t} loss_t / (N * max_completion_length)``.

    Args:
        logp: ``(N, T)`` log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: ``(N, T)`` log-probs under the policy that sampled them, or None for mu = 1.
        ref_logp: ``(N, T)`` log-probs under the frozen reference, or None (no KL term, ``kl`` reported as 0).
        advantages: ``(N,)`` one advantage per sequence (:func:`group_advantages`).
        mask: ``(N, T)`` bool or 0/1, real completion tokens (:func:`completion_mask`). Masked-out entries of the
            inputs are never used, so padding may hold any value, even inf or NaN.
        beta: KL coefficient; 0 drops the KL term from the loss.
        epsilon: Lower clip ``1 - epsilon`` (and the upper one unless ``epsilon_high`` is given).
        epsilon_high: Upper clip ``1 + epsilon_high`` (DAPO's clip-higher uses 0.28); None means ``epsilon``.
        loss_type: The reduction, see above.
        max_completion_length: The constant of ``dr_grpo``; unused otherwise.
        num_items: Replaces this batch's own count in the divisor: the token count for ``bnpo`` / ``dapo``, the
            sequence count ``N`` for ``grpo`` and ``dr_grpo``. Used to normalise across ranks or accumulation steps.

    Returns:
        The loss and detached diagnostics; the loss is fp32 whatever the input dtype.

    Raises:
        ValueError: On mismatched shapes, an unknown ``loss_type``, or ``dr_grpo`` without ``max_completion_length``.

    Example:
        >>> logp = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.5, 1.0, 1.0]]))
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> out = grpo_loss(logp, None, None, torch.tensor([1.0, -3.0]), mask, beta=0.0)
        >>> out.loss  # per-token -A: row means -1 and 3, then their mean
        tensor(1.)
    """
    _check_loss_inputs(logp, (old_logp, ref_logp, mask), advantages, loss_type)
    keep = mask.bool()  # (N, T)
    logp = logp.float().where(keep, 0.0)  # (N, T) padding zeroed so it cannot reach values or gradients
    adv = advantages.float().unsqueeze(1)  # (N, 1)
    if old_logp is None:
        surrogate = torch.exp(logp - logp.detach()) * adv  # (N, T) value A, gradient A * grad logp
        clipped = torch.zeros_like(keep)  # (N, T)
    else:
        ratio = torch.exp(logp - old_logp.float().where(keep, 0.0))  # (N, T)
        high = epsilon if epsilon_high is None else epsilon_high
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + high) * adv)  # (N, T)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))  # (N, T)
    kl = torch.zeros_like(logp) if ref_logp is None else k3_kl(logp, ref_logp.float().where(keep, 0.0))  # (N, T)
    per_token = -surrogate + beta * kl if ref_logp is not None and beta != 0 else -surrogate  # (N, T)
    reduce = REDUCTIONS[loss_type]
    loss = reduce(per_token.where(keep, 0.0), keep, num_items, max_completion_length)  # ()
    policy_loss = reduce((-surrogate).detach().where(keep, 0.0), keep, num_items, max_completion_length)  # ()
    count = keep.sum()  # ()
    return GRPOLossOutput(
        loss=loss,
        policy_loss=policy_loss,
        kl=(kl.detach().where(keep, 0.0).sum() / count.clamp(min=1)),
        clip_fraction=(clipped & keep).sum() / count.clamp(min=1),
        num_tokens=count.detach(),
    )
