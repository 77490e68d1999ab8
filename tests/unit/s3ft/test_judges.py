"""S3FT judges on hand-made items: numeric answers, exact match, token F1, LLM yes/no, unit tests in the sandbox."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from ftmods.s3ft.judges import (
    DEFAULT_LLM_JUDGE_PROMPT,
    JUDGES,
    BaseJudge,
    ExactMatchJudge,
    LLMJudge,
    NumericAnswerJudge,
    SimilarityJudge,
    UnitTestJudge,
    Verdict,
    answer_spans,
    extract_code,
    make_judge,
    parse_verdict,
)


@dataclass(frozen=True)
class Item:
    """Stands in for the data module's record: judges only read these attributes."""

    id: str = "0"
    task: str = "toy"
    prompt: str = ""
    gold: str = ""
    answers: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    context: str | None = None


GSM = Item(task="gsm8k", prompt="How many?", gold="3 * 24 = 72\n#### 72", answers=["72"])


# ----------------------------------------------------------------------------------------------------------------------
# NumericAnswerJudge
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "answers", "expected"),
    [
        ("1,000 + 234 makes 1,234 in all.\nThe answer is 1,234.", ["1234"], "extracted 1234 == 1234 (answer is)"),
        ("She is down 5 dollars. The answer is -5", ["-5"], "extracted -5 == -5 (answer is)"),
        ("The answer is 3.50", ["3.5"], "extracted 3.5 == 3.5 (answer is)"),
        ("The answer is $1,000.00.", ["$1,000"], "extracted 1000 == 1000 (answer is)"),
        ("The final answer is: **18**. Check: 9 * 2 = 18, 20 - 2", ["18"], "extracted 18 == 18 (answer is)"),
        ("The answer is 5. No, wait: the answer is 6.", ["6"], "extracted 6 == 6 (answer is)"),
        ("24 + 48 = 72\n#### 72.0", ["72"], "extracted 72 == 72 (####)"),
        ("First 3 boxes, then 72 pens", ["72"], "extracted 72 == 72 (last number)"),
        ("I got -5 first, then 7", ["-5"], "extracted 7 != -5 (last number)"),
        ("The answer is 71.", ["72"], "extracted 71 != 72 (answer is)"),
        ("The answer is 5", ["-5"], "extracted 5 != -5 (answer is)"),
    ],
)
def test_numeric_extraction(candidate: str, answers: list[str], expected: str) -> None:
    verdict = NumericAnswerJudge()(Item(answers=answers, gold=""), candidate)
    assert verdict == Verdict(expected.split()[2] == "==", expected)


def test_numeric_without_a_number_is_incorrect() -> None:
    assert NumericAnswerJudge()(GSM, "I do not know.") == Verdict(False, "no number in candidate (gold 72)")
    assert NumericAnswerJudge()(Item(gold="no digits", answers=[]), "The answer is 3") == Verdict(
        False, "no number in the gold answer"
    )


def test_numeric_gold_comes_from_the_hashes_when_answers_are_empty() -> None:
    item = Item(gold="3 boxes of 4 = 12 pens, plus 1 = 13\n#### 13", answers=[])
    assert NumericAnswerJudge().gold_number(item) == 13.0
    assert NumericAnswerJudge()(item, "The answer is 13").correct


def test_numeric_tolerance_is_relative_to_the_gold() -> None:
    """tolerance 0.01 * max(1, |72|) = 0.72: 72.5 passes, 72.8 does not."""
    judge = NumericAnswerJudge(tolerance=0.01)
    assert judge(GSM, "The answer is 72.5").correct
    assert not judge(GSM, "The answer is 72.8").correct
    assert not NumericAnswerJudge()(GSM, "The answer is 72.001").correct


def test_numeric_custom_pattern() -> None:
    judge = NumericAnswerJudge(pattern=r"Final: (\S+)")
    assert judge(GSM, "Final: 72, then 5 more words 9") == Verdict(True, "extracted 72 == 72 (answer is)")


# ----------------------------------------------------------------------------------------------------------------------
# ExactMatchJudge and SimilarityJudge
# ----------------------------------------------------------------------------------------------------------------------


def test_answer_spans() -> None:
    assert answer_spans("Paris") == [("whole", "Paris")]
    assert answer_spans("It is big.\nThe final answer is The Louvre.") == [
        ("whole", "It is big.\nThe final answer is The Louvre."),
        ("last line", "The final answer is The Louvre."),
        ("answer span", "The Louvre."),
    ]


