"""LocFT-BF toy world: world and tokenizer determinism, the pre-trained ``tiny/locft-toy`` and the committed edits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftmods.models.tiny import is_tiny_id, resolve_pretrained, tiny_model_dir
from ftmods.models.toy_world import (
    CITY_PREFIXES,
    DEFAULT_PRETRAIN,
    REPORT_FILE,
    SPECIAL_TOKENS,
    TEMPLATE_EDIT,
    TEMPLATE_OTHER,
    TEMPLATE_PARAPHRASE,
    WORLD_FILE,
    ToyWorld,
    build_word_tokenizer,
    default_world,
    edit_requests,
    encode_facts,
    fact_accuracy,
    make_world,
    pretrain_toy_lm,
)

REPO = Path(__file__).resolve().parents[3]
MAKE_SCRIPT = REPO / "configs" / "data" / "make_locft_tiny.py"
EDITS_FILE = REPO / "configs" / "data" / "locft_tiny_edits.jsonl"
EDIT_KEYS = {
    "case_id",
    "prompt",
    "target_new",
    "ground_truth",
    "subject",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
}


def _small_world(seed: int = 0) -> ToyWorld:
    return make_world(21, 6, 3, seed, n_probe=3)


# ----------------------------------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------------------------------


def test_world_is_deterministic_in_its_seed() -> None:
    assert make_world(96, 24, 8, seed=0) == make_world(96, 24, 8, seed=0)
    a, b = make_world(96, 24, 8, seed=0), make_world(96, 24, 8, seed=1)
    assert a.subjects != b.subjects
    assert [a.capital[s] for s in a.subjects] != [b.capital[s] for s in b.subjects]
    assert default_world() == make_world(96, 24, 8, seed=0, n_probe=16)


def test_world_shape() -> None:
    world = make_world(70, 10, 5, seed=3)
    assert len(world.train_subjects) == 60
    assert len(world.probe_subjects) == 10  # default n_probe = n_subjects // 7
    assert len(set(world.subjects)) == 70
    assert len(world.cities) == len(set(world.cities)) == 10
    one, two = [c for c in world.cities if " " not in c], [c.split() for c in world.cities if " " in c]
    assert len(one) == len(two) == 5
    assert all(len(words) == 2 and words[0] in CITY_PREFIXES for words in two)
    assert len(set(world.currencies)) == 5
    assert set(world.capital) == set(world.currency) == set(world.subjects)
    assert set(world.capital.values()) <= set(world.cities)
    assert set(world.currency.values()) <= set(world.currencies)
    vocabulary = world.vocabulary()
    assert vocabulary[:4] == list(SPECIAL_TOKENS)
    assert len(vocabulary) == len(set(vocabulary)) == 4 + 11 + 4 + 70 + 5 + 5 + 5
    names = world.subjects + [w for c in world.cities for w in c.split()] + world.currencies
    assert all(" " not in w and w not in SPECIAL_TOKENS for w in names)


def test_world_facts_and_json_round_trip(tmp_path: Path) -> None:
    world = _small_world()
    subject, probe = world.train_subjects[0], world.probe_subjects[0]
    trained = world.facts("trained")
    assert len(trained) == 3 * 18 + 2 * 3
    assert trained[:3] == [
        (f"the capital of {subject} is", world.capital[subject]),
        (f"{subject} has its capital city at", world.capital[subject]),
        (f"the currency used in {subject} is", world.currency[subject]),
    ]
    assert (TEMPLATE_PARAPHRASE.format(s=probe), world.capital[probe]) not in trained
    assert world.facts("probe_paraphrase") == [
        (f"{s} has its capital city at", world.capital[s]) for s in world.probe_subjects
    ]
    world.save(tmp_path / "world.json")
    assert ToyWorld.load(tmp_path / "world.json") == world


@pytest.mark.parametrize("sizes", [(5, 4, 1, 5), (10, 1, 1, 1), (10, 4, 0, 1)])
def test_make_world_rejects_bad_sizes(sizes: tuple[int, int, int, int]) -> None:
    n_subjects, n_cities, n_currencies, n_probe = sizes
    with pytest.raises(ValueError, match="invalid sizes"):
        make_world(n_subjects, n_cities, n_currencies, n_probe=n_probe)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_word_tokenizer(tmp_path: Path) -> None:
    world = _small_world()
    built = build_word_tokenizer(world)
    built.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer.get_vocab() == {w: i for i, w in enumerate(world.vocabulary())}
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.padding_side == "left"

    subject = world.train_subjects[0]
    prompt = TEMPLATE_EDIT.format(s=subject)
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "the", "capital", "of", subject, "is"]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    for city in world.cities:  # " " + target encodes to the target's words: whitespace only separates
        city_ids = tokenizer(" " + city, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(city_ids) == city.split()
        assert city_ids == tokenizer(city, add_special_tokens=False)["input_ids"]
        assert tokenizer(prompt + " " + city)["input_ids"] == ids + city_ids
        assert tokenizer.decode(city_ids) == city
    for fact_prompt, answer in world.facts("trained"):
        assert tokenizer.unk_token_id not in tokenizer(fact_prompt + " " + answer)["input_ids"]
    assert tokenizer("Xyzzy")["input_ids"] == [2, 1]

    batch = tokenizer([prompt, TEMPLATE_OTHER.format(s=subject)], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.pad_token_id  # left padding, the longer prompt is unpadded
    assert batch["attention_mask"].sum(-1).tolist() == [6, 7]


def test_encode_facts_labels_only_the_answer_and_eos() -> None:
    world = _small_world()
    tokenizer = build_word_tokenizer(world)
    two_token = next(s for s in world.subjects if " " in world.capital[s])
    one_token = next(c for c in world.cities if " " not in c)
    pairs = [(TEMPLATE_EDIT.format(s=two_token), world.capital[two_token]), (TEMPLATE_EDIT.format(s="X"), one_token)]
    input_ids, attention_mask, labels = encode_facts(tokenizer, pairs)
    assert input_ids.shape == (2, 1 + 5 + 2 + 1)  # <s>, prompt, two-token answer, </s>
    assert attention_mask.tolist() == [[1] * 9, [1] * 8 + [0]]  # right padding
    answer = tokenizer(" " + world.capital[two_token], add_special_tokens=False)["input_ids"]
    assert len(answer) == 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert labels[0].tolist() == [-100] * 6 + answer + [eos]
    assert labels[1].tolist() == [-100] * 6 + [tokenizer.convert_tokens_to_ids(one_token), eos, -100]
    assert input_ids[1, 4].item() == tokenizer.unk_token_id  # "X" is no subject
    assert input_ids[1, -1].item() == pad


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training (a small world and model; the default build is tested through the cache below)
# ----------------------------------------------------------------------------------------------------------------------

SMALL_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def test_pretraining_is_deterministic_and_leaves_global_state_alone() -> None:
    world = _small_world()
    torch.set_num_threads(2)
    try:
        rng_before = torch.get_rng_state()
        model_a, report_a = pretrain_toy_lm(world, **SMALL_MODEL, lr=1e-2)
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert torch.get_num_threads() == 2
        torch.manual_seed(1234)  # the global seed must not matter
        model_b, report_b = pretrain_toy_lm(world, **SMALL_MODEL, lr=1e-2)
    finally:
        torch.set_num_threads(1)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert (report_a.steps, report_a.min_margin) == (report_b.steps, report_b.min_margin)
    assert report_a.trained_accuracy == 1.0
    assert report_a.min_margin >= DEFAULT_PRETRAIN["min_margin"]
    assert not model_a.config.tie_word_embeddings
    assert fact_accuracy(model_a, *encode_facts(build_word_tokenizer(world), world.facts("trained"))) == 1.0


def test_pretraining_raises_when_the_budget_is_too_small() -> None:
    with pytest.raises(RuntimeError, match="greedy accuracy"):
        pretrain_toy_lm(_small_world(), **SMALL_MODEL, max_steps=2)


# ----------------------------------------------------------------------------------------------------------------------
# Edit requests
# ----------------------------------------------------------------------------------------------------------------------


def test_edit_requests() -> None:
    world = default_world()
    edits = edit_requests(world, 40, seed=0)
    assert edits == edit_requests(world, 40, seed=0)
    assert edits != edit_requests(world, 40, seed=1)
    assert [e["case_id"] for e in edits] == list(range(40))
    subjects = [e["subject"] for e in edits]
    assert len(set(subjects)) == 40
    assert set(subjects) <= set(world.train_subjects)
    for e in edits:
        assert set(e) == EDIT_KEYS
        s = e["subject"]
        assert e["prompt"] == TEMPLATE_EDIT.format(s=s)
        assert e["rephrase_prompt"] == TEMPLATE_PARAPHRASE.format(s=s)
        assert e["ground_truth"] == world.capital[s]
        assert e["target_new"] in world.cities
        assert e["target_new"] != e["ground_truth"]
        other = e["locality_prompt"].removeprefix("the capital of ").removesuffix(" is")
        assert e["locality_prompt"] == TEMPLATE_EDIT.format(s=other)
        assert other in world.train_subjects
        assert other not in subjects
        assert e["locality_ground_truth"] == world.capital[other]
    assert len({e["locality_prompt"] for e in edits}) == 40  # 40 unedited train subjects, drawn without replacement


def test_edit_requests_of_every_train_subject_use_probe_localities() -> None:
    world = _small_world()
    edits = edit_requests(world, len(world.train_subjects), seed=0)
    localities = {e["locality_prompt"] for e in edits}
    assert localities == {TEMPLATE_EDIT.format(s=s) for s in world.probe_subjects}
    with pytest.raises(ValueError, match="n_edits"):
        edit_requests(world, len(world.train_subjects) + 1)


# ----------------------------------------------------------------------------------------------------------------------
# The cached, pre-trained tiny/locft-toy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_dir() -> Path:
    return Path(resolve_pretrained("tiny/locft-toy"))


@pytest.fixture(scope="module")
def toy(toy_dir: Path) -> tuple[torch.nn.Module, object, ToyWorld]:
    model = AutoModelForCausalLM.from_pretrained(toy_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_dir, local_files_only=True)
    return model, tokenizer, ToyWorld.load(toy_dir / WORLD_FILE)


def _greedy_answers(model: torch.nn.Module, tokenizer: object, prompts: list[str]) -> list[str]:
    """Batched greedy decoding from ``<s> prompt`` (left-padded) until ``</s>``, decoded without special tokens."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]


