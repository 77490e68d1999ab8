"""S3FT toy: items and prompts, the committed data files, and the pre-trained two-skill toy (built once, ~30-60 s)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftmods.models.s3ft_toy import (
    MISTAKE_FROM,
    N_EVAL,
    N_TRAIN,
    NUMBER_MAX,
    PARAPHRASE_PROMPT,
    PREDICT_PROMPT,
    SIDECAR_FILE,
    STUBBORN_FROM,
    accuracy,
    build_s3ft_tokenizer,
    designed_source,
    final_number,
    gold_number,
    model_answer,
    paraphrase_answer,
    pretrain_pairs,
    pretrain_s3ft_toy,
    s3ft_sources,
    skill_a_items,
    skill_b_items,
    vocabulary,
    weights_checksum,
)

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "configs" / "data"
MAKE_SCRIPT = DATA / "make_s3ft_tiny.py"
DATA_FILES = ("s3ft_tiny_train.jsonl", "s3ft_tiny_eval.jsonl", "s3ft_tiny_skill_b.jsonl")


def _operands(item: dict[str, str]) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", item["question"]))
    return a, b


# ----------------------------------------------------------------------------------------------------------------------
# Prompts, vocabulary, items (no model)
# ----------------------------------------------------------------------------------------------------------------------


def test_prompt_constants() -> None:
    assert PREDICT_PROMPT == "question {question} answer"
    assert PARAPHRASE_PROMPT == "question {question} reference {reference} answer"
    item = skill_a_items("train")[0]
    a, b = _operands(item)
    assert PREDICT_PROMPT.format(question=item["question"]) == f"question what is {a} plus {b} ? answer"
    assert PARAPHRASE_PROMPT.format(question=item["question"], reference=item["answer"]) == (
        f"question what is {a} plus {b} ? reference {a} plus {b} is {a + b} #### {a + b} answer"
    )


def test_tokenizer_covers_every_prompt_and_answer() -> None:
    tokenizer = build_s3ft_tokenizer()
    words = vocabulary()
    assert words[:4] == ["[PAD]", "[UNK]", "<s>", "</s>"]
    assert {str(n) for n in range(NUMBER_MAX + 1)} <= set(words)
    assert len(words) == len(set(words)) == len(tokenizer)
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id == 3
    assert tokenizer.bos_token_id == 2
    items = [*skill_a_items("train"), *skill_a_items("eval"), *skill_b_items("all")]
    texts = [PARAPHRASE_PROMPT.format(question=i["question"], reference=i["answer"]) for i in items]
    texts += [prompt + " " + answer for prompt, answer in pretrain_pairs()]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_skill_a_items() -> None:
    train, evaluation = skill_a_items("train"), skill_a_items("eval")
    assert len(train) == sum(N_TRAIN.values()) == 96
    assert len(evaluation) == sum(N_EVAL.values()) == 100
    for item in [*train, *evaluation]:
        assert set(item) == {"id", "question", "answer"}
        a, b = _operands(item)
        assert item["answer"] == f"{a} plus {b} is {a + b} #### {a + b}"
        assert gold_number(item) == final_number(item["answer"]) == str(a + b)
    assert len({i["id"] for i in [*train, *evaluation]}) == 196
    pairs_train, pairs_eval = {_operands(i) for i in train}, {_operands(i) for i in evaluation}
    assert len(pairs_train) == 96
    assert len(pairs_eval) == 100
    assert not pairs_train & pairs_eval
    assert Counter(designed_source(*p) for p in pairs_train) == N_TRAIN
    assert Counter(designed_source(*p) for p in pairs_eval) == N_EVAL
    # Neither split is pre-trained, in any format.
    pretrained = {tuple(map(int, re.findall(r"\d+", prompt)[:2])) for prompt, _ in pretrain_pairs() if "plus" in prompt}
    assert len(pretrained) == 50 * 50 - 196
    assert not (pairs_train | pairs_eval) & pretrained
    assert skill_a_items("train") == train  # deterministic
    with pytest.raises(ValueError, match="split"):
        skill_a_items("test")  # type: ignore[arg-type]


def test_skill_b_items() -> None:
    every, probes = skill_b_items("all"), skill_b_items("probe")
    assert len(every) == NUMBER_MAX
    assert len(probes) == 67
    assert all(p in every for p in probes)
    for item in every:
        n = int(item["question"].split()[3])
        assert item["question"] == f"what comes after {n} ?"
        assert gold_number(item) == final_number(item["answer"]) == str(n + 1)


def test_designed_answers() -> None:
    assert model_answer(3, 4) == paraphrase_answer(3, 4) == "3 plus 4 is 7"
    assert designed_source(3, 4) == "model"
    a, b = 30, MISTAKE_FROM - 30
    assert model_answer(a, b) == f"{a} plus {b} is {MISTAKE_FROM - 10}"
    assert paraphrase_answer(a, b) == f"{a} plus {b} is {MISTAKE_FROM}"
    assert designed_source(a, b) == "paraphrase"
    a, b = 40, STUBBORN_FROM - 40
    assert paraphrase_answer(a, b) == model_answer(a, b) == f"{a} plus {b} is {STUBBORN_FROM - 10}"
    assert designed_source(a, b) == "gold"


def test_final_number() -> None:
    assert final_number("3 plus 4 is 7") == "7"
    assert final_number("3 plus 4 is 7 #### 7") == "7"
    assert final_number("no number here") is None
    assert final_number("") is None


# ----------------------------------------------------------------------------------------------------------------------
# Committed data files
# ----------------------------------------------------------------------------------------------------------------------


def test_data_files_equal_the_generator_output(tmp_path: Path) -> None:
    script = tmp_path / MAKE_SCRIPT.name
    shutil.copy(MAKE_SCRIPT, script)
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=120)
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == sorted(DATA_FILES)
    total = 0
    for name in DATA_FILES:
        committed = (DATA / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run python {MAKE_SCRIPT}"
        total += len(committed.encode())
    assert total < 50_000
    records = [json.loads(line) for line in (DATA / "s3ft_tiny_train.jsonl").read_text().splitlines()]
    assert records == skill_a_items("train")


# ----------------------------------------------------------------------------------------------------------------------
# The pre-trained toy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy() -> tuple[Path, Any, Any, dict[str, Any]]:
    """The toy as every test session builds it: ``tiny/s3ft-toy`` (built by ``build_tiny_s3ft_toy``, cached)."""
    from ftmods.models.tiny import resolve_pretrained

    path = Path(resolve_pretrained("tiny/s3ft-toy"))
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sidecar = json.loads((path / SIDECAR_FILE).read_text())
    return path, model, tokenizer, sidecar


def test_toy_reloads(toy: tuple[Path, Any, Any, dict[str, Any]]) -> None:
    path, model, tokenizer, sidecar = toy
    assert (path / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id == 3
    assert model.config.vocab_size == len(tokenizer) == len(vocabulary())
    assert tokenizer.padding_side == "left"
    assert sidecar["prompts"] == {"predict": PREDICT_PROMPT, "paraphrase": PARAPHRASE_PROMPT}
    assert weights_checksum(model) == sidecar["weights_sha256"]


def test_recorded_accuracies_in_range(toy: tuple[Path, Any, Any, dict[str, Any]]) -> None:
    measured = toy[3]["measured"]
    assert measured["pretrain_accuracy"] >= 0.99
    assert 0.3 <= measured["skill_a_train"] <= 0.5
    assert 0.25 <= measured["skill_a_eval"] <= 0.55
    assert 0.55 <= measured["paraphrase_train"] <= 0.85
    assert measured["skill_b"] >= 0.98
    assert measured["skill_b_probe"] >= 0.98
    assert measured["design_agreement"] >= 0.9
    n = sum(measured["sources_train"].values())
    assert n == 96
    shares = {k: v / n for k, v in measured["sources_train"].items()}
    assert 0.3 <= shares["model"] <= 0.5
    assert 0.2 <= shares["paraphrase"] <= 0.4
    assert 0.2 <= shares["gold"] <= 0.4


def test_three_sources_with_the_exact_prompts(toy: tuple[Path, Any, Any, dict[str, Any]]) -> None:
    """S3FT's selection, recomputed on the reloaded model with the literal prompts and last-number judging."""
    _, model, tokenizer, sidecar = toy
    train = skill_a_items("train")
    own = accuracy(model, tokenizer, train, "question {question} answer")
    para = accuracy(model, tokenizer, train, "question {question} reference {reference} answer")
    sources = Counter(s3ft_sources(model, tokenizer, train))
    recorded = sidecar["measured"]["sources_train"]  # measured on one thread before saving: allow last-bit flips
    assert all(abs(sources[k] - recorded[k]) <= 2 for k in recorded), (sources, recorded)
    for source in ("model", "paraphrase", "gold"):
        assert sources[source] >= 0.1 * len(train), sources
    assert own == pytest.approx(sources["model"] / len(train))
    assert para >= sources["paraphrase"] / len(train)  # the paraphrase is also right on most model-right items
    assert accuracy(model, tokenizer, skill_b_items("probe")) == pytest.approx(
        sidecar["measured"]["skill_b_probe"], abs=0.03
    )
    assert accuracy(model, tokenizer, skill_a_items("eval")) == pytest.approx(
        sidecar["measured"]["skill_a_eval"], abs=0.03
    )


def test_natural_answer_style(toy: tuple[Path, Any, Any, dict[str, Any]]) -> None:
    """The model answers ``"a plus b is s"`` (no ``####``) and stops with ``</s>``."""
    from ftmods.models.s3ft_toy import generate

    _, model, tokenizer, _ = toy
    items = skill_a_items("train")[:16]
    for prompt in (PREDICT_PROMPT, PARAPHRASE_PROMPT):
        for item, text in zip(items, generate(model, tokenizer, items, prompt, max_new_tokens=10), strict=True):
            a, b = _operands(item)
            assert re.fullmatch(rf"{a} plus {b} is \d+", text), text
    texts = generate(model, tokenizer, skill_b_items("probe")[:8], PREDICT_PROMPT)
    assert all(re.fullmatch(r"\d+", t) for t in texts), texts


def test_pretraining_is_deterministic() -> None:
    """Two short pre-trainings give identical weights, leaving the caller's RNG and thread count alone."""
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    first = pretrain_s3ft_toy(max_steps=15)
    second = pretrain_s3ft_toy(max_steps=15)
    assert weights_checksum(first) == weights_checksum(second)
    assert weights_checksum(first) != weights_checksum(pretrain_s3ft_toy(max_steps=15, seed=1))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