@pytest.mark.parametrize(
    ("candidate", "detail"),
    [
        ("  PARIS!  ", "matched 'Paris' (whole)"),
        ("It is in France.\nThe Paris", "matched 'Paris' (last line)"),
        ("I believe the answer is: paris.", "matched 'Paris' (answer span)"),
        ("New York City.", "matched 'New York City' (whole)"),
        ("Answer: an nyc", "matched 'NYC' (answer span)"),
    ],
)
def test_exact_match_normalised(candidate: str, detail: str) -> None:
    item = Item(answers=["Paris", "NYC", "New York City"])
    assert ExactMatchJudge()(item, candidate) == Verdict(True, detail)


def test_exact_match_rejects_partial_and_respects_normalize_flag() -> None:
    item = Item(answers=["Paris"])
    assert ExactMatchJudge()(item, "Paris, France") == Verdict(False, "no match among 1 answer(s)")
    assert not ExactMatchJudge(normalize=False)(item, "paris").correct
    assert ExactMatchJudge(normalize=False)(item, " Paris\n").correct


def test_exact_match_falls_back_to_gold() -> None:
    assert ExactMatchJudge()(Item(gold="Abraham Lincoln", answers=[]), "abraham lincoln").correct


@pytest.mark.parametrize(
    ("candidate", "gold", "threshold", "correct", "detail"),
    [
        # "red car" vs "red bus": overlap 1, P = R = 1/2, F1 = 0.5
        ("red car", "red bus", 0.5, True, "token F1 0.500 >= 0.5"),
        ("red car", "red bus", 0.51, False, "token F1 0.500 < 0.51"),
        # 3 of 4 tokens shared both ways: P = R = 3/4, F1 = 0.75
        ("big red barn door", "big red barn house", 0.75, True, "token F1 0.750 >= 0.75"),
        ("big red barn door", "big red barn house", 0.76, False, "token F1 0.750 < 0.76"),
        # P = 2/2, R = 2/4: F1 = 2 * 1 * 0.5 / 1.5 = 2/3
        ("red barn", "big red barn house", 0.6, True, "token F1 0.667 >= 0.6"),
        ("red barn", "big red barn house", 0.7, False, "token F1 0.667 < 0.7"),
        # articles and punctuation vanish: "The red barn!" == "red barn"
        ("The red barn!", "red barn", 1.0, True, "token F1 1.000 >= 1"),
        ("blue", "red barn", 0.0, True, "token F1 0.000 >= 0"),
    ],
)
def test_similarity_token_f1(candidate: str, gold: str, threshold: float, correct: bool, detail: str) -> None:
    assert SimilarityJudge(threshold)(Item(answers=[gold]), candidate) == Verdict(correct, detail)


def test_similarity_best_span_and_reference_count() -> None:
    """The "answer is" span "red bus" scores F1 1.0 against the second reference."""
    item = Item(answers=["green car", "red bus"])
    assert SimilarityJudge(0.9)(item, "Long thoughts here.\nThe answer is red bus").correct


def test_similarity_with_embeddings_batches_two_calls() -> None:
    """cos([1, 0], [0.6, 0.8]) = 0.6; cos([1, 0], [0, 1]) = 0."""
    vectors = {"yes": [1.0, 0.0], "ok": [0.6, 0.8], "nope": [0.0, 1.0]}
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> Tensor:
        calls.append(texts)
        return torch.tensor([vectors[t] for t in texts])

    items = [Item(answers=["yes"])] * 3
    verdicts = SimilarityJudge(0.6, embed=embed).batch(items, ["ok", "nope", "yes"])
    assert [v.correct for v in verdicts] == [True, False, True]
    assert verdicts[0].detail == "cosine 0.600 >= 0.6"
    assert calls == [["ok", "nope", "yes"], ["yes", "yes", "yes"]]
    assert not SimilarityJudge(0.61, embed=embed)(items[0], "ok").correct


