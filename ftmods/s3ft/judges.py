r"""Judges of S3FT: is a response a correct solution of a training item? (spec ``s3ft.md`` §2, §7).

S3FT keeps the base model's own answer when a judge accepts it, else its judged paraphrase of the gold answer, else
the gold answer. A judge is any object with a ``name``, ``judge(item, candidate) -> Verdict`` and a batched
``judge.batch(items, candidates)`` (:class:`Judge`); items are anything with the attributes of :class:`JudgeItem`.

- :class:`NumericAnswerJudge` (GSM8K): final number ("The answer is N", else "#### N", else the last number) equals
  the gold number.
- :class:`UnitTestJudge` (MBPP): the extracted code passes the item's asserts, run only in the
  :mod:`ftmods.s3ft.sandbox` subprocess (timeout, memory / CPU limits, temporary folder, no network by prelude).
- :class:`LLMJudge` (NQ): a configurable judge LLM answers yes / no to a prompt in the spirit of the paper's Fig. 8;
  the reply is parsed strictly. Never a hub default: the model (or a ``generate`` callable) must be given.
- :class:`ExactMatchJudge` (short QA): SQuAD-normalised exact match against any accepted answer.
- :class:`SimilarityJudge`: SQuAD token F1 (or embedding cosine) against the answers, above a threshold.

Every class is constructible from a LightningCLI / jsonargparse config (``class_path: ftmods.s3ft.judges.<Class>``
with ``init_args``); :data:`JUDGES` and :func:`make_judge` map short names to the classes.

Example:
    >>> from types import SimpleNamespace
    >>> item = SimpleNamespace(id="0", task="gsm8k", prompt="2 + 70?", gold="2 + 70 = 72\n#### 72", answers=["72"],
    ...                        tests=[], context=None)
    >>> NumericAnswerJudge()(item, "Adding gives 72.\nThe answer is 72.")
    Verdict(correct=True, detail='extracted 72 == 72 (answer is)')
    >>> ExactMatchJudge()(SimpleNamespace(answers=["Paris"], gold="Paris"), "The answer is: the paris.")
    Verdict(correct=True, detail="matched 'Paris' (answer span)")
"""

from __future__ import annotations

import re
import secrets
import signal
import string
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ftmods.many_icl.metrics import first_number, normalize_answer, token_f1
from ftmods.models.generation import generate_texts
from ftmods.models.loading import DType, LoadOptions, load_causal_lm, load_tokenizer
from ftmods.s3ft.sandbox import SandboxResult, run_python

__all__ = [
    "DEFAULT_LLM_JUDGE_PROMPT",
    "JUDGES",
    "BaseJudge",
    "ExactMatchJudge",
    "Judge",
    "JudgeItem",
    "LLMJudge",
    "NumericAnswerJudge",
    "SimilarityJudge",
    "UnitTestJudge",
    "Verdict",
    "answer_spans",
    "extract_code",
    "make_judge",
    "parse_verdict",
]


# ----------------------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------------------


