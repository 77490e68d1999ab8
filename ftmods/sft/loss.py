"""Completion-only negative log-likelihood, as pure functions.

Inputs are *aligned*: ``targets[i]`` is the token that ``logits[i]`` predicts (see
:func:`ftmods.ops.next_token_targets`), and positions that are not supervised hold ``ignore_index``. Both functions
accept any leading shape, e.g. ``(B, T, V)`` / ``(B, T)`` or the flattened ``(N, V)`` / ``(N,)`` of selected positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ftmods.ops.tokens import IGNORE_INDEX


class SFTLossOutput(NamedTuple):
    """Loss and detached diagnostics."""

    loss: Tensor
    """() the reduced NLL; differentiable."""
    nll_sum: Tensor
    """() summed NLL over supervised tokens, detached."""
    num_tokens: Tensor
    """() number of supervised tokens, detached."""
    num_sequences: Tensor
    """() number of sequences with at least one supervised token, detached."""


def _token_nll(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V) in fp32 for a stable log-softmax
    flat_targets = targets.reshape(-1)  # (N,)
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="none")  # (N,)
    return nll, flat_targets != ignore_index  # (N,), (N,)


def token_mean_nll(
    logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, num_tokens: Tensor | float | None = None
) -> SFTLossOutput:
    """Mean NLL over all supervised tokens of the batch (every token weighs the same; long answers weigh more).

    Args:
        logits: ``(..., V)`` next-token logits.
        targets: ``(...)`` aligned target ids, ``ignore_index`` where not supervised.
        ignore_index: Target value of unsupervised positions.
        num_tokens: Denominator to use instead of this batch's own token count, e.g. the count summed over all
            data-parallel ranks times the world size, so that averaged gradients equal the global token mean.

    Returns:
        ``loss = sum(nll) / num_tokens``; 0 (with a gradient path) when nothing is supervised.
    """
    nll, supervised = _token_nll(logits, targets, ignore_index)  # (N,), (N,)
    nll_sum = nll.sum()  # () ignored positions contribute exactly 0
    count = supervised.sum()  # ()
    denominator = count.clamp(min=1) if num_tokens is None else torch.as_tensor(num_tokens, device=nll.device)
    seqs = (supervised.reshape(targets.shape).flatten(1).any(-1) if targets.dim() > 1 else supervised.any()).sum()
    return SFTLossOutput(nll_sum / denominator, nll_sum.detach(), count.detach(), seqs.detach())


def sequence_mean_nll(
    logits: Tensor,
    targets: Tensor,
    sequence_ids: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_sequences: Tensor | float | None = None,
) -> SFTLossOutput:
    """Mean over sequences of each sequence's mean token NLL (every example weighs the same, whatever its length).

    Args:
        logits: ``(..., V)`` next-token logits.
        targets: ``(...)`` aligned target ids, ``ignore_index`` where not supervised.
        sequence_ids: ``(...)`` integer id of the sequence each position belongs to (``row index`` for a padded batch,
            the segment id for a packed row). Ids need not be contiguous.
        ignore_index: Target value of unsupervised positions.
        num_sequences: Denominator to use instead of this batch's count of supervised sequences.

    Returns:
        ``loss = sum_s mean_{t in s} nll_t / num_sequences``; sequences with no supervised token are left out.
    """
    nll, supervised = _token_nll(logits, targets, ignore_index)  # (N,), (N,)
    _, seq = torch.unique(sequence_ids.reshape(-1), return_inverse=True)  # (N,) contiguous ids 0..S-1
    num_segments = int(seq.max().item()) + 1 if seq.numel() else 0
    per_seq_sum = nll.new_zeros(num_segments).index_add(0, seq, nll)  # (S,)
    per_seq_count = nll.new_zeros(num_segments).index_add(0, seq, supervised.to(nll.dtype))  # (S,)
    has_tokens = per_seq_count > 0  # (S,)
    per_seq_mean = per_seq_sum / per_seq_count.clamp(min=1)  # (S,)
    count = has_tokens.sum()  # ()
    denominator = count.clamp(min=1) if num_sequences is None else torch.as_tensor(num_sequences, device=nll.device)
    loss = per_seq_mean[has_tokens].sum() / denominator  # ()
    return SFTLossOutput(loss, nll.sum().detach(), supervised.sum().detach(), count.detach())


def grouped_token_nll(
    logits: Tensor, targets: Tensor, groups: Tensor, num_groups: int, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Summed NLL and supervised-token count per group (a row, a packed segment, a data source, ...).

    Args:
        logits: ``(..., V)`` next-token logits.
        targets: ``(...)`` aligned target ids, ``ignore_index`` where not supervised.
        groups: ``(...)`` group id in ``[0, num_groups)`` of each position.
        num_groups: Number of groups.
        ignore_index: Target value of unsupervised positions.

    Returns:
        ``(num_groups,)`` NLL sums (differentiable) and ``(num_groups,)`` token counts; a group's mean is sum / count,
        its log-probability is ``-sum``.

    Example:
        >>> import math
        >>> logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]]])  # p = (3/4, 1/4), (1/2, 1/2), ...
        >>> sums, counts = grouped_token_nll(logits, torch.tensor([[0, 1, -100]]), torch.tensor([[0, 1, 1]]), 2)
        >>> [round(v, 4) for v in sums.tolist()], counts.tolist()  # -log(3/4) = 0.2877; -log(1/2) = 0.6931
        ([0.2877, 0.6931], [1.0, 1.0])
    """
    nll, supervised = _token_nll(logits, targets, ignore_index)  # (N,), (N,)
    index = groups.reshape(-1).to(nll.device)  # (N,)
    sums = nll.new_zeros(num_groups).index_add(0, index, nll)  # (G,) ignored positions contribute exactly 0
    counts = nll.new_zeros(num_groups).index_add(0, index, supervised.to(nll.dtype))  # (G,)
    return sums, counts
