r"""``EditEvaluator``: score a causal LM on edit requests under named protocols (spec ``locft_bf.md`` §2, §7.7).

A plain class (not a LightningModule) that drives a model + tokenizer and calls the pure functions of
:mod:`ftmods.locft.metrics`. Every score it returns is keyed ``"<protocol>/<metric>"`` and holds one value per request.

Protocols (selected by name):

=========================  ==========================================================================================
``wild_em``                WILD (the LocFT-BF paper's protocol): greedy generation of at most ``max_new_tokens``,
                           cut at ".", "\n" or EOS, SQuAD exact match. ``reliability`` (prompt vs ``target_new``),
                           ``generalization`` (each rephrase vs ``target_new``), ``portability`` (each portability
                           prompt vs its answer), ``locality`` (the stopped generation for each locality prompt
                           equals the pre-edit model's, as a string).
``wild_judge``             The same generations, scored by ``judge(question, prediction, golds)`` instead of EM; the
                           same four metrics (``locality`` is the same string comparison as ``wild_em``).
``teacher_forced_token``   EasyEdit compatibility: token accuracy on prompt + " " + target [+ EOS] (``reliability``),
                           on each rephrase (``generalization``) and on each portability pair (``portability``);
                           ``locality`` = argmax agreement with the pre-edit model on locality prompt + " " + answer;
                           ``specificity`` = token accuracy of that same input against the gold locality answer
                           (MEMIT's ZsRE "Specificity"; needs no reference).
``counterfact_prob``       ROME / MEMIT CounterFact, only for requests with ``ground_truth``: ``efficacy`` (prompt:
                           P(new) > P(true)), ``paraphrase`` (each rephrase, same test), ``neighborhood`` (each
                           locality prompt: P(true) > P(new), with true = that locality pair's answer and new =
                           ``target_new``), each with a ``*_magnitude`` (P(new) - P(true), reversed for the
                           neighbourhood). P is ``exp`` of the summed target log-probability by default.
=========================  ==========================================================================================

**Per-request values.** A request with several rephrases / locality / portability prompts gets the mean over them. A
request with none of a kind gets NaN for that metric (so are all ``counterfact_prob`` values of a request without
``ground_truth``); :func:`ftmods.locft.metrics.summarize` and :class:`ftmods.locft.metrics.ProtocolScores` skip NaN.
Without a ``reference`` the ``*/locality`` keys are **absent** (they need the pre-edit model); everything else is
computed.

**Inputs.** The prompt is formatted (``prompt_format``) and tokenised with the tokenizer's special tokens (e.g. BOS;
none for ``chat_template``, whose text already has them). A target is tokenised separately as ``" " + target`` (no
special tokens; no extra space if the target already starts with one) plus EOS when ``append_eos``, and concatenated,
so the prompt/target boundary is exact. Batches are left-padded with explicit ``position_ids = cumsum(mask) - 1``
clamped at 0. SentencePiece tokenizers that add a dummy prefix (Llama-2, Mistral) may tokenise ``" " + target``
alone with an extra "▁" piece; byte-level BPE (Llama-3, Qwen2.5) does not.

**Reference.** :meth:`EditEvaluator.reference` runs the unedited model once on the locality prompts (greedy
generations for WILD, argmax ids on the answer tokens for teacher forcing); pass its result to every later
:meth:`EditEvaluator.evaluate`. Locality prompts are batched on their own, in request order, so an unchanged model
reproduces its reference exactly (locality 1.0).

Example::

    evaluator = EditEvaluator(tokenizer, protocols=("wild_em", "teacher_forced_token"))
    ref = evaluator.reference(model, requests)  # before editing
    ...  # edit the model
    scores = evaluator.evaluate(model, requests, reference=ref)  # {"wild_em/reliability": (N,), ...}
    print(evaluator.summarize(scores))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, TypedDict, get_args

import torch
from torch import Tensor, nn

from ftmods.datamodules.edits import EditRequest
from ftmods.locft.metrics import (
    counterfact_scores,
    exact_match,
    generation_agreement,
    sequence_logprob,
    summarize,
    token_accuracy,
    token_agreement,
    truncate_at_stop,
)
from ftmods.models.generation import generate_texts, left_pad
from ftmods.ops.tokens import IGNORE_INDEX, next_token_targets

__all__ = [
    "PROTOCOL_METRICS",
    "QA_INST_TEMPLATE",
    "EditEvaluator",
    "EditReference",
    "Judge",
    "PromptFormat",
    "Protocol",
    "build_teacher_forced_batch",
    "protocol_keys",
]

Protocol = Literal["wild_em", "wild_judge", "teacher_forced_token", "counterfact_prob"]
PromptFormat = Literal["raw", "qa_inst", "chat_template"]
Judge = Callable[[str, str, list[str]], bool]
"""``judge(question, prediction, golds) -> correct``; the question is the raw request prompt."""

QA_INST_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"
"""WILD's QA-instruction context (``prompt_format="qa_inst"``)."""

