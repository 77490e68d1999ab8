import random
import re

import pytest

from ftmods.cls_rl.rewards import (
    ANSWER_PATTERN,
    EVAL_ANSWER_PATTERN,
    FORMAT_PATTERN,
    REWARDS,
    accuracy_reward,
    accuracy_rewards,
    equality_reward,
    equality_rewards,
    extract_answer,
    extract_eval_answer,
    format_reward,
    format_rewards,
    ground_truth,
    lenient_match,
)

# ------------------------------------------------------------------------------------- the official code, verbatim
# (src/cls-rl/src/open_r1/grpo.py, grpo_direct.py and src/eval/test_qwen2vl_fewshot.py at 926eb1b, math_verify left
# out), used as the oracle for the linear-time scanners.


def _official_format(content: str) -> float:
    return 1.0 if re.fullmatch(FORMAT_PATTERN, content, re.DOTALL) else 0.0


def _official_accuracy(content: str, sol: str) -> float:
    sol_match = re.search(ANSWER_PATTERN, sol)
    ground = sol_match.group(1).strip() if sol_match else sol.strip()
    content_match = re.search(ANSWER_PATTERN, content)
    student = content_match.group(1).strip() if content_match else content.strip()
    return 1.0 if student.lower() == ground.lower() else 0.0


def _official_equality(content: str, sol: str) -> float:
    sol_match = re.search(ANSWER_PATTERN, sol)
    ground = sol_match.group(1).strip() if sol_match else sol.strip()
    return 1.0 if ground == content else 0.0


def _official_eval_answer(output: str) -> str:
    match = re.search(EVAL_ANSWER_PATTERN, output, re.DOTALL)
    content_match = match.group(1).strip() if match else None
    return content_match if content_match else output.strip()


def _official_lenient(output: str, gt: str) -> bool:
    answer = _official_eval_answer(output)
    if answer.lower() == gt.lower() or gt.lower() in answer.lower():
        return True
    if "_" in gt:
        gt = gt.replace("_", " ")
        if answer.lower() == gt.lower() or gt.lower() in answer.lower():
            return True
    return False


# ------------------------------------------------------------------------------------------ spec §8 edge cases

LABEL = "golden retriever"


@pytest.mark.parametrize(
    ("completion", "fmt", "acc", "lenient"),
    [
        ("<think>fur</think><answer>golden retriever</answer>", 1, 1, True),
        ("<think>fur</think>\n\n<answer> Golden Retriever </answer>", 1, 1, True),  # whitespace, case
        ("<think>fur</think><answer></answer>", 1, 0, False),  # empty answer (Visual-RFT #176 hack): no reward
        ("<think>golden retriever?</think><answer></answer>", 1, 0, True),  # eval falls back to the whole output
        ("<think>fur</think><answer>golden retriever, labrador</answer>", 1, 0, True),  # several classes
        ("<think>fur</think><answer>golden retriever or labrador</answer>", 1, 0, True),
        ("<think>fur</think><answer>golden retriever.</answer>", 1, 0, True),  # trailing punctuation
        ("<think>fur</think><answer>golden_retriever</answer>", 1, 0, False),  # underscore in the answer only
        ("<think>fur</think><answer>labrador</answer> <answer>golden retriever</answer>", 1, 0, False),  # 1st tag
        ("<think>fur</think><answer>golden retriever</answer> <answer>labrador</answer>", 1, 1, True),
        ("<think>fur</think><answer>\ngolden retriever\n</answer>", 1, 0, True),  # training regex: no DOTALL
        ("<think>fur</think><answer>golden retriever</answer>.", 0, 1, True),  # trailing text: format 0 only
        (" <think>fur</think><answer>golden retriever</answer>", 0, 1, True),  # leading space
        ("<think>fur</think> so <answer>golden retriever</answer>", 0, 1, True),  # text between the parts
        ("<answer>golden retriever</answer>", 0, 1, True),  # no think part
        ("golden retriever", 0, 1, True),  # no tags: the whole stripped completion is the answer
        ("  GOLDEN RETRIEVER\n", 0, 1, True),
        ("", 0, 0, False),
        ("<think></think><answer>", 0, 0, False),
    ],
)
def test_thinking_rewards_on_edge_cases(completion, fmt, acc, lenient):
    assert format_reward(completion) == fmt
    assert accuracy_reward(completion, LABEL) == acc
    assert lenient_match(completion, LABEL) is lenient
    assert _official_format(completion) == fmt  # the table itself agrees with the official code
    assert _official_accuracy(completion, LABEL) == acc
    assert _official_lenient(completion, LABEL) is lenient


def test_underscore_labels():
    """Class names with underscores (CoOp's raw names): training needs the exact string; evaluation retries with
    spaces."""
    assert accuracy_reward("<answer>Apple_Pie</answer>", "apple_pie") == 1.0
    assert accuracy_reward("<answer>apple pie</answer>", "apple_pie") == 0.0
    assert lenient_match("<answer>Apple pie</answer>", "apple_pie")
    assert lenient_match("<answer>apple_pie</answer>", "apple_pie")
    assert not lenient_match("<answer>apple-pie</answer>", "apple_pie")


def test_label_may_be_a_solution_string():
    """Solutions look like '<answer> label </answer>'; the tags are stripped, a bare label is stripped as is."""
    assert ground_truth("<answer> sea lion </answer>") == "sea lion"
    assert ground_truth("  sea lion\n") == "sea lion"
    assert ground_truth("<answer></answer>") == ""
    assert accuracy_reward("<answer>Sea Lion</answer>", "<answer> sea lion </answer>") == 1.0
    assert equality_reward("sea lion", "<answer> sea lion </answer>") == 1.0


