"""ManyICL objectives over many-shot episodes, as pure functions.

Inputs are *aligned* as in :mod:`ftmods.sft.loss`: ``targets[i]`` is the token that ``logits[i]`` predicts (see
:func:`ftmods.ops.next_token_targets`), and positions that are not supervised hold ``ignore_index``. Two more aligned
integer fields of the same shape say which answer a supervised position belongs to:

- ``shot_index``: the 0-based index ``k`` of the shot (example) whose answer the position predicts, i.e. the number of
  demonstrations before it in its episode; -1 where not supervised.
- ``episode_ids``: the episode the position belongs to (the row index for a padded batch, the segment id for a packed
  row); ids need not be contiguous.

An *answer* is one ``(episode, shot)`` pair. Per-token fields recorded on the input ids (like ``shot_index`` from the
DataModule) must be shifted exactly as the labels are, with :func:`shift_token_field`; a supervised target whose
``shot_index`` is -1 raises, which catches a mask that is off by one against the shifted labels (spec P8). Any leading
shape works (``(B, T)`` or the flattened ``(N,)``); everything is flattened inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ftmods.ops.tokens import IGNORE_INDEX, next_token_targets

Reduction = Literal["token_mean", "answer_mean", "weighted"]
Supervise = Literal["all", "last", "after_m"]

SHOT_BUCKETS: tuple[int, ...] = (0, 1, 5, 17)
"""Lower bounds of the shot-index buckets the loss is reported in: shots 0, 1-4, 5-16 and 17+."""

_REDUCTIONS = ("token_mean", "answer_mean", "weighted")
_SUPERVISE = ("all", "last", "after_m")


class ManyICLLossOutput(NamedTuple):
    """Loss and detached diagnostics."""

    loss: Tensor
    """() the reduced NLL; differentiable."""
    nll_sum: Tensor
    """() summed NLL over the selected tokens, detached."""
    num_tokens: Tensor
    """() number of selected tokens (supervised and kept by ``supervise``), detached."""
    num_answers: Tensor
    """() number of selected answers: distinct ``(episode, shot)`` pairs with at least one selected token, detached."""
    units: Tensor
    """() this batch's own count the reduction normalises by (fp32, detached), whatever ``denominator`` says:
    ``num_tokens`` (token_mean), ``num_answers`` (answer_mean) or the sum of the answers' weights (weighted). Sum it
    over ranks and accumulation steps to get a global ``denominator``."""
    bucket_nll_sum: Tensor
    """(len(buckets),) summed NLL of the selected tokens per shot-index bucket, detached."""
    bucket_tokens: Tensor
    """(len(buckets),) number of selected tokens per shot-index bucket, detached."""


class _Answers(NamedTuple):
    mean: Tensor  # (A,) mean NLL of each answer; 0 for a pair with no selected token
    shot: Tensor  # (A,) shot index of each answer
    present: Tensor  # (A,) whether the answer has at least one selected token


def _check_buckets(buckets: Sequence[int]) -> None:
    if not buckets or buckets[0] != 0 or any(hi <= lo for lo, hi in zip(buckets[:-1], buckets[1:], strict=True)):
        raise ValueError(f"buckets must be strictly increasing lower bounds starting at 0, got {tuple(buckets)}")


def bucket_names(buckets: Sequence[int] = SHOT_BUCKETS) -> list[str]:
    """Readable names of shot-index buckets, for log keys.

    Args:
        buckets: Strictly increasing lower bounds, starting at 0.

    Returns:
        One name per bucket: a single shot, an inclusive range, or an open-ended last bucket.

    Example:
        >>> bucket_names()
        ['0', '1-4', '5-16', '17+']
    """
    _check_buckets(buckets)
    names = [str(lo) if hi - 1 == lo else f"{lo}-{hi - 1}" for lo, hi in zip(buckets[:-1], buckets[1:], strict=True)]
    return [*names, f"{buckets[-1]}+"]


def _check_selection(shot_index: Tensor, episode_ids: Tensor, supervise: str, min_context_shots: int) -> None:
    if supervise not in _SUPERVISE:
        raise ValueError(f"supervise must be one of {_SUPERVISE}, got {supervise!r}")
    if min_context_shots < 0:
        raise ValueError(f"min_context_shots must be >= 0, got {min_context_shots}")
    if min_context_shots and supervise != "after_m":
        raise ValueError(f"min_context_shots={min_context_shots} needs supervise='after_m', got {supervise!r}")
    if shot_index.shape != episode_ids.shape:
        raise ValueError(f"shot_index {tuple(shot_index.shape)} and episode_ids {tuple(episode_ids.shape)} differ")
    if shot_index.is_floating_point() or episode_ids.is_floating_point():
        raise ValueError("shot_index and episode_ids must be integer tensors")


def select_answers(
    shot_index: Tensor, episode_ids: Tensor, *, supervise: Supervise = "all", min_context_shots: int = 0
) -> Tensor:
    """Which answer positions the loss trains on.

    Args:
        shot_index: ``(...)`` shot index of each position, -1 outside answers.
        episode_ids: ``(...)`` episode id of each position.
        supervise: ``"all"`` keeps every answer (ManyICL); ``"last"`` keeps only the highest shot index present in each
            episode (the few-shot ICFT / MetaICL baseline); ``"after_m"`` keeps shots with index
            ``>= min_context_shots`` (answers seen with at least that many demonstrations).
        min_context_shots: The ``m`` of ``"after_m"``; must stay 0 for the other modes.

    Returns:
        ``(...)`` boolean mask, true at the kept answer positions.

    Example:
        >>> shots = torch.tensor([[-1, 0, -1, 1, 1], [0, -1, 1, 2, -1]])
        >>> select_answers(shots, torch.tensor([[0], [1]]).expand(2, 5), supervise="last").long()
        tensor([[0, 0, 0, 1, 1],
                [0, 0, 0, 1, 0]])
    """
    _check_selection(shot_index, episode_ids, supervise, min_context_shots)
    if supervise == "all":
        return shot_index >= 0
    if supervise == "after_m":
        return shot_index >= min_context_shots
    episodes, episode = torch.unique(episode_ids.reshape(-1), return_inverse=True)  # (E,), (N,)
    flat = shot_index.reshape(-1)  # (N,)
    last = flat.new_full((episodes.numel(),), -1).scatter_reduce(0, episode, flat, reduce="amax")  # (E,)
    return ((flat >= 0) & (flat == last[episode])).view(shot_index.shape)  # (...)


def shot_weights(shot_index: Tensor, power: float = 1.0) -> Tensor:
    """Per-shot weights ``w_k = (k + 1) ** power`` (fp32), 0 where ``shot_index`` is negative.

    ``power > 0`` up-weights answers seen with more demonstrations; ``power = 0`` weighs every answer the same.

    Example:
        >>> shot_weights(torch.tensor([-1, 0, 1, 3]), power=2.0)
        tensor([ 0.,  1.,  4., 16.])
    """
    k = shot_index.clamp(min=0).to(torch.float32)  # (...)
    return torch.where(shot_index >= 0, (k + 1).pow(power), 0.0)  # (...)


def shift_token_field(field: Tensor, fill: int = -1) -> Tensor:
    """Align a per-token field of the input ids with the targets: ``out[:, t] = field[:, t + 1]``, last = ``fill``.

    This is :func:`ftmods.ops.next_token_targets` with ``fill`` for the missing last position: shift ``shot_index``
    and ``episode_ids`` with it exactly as the labels, so that position ``t`` carries the field of the token it
    predicts.

    Example:
        >>> shift_token_field(torch.tensor([[-1, 0, 0, -1, 1]]))
        tensor([[ 0,  0, -1,  1, -1]])
    """
    return next_token_targets(field, ignore_index=fill)  # (B, T)


def _check_inputs(logits: Tensor, targets: Tensor, shot_index: Tensor, episode_ids: Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} plus a vocab dim")
    if shot_index.shape != targets.shape or episode_ids.shape != targets.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)}, shot_index {tuple(shot_index.shape)} and episode_ids "
            f"{tuple(episode_ids.shape)} must have the same shape"
        )
    if shot_index.is_floating_point() or episode_ids.is_floating_point():
        raise ValueError("shot_index and episode_ids must be integer tensors")


def _per_answer(nll: Tensor, selected: Tensor, shot: Tensor, episode: Tensor) -> _Answers:
    pairs = torch.stack([episode, shot.where(selected, -1)], dim=1)  # (N, 2) unselected positions share shot -1
    keys, answer = torch.unique(pairs, dim=0, return_inverse=True)  # (A, 2), (N,)
    total = nll.new_zeros(keys.shape[0]).index_add(0, answer, nll)  # (A,)
    count = nll.new_zeros(keys.shape[0]).index_add(0, answer, selected.to(nll.dtype))  # (A,)
    return _Answers(total / count.clamp(min=1), keys[:, 1], count > 0)


def _token_mean(nll: Tensor, selected: Tensor, answers: _Answers, power: float) -> tuple[Tensor, Tensor]:
    return nll.sum(), selected.sum().to(nll.dtype)  # (), ()


def _answer_mean(nll: Tensor, selected: Tensor, answers: _Answers, power: float) -> tuple[Tensor, Tensor]:
    return answers.mean.sum(), answers.present.sum().to(nll.dtype)  # (), () absent answers have mean 0


def _weighted(nll: Tensor, selected: Tensor, answers: _Answers, power: float) -> tuple[Tensor, Tensor]:
    weights = shot_weights(answers.shot, power) * answers.present  # (A,)
    return (weights * answers.mean).sum(), weights.sum()  # (), ()


_REDUCE = {"token_mean": _token_mean, "answer_mean": _answer_mean, "weighted": _weighted}


def many_icl_nll(
    logits: Tensor,
    targets: Tensor,
    shot_index: Tensor,
    episode_ids: Tensor,
    *,
    reduction: Reduction = "token_mean",
    supervise: Supervise = "all",
    min_context_shots: int = 0,
    weight_power: float = 1.0,
    denominator: Tensor | float | None = None,
    buckets: Sequence[int] = SHOT_BUCKETS,
    ignore_index: int = IGNORE_INDEX,
) -> ManyICLLossOutput:
    """NLL of the in-context answers of many-shot episodes (spec §1.4.3).

    With ``T`` the selected token positions, ``A_k`` those of one answer (an ``(episode, shot k)`` pair) and
    ``w_k = (k + 1) ** weight_power``:

    - ``token_mean`` (default; what HF ``labels`` give): ``L = sum_{t in T} nll_t / |T|``; long answers weigh more.
    - ``answer_mean``: ``L = sum_answers mean_{t in A_k} nll_t / num_answers``; every answer weighs the same.
    - ``weighted``: ``L = sum_answers w_k mean_{t in A_k} nll_t / sum_answers w_k``.

    Args:
        logits: ``(..., V)`` next-token logits; the log-softmax runs in fp32.
        targets: ``(...)`` aligned target ids, ``ignore_index`` where not supervised.
        shot_index: ``(...)`` aligned shot index of each position, -1 where not supervised.
        episode_ids: ``(...)`` aligned episode id of each position.
        reduction: How token NLLs are reduced, see above.
        supervise: Which answers are trained on, see :func:`select_answers`; ``"last"`` is the few-shot ICFT baseline.
        min_context_shots: Shots below this index are left out (only with ``supervise="after_m"``).
        weight_power: Exponent of the shot weights; used only by ``reduction="weighted"``.
        denominator: Replaces this batch's own ``units`` as the divisor, e.g. ``1.0`` for a sum that the caller
            normalises globally across ranks and accumulation steps (spec P6). A zero divisor counts as 1, so an empty
            selection gives 0, not NaN.
        buckets: Lower bounds of the shot-index buckets of ``bucket_nll_sum`` / ``bucket_tokens``.
        ignore_index: Target value of unsupervised positions.

    Returns:
        The loss (0 with a gradient path when nothing is selected) and detached diagnostics.

    Raises:
        ValueError: On an unknown ``reduction`` or ``supervise``, mismatched shapes, a negative or misplaced
            ``min_context_shots``, bad ``buckets``, or a supervised target whose ``shot_index`` is negative (fields not
            shifted like the labels).
    """
    _check_inputs(logits, targets, shot_index, episode_ids, reduction)
    _check_buckets(buckets)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V) in fp32 for a stable log-softmax
    flat_targets = targets.reshape(-1)  # (N,)
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="none")  # (N,)
    supervised = flat_targets != ignore_index  # (N,)
    shot = shot_index.reshape(-1).long()  # (N,)
    if bool((supervised & (shot < 0)).any()):
        raise ValueError("a supervised target has shot_index < 0: shift shot_index like the labels (shift_token_field)")
    shot = shot.where(supervised, -1)  # (N,) answer positions whose target was masked out do not count
    episode = episode_ids.reshape(-1).long()  # (N,)
    selected = select_answers(shot, episode, supervise=supervise, min_context_shots=min_context_shots)  # (N,)
    nll = nll.where(selected, 0.0)  # (N,) unselected positions contribute exactly 0 and get no gradient
    answers = _per_answer(nll, selected, shot, episode)
    total, units = _REDUCE[reduction](nll, selected, answers, weight_power)  # (), ()
    divisor = units if denominator is None else torch.as_tensor(denominator, dtype=nll.dtype, device=nll.device)
    loss = total / divisor.where(divisor != 0, 1.0)  # ()
    bounds = torch.as_tensor(list(buckets), dtype=shot.dtype, device=shot.device)  # (M,)
    bucket = torch.searchsorted(bounds, shot.clamp(min=0), right=True) - 1  # (N,) every shot >= 0 has a bucket
    bucket_nll = nll.new_zeros(len(buckets)).index_add(0, bucket, nll.detach())  # (M,)
    bucket_tokens = torch.zeros(len(buckets), dtype=torch.long, device=nll.device).index_add(0, bucket, selected.long())
    return ManyICLLossOutput(
        loss=loss,
        nll_sum=nll.sum().detach(),
        num_tokens=selected.sum().detach(),
        num_answers=answers.present.sum().detach(),
        units=units.detach(),
        bucket_nll_sum=bucket_nll,
        bucket_tokens=bucket_tokens,
    )