# ----------------------------------------------------------------------------------------------------------------------
# LLMJudge
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Yes", Verdict(True, "judge said 'yes'")),
        ("  CORRECT! The prediction matches.", Verdict(True, "judge said 'correct'")),
        ("true", Verdict(True, "judge said 'true'")),
        ("**No**", Verdict(False, "judge said 'no'")),
        ("Incorrect.", Verdict(False, "judge said 'incorrect'")),
        ("False, it names Lyon", Verdict(False, "judge said 'false'")),
        ("", Verdict(False, "unparseable verdict: ")),
        ("The prediction is correct, yes.", Verdict(False, "unparseable verdict: The prediction is correct, yes.")),
        ("yes/no", Verdict(False, "unparseable verdict: yes/no")),
        ("Y" * 60, Verdict(False, "unparseable verdict: " + "Y" * 40)),
    ],
)
def test_parse_verdict_is_strict(reply: str, verdict: Verdict) -> None:
    assert parse_verdict(reply) == verdict


def test_llm_judge_with_a_stub_generator() -> None:
    received: list[list[str]] = []
    replies = iter(["Yes.", "no", "Maybe so"])

    def generate(prompts: list[str]) -> list[str]:
        received.append(prompts)
        return [next(replies) for _ in prompts]

    item = Item(task="nq", prompt="Which city is the capital of France?", gold="Paris", answers=["Paris"])
    judge = LLMJudge(generate=generate, batch_size=2)
    verdicts = judge.batch([item] * 3, ["It is Paris.", "Lyon", "Marseille"])
    assert verdicts == [
        Verdict(True, "judge said 'yes'"),
        Verdict(False, "judge said 'no'"),
        Verdict(False, "unparseable verdict: Maybe so"),
    ]
    assert [len(chunk) for chunk in received] == [2, 1]
    first = received[0][0]
    assert "Which city is the capital of France?" in first
    assert "Predicted response: It is Paris." in first
    assert "Gold answer: Paris" in first
    assert first.endswith("Answer yes or no.")
    assert first == DEFAULT_LLM_JUDGE_PROMPT.format(
        question=item.prompt, prediction="It is Paris.", gold="Paris", context="", answers="Paris"
    )


def test_llm_judge_custom_prompt_fields() -> None:
    seen: list[str] = []
    judge = LLMJudge(generate=lambda ps: seen.extend(ps) or ["yes"] * len(ps), prompt="{context}|{answers}|{gold}")
    assert judge(Item(gold="", answers=["NYC", "New York"], context="passage"), "nyc").correct
    assert seen == ["passage|NYC | New York|NYC | New York"]


def test_llm_judge_argument_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LLMJudge()
    with pytest.raises(ValueError, match="exactly one"):
        LLMJudge("tiny/causal-lm", generate=lambda ps: ps)
    with pytest.raises(ValueError, match="unknown prompt fields"):
        LLMJudge(generate=lambda ps: ps, prompt="{question} {reference}")
    with pytest.raises(ValueError, match="2 replies for 1 prompts"):
        LLMJudge(generate=lambda ps: ["yes", "no"])(Item(), "x")


def test_llm_judge_with_a_tiny_model_is_deterministic() -> None:
    """The tiny model's replies are noise: only the types and determinism (greedy decoding) are checked."""
    judge = LLMJudge("tiny/causal-lm", max_new_tokens=4, batch_size=2, dtype="float32", device="cpu")
    items = [Item(prompt="Capital of France?", gold="Paris", answers=["Paris"])] * 3
    first = judge.batch(items, ["Paris", "Lyon", "I am not sure at all"])
    second = judge.batch(items, ["Paris", "Lyon", "I am not sure at all"])
    assert all(isinstance(v, Verdict) and isinstance(v.correct, bool) for v in first)
    assert first == second
    assert judge(items[0], "Paris") == first[0]


# ----------------------------------------------------------------------------------------------------------------------
# UnitTestJudge and code extraction
# ----------------------------------------------------------------------------------------------------------------------