def test_resolve_builds_and_caches_the_toy(toy_dir: Path) -> None:
    assert is_tiny_id("tiny/locft-toy")
    assert toy_dir == tiny_model_dir("locft-toy")
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (toy_dir / name).is_file()
    assert ToyWorld.load(toy_dir / WORLD_FILE) == default_world()
    report = json.loads((toy_dir / REPORT_FILE).read_text())
    assert report["trained_accuracy"] == 1.0
    assert resolve_pretrained("tiny/locft-toy") == str(toy_dir)  # cached: no second build


def test_toy_config(toy: tuple[torch.nn.Module, object, ToyWorld]) -> None:
    model, tokenizer, world = toy
    config = model.config
    assert config.model_type == "llama"
    assert not config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer) == len(world.vocabulary())  # type: ignore[arg-type]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 3, 0)
    assert model.generation_config.eos_token_id == 3
    assert config.num_hidden_layers == DEFAULT_PRETRAIN["num_hidden_layers"]


def test_toy_answers_every_trained_fact_greedily(toy: tuple[torch.nn.Module, object, ToyWorld]) -> None:
    model, tokenizer, world = toy
    prompts, answers = zip(*world.facts("trained"), strict=True)
    assert _greedy_answers(model, tokenizer, list(prompts)) == list(answers)


