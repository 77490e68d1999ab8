"""CLS-RL rewards and answer matchers as pure string functions (spec cls_rl §1.3, §1.6, §3).

Training rewards follow the official code (``src/cls-rl/src/open_r1/grpo.py`` and ``grpo_direct.py`` at ``926eb1b``):

- :func:`format_reward`: 1 iff the whole completion is ``<think>...</think>`` then optional whitespace then
  ``<answer>...</answer>`` (``re.fullmatch`` with ``re.DOTALL``).
- :func:`accuracy_reward`: exact match, case-insensitive, of the stripped text inside the *first* ``<answer>`` tag
  (no ``re.DOTALL``: the tag pair must sit on one line); without such a tag the whole stripped completion is compared.
- :func:`equality_reward` (No-Thinking): the *raw* completion must equal the class name; no tag extraction, no
  lowercasing, no stripping (``strip_completion=True`` is an opt-in).

Evaluation uses the paper's lenient matcher (``src/eval/test_qwen2vl_fewshot.py``), :func:`lenient_match`, which
accepts any answer *containing* the class name. It is hackable (listing several classes, or an empty answer tag that
falls back to the whole output), so it is for evaluation only.

Every function accepts any string (empty, huge, any unicode) and never raises; ``None`` stands for a missing
completion and earns 0. The tag scanners run in linear time: the reference regexes backtrack quadratically on inputs
with many unmatched tags, which a sampled completion can contain. The tests check them against those regexes.

Prompt templates are config strings; the paper's are in :class:`ftmods.cls_rl.loss.CLSRLDefaults`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
"""The format regex of the official code, applied with ``re.fullmatch(..., re.DOTALL)``."""
ANSWER_PATTERN = r"<answer>(.*?)</answer>"
"""The training extraction regex of the official code, applied with ``re.search`` (first match, no flags)."""
EVAL_ANSWER_PATTERN = r"<answer>\s*(.*?)\s*</answer>"
"""The evaluation extraction regex of the official code, applied with ``re.search(..., re.DOTALL)``."""

RewardFn = Callable[[Sequence[str | None], Sequence[str]], list[float]]


def format_reward(completion: str | None) -> float:
    r"""1.0 iff the entire completion matches ``FORMAT_PATTERN`` (full match, DOTALL), else 0.0.

    Leading or trailing text (even whitespace) gives 0; text between ``</think>`` and ``<answer>`` other than
    whitespace gives 0; the think and answer parts may hold anything, including newlines and further tags.

    Example:
        >>> format_reward("<think>a tabby</think>\n<answer>cat</answer>")
        1.0
        >>> format_reward("<think>a tabby</think><answer>cat</answer>.")
        0.0
    """
    if completion is None or not (completion.startswith(THINK_OPEN) and completion.endswith(ANSWER_CLOSE)):
        return 0.0
    # Try each </think>; an <answer> right after it (and whitespace) completes the match, since the string ends with
    # </answer> and the two tags cannot overlap.
    close = completion.find(THINK_CLOSE, len(THINK_OPEN))
    while close != -1:
        start = close + len(THINK_CLOSE)
        while start < len(completion) and completion[start].isspace():  # \s* (str.isspace is what re's \s tests)
            start += 1
        if completion.startswith(ANSWER_OPEN, start):
            return 1.0
        close = completion.find(THINK_CLOSE, close + 1)
    return 0.0


def extract_answer(completion: str | None) -> str | None:
    r"""The stripped text inside the first ``<answer>...</answer>`` pair on one line (training extraction), or None.

    Equivalent to ``re.search(ANSWER_PATTERN, completion).group(1).strip()``: ``.`` does not match a newline, so a
    pair split across lines is skipped and a later one-line pair is used instead.

    Example:
        >>> extract_answer("<think>x</think><answer> Golden Retriever </answer>")
        'Golden Retriever'
        >>> extract_answer("<answer>\ncat\n</answer>") is None
        True
    """
    if completion is None:
        return None
    for line in completion.split("\n"):  # only "\n" stops "." without DOTALL
        start = line.find(ANSWER_OPEN)
        if start == -1:
            continue
        end = line.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end != -1:  # else no later <answer> on this line has a closing tag either
            return line[start + len(ANSWER_OPEN) : end].strip()
    return None


def ground_truth(solution: str) -> str:
    """The class name of a ``solution`` string: its first answer-tag text, or the whole string, stripped.

    Example:
        >>> ground_truth("<answer> sunflower </answer>"), ground_truth(" sunflower ")
        ('sunflower', 'sunflower')
    """
    answer = extract_answer(solution)
    return solution.strip() if answer is None else answer


def accuracy_reward(completion: str | None, label: str) -> float:
    """1.0 iff the completion's answer equals the label, case-insensitively after stripping (CLS-RL training reward).

    The answer is :func:`extract_answer`, or the whole stripped completion when there is no one-line answer pair (as
    in the official code). ``label`` may be a bare class name or a ``solution`` string (:func:`ground_truth`).
    Exact equality, not containment: several classes, extra words or punctuation give 0. The official code first tries
    ``math_verify``; that path is left out (it matters only for numeric class names).

    Example:
        >>> accuracy_reward("<think>stripes</think><answer> Tiger </answer>", "<answer> tiger </answer>")
        1.0
        >>> accuracy_reward("<think>stripes</think><answer>tiger, zebra</answer>", "tiger")
        0.0
    """
    if completion is None:
        return 0.0
    answer = extract_answer(completion)
    answer = completion.strip() if answer is None else answer
    return float(answer.lower() == ground_truth(label).lower())


def equality_reward(completion: str | None, label: str, *, strip_completion: bool = False) -> float:
    r"""1.0 iff the raw completion equals the class name exactly (No-Thinking-CLS-RL training reward).

    Faithful to ``grpo_direct.py``: the ground truth is :func:`ground_truth` of ``label`` (stripped), the completion is
    compared as decoded, so case, a trailing period or newline, or any tag gives 0.

    Args:
        completion: Decoded completion (``skip_special_tokens=True``).
        label: Class name or ``solution`` string.
        strip_completion: Strip surrounding whitespace from the completion first (ftmods opt-in; not the paper).

    Example:
        >>> equality_reward("Tiger", "tiger"), equality_reward("tiger.", "tiger"), equality_reward("tiger", "tiger")
        (0.0, 0.0, 1.0)
        >>> equality_reward("tiger\n", "tiger"), equality_reward("tiger\n", "tiger", strip_completion=True)
        (0.0, 1.0)
    """
    if completion is None:
        return 0.0
    text = completion.strip() if strip_completion else completion
    return float(text == ground_truth(label))


def extract_eval_answer(output: str | None) -> str:
    r"""The answer the paper's evaluation scores: the first answer-tag text (DOTALL), else the stripped output.

    Equivalent to ``m = re.search(EVAL_ANSWER_PATTERN, output, re.DOTALL)`` then
    ``m.group(1).strip() if m and m.group(1) else output.strip()``. Faithfully, an *empty* answer tag also falls back to
    the whole output.

    Example:
        >>> extract_eval_answer("<think>hmm</think><answer>\n  red fox \n</answer>")
        'red fox'
        >>> extract_eval_answer("<think>a fox?</think><answer> </answer>")
        '<think>a fox?</think><answer> </answer>'
    """
    if output is None:
        return ""
    start = output.find(ANSWER_OPEN)
    end = -1 if start == -1 else output.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    answer = "" if end == -1 else output[start + len(ANSWER_OPEN) : end].strip()
    return answer if answer else output.strip()


def lenient_match(prediction: str | None, label: str) -> bool:
    """The paper's evaluation matcher (spec §3): is the class name contained in the answer, ignoring case?

    ``prediction`` is the raw model output; its answer is :func:`extract_eval_answer` (an already extracted answer
    passes through unchanged). Correct iff ``answer.lower() == label.lower()`` or ``label.lower()`` is a substring of
    ``answer.lower()`` (equality implies containment); if not, and the label contains ``_``, the test is retried with
    ``_`` replaced by a space. ``label`` is the bare class name, used as is (the evaluation script does not strip it).

    Evaluation only: "cat or dog" counts as "cat", and so does an output whose empty answer tag sends the matcher back
    to a thinking part that mentions the class.

    Example:
        >>> lenient_match("<think>..</think><answer>Apple pie.</answer>", "apple_pie")
        True
        >>> lenient_match("<answer>pie</answer>", "apple_pie")
        False
    """
    if prediction is None:
        return False
    answer = extract_eval_answer(prediction).lower()
    return label.lower() in answer or ("_" in label and label.replace("_", " ").lower() in answer)


def _batch(fn: Callable[[str | None, str], float]) -> RewardFn:
    def rewards(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
        return [fn(completion, label) for completion, label in zip(completions, labels, strict=True)]

    return rewards


def format_rewards(completions: Sequence[str | None], labels: Sequence[str] | None = None) -> list[float]:
    """:func:`format_reward` of each completion; ``labels`` is accepted for a uniform signature and ignored.

    Example:
        >>> format_rewards(["<think></think><answer>a</answer>", "a"])
        [1.0, 0.0]
    """
    return [format_reward(completion) for completion in completions]


def accuracy_rewards(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
    """:func:`accuracy_reward` of each (completion, label) pair; the lengths must match.

    Example:
        >>> accuracy_rewards(["<answer>cat</answer>", "<answer>dog</answer>"], ["Cat", "cat"])
        [1.0, 0.0]
    """
    return _batch(accuracy_reward)(completions, labels)


def equality_rewards(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
    """:func:`equality_reward` (faithful, unstripped) of each (completion, label) pair; the lengths must match.

    Example:
        >>> equality_rewards(["cat", "cat."], ["cat", "cat"])
        [1.0, 0.0]
    """
    return _batch(equality_reward)(completions, labels)


REWARDS: dict[str, RewardFn] = {"format": format_rewards, "accuracy": accuracy_rewards, "equality": equality_rewards}
"""Batch reward functions ``(completions, labels) -> list[float]`` by name. CLS-RL ("think") sums ``accuracy`` and
``format``; No-Thinking-CLS-RL uses ``equality`` alone."""
