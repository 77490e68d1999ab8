r"""Pure scoring functions for model editing: WILD exact match, EasyEdit teacher forcing, ROME/MEMIT CounterFact.

Every function here is model-free: strings or tensors in, strings, booleans or tensors out. The evaluator
(:mod:`ftmods.locft.evaluator`) drives the model and names every score by the protocol that produced it
(``"<protocol>/<metric>"``); :class:`ProtocolScores` accumulates those per-request scores over batches and DDP ranks.

**Label convention** (as :func:`ftmods.ops.next_token_targets` and ``EditBatch``): ``labels`` has the shape of
``input_ids`` and holds the input id itself on every supervised (target) position and ``-100`` elsewhere. The logits
at position ``t`` predict ``labels[:, t + 1]``; the last position predicts nothing. Masks over *logit positions*
(``argmax_agreement``, ``token_agreement``) are therefore ``next_token_targets(labels) != -100``.

Protocols (spec ``locft_bf.md`` §2):

- **WILD** (``wild_em``): greedy generation, cut at the first ".", "\n" or EOS (:func:`truncate_at_stop`), SQuAD
  exact match (:func:`exact_match`); locality = the post-edit generation equals the pre-edit one
  (:func:`generation_agreement`).
- **EasyEdit teacher forcing** (``teacher_forced_token``): per-case token accuracy (:func:`token_accuracy`);
  locality = argmax agreement with the pre-edit model (:func:`argmax_agreement`), not with the gold answer.
- **ROME / MEMIT CounterFact** (``counterfact_prob``): P(new) > P(true) and its magnitude
  (:func:`counterfact_scores` over :func:`sequence_logprob`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from ftmods.ops.tokens import IGNORE_INDEX, masked_mean, next_token_targets

__all__ = [
    "CounterFactScores",
    "ProtocolScores",
    "argmax_agreement",
    "counterfact_scores",
    "exact_match",
    "generation_agreement",
    "normalize_answer",
    "sequence_logprob",
    "summarize",
    "token_accuracy",
    "token_agreement",
    "truncate_at_stop",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ----------------------------------------------------------------------------------------------------------------------
# Strings (WILD)
# ----------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop the articles a / an / the, collapse whitespace.

    The steps run in SQuAD's order (lower → punctuation → articles → whitespace), so "U.S.A." becomes "usa".

    Example:
        >>> normalize_answer("  The Eiffel-Tower,  in PARIS! ")
        'eiffeltower in paris'
        >>> normalize_answer("An apple a day")
        'apple day'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def truncate_at_stop(text: str, stop: Sequence[str] = (".", "\n")) -> str:
    r"""Cut ``text`` at the earliest occurrence of any stop string (the stop string itself is dropped).

    This is WILD's natural stopping applied after greedy decoding; for greedy decoding it equals stopping the
    generation there. Note that "." also cuts answers such as "Robert C. Newton" (a known bias of the protocol).

    Example:
        >>> truncate_at_stop(" Paris. It is the capital")
        ' Paris'
        >>> truncate_at_stop("Robert C. Newton\n")
        'Robert C'
        >>> truncate_at_stop("no stop here")
        'no stop here'
    """
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether ``prediction`` equals any gold answer after :func:`normalize_answer` (SQuAD EM).

    Example:
        >>> exact_match(" the Paris", "Paris")
        True
        >>> exact_match("Paris, France", ["Paris", "Lyon"])
        False
        >>> exact_match("lyon!", ["Paris", "Lyon"])
        True
    """
    golds = [answers] if isinstance(answers, str) else answers
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(gold) for gold in golds)


def generation_agreement(post: Sequence[str | Sequence[int]], pre: Sequence[str | Sequence[int]]) -> Tensor:
    """WILD locality: 1.0 where the post-edit generation equals the pre-edit one (strings or token-id lists).

    Args:
        post: Generations of the edited model, one per locality prompt.
        pre: Generations of the unedited model for the same prompts, in the same order.

    Returns:
        ``(N,)`` float tensor of 0.0 / 1.0.

    Example:
        >>> generation_agreement([" Paris", " Rome"], [" Paris", " Lyon"])
        tensor([1., 0.])
        >>> generation_agreement([[5, 6]], [[5, 6]])
        tensor([1.])
    """
    if len(post) != len(pre):
        raise ValueError(f"generation_agreement: {len(post)} post-edit vs {len(pre)} pre-edit generations")
    same = [_as_comparable(a) == _as_comparable(b) for a, b in zip(post, pre, strict=True)]
    return torch.tensor(same, dtype=torch.float32).reshape(len(same))  # (N,)