class JudgeItem(Protocol):
    """What a judge reads from a training item (e.g. ``ftmods.datamodules.s3ft``'s record; any object will do)."""

    @property
    def id(self) -> str:
        """Unique id of the item."""

    @property
    def task(self) -> str:
        """Task name (``gsm8k``, ``mbpp``, ``nq``, ...)."""

    @property
    def prompt(self) -> str:
        """The question or task text."""

    @property
    def gold(self) -> str:
        """Full gold response (GSM8K reasoning ending in ``#### 72``, MBPP code, ...)."""

    @property
    def answers(self) -> Sequence[str]:
        """Accepted short answers (``["72"]``, aliases for QA; empty for code)."""

    @property
    def tests(self) -> Sequence[str]:
        """Assert statements (MBPP); empty otherwise."""

    @property
    def context(self) -> str | None:
        """Passage for reading comprehension, if any."""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one candidate."""

    correct: bool
    """Whether the candidate solves the item."""
    detail: str
    """Short reason, e.g. ``"extracted 72 == 72"``, ``"AssertionError in test 2"``, ``"timeout after 5 s"``."""


class Judge(Protocol):
    """``judge(item, candidate) -> Verdict``; ``batch`` judges many at once (in order)."""

    @property
    def name(self) -> str:
        """Short name, also written to the builder's output (``judge`` field)."""

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Judge one candidate response for ``item``."""

    def batch(self, items: Sequence[JudgeItem], candidates: Sequence[str]) -> list[Verdict]:
        """Judge ``candidates[i]`` for ``items[i]``, for every ``i``."""


class BaseJudge(ABC):
    """Base of ftmods' judges: ``batch`` loops over ``__call__``; subclasses override it to batch or parallelise."""

    name: str = "base"

    @abstractmethod
    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Judge one candidate response for ``item``."""

    def batch(self, items: Sequence[JudgeItem], candidates: Sequence[str]) -> list[Verdict]:
        """Judge ``candidates[i]`` for ``items[i]``, in order.

        Raises:
            ValueError: If the two sequences differ in length.
        """
        _check_lengths(items, candidates)
        return [self(item, candidate) for item, candidate in zip(items, candidates, strict=True)]

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"


def _check_lengths(items: Sequence[Any], candidates: Sequence[str]) -> None:
    if len(items) != len(candidates):
        raise ValueError(f"got {len(items)} items but {len(candidates)} candidates")


def _references(item: JudgeItem) -> list[str]:
    """The accepted answers of ``item``, or its gold response when it lists none."""
    return [a for a in item.answers if a.strip()] or [item.gold]


# ----------------------------------------------------------------------------------------------------------------------
# Numeric final answer (GSM8K)
# ----------------------------------------------------------------------------------------------------------------------

_HASHES = re.compile(r"####\s*\$?\s*(-?\$?[\d,]*\.?\d+)")
_ANY_NUMBER = re.compile(r"(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?")


def _parse_number(text: str) -> float | None:
    """``"$1,234.50"`` → 1234.5, ``"-5"`` → -5.0; the first number of ``text``, or ``None``."""
    return first_number(text.replace("$", "").replace(",", ""))


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class NumericAnswerJudge(BaseJudge):
    """Final-answer match for math word problems (GSM8K): the candidate's final number equals the gold number.

    The candidate's number is the last match of ``pattern`` ("The answer is N"), else the last "#### N", else the last
    number in the text. Commas, a ``$`` and trailing zeros do not matter (numbers are compared as floats: ``3.50``
    equals ``3.5``, ``72.0`` equals ``72``). The gold number is the first number of ``item.answers[0]`` if there is
    one, else it is extracted from ``item.gold`` ("#### N" first, then the same chain as for the candidate).

    Args:
        pattern: Regular expression of the explicit final-answer statement; its first group (or the whole match if it
            has none) must hold the number. The default also accepts "The final answer is", a colon, ``**`` and ``$``.
        tolerance: Numbers match when ``|candidate - gold| <= tolerance * max(1, |gold|)``.
    """

    name = "numeric"

    def __init__(
        self,
        pattern: str = r"[Tt]he (?:final )?answer is\s*:?\s*\**\s*\$?(-?[\d,]*\.?\d+)",
        tolerance: float = 1e-6,
    ) -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.pattern = pattern
        self.tolerance = tolerance
        self._regex = re.compile(pattern)

    def extract(self, text: str) -> tuple[float | None, str]:
        """The final number of a response and where it came from (``answer is``, ``####``, ``last number``).

        Example:
            >>> NumericAnswerJudge().extract("So 1,000 + 234 = 1,234. The answer is 1,234.")
            (1234.0, 'answer is')
            >>> NumericAnswerJudge().extract("Total: $3.50 - no more"), NumericAnswerJudge().extract("none")
            ((3.5, 'last number'), (None, 'no number'))
        """
        for regex, how in ((self._regex, "answer is"), (_HASHES, "####")):
            matches = list(regex.finditer(text))
            if matches:
                last = matches[-1]
                value = _parse_number(last.group(1) if regex.groups else last.group(0))
                if value is not None:
                    return value, how
        numbers = _ANY_NUMBER.findall(text)
        return (_parse_number(numbers[-1]), "last number") if numbers else (None, "no number")

    def gold_number(self, item: JudgeItem) -> float | None:
        """The reference number: ``item.answers[0]`` if it holds one, else "#### N" (or the chain) in ``item.gold``."""
        if item.answers:
            value = _parse_number(item.answers[0])
            if value is not None:
                return value
        hashes = list(_HASHES.finditer(item.gold))
        if hashes:
            return _parse_number(hashes[-1].group(1))
        return self.extract(item.gold)[0]

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Compare the candidate's final number with the gold number."""
        gold = self.gold_number(item)
        if gold is None:
            return Verdict(False, "no number in the gold answer")
        value, how = self.extract(candidate)
        if value is None:
            return Verdict(False, f"no number in candidate (gold {_format_number(gold)})")
        same = abs(value - gold) <= self.tolerance * max(1.0, abs(gold))
        return Verdict(
            same, f"extracted {_format_number(value)} {'==' if same else '!='} {_format_number(gold)} ({how})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Exact match and similarity (short QA)
# ----------------------------------------------------------------------------------------------------------------------

_ANSWER_SPAN = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)\s*:?\s*(.+)")


def answer_spans(text: str) -> list[tuple[str, str]]:
    r"""Candidate answer strings of a response, with names: the whole text, its last line, the "answer is X" span.

    Example:
        >>> answer_spans("Let me think.\nThe answer is: Paris")[1:]
        [('last line', 'The answer is: Paris'), ('answer span', 'Paris')]
    """
    stripped = text.strip()
    spans = [("whole", stripped)]
    lines = [line.strip() for line in stripped.splitlines() if line.strip()]
    if lines:
        spans.append(("last line", lines[-1]))
    matches = list(_ANSWER_SPAN.finditer(stripped))
    if matches:
        spans.append(("answer span", matches[-1].group(1).strip()))
    unique: list[tuple[str, str]] = []
    for name, span in spans:
        if span not in {s for _, s in unique}:
            unique.append((name, span))
    return unique


class ExactMatchJudge(BaseJudge):
    """Exact match of the response (or its last line, or its "The answer is X" span) with any accepted answer.

    References are ``item.answers``, or ``[item.gold]`` when that is empty.

    Args:
        normalize: Compare after SQuAD normalisation (lower case, no punctuation, no articles, single spaces);
            otherwise compare the stripped strings.
    """

    name = "exact_match"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def _norm(self, text: str) -> str:
        return normalize_answer(text) if self.normalize else text.strip()

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Whether any span of the candidate equals any reference."""
        references = _references(item)
        golds = {self._norm(ref): ref for ref in references}
        for how, span in answer_spans(candidate):
            gold = golds.get(self._norm(span))
            if gold is not None:
                return Verdict(True, f"matched {gold!r} ({how})")
        return Verdict(False, f"no match among {len(references)} answer(s)")


class SimilarityJudge(BaseJudge):
    """Soft match: SQuAD token F1 (or cosine similarity of embeddings) with the best reference ``>= threshold``.

    Each span of :func:`answer_spans` is compared with each reference (``item.answers``, else ``[item.gold]``); the
    best score counts. With ``embed``, the score is the cosine similarity of ``embed([text, ...])`` rows instead, and
    :meth:`batch` embeds all spans and references of the batch in two calls.

    Args:
        threshold: Smallest score that counts as correct (inclusive).
        embed: Optional text encoder, ``list[str] -> Tensor (N, D)``.
    """

    name = "similarity"

    def __init__(self, threshold: float = 0.6, embed: Callable[[list[str]], Tensor] | None = None) -> None:
        self.threshold = threshold
        self.embed = embed

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Best F1 (or cosine) between the candidate's spans and the references, against the threshold."""
        return self.batch([item], [candidate])[0]

    def batch(self, items: Sequence[JudgeItem], candidates: Sequence[str]) -> list[Verdict]:
        """Score every pair; with ``embed``, two encoder calls for the whole batch."""
        _check_lengths(items, candidates)
        spans = [[span for _, span in answer_spans(c)] for c in candidates]
        references = [_references(item) for item in items]
        if self.embed is None:
            scores = [max(token_f1(s, r) for s in ss for r in rr) for ss, rr in zip(spans, references, strict=True)]
            metric = "token F1"
        else:
            scores = self._cosines(spans, references)
            metric = "cosine"
        return [
            Verdict(
                score >= self.threshold,
                f"{metric} {score:.3f} {'>=' if score >= self.threshold else '<'} {self.threshold:g}",
            )
            for score in scores
        ]

    def _cosines(self, spans: list[list[str]], references: list[list[str]]) -> list[float]:
        """Best cosine per pair, from one ``embed`` call for all spans and one for all references."""
        assert self.embed is not None
        flat_spans = [s for ss in spans for s in ss]
        flat_refs = [r for rr in references for r in rr]
        a = F.normalize(self.embed(flat_spans).float(), dim=-1)  # (S, D)
        b = F.normalize(self.embed(flat_refs).float(), dim=-1)  # (R, D)
        sims = a @ b.T  # (S, R)
        out, i, j = [], 0, 0
        for ss, rr in zip(spans, references, strict=True):
            out.append(float(sims[i : i + len(ss), j : j + len(rr)].max()))
            i, j = i + len(ss), j + len(rr)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Unit tests in the sandbox (MBPP)
# ----------------------------------------------------------------------------------------------------------------------

_BEGIN_DONE = re.compile(r"\[\[BEGIN\]\](.*?)(?:\[\[DONE\]\]|$)", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    r"""The code of a response, dedented.

    Taken from between ``[[BEGIN]]`` and ``[[DONE]]``, else from the first python (else any) fenced block, else the
    whole text. A fence inside the ``[[BEGIN]]`` block is unwrapped too; an unclosed block runs to the end.

    Example:
        >>> extract_code("Sure.\n[[BEGIN]]\ndef f(x):\n    return x\n[[DONE]]\nDone.")
        'def f(x):\n    return x'
        >>> extract_code("Here:\n```python\nprint(1)\n```\n")
        'print(1)'
    """
    begin = _BEGIN_DONE.search(text)
    if begin:
        text = begin.group(1)
    fences = list(_FENCE.finditer(text))
    python = [f for f in fences if f.group(1).lower() in ("python", "py", "python3")]
    if python or fences:
        text = (python or fences)[0].group(2)
    return textwrap.dedent(text.strip("\n")).rstrip()


def _harness(code: str, tests: Sequence[str], nonce: str) -> str:
    """A program that runs ``code`` then each test, and reports ``<nonce> pass`` / ``test i Error`` / ``code Error``.

    The report goes to the real stdout as the last line; the nonce keeps the candidate from printing a fake one by
    accident.
    """
    return f"""import sys as _ftmods_sys
_FTMODS_CODE = {code!r}
_FTMODS_TESTS = {list(tests)!r}


def _ftmods_report(line):
    _ftmods_sys.__stdout__.write("\\n{nonce} " + line + "\\n")
    _ftmods_sys.__stdout__.flush()


try:
    exec(compile(_FTMODS_CODE, "<candidate>", "exec"), globals())
except BaseException as _ftmods_exc:
    _ftmods_report("code " + type(_ftmods_exc).__name__)
    raise SystemExit(3)
for _ftmods_i, _ftmods_test in enumerate(_FTMODS_TESTS):
    try:
        exec(compile(_ftmods_test, "<test %d>" % _ftmods_i, "exec"), globals())
    except BaseException as _ftmods_exc:
        _ftmods_report("test %d %s" % (_ftmods_i, type(_ftmods_exc).__name__))
        raise SystemExit(4)
_ftmods_report("pass")
"""


_SIGNALS = {
    int(getattr(signal, name)): text
    for name, text in (("SIGXCPU", "cpu limit"), ("SIGXFSZ", "file size limit"), ("SIGKILL", "killed (SIGKILL)"))
    if hasattr(signal, name)  # not on Windows
}


class UnitTestJudge(BaseJudge):
    """Run the response's code plus the item's asserts in the sandbox; correct iff every assert passes.

    Code comes from :func:`extract_code`; ``setup_code`` (e.g. MBPP's ``test_setup_code`` or imports) runs first.
    Execution happens only in :func:`ftmods.s3ft.sandbox.run_python` (separate process, time / memory / CPU limits,
    temporary folder; see that module for what it does and does not guarantee). Details name the first failing test
    by its 0-based index in ``item.tests``: ``"AssertionError in test 1: assert f(2) == 5"``, or ``"NameError in
    code"``, ``"timeout after 5 s"``, ``"memory limit: ..."``, ``"no code"``.

    Args:
        timeout_s: Wall-clock limit per candidate (code plus all its tests).
        memory_mb: Address-space limit of the sandbox process.
        max_workers: Sandboxes running at once in :meth:`batch`.
        setup_code: Source run before the candidate's code.
    """

    name = "unit_test"

    def __init__(
        self, timeout_s: float = 5.0, memory_mb: int = 512, max_workers: int = 2, setup_code: str = ""
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.setup_code = setup_code

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Run the candidate's code and ``item.tests`` in a fresh sandbox."""
        code = extract_code(candidate)
        if not code.strip():
            return Verdict(False, "no code")
        if not item.tests:
            return Verdict(False, "no tests to run")
        nonce = f"@@ftmods-verdict-{secrets.token_hex(8)}@@"
        program = _harness(f"{self.setup_code}\n{code}" if self.setup_code else code, item.tests, nonce)
        result = run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return self._verdict(result, nonce, item.tests)

    def batch(self, items: Sequence[JudgeItem], candidates: Sequence[str]) -> list[Verdict]:
        """Judge in parallel, at most ``max_workers`` sandboxes at a time; results in input order."""
        _check_lengths(items, candidates)
        if len(items) <= 1 or self.max_workers == 1:
            return super().batch(items, candidates)
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(self, items, candidates))

    def _verdict(self, result: SandboxResult, nonce: str, tests: Sequence[str]) -> Verdict:
        if result.timed_out:
            return Verdict(False, f"timeout after {self.timeout_s:g} s")
        reports = [line[len(nonce) + 1 :].split() for line in result.stdout.splitlines() if line.startswith(nonce)]
        if not reports:
            return Verdict(False, self._crash_detail(result))
        report = reports[-1]
        if report == ["pass"]:
            return Verdict(result.ok, f"passed {len(tests)} test(s)" if result.ok else self._crash_detail(result))
        error = report[-1]
        prefix = "memory limit: " if error == "MemoryError" else ""
        if report[0] == "test":
            index = int(report[1])
            return Verdict(False, f"{prefix}{error} in test {index}: {tests[index].strip()[:80]}")
        return Verdict(False, f"{prefix}{error} in code")

    def _crash_detail(self, result: SandboxResult) -> str:
        """Why a run ended without a report: a signal, a limit, or the last line of stderr."""
        if result.returncode is not None and result.returncode < 0:
            sig = -result.returncode
            return _SIGNALS.get(sig, f"killed by signal {sig}")
        if "MemoryError" in result.stderr:
            return "memory limit"
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit code {result.returncode}: {last[:80]}"


# ----------------------------------------------------------------------------------------------------------------------
# LLM judge (NQ)
# ----------------------------------------------------------------------------------------------------------------------

DEFAULT_LLM_JUDGE_PROMPT = (
    "You are checking whether a predicted response answers a question correctly.\n"
    "You are given the question, the predicted response and the gold answer. The predicted response is correct if "
    "it gives the same answer as the gold answer; differences in wording, detail or length do not matter.\n\n"
    "Question: {question}\n"
    "Predicted response: {prediction}\n"
    "Gold answer: {gold}\n\n"
    "Is the predicted response correct? Answer yes or no."
)
"""Judge prompt in the spirit of the paper's Fig. 8 (question, predicted response, gold answer; yes or no). Fields:
``{question}``, ``{context}``, ``{prediction}``, ``{gold}``, ``{answers}``."""

_PROMPT_FIELDS = frozenset({"question", "context", "prediction", "gold", "answers"})
_YES = frozenset({"yes", "correct", "true"})
_NO = frozenset({"no", "incorrect", "false"})


def parse_verdict(reply: str) -> Verdict:
    """Strict yes / no parsing: the first word of the stripped reply, lower-cased, punctuation stripped.

    ``yes`` / ``correct`` / ``true`` → correct; ``no`` / ``incorrect`` / ``false`` → incorrect; anything else →
    incorrect with ``"unparseable verdict: <reply[:40]>"``.

    Example:
        >>> parse_verdict("**Yes.** The prediction names Paris.")
        Verdict(correct=True, detail="judge said 'yes'")
        >>> parse_verdict("Incorrect")
        Verdict(correct=False, detail="judge said 'incorrect'")
        >>> parse_verdict("I think yes")
        Verdict(correct=False, detail='unparseable verdict: I think yes')
    """
    words = reply.strip().split()
    word = words[0].strip(string.punctuation).lower() if words else ""
    if word in _YES:
        return Verdict(True, f"judge said {word!r}")
    if word in _NO:
        return Verdict(False, f"judge said {word!r}")
    return Verdict(False, f"unparseable verdict: {reply.strip()[:40]}")


class LLMJudge(BaseJudge):
    """Ask a judge LLM whether the prediction is correct; the reply is parsed by :func:`parse_verdict`.

    Exactly one of ``model`` and ``generate`` must be given; there is no default judge model.

    - ``generate``: a callable from formatted prompts to replies (tests, an API or a vLLM server). It receives the
      plain prompt text and applies any chat formatting itself.
    - ``model``: a hub id, a local folder or a ``tiny/<name>`` id, loaded on first use with
      :func:`~ftmods.models.loading.load_causal_lm` / :func:`~ftmods.models.loading.load_tokenizer`. Replies are
      greedy, batched (:func:`~ftmods.models.generation.generate_texts`); the prompt goes through the tokenizer's chat
      template as one user turn when it has one.

    Args:
        model: Judge model to load (hub id or local path).
        generate: Replacement for the model: ``list[str] -> list[str]``, one reply per prompt.
        prompt: Template with ``{question}``, ``{context}``, ``{prediction}``, ``{gold}`` and ``{answers}`` (the
            accepted answers joined by `` | ``); ``{gold}`` is ``item.gold``, or the answers when it is empty.
        max_new_tokens: Reply length (the verdict is the first word).
        batch_size: Prompts per generation call.
        trust_remote_code: Run modelling code shipped with ``model``.
        dtype: Weight dtype of ``model`` (``None``: the current default dtype).
        device: Device of ``model`` (``None``: CUDA when available, else CPU).
    """

    name = "llm"

    def __init__(
        self,
        model: str | None = None,
        *,
        generate: Callable[[list[str]], list[str]] | None = None,
        prompt: str = DEFAULT_LLM_JUDGE_PROMPT,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        dtype: DType | None = None,
        device: str | None = None,
    ) -> None:
        if (model is None) == (generate is None):
            raise ValueError("LLMJudge needs exactly one of `model` (a judge model id or path) and `generate`")
        unknown = {field for _, field, _, _ in string.Formatter().parse(prompt) if field} - _PROMPT_FIELDS
        if unknown:
            raise ValueError(f"unknown prompt fields {sorted(unknown)}; use {sorted(_PROMPT_FIELDS)}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self.model = model
        self.generate = generate
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self.device = device
        self._lm: Any = None  # loaded on first use
        self._tokenizer: Any = None

    def format_prompt(self, item: JudgeItem, candidate: str) -> str:
        """The judge prompt for one candidate."""
        answers = " | ".join(a for a in item.answers if a.strip())
        return self.prompt.format(
            question=item.prompt,
            context=item.context or "",
            prediction=candidate.strip(),
            gold=item.gold.strip() or answers,
            answers=answers or item.gold.strip(),
        )

    def __call__(self, item: JudgeItem, candidate: str) -> Verdict:
        """Ask the judge about one candidate."""
        return self.batch([item], [candidate])[0]

    def batch(self, items: Sequence[JudgeItem], candidates: Sequence[str]) -> list[Verdict]:
        """Ask the judge about every pair, ``batch_size`` prompts per generation call."""
        _check_lengths(items, candidates)
        prompts = [self.format_prompt(item, c) for item, c in zip(items, candidates, strict=True)]
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            out = list(self.generate(chunk) if self.generate is not None else self._generate(chunk))
            if len(out) != len(chunk):
                raise ValueError(f"the judge returned {len(out)} replies for {len(chunk)} prompts")
            replies += out
        return [parse_verdict(reply) for reply in replies]

    def _load(self) -> None:
        assert self.model is not None
        options = LoadOptions(dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._tokenizer = load_tokenizer(self.model, options, padding_side="left")
        self._lm = load_causal_lm(self.model, options).to(device).eval().requires_grad_(False)

    def _encode(self, prompt: str) -> list[int]:
        if getattr(self._tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            text = str(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self._tokenizer(prompt)["input_ids"])

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy replies of the loaded judge model."""
        if self._lm is None:
            self._load()
        device = next(self._lm.parameters()).device
        ids = [torch.tensor(self._encode(p), dtype=torch.long, device=device) for p in prompts]
        return generate_texts(self._lm, self._tokenizer, ids, max_new_tokens=self.max_new_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

JUDGES: dict[str, type[BaseJudge]] = {
    "numeric": NumericAnswerJudge,
    "exact_match": ExactMatchJudge,
    "unit_test": UnitTestJudge,
    "llm": LLMJudge,
    "similarity": SimilarityJudge,
}
"""Short names of the judges (the ``name`` of each class)."""


def make_judge(name: str, **kwargs: Any) -> BaseJudge:
    """Build the judge registered as ``name`` with ``kwargs``.

    Example:
        >>> make_judge("unit_test", timeout_s=2.0)
        UnitTestJudge(timeout_s=2.0, memory_mb=512, max_workers=2, setup_code='')

    Raises:
        ValueError: If ``name`` is not in :data:`JUDGES`.
    """
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; use one of {sorted(JUDGES)}")
    return JUDGES[name](**kwargs)
