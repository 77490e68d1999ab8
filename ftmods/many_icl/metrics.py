"""Scoring of many-shot evaluation answers, as pure functions: one prediction and its gold answer in, a float out.

Metric names follow the task records' ``metric`` field: ``accuracy`` (option scoring, or exact match of the generated
string), ``exact_match`` (SQuAD-normalised), ``f1_em`` (SQuAD token F1), ``exact_match_numeric`` (the first number in
the prediction equals the gold number) and ``rouge_l`` (ROUGE-L F-measure, torchmetrics).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Literal

Metric = Literal["accuracy", "exact_match", "f1_em", "exact_match_numeric", "rouge_l"]
METRICS: tuple[str, ...] = ("accuracy", "exact_match", "f1_em", "exact_match_numeric", "rouge_l")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces.

    Example:
        >>> normalize_answer("  The  Cat, sat!")
        'cat sat'
    """
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the SQuAD-normalised strings are equal.

    Example:
        >>> exact_match("Positive.", "positive"), exact_match("positive review", "positive")
        (1.0, 0.0)
    """
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalised strings (1.0 when both are empty).

    Example:
        >>> round(token_f1("the red big house", "big red barn"), 4)  # overlap 2; P = 2/3, R = 2/3
        0.6667
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_number(text: str) -> float | None:
    """The first number in ``text`` (thousands separators allowed), or ``None``.

    Example:
        >>> first_number("so the answer is 1,234.5 apples"), first_number("none")
        (1234.5, None)
    """
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric_match(prediction: str, gold: str) -> float:
    """1.0 when the first number of the prediction equals the gold number (within 1e-6).

    Example:
        >>> numeric_match("= 42", "42"), numeric_match("41", "42"), numeric_match("x", "42")
        (1.0, 0.0, 0.0)
    """
    pred, ref = first_number(prediction), first_number(gold)
    return float(pred is not None and ref is not None and abs(pred - ref) <= 1e-6)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), via torchmetrics.

    Example:
        >>> round(rouge_l("the cat sat on mat", "the cat was on the mat"), 4)  # LCS 4; P = 4/5, R = 4/6
        0.7273
    """
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score([prediction], [gold], rouge_keys="rougeL")["rougeL_fmeasure"])


def score_answer(prediction: str, gold: str, metric: str) -> float:
    """Score one generated answer under ``metric`` (``accuracy`` on a generated string is exact match).

    Example:
        >>> score_answer("7", "7.0", "exact_match_numeric"), score_answer("b", "a", "accuracy")
        (1.0, 0.0)
    """
    if metric in ("accuracy", "exact_match"):
        return exact_match(prediction, gold)
    if metric == "f1_em":
        return token_f1(prediction, gold)
    if metric == "exact_match_numeric":
        return numeric_match(prediction, gold)
    if metric == "rouge_l":
        return rouge_l(prediction, gold)
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")


def truncate_at(text: str, stop: str) -> str:
    r"""The text before the first ``stop`` (the episode separator), stripped.

    Example:
        >>> truncate_at(" positive\n\nInput: x", "\n\n")
        'positive'
    """
    return (text.split(stop, 1)[0] if stop else text).strip()