def _as_comparable(value: str | Sequence[int]) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, Tensor):
        return tuple(value.tolist())
    return tuple(value)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors (teacher forcing, CounterFact)
# ----------------------------------------------------------------------------------------------------------------------


def token_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """EasyEdit teacher-forced accuracy per case: the fraction of supervised tokens whose argmax equals the label.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (:func:`ftmods.ops.next_token_targets`), so ``labels`` is in the
    input-id layout: ``labels[b, t] = input_ids[b, t]`` on target tokens, ``ignore_index`` on prompt and padding.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` long.
        ignore_index: Label value of unsupervised positions.

    Returns:
        ``(B,)`` float in [0, 1]; 0 for a row with no supervised token (the :func:`ftmods.ops.masked_mean`
        convention).

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])  # argmax 1, 0, (tie → 0)
        >>> token_accuracy(logits, torch.tensor([[-100, 1, 1]]))  # position 0 predicts 1 (right), 1 predicts 1 (wrong)
        tensor([0.5000])
    """
    targets = next_token_targets(labels, ignore_index)  # (B, T)
    mask = targets != ignore_index  # (B, T)
    correct = (logits.argmax(-1) == targets).float()  # (B, T)
    return masked_mean(correct, mask, dim=-1)  # (B,)


def token_agreement(ids_post: Tensor, ids_pre: Tensor, mask: Tensor) -> Tensor:
    """Fraction of masked positions where two id tensors agree (the core of :func:`argmax_agreement`).

    Args:
        ids_post: ``(B, T)`` token ids (e.g. the edited model's argmax).
        ids_pre: ``(B, T)`` token ids (e.g. the unedited model's argmax).
        mask: ``(B, T)`` bool, the positions that count.

    Returns:
        ``(B,)`` float in [0, 1]; 0 for a row with an empty mask.

    Example:
        >>> token_agreement(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]]), torch.tensor([[True, True, False]]))
        tensor([0.5000])
    """
    return masked_mean((ids_post == ids_pre).float(), mask, dim=-1)  # (B,)


def argmax_agreement(logits_post: Tensor, logits_pre: Tensor, mask: Tensor) -> Tensor:
    """EasyEdit locality: fraction of masked positions whose argmax equals the pre-edit model's argmax.

    The comparison is with the **pre-edit model**, not with the gold answer. ``mask`` is over logit positions: for a
    locality prompt + answer with ``labels`` in the input-id layout, use ``next_token_targets(labels) != -100``.

    Args:
        logits_post: ``(B, T, V)`` from the edited model.
        logits_pre: ``(B, T, V)`` from the unedited model on the same inputs.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B,)`` float in [0, 1]; 0 for a row with an empty mask.

    Example:
        >>> post = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # argmax 0, 1
        >>> pre = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # argmax 0, 0
        >>> argmax_agreement(post, pre, torch.tensor([[True, True]]))
        tensor([0.5000])
    """
    return token_agreement(logits_post.argmax(-1), logits_pre.argmax(-1), mask)  # (B,)