def test_toy_paraphrase_generalization_is_measured(toy: tuple[torch.nn.Module, object, ToyWorld]) -> None:
    """Probe subjects never saw template B; the accuracy is reported, not required (it was 100 % at seed 0)."""
    model, tokenizer, world = toy
    prompts, answers = zip(*world.facts("probe_paraphrase"), strict=True)
    hits = [a == b for a, b in zip(_greedy_answers(model, tokenizer, list(prompts)), answers, strict=True)]
    report = json.loads((Path(resolve_pretrained("tiny/locft-toy")) / REPORT_FILE).read_text())
    assert report["probe_paraphrase_accuracy"] == pytest.approx(sum(hits) / len(hits))


def _load_make_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_locft_tiny", MAKE_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_edits_are_current_and_agree_with_the_toy(toy: tuple[torch.nn.Module, object, ToyWorld]) -> None:
    assert EDITS_FILE.read_text() == _load_make_script().render(), "run python configs/data/make_locft_tiny.py"
    edits = [json.loads(line) for line in EDITS_FILE.read_text().splitlines()]
    assert len(edits) == 40
    model, tokenizer, _ = toy
    answers = _greedy_answers(model, tokenizer, [e["prompt"] for e in edits])
    assert answers == [e["ground_truth"] for e in edits]
    assert all(a != e["target_new"] for a, e in zip(answers, edits, strict=True))
    assert _greedy_answers(model, tokenizer, [e["rephrase_prompt"] for e in edits]) == answers
    localities = _greedy_answers(model, tokenizer, [e["locality_prompt"] for e in edits])
    assert localities == [e["locality_ground_truth"] for e in edits]