def test_equality_reward_is_raw_and_exact():
    """No-Thinking: the raw completion must be the class name (spec §1.6): no lowercasing, stripping or extraction."""
    assert equality_reward("sea lion", "sea lion") == 1.0
    for wrong in ("Sea lion", "sea lion.", "sea lion\n", " sea lion", "<answer>sea lion</answer>", "sea lions", ""):
        assert equality_reward(wrong, "sea lion") == 0.0
    assert equality_reward(" sea lion\n", "sea lion", strip_completion=True) == 1.0
    assert equality_reward("Sea lion", "sea lion", strip_completion=True) == 0.0  # stripping only, still exact


def test_lenient_match_quirks_are_faithful():
    """Containment makes the evaluation matcher lenient; an empty label is contained in anything (never happens with
    real class names, kept as in the official script)."""
    assert lenient_match("It is a cat, I think", "cat")
    assert lenient_match("concatenate", "cat")  # substring, not a word match
    assert lenient_match("anything", "")
    assert not lenient_match(None, "cat")


def test_batch_helpers_and_registry():
    completions = ["<think>a</think><answer>cat</answer>", "cat", "<answer>dog</answer>", None]
    labels = ["cat", "cat", "cat", "cat"]
    assert format_rewards(completions, labels) == [1.0, 0.0, 0.0, 0.0]
    assert accuracy_rewards(completions, labels) == [1.0, 1.0, 0.0, 0.0]
    assert equality_rewards(completions, labels) == [0.0, 1.0, 0.0, 0.0]
    assert set(REWARDS) == {"format", "accuracy", "equality"}
    for name, fn in REWARDS.items():
        assert len(fn(completions, labels)) == 4, name
    with pytest.raises(ValueError, match="zip"):
        accuracy_rewards(["cat"], ["cat", "dog"])


# ------------------------------------------------------------------------------------------ fuzz and equivalence

_FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<answer",
    "</",
    " ",
    "\n",
    "\t",
    "\r\n",
    "\u00a0",  # no-break space: whitespace for both \s and str.strip
    "\u2028",  # line separator: whitespace, but not a newline for "." without DOTALL
    "\x1c",
    "\x85",
    "\u3000",
    "cat",
    "Cat",
    "_",
    ".",
    "İ",  # lowercases to two characters
    "ß",
    "\ud800",  # lone surrogate
]


def _fragment_string(rng: random.Random) -> str:
    """Half tag soup, half the think/answer template with random pieces in, around and between its parts."""

    def soup(most: int) -> str:
        return "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, most)))

    if rng.random() < 0.5:
        return soup(10)
    parts = ["<think>", soup(3), "</think>", soup(2), "<answer>", soup(3), "</answer>"]
    for edge in (0, len(parts)):  # sometimes text before or after
        if rng.random() < 0.2:
            parts.insert(edge, soup(2))
    return "".join(parts)


def test_scanners_match_the_official_regexes_on_tag_soup():
    """The linear-time scanners agree with the official regexes on 20k random strings built from tags, unicode
    whitespace and class-name pieces, and so do the rewards built on them."""
    rng = random.Random(0)
    for _ in range(20_000):
        text = _fragment_string(rng)
        label = rng.choice(["cat", "Cat_", "<answer> cat </answer>", "ca t", " İ "])
        match = re.search(ANSWER_PATTERN, text)
        assert extract_answer(text) == (match.group(1).strip() if match else None), repr(text)
        assert format_reward(text) == _official_format(text), repr(text)
        assert extract_eval_answer(text) == _official_eval_answer(text), repr(text)
        assert accuracy_reward(text, label) == _official_accuracy(text, label), repr((text, label))
        assert equality_reward(text, label) == _official_equality(text, label), repr((text, label))
        assert lenient_match(text, label) is _official_lenient(text, label), repr((text, label))


def _random_unicode(rng: random.Random, length: int) -> str:
    return "".join(chr(rng.randrange(0x110000)) for _ in range(length))


def test_garbage_never_raises():
    """Random unicode (any code point, surrogates included), None-like text, control characters: every function returns
    a value of the right type."""
    rng = random.Random(1)
    samples = ["", "None", "null", "\x00", "\n" * 5, "<", "</answer><answer>", "<think>" * 3]
    samples += [_random_unicode(rng, rng.randint(0, 200)) for _ in range(2_000)]
    for text in samples:
        label = _random_unicode(rng, rng.randint(0, 5))
        assert format_reward(text) in (0.0, 1.0)
        assert accuracy_reward(text, label) in (0.0, 1.0)
        assert equality_reward(text, label) in (0.0, 1.0)
        assert isinstance(lenient_match(text, label), bool)
        assert isinstance(extract_eval_answer(text), str)
        answer = extract_answer(text)
        assert answer is None or isinstance(answer, str)
    for fn in (format_reward, extract_answer):
        fn(None)
    assert accuracy_reward(None, "cat") == equality_reward(None, "cat") == 0.0


def test_huge_adversarial_strings():
    """Inputs on which the official regexes backtrack quadratically (many opening tags without a closing one, many
    </think> before a bad ending) are scanned in linear time; results still match small-scale expectations."""
    n = 200_000
    many_opens = "<answer>" * n  # one line, no </answer>
    assert extract_answer(many_opens) is None
    assert accuracy_reward(many_opens, "cat") == 0.0
    assert extract_eval_answer(many_opens) == many_opens
    many_closes = "<think>" + "</think><answer>" * n + "x"  # no final </answer>: format 0
    assert format_reward(many_closes) == 0.0
    good = "<think>" + "</think>" * n + " <answer>" + "cat " * n + "</answer>"
    assert format_reward(good) == 1.0
    assert lenient_match(good, "cat")