ADD = Item(task="mbpp", prompt="Add two numbers.", tests=["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
GOOD = "def add(a, b):\n    return a + b"
WRONG = "def add(a, b):\n    return abs(a) + b"  # passes test 0, fails test 1


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (f"[[BEGIN]]\n{GOOD}\n[[DONE]]", GOOD),
        (f"Sure! [[BEGIN]]\n```python\n{GOOD}\n```\n[[DONE]] Explanation: adds.", GOOD),
        (f"[[BEGIN]]\n{GOOD}\n", GOOD),  # cut before [[DONE]]
        (f"Here you go:\n```python\n{GOOD}\n```\nand a test:\n```python\nprint(add(1, 2))\n```", GOOD),
        (f"```text\nnot code\n```\n```py\n{GOOD}\n```", GOOD),
        (f"```\n{GOOD}\n```", GOOD),
        ("    def f():\n        return 1\n", "def f():\n    return 1"),
        (GOOD, GOOD),
        ("  \n ", ""),
    ],
)
def test_extract_code(text: str, code: str) -> None:
    assert extract_code(text) == code


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (f"[[BEGIN]]\n{GOOD}\n[[DONE]]", Verdict(True, "passed 2 test(s)")),
        (f"Here:\n```python\n{GOOD}\n```", Verdict(True, "passed 2 test(s)")),
        (WRONG, Verdict(False, "AssertionError in test 1: assert add(-1, 1) == 0")),
        ("def add(a, b) return a", Verdict(False, "SyntaxError in code")),
        ("def plus(a, b):\n    return a + b", Verdict(False, "NameError in test 0: assert add(1, 2) == 3")),
        ("", Verdict(False, "no code")),
        ("[[BEGIN]]\n[[DONE]]", Verdict(False, "no code")),
        ("import os\nos._exit(0)", Verdict(False, "exit code 0: no output")),  # must not pass by skipping the tests
        ("x = bytearray(10**10)", Verdict(False, "memory limit: MemoryError in code")),
        ("import socket\nsocket.create_connection(('1.1.1.1', 80))", Verdict(False, "PermissionError in code")),
    ],
)
def test_unit_test_judge(candidate: str, expected: Verdict) -> None:
    assert UnitTestJudge(memory_mb=256)(ADD, candidate) == expected


def test_unit_test_judge_timeout() -> None:
    judge = UnitTestJudge(timeout_s=1.0)
    assert judge(ADD, "def add(a, b):\n    while True:\n        pass") == Verdict(False, "timeout after 1 s")


def test_unit_test_judge_setup_code_and_missing_tests() -> None:
    item = Item(tests=["assert root(16) == 4"])
    assert UnitTestJudge(setup_code="import math")(item, "def root(x):\n    return int(math.sqrt(x))").correct
    assert UnitTestJudge()(Item(tests=[]), GOOD) == Verdict(False, "no tests to run")


def test_unit_test_judge_batch_keeps_order() -> None:
    judge = UnitTestJudge(max_workers=2)
    verdicts = judge.batch([ADD] * 4, [GOOD, WRONG, "", f"[[BEGIN]]\n{GOOD}\n[[DONE]]"])
    assert [v.correct for v in verdicts] == [True, False, False, True]
    assert verdicts[2].detail == "no code"
    with pytest.raises(ValueError, match="2 items but 1 candidates"):
        judge.batch([ADD, ADD], [GOOD])


def test_unit_test_judge_never_runs_code_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that would end the test process only ends its sandbox."""
    monkeypatch.setattr(sys, "exit", lambda *a: pytest.fail("in-process exit"))
    assert not UnitTestJudge()(ADD, "import sys\nsys.exit(0)").correct


# ----------------------------------------------------------------------------------------------------------------------
# Configs and registry
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "init_args"),
    [
        ("NumericAnswerJudge", "    tolerance: 0.01\n"),
        ("ExactMatchJudge", "    normalize: false\n"),
        ("SimilarityJudge", "    threshold: 0.8\n"),
        ("UnitTestJudge", "    timeout_s: 2.0\n    setup_code: import math\n"),
        ("LLMJudge", "    model: tiny/causal-lm\n    max_new_tokens: 4\n"),
    ],
)
def test_judges_parse_from_yaml(class_name: str, init_args: str) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--judge", type=BaseJudge)
    config = parser.parse_string(f"judge:\n  class_path: ftmods.s3ft.judges.{class_name}\n  init_args:\n{init_args}")
    judge = parser.instantiate(config).judge
    assert type(judge).__name__ == class_name
    assert JUDGES[judge.name] is type(judge)


def test_make_judge() -> None:
    judge = make_judge("numeric", tolerance=0.5)
    assert isinstance(judge, NumericAnswerJudge)
    assert judge.tolerance == 0.5
    assert {name: cls.name for name, cls in JUDGES.items()} == {name: name for name in JUDGES}
    with pytest.raises(ValueError, match="unknown judge 'regex'"):
        make_judge("regex")