def sequence_logprob(
    logits: Tensor,
    labels: Tensor,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Log-probability of the supervised tokens of each row: ``log P(target | prompt)`` under teacher forcing.

    Same alignment as :func:`token_accuracy` (``logits[:, t]`` scores ``labels[:, t + 1]``); computed in float32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` long, ``ignore_index`` off target.
        reduction: ``"sum"`` gives the joint log-probability of the whole target sequence (ftmods' CounterFact
            default); ``"mean"`` the per-token mean, i.e. ROME's ``-mean NLL`` (``exp`` of it is a geometric-mean
            token probability).
        ignore_index: Label value of unsupervised positions.

    Returns:
        ``(B,)`` float32; 0 for a row with no supervised token.

    Example:
        >>> import math
        >>> logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]]])  # p = (3/4, 1/4), (1/2, 1/2)
        >>> lp = sequence_logprob(logits, torch.tensor([[-100, 0, 1]]))  # log(3/4) + log(1/2) = log(3/8)
        >>> round(lp.item(), 5), round(math.log(3 / 8), 5)
        (-0.98083, -0.98083)
    """
    targets = next_token_targets(labels, ignore_index)  # (B, T)
    mask = targets != ignore_index  # (B, T)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    picked = picked.masked_fill(~mask, 0.0)  # (B, T)
    if reduction == "mean":
        return masked_mean(picked, mask, dim=-1)  # (B,)
    return picked.sum(-1)  # (B,)


class CounterFactScores(NamedTuple):
    """ROME / MEMIT CounterFact comparisons for a batch of prompts (all ``(B,)`` float)."""

    new_beats_true: Tensor
    """1.0 where P(new) > P(true): Efficacy (rewrite prompt) and Paraphrase success."""
    new_margin: Tensor
    """P(new) - P(true): the Efficacy / Paraphrase magnitude."""
    true_beats_new: Tensor
    """1.0 where P(true) > P(new): Neighborhood success (strict, so a tie counts for neither side)."""
    true_margin: Tensor
    """P(true) - P(new): the Neighborhood magnitude."""


def counterfact_scores(logp_new: Tensor, logp_true: Tensor) -> CounterFactScores:
    """Compare the new and the true object of each prompt, as ROME / MEMIT's CounterFact scores do.

    Pick ``new_beats_true`` / ``new_margin`` on rewrite prompts (Efficacy) and paraphrases (Paraphrase), and
    ``true_beats_new`` / ``true_margin`` on neighbourhood prompts (Neighborhood). Probabilities are ``exp`` of the
    inputs, so with :func:`sequence_logprob`'s default ``"sum"`` they are joint sequence probabilities.

    Args:
        logp_new: ``(B,)`` log P(new object | prompt).
        logp_true: ``(B,)`` log P(true object | prompt).

    Example:
        >>> import math
        >>> out = counterfact_scores(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
        >>> out.new_beats_true, out.new_margin, out.true_beats_new, out.true_margin
        (tensor([1.]), tensor([0.2500]), tensor([0.]), tensor([-0.2500]))
    """
    new_wins = (logp_new > logp_true).float()  # (B,)
    true_wins = (logp_true > logp_new).float()  # (B,)
    margin = logp_new.exp() - logp_true.exp()  # (B,)
    return CounterFactScores(new_wins, margin, true_wins, -margin)


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------


def summarize(scores: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean of each per-request score over the requests that have it (NaN entries are skipped).

    A key whose entries are all NaN (e.g. no request had a rephrase) summarises to NaN.

    Example:
        >>> summarize({"wild_em/reliability": torch.tensor([1.0, 0.0]), "wild_em/generalization": torch.tensor([1.0, float("nan")])})
        {'wild_em/reliability': 0.5, 'wild_em/generalization': 1.0}
    """  # noqa: E501
    out = {}
    for key, values in scores.items():
        finite = values[~values.isnan()]  # (K,)
        out[key] = finite.double().mean().item() if finite.numel() else math.nan
    return out


class ProtocolScores(Metric):
    """Exact mean of protocol-tagged per-request scores over batches and DDP ranks (NaN entries skipped).

    The keys are fixed at construction (every rank must hold the same states), e.g. ``EditEvaluator.keys``. The state
    is a float64 sum and count per key, reduced by summation, so the result is the plain mean over all requests seen
    on all ranks, whatever the batch sizes.

    Args:
        keys: The ``"<protocol>/<metric>"`` names to accumulate.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = ProtocolScores(["wild_em/reliability", "wild_em/generalization"])
        >>> metric.update({"wild_em/reliability": torch.tensor([1.0, 0.0])})
        >>> metric.update({"wild_em/reliability": torch.tensor([1.0]), "wild_em/generalization": torch.tensor([float("nan")])})
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'wild_em/reliability': 0.6667, 'wild_em/generalization': nan}
    """  # noqa: E501

    full_state_update = False
    higher_is_better = True
    total: Tensor
    count: Tensor

    def __init__(self, keys: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = tuple(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"ProtocolScores: duplicate keys in {self.keys}")
        self._index = {key: i for i, key in enumerate(self.keys)}
        self.add_state("total", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Mapping[str, Tensor]) -> None:
        """Add per-request scores; keys may be a subset of ``keys``, unknown keys raise ``KeyError``."""
        for key, values in scores.items():
            if key not in self._index:
                raise KeyError(f"ProtocolScores: unknown key {key!r}; known keys: {self.keys}")
            values = values.detach().flatten().to(self.total.device, torch.float64)  # (K,)
            finite = ~values.isnan()  # (K,)
            self.total[self._index[key]] += values[finite].sum()
            self.count[self._index[key]] += finite.sum()

    def compute(self) -> dict[str, Tensor]:
        """Mean per key (NaN where nothing was seen)."""
        means = self.total / self.count  # (K,)  0 / 0 = NaN
        return {key: means[i] for i, key in enumerate(self.keys)}