_WILD = ("reliability", "generalization", "locality", "portability")
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "wild_em": _WILD,
    "wild_judge": _WILD,
    "teacher_forced_token": ("reliability", "generalization", "locality", "specificity", "portability"),
    "counterfact_prob": (
        "efficacy",
        "efficacy_magnitude",
        "paraphrase",
        "paraphrase_magnitude",
        "neighborhood",
        "neighborhood_magnitude",
    ),
}
"""Metric names each protocol can produce; keys are ``f"{protocol}/{metric}"``."""

# Which prompts of a request each kind uses, and the metric the scored kind feeds (WILD and teacher forcing).
_SCORED_KINDS = (("prompt", "reliability"), ("rephrase", "generalization"), ("portability", "portability"))


def protocol_keys(protocols: Sequence[str]) -> list[str]:
    """All score keys the given protocols can produce, in a fixed order (e.g. for :class:`ProtocolScores`).

    Example:
        >>> protocol_keys(["wild_em"])
        ['wild_em/reliability', 'wild_em/generalization', 'wild_em/locality', 'wild_em/portability']
    """
    return [f"{p}/{m}" for p in protocols for m in PROTOCOL_METRICS[p]]


class EditReference(TypedDict, total=False):
    """Pre-edit outputs on the locality prompts, from :meth:`EditEvaluator.reference` (flat, in request order)."""

    locality_prompts: list[str]
    """The raw locality prompts, to check that ``evaluate`` gets the same requests."""
    wild_generations: list[str]
    """Greedy generations cut at the stop strings (WILD protocols)."""
    teacher_forced_argmax: list[Tensor]
    """``(L_i,)`` argmax ids at the positions predicting each locality answer's tokens (``teacher_forced_token``)."""


class _Item(NamedTuple):
    """One scored prompt: the request it belongs to, the raw question and its answer."""

    request: int
    question: str
    answer: str


class _TFBatch(NamedTuple):
    input_ids: Tensor  # (B, T) long, left-padded
    attention_mask: Tensor  # (B, T) long
    position_ids: Tensor  # (B, T) long, cumsum(mask) - 1 clamped at 0
    labels: Tensor  # (B, T) long, target ids on target tokens, -100 on prompt and padding


def build_teacher_forced_batch(prompts: list[list[int]], targets: list[list[int]], pad_token_id: int) -> _TFBatch:
    """Left-pad ``prompt + target`` id lists; labels are the target ids (input-id layout) and -100 elsewhere.

    Example:
        >>> b = build_teacher_forced_batch([[5, 6], [7]], [[8], [9, 2]], pad_token_id=0)
        >>> b.input_ids.tolist(), b.labels.tolist(), b.position_ids.tolist()
        ([[5, 6, 8], [7, 9, 2]], [[-100, -100, 8], [-100, 9, 2]], [[0, 1, 2], [0, 1, 2]])
        >>> build_teacher_forced_batch([[5, 6], [7]], [[8], [9]], pad_token_id=0).position_ids.tolist()
        [[0, 1, 2], [0, 0, 1]]
    """
    ids, mask = left_pad(
        [torch.tensor(p + t, dtype=torch.long) for p, t in zip(prompts, targets, strict=True)], pad_token_id
    )
    labels = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
    for row, target in enumerate(targets):
        labels[row, ids.shape[1] - len(target) :] = torch.tensor(target, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return _TFBatch(ids, mask, position_ids, labels)


def _items(requests: Sequence[EditRequest], kind: str, only: Sequence[bool] | None = None) -> list[_Item]:
    """Flatten one kind of prompt over the requests, in request order (``only`` filters requests)."""
    out = []
    for i, req in enumerate(requests):
        if only is not None and not only[i]:
            continue
        if kind == "prompt":
            out.append(_Item(i, req.prompt, req.target_new))
        elif kind == "rephrase":
            out += [_Item(i, q, req.target_new) for q in req.rephrase]
        elif kind == "locality":
            out += [_Item(i, q, a) for q, a in req.locality]
        elif kind == "portability":
            out += [_Item(i, q, a) for q, a in req.portability]
        else:
            raise ValueError(f"unknown prompt kind {kind!r}")
    return out


def _per_request(values: Tensor, items: Sequence[_Item], num_requests: int) -> Tensor:
    """Mean of item values per request; NaN for a request with no item."""
    owners = torch.tensor([it.request for it in items], dtype=torch.long)  # (M,)
    total = torch.zeros(num_requests, dtype=torch.float32).index_add_(0, owners, values.float().cpu())  # (N,)
    count = torch.zeros(num_requests, dtype=torch.float32).index_add_(
        0, owners, torch.ones(len(items), dtype=torch.float32)
    )  # (N,)
    return total / count  # (N,)  0 / 0 = NaN


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside; the train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class EditEvaluator:
    """Score edit requests on a causal LM under the named protocols (see the module docstring).

    Args:
        tokenizer: The model's tokenizer (``pad_token_id`` falls back to ``eos_token_id``).
        protocols: Protocols to run: ``wild_em``, ``wild_judge``, ``teacher_forced_token``, ``counterfact_prob``.
        prompt_format: ``raw`` (the paper's setting), ``qa_inst`` (:data:`QA_INST_TEMPLATE`) or ``chat_template``
            (one user turn through the tokenizer's template, with the generation prompt); applies to every protocol.
        max_new_tokens: Generation budget of the WILD protocols.
        stop: Stop strings of the WILD protocols (EOS always stops).
        batch_size: Prompts per forward / ``generate`` call.
        append_eos: Append EOS to teacher-forced targets (LocFT scores ``" " + target + eos``; ``False`` gives
            EasyEdit's ``prompt + " " + target``). Also applies to ``counterfact_prob``.
        counterfact_reduction: ``sum`` compares joint sequence probabilities; ``mean`` compares per-token mean
            log-probabilities, as ROME's ``test_batch_prediction`` does.
        judge: ``judge(question, prediction, golds)``; required by, and only used for, ``wild_judge``.
    """

    def __init__(
        self,
        tokenizer: Any,
        protocols: Sequence[Protocol] = ("wild_em",),
        *,
        prompt_format: PromptFormat = "raw",
        max_new_tokens: int = 32,
        stop: Sequence[str] = (".", "\n"),
        batch_size: int = 16,
        append_eos: bool = True,
        counterfact_reduction: Literal["sum", "mean"] = "sum",
        judge: Judge | None = None,
    ) -> None:
        unknown = [p for p in protocols if p not in PROTOCOL_METRICS]
        if unknown or not protocols:
            raise ValueError(f"protocols must be a non-empty subset of {list(PROTOCOL_METRICS)}, got {protocols}")
        if prompt_format not in get_args(PromptFormat):
            raise ValueError(f"prompt_format must be one of {get_args(PromptFormat)}, got {prompt_format!r}")
        if "wild_judge" in protocols and judge is None:
            raise ValueError("protocol 'wild_judge' needs a judge callable")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self.tokenizer = tokenizer
        self.protocols = tuple(dict.fromkeys(protocols))
        self.prompt_format = prompt_format
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.batch_size = batch_size
        self.append_eos = append_eos
        self.counterfact_reduction = counterfact_reduction
        self.judge = judge
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def keys(self) -> list[str]:
        """Every key :meth:`evaluate` can return for these protocols (for :class:`ProtocolScores`)."""
        return protocol_keys(self.protocols)

    @property
    def _wild_protocols(self) -> list[str]:
        return [p for p in self.protocols if p in ("wild_em", "wild_judge")]

    @staticmethod
    def summarize(scores: dict[str, Tensor]) -> dict[str, float]:
        """Mean over requests of each score, NaN skipped (:func:`ftmods.locft.metrics.summarize`)."""
        return summarize(scores)

    # ------------------------------------------------------------------------------------------------------------------
    # Public entry points
    # ------------------------------------------------------------------------------------------------------------------

    def reference(self, model: nn.Module, requests: Sequence[EditRequest]) -> EditReference:
        """Pre-edit outputs on the locality prompts, computed once before editing (see :class:`EditReference`)."""
        items = _items(requests, "locality")
        ref = EditReference(locality_prompts=[it.question for it in items])
        with _eval_mode(model):
            if self._wild_protocols:
                ref["wild_generations"] = self.generate(model, [it.question for it in items])
            if "teacher_forced_token" in self.protocols:
                ref["teacher_forced_argmax"] = [ids for _, ids in self._locality_tf(model, items)]
        return ref

    def evaluate(
        self, model: nn.Module, requests: Sequence[EditRequest], reference: EditReference | None = None
    ) -> dict[str, Tensor]:
        """Per-request scores ``{"<protocol>/<metric>": (N,) float}`` (NaN where a request has no such prompt).

        Args:
            model: The (edited) causal LM; its train/eval mode is restored afterwards.
            requests: The edit requests, ``N`` of them.
            reference: From :meth:`reference` on the unedited model with the same requests; without it the
                ``*/locality`` keys are left out.
        """
        if reference is not None and reference.get("locality_prompts") != [
            it.question for it in _items(requests, "locality")
        ]:
            raise ValueError("reference was computed for other requests (locality prompts differ)")
        scores: dict[str, Tensor] = {}
        with _eval_mode(model):
            if self._wild_protocols:
                scores.update(self._wild_scores(model, requests, reference))
            if "teacher_forced_token" in self.protocols:
                scores.update(self._teacher_forced_scores(model, requests, reference))
            if "counterfact_prob" in self.protocols:
                scores.update(self._counterfact_scores(model, requests))
        return scores

    def generate(self, model: nn.Module, questions: Sequence[str]) -> list[str]:
        """Greedy answers to raw questions (formatted, batched, cut at the stop strings), as WILD scores them."""
        device = next(model.parameters()).device
        out: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            prompts = [
                torch.tensor(self._encode_prompt(q), dtype=torch.long, device=device)
                for q in questions[start : start + self.batch_size]
            ]
            texts = generate_texts(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens)
            out += [truncate_at_stop(t, self.stop) for t in texts]
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # Tokenisation and forward passes
    # ------------------------------------------------------------------------------------------------------------------

    def format_prompt(self, question: str) -> str:
        """The text fed to the model for a raw question under ``prompt_format``."""
        if self.prompt_format == "qa_inst":
            return QA_INST_TEMPLATE.format(question=question)
        if self.prompt_format == "chat_template":
            messages = [{"role": "user", "content": question}]
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return question

    def _encode_prompt(self, question: str) -> list[int]:
        special = self.prompt_format != "chat_template"  # the template text already carries its special tokens
        return list(self.tokenizer(self.format_prompt(question), add_special_tokens=special)["input_ids"])

    def _encode_target(self, answer: str) -> list[int]:
        text = answer if answer.startswith(" ") else " " + answer
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [*ids, self.tokenizer.eos_token_id] if self.append_eos else ids

    def _forward(self, model: nn.Module, pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Teacher-forced ``(logits (B, T, V), labels (B, T))`` per batch of (question, answer) pairs, in order."""
        device = next(model.parameters()).device
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            batch = build_teacher_forced_batch(
                [self._encode_prompt(q) for q, _ in chunk],
                [self._encode_target(a) for _, a in chunk],
                self.pad_token_id,
            )
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
            ).logits  # (B, T, V)
            yield logits, batch.labels.to(device)

    def _token_accuracy(self, model: nn.Module, items: Sequence[_Item]) -> Tensor:
        """``(M,)`` teacher-forced token accuracy of each item's answer."""
        accs = [token_accuracy(logits, labels).cpu() for logits, labels in self._forward(model, self._pairs(items))]
        return torch.cat(accs) if accs else torch.zeros(0, dtype=torch.float32)  # (M,)

    def _locality_tf(self, model: nn.Module, items: Sequence[_Item]) -> Iterator[tuple[Tensor, Tensor]]:
        """Per locality item: (accuracy vs the gold answer (), argmax ids at the answer positions (L_i,))."""
        for logits, labels in self._forward(model, self._pairs(items)):
            mask = next_token_targets(labels) != IGNORE_INDEX  # (B, T)
            argmax = logits.argmax(-1)  # (B, T)
            acc = token_accuracy(logits, labels).cpu()  # (B,)
            for row in range(labels.shape[0]):
                yield acc[row], argmax[row][mask[row]].cpu()

    def _sequence_logprob(self, model: nn.Module, pairs: Sequence[tuple[str, str]]) -> Tensor:
        """``(M,)`` log P(answer | question) of each pair."""
        reduction = self.counterfact_reduction
        lps = [sequence_logprob(lg, lb, reduction=reduction).cpu() for lg, lb in self._forward(model, pairs)]
        return torch.cat(lps) if lps else torch.zeros(0, dtype=torch.float32)  # (M,)

    @staticmethod
    def _pairs(items: Sequence[_Item]) -> list[tuple[str, str]]:
        return [(it.question, it.answer) for it in items]

    # ------------------------------------------------------------------------------------------------------------------
    # Protocols
    # ------------------------------------------------------------------------------------------------------------------

    def _is_correct(self, protocol: str, item: _Item, prediction: str) -> bool:
        if protocol == "wild_judge":
            assert self.judge is not None  # checked in __init__
            return bool(self.judge(item.question, prediction, [item.answer]))
        return exact_match(prediction, item.answer)

    def _wild_scores(
        self, model: nn.Module, requests: Sequence[EditRequest], reference: EditReference | None
    ) -> dict[str, Tensor]:
        n, out = len(requests), {}
        for kind, metric in _SCORED_KINDS:
            items = _items(requests, kind)
            predictions = self.generate(model, [it.question for it in items])
            for protocol in self._wild_protocols:
                correct = [self._is_correct(protocol, it, p) for it, p in zip(items, predictions, strict=True)]
                out[f"{protocol}/{metric}"] = _per_request(torch.tensor(correct, dtype=torch.float32), items, n)
        if reference is not None:
            if "wild_generations" not in reference:
                raise ValueError("reference has no WILD generations; build it with a WILD protocol selected")
            items = _items(requests, "locality")
            same = generation_agreement(
                self.generate(model, [it.question for it in items]), reference["wild_generations"]
            )
            for protocol in self._wild_protocols:
                out[f"{protocol}/locality"] = _per_request(same, items, n)
        return out

    def _teacher_forced_scores(
        self, model: nn.Module, requests: Sequence[EditRequest], reference: EditReference | None
    ) -> dict[str, Tensor]:
        n, out = len(requests), {}
        for kind, metric in _SCORED_KINDS:
            items = _items(requests, kind)
            out[f"teacher_forced_token/{metric}"] = _per_request(self._token_accuracy(model, items), items, n)
        items = _items(requests, "locality")
        results = list(self._locality_tf(model, items))
        gold_acc = torch.stack([acc for acc, _ in results]) if results else torch.zeros(0, dtype=torch.float32)  # (M,)
        out["teacher_forced_token/specificity"] = _per_request(gold_acc, items, n)
        if reference is not None:
            if "teacher_forced_argmax" not in reference:
                raise ValueError("reference has no argmax ids; build it with 'teacher_forced_token' selected")
            agree = [
                token_agreement(post, pre, torch.ones_like(post, dtype=torch.bool))
                for (_, post), pre in zip(results, reference["teacher_forced_argmax"], strict=True)
            ]
            out["teacher_forced_token/locality"] = _per_request(
                torch.stack(agree) if agree else torch.zeros(0, dtype=torch.float32), items, n
            )
        return out

    def _counterfact_scores(self, model: nn.Module, requests: Sequence[EditRequest]) -> dict[str, Tensor]:
        n, out = len(requests), {}
        has_truth = [r.ground_truth is not None for r in requests]
        groups = (("prompt", "efficacy"), ("rephrase", "paraphrase"), ("locality", "neighborhood"))
        for kind, metric in groups:
            items = _items(requests, kind, only=has_truth)
            if kind == "locality":  # true = the neighbour's answer, new = the request's target_new
                new = [(it.question, requests[it.request].target_new) for it in items]
                true = [(it.question, it.answer) for it in items]
            else:
                new = [(it.question, it.answer) for it in items]
                true = [(it.question, str(requests[it.request].ground_truth)) for it in items]
            logp = self._sequence_logprob(model, new + true)  # (2M,)
            scores = counterfact_scores(logp[: len(items)], logp[len(items) :])
            success, margin = (
                (scores.true_beats_new, scores.true_margin)
                if kind == "locality"
                else (scores.new_beats_true, scores.new_margin)
            )
            out[f"counterfact_prob/{metric}"] = _per_request(success, items, n)
            out[f"counterfact_prob/{metric}_magnitude"] = _per_request(margin, items, n)
        return out
