"""Model-editing data: loaders for every format (with key fallbacks and file:line:field errors), the edit collator
(``prompt + " " + target + eos``, left padding, target-only labels, truncation guard), augmentation and the DataModule
(stream / seeded resumable shuffle order, raw requests for evaluation).

The tokenizer is the offline tiny byte-level BPE (``tiny/causal-lm``): no bos, eos ``<|im_end|>``, pad
``<|endoftext|>``. A SentencePiece-style word-level tokenizer (Llama-2 legacy normalizer: ``"▁"`` prepended, spaces
to ``"▁"``, bos added) is built in code for the tokenizer-aware space handling.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ftmods.datamodules import EditBatch, EditCollator, EditDataModule, EditRequest, RecordError
from ftmods.datamodules.edits import (
    DEFAULT_PREFIXES,
    QA_INST_TEMPLATE,
    EditItems,
    EditRequests,
    adds_word_start,
    detect_edit_format,
    load_counterfact,
    load_edits,
    load_knowedit,
    load_locft,
    load_qaedit,
    load_wikibigedit,
)

IGNORE = -100

ZSRE = {  # MEND / ROME ZsRE, as in LocFT's zsre_3k.json
    "subject": "Charity Creek",
    "src": "Which river system contains Charity Creek?",
    "pred": "Mississippi River",
    "rephrase": "What river system does Charity Creek belong to?",
    "alt": "Ottawa River",
    "answers": ["Ohio River"],
    "loc": "nq question: who sang i will always love you",
    "loc_ans": "Dolly Parton",
    "cond": "Ohio River >> Ottawa River || Which river system contains Charity Creek?",
}
LOCFT_CF = {  # LocFT's counterfact_3k.json
    "case_id": 7,
    "prompt": "Reedy Glacier is in",
    "target_new": "Europe",
    "subject": "Reedy Glacier",
    "ground_truth": "Antarctica",
    "rephrase_prompt": "Tony Blair. Reedy Glacier is located in",
    "locality_prompt": "Marshall Glacier is in",
    "locality_ground_truth": "Antarctica",
}
COUNTERFACT = {  # ROME counterfact.json
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native", "It rained. Danielle Darrieux spoke"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
KNOWEDIT = {
    "subject": "Watts Humphrey",
    "prompt": "What university did Watts Humphrey attend?",
    "target_new": "University of Michigan",
    "ground_truth": ["Illinois Institute of Technology"],
    "rephrase_prompt": "What university did Watts Humphrey take part in?",
    "portability": {
        "Reasoning": [{"prompt": "Where is the university Watts Humphrey attended?", "ground_truth": [["Ann Arbor"]]}],
        "Subject_Aliasing": [{"prompt": "What university did Watts S. Humphrey attend?", "ground_truth": "UMich"}],
    },
    "locality": {"Relation_Specificity": [{"prompt": "Watts Humphrey works as", "ground_truth": "engineer"}]},
}
WIKIBIGEDIT = {
    "subject": "Kendrick Lamar",
    "update": "Kendrick Lamar is a citizen of",
    "ans": "Canada",
    "rephrase": "Kendrick Lamar holds the citizenship of",
    "personas": "Yo, which passport does Kendrick Lamar carry?",
    "mhop": "The capital of the country Kendrick Lamar is a citizen of is",
    "mhop_ans": "Ottawa",
    "loc": "Taylor Swift was born in",
    "loc_ans": "Reading",
}
QAEDIT = {
    "id": 17,
    "source": "NQ",
    "prompt": "who wrote the song hallelujah",
    "target": "Leonard Cohen",
    "subject": "hallelujah",
    "rephrase": "who is the writer of the song hallelujah",
    "locality": [
        {"loc": "nq question: when was the eiffel tower built", "loc_ans": "1889"},
        {"loc": "who painted the mona lisa", "loc_ans": "Leonardo da Vinci"},
    ],
}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))


@pytest.fixture(scope="module")
def tok() -> Any:
    from ftmods.models.loading import load_tokenizer

    return load_tokenizer("tiny/causal-lm")


@pytest.fixture(scope="module")
def sp_tok() -> Any:
    """Word-level stand-in for a legacy Llama-2 SentencePiece tokenizer: ``" Paris"`` → ``▁ ▁Paris`` (doubled)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "The", "capital", "of", "France", "Italy", "is", "Paris", "Rome", "city"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3} | {"▁" + w: 4 + i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_jsonl(path: Path, records: Sequence[dict[str, Any] | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def item(prompt: str, target: str, index: int = 0) -> dict[str, Any]:
    return {"edit_index": index, "prompt": prompt, "target": target}


def supervised(batch: EditBatch, row: int) -> list[int]:
    labels = batch["labels"][row]
    return labels[labels != IGNORE].tolist()


def numbered(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"The answer is {i}", "target_new": f"good {i}", "case_id": i} for i in range(n)]


# ------------------------------------------------------------------------------------------------------------ loaders


def test_load_locft_zsre_mend_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "zsre.jsonl", [ZSRE])
    [request] = load_locft(str(path))
    assert replace(request, meta={}) == EditRequest(
        prompt="Which river system contains Charity Creek?",
        target_new="Ottawa River",
        subject="Charity Creek",
        ground_truth="Ohio River",  # answers[0]: the true answer; pred is only a fallback
        rephrase=["What river system does Charity Creek belong to?"],
        locality=[("who sang i will always love you", "Dolly Parton")],  # "nq question: " stripped
    )
    assert request.meta == {
        "answers": ["Ohio River"],
        "cond": ZSRE["cond"],
        "dataset": "zsre",
        "format": "locft",
        "file": str(path),
        "record": 0,
        "edit_index": 0,
    }


def test_load_locft_counterfact_processed_json(tmp_path: Path) -> None:
    path = tmp_path / "counterfact_3k.json"
    path.write_text(json.dumps([LOCFT_CF, {**LOCFT_CF, "case_id": 8, "target_new": "Asia"}]), encoding="utf-8")
    first, second = load_locft(str(path))
    assert replace(first, meta={}) == EditRequest(
        prompt="Reedy Glacier is in",
        target_new="Europe",
        subject="Reedy Glacier",
        ground_truth="Antarctica",
        rephrase=["Tony Blair. Reedy Glacier is located in"],
        locality=[("Marshall Glacier is in", "Antarctica")],
    )
    assert (first.meta["dataset"], first.meta["case_id"]) == ("counterfact", 7)
    assert (second.target_new, second.meta["record"], second.meta["edit_index"]) == ("Asia", 1, 1)


def test_load_locft_key_fallbacks_mix_within_a_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p0", "target_new": "t0", "rephrase_prompt": ["r0", "r0b"], "pred": "old0"},
            {"src": "p1", "alt": "t1", "rephrase": "r1", "loc": ["l1", "l1b"], "loc_ans": ["a1", ["a1b", "x"]]},
        ],
    )
    first, second = load_locft(str(path))
    assert (first.prompt, first.target_new, first.rephrase, first.ground_truth) == ("p0", "t0", ["r0", "r0b"], "old0")
    assert (second.prompt, second.target_new, second.rephrase) == ("p1", "t1", ["r1"])
    assert second.locality == [("l1", "a1"), ("l1b", "a1b")]  # alias lists keep their first alias


def test_load_counterfact_original(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cf.jsonl", [COUNTERFACT])
    [request] = load_counterfact(str(path))
    assert replace(request, meta={}) == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        subject="Danielle Darrieux",
        ground_truth="French",
        rephrase=COUNTERFACT["paraphrase_prompts"],
        locality=[("The mother tongue of Léon Blum is", "French"), ("The native language of Montesquieu is", "French")],
    )
    wanted = {"case_id": 0, "relation_id": "P103", "prompt_template": "The mother tongue of {} is"}
    wanted["dataset"] = "counterfact"
    assert {k: request.meta[k] for k in wanted} == wanted
    assert request.meta["attribute_prompts"] == COUNTERFACT["attribute_prompts"]


def test_load_knowedit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "knowedit.jsonl", [KNOWEDIT])
    [request] = load_knowedit(str(path))
    assert replace(request, meta={}) == EditRequest(
        prompt="What university did Watts Humphrey attend?",
        target_new="University of Michigan",
        subject="Watts Humphrey",
        ground_truth="Illinois Institute of Technology",
        rephrase=["What university did Watts Humphrey take part in?"],
        locality=[("Watts Humphrey works as", "engineer")],
        portability=[
            ("Where is the university Watts Humphrey attended?", "Ann Arbor"),
            ("What university did Watts S. Humphrey attend?", "UMich"),
        ],
    )
    assert request.meta["portability_kinds"] == ["Reasoning", "Subject_Aliasing"]
    assert request.meta["locality_kinds"] == ["Relation_Specificity"]


def test_load_wikibigedit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "wbe.jsonl", [WIKIBIGEDIT, {**WIKIBIGEDIT, "mhop": None, "mhop_ans": None}])
    first, second = load_wikibigedit(str(path))
    assert replace(first, meta={}) == EditRequest(
        prompt="Kendrick Lamar is a citizen of",
        target_new="Canada",
        subject="Kendrick Lamar",
        rephrase=["Kendrick Lamar holds the citizenship of"],
        locality=[("Taylor Swift was born in", "Reading")],
        portability=[("The capital of the country Kendrick Lamar is a citizen of is", "Ottawa")],
    )
    assert first.meta["personas"] == WIKIBIGEDIT["personas"]
    assert second.portability == []  # no multi-hop question


def test_load_qaedit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qaedit.jsonl", [QAEDIT])
    [request] = load_qaedit(str(path))
    assert replace(request, meta={}) == EditRequest(
        prompt="who wrote the song hallelujah",
        target_new="Leonard Cohen",
        subject="hallelujah",
        rephrase=["who is the writer of the song hallelujah"],
        locality=[("when was the eiffel tower built", "1889"), ("who painted the mona lisa", "Leonardo da Vinci")],
    )
    assert (request.meta["id"], request.meta["source"], request.meta["dataset"]) == (17, "NQ", "qaedit")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (ZSRE, "locft"),
        (LOCFT_CF, "locft"),
        (COUNTERFACT, "counterfact"),
        (KNOWEDIT, "knowedit"),
        (WIKIBIGEDIT, "wikibigedit"),
        (QAEDIT, "qaedit"),
    ],
)
def test_auto_detection_matches_the_explicit_loader(tmp_path: Path, record: dict[str, Any], fmt: str) -> None:
    assert detect_edit_format(record) == fmt
    path = str(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert load_edits(path) == load_edits(path, fmt)
    assert EditRequests(path).formats == {path: fmt}


def test_files_are_read_in_order_with_global_edit_index_and_max_edits(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [LOCFT_CF, ZSRE])
    b = write_jsonl(tmp_path / "b.jsonl", [QAEDIT, QAEDIT])
    requests = EditRequests([str(a), str(b)], max_edits=3)
    assert len(requests) == 3
    assert [r.meta["edit_index"] for r in requests] == [0, 1, 2]
    assert [(r.meta["file"], r.meta["record"]) for r in requests] == [(str(a), 0), (str(a), 1), (str(b), 0)]
    assert requests[-1] == requests[2]
    assert [r.prompt for r in requests[1:]] == [ZSRE["src"], QAEDIT["prompt"]]
    with pytest.raises(IndexError):
        requests[3]


# ------------------------------------------------------------------------------------------------------------- errors


def _raises_at(where: str, field: str | None, problem: str) -> Any:
    what = f": field {field!r}" if field else ""
    return pytest.raises(RecordError, match=re.escape(f"{where}{what}: ") + problem)


def test_missing_target_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [LOCFT_CF, "", {"prompt": "no target here"}])
    with _raises_at(f"{path}:3", "target_new", "missing; looked for target_new \\(or 'alt'\\)"):
        load_edits(str(path))


def test_non_string_prompt_names_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [LOCFT_CF, {"prompt": 5, "target_new": "x"}])
    with _raises_at(f"{path}:2", "prompt", "must be a string, got int"):
        load_locft(str(path))


@pytest.mark.parametrize(
    ("record", "fmt", "field", "problem"),
    [
        ({**LOCFT_CF, "target_new": " "}, "locft", "target_new", "is empty"),
        ({**LOCFT_CF, "locality_prompt": ["a", "b"], "locality_ground_truth": ["x"]}, "locft", "locality_ground_truth",
         "has 1 answers for 2 prompts"),
        ({**LOCFT_CF, "locality_ground_truth": None}, "locft", "locality_ground_truth", "missing"),
        ({**LOCFT_CF, "rephrase_prompt": [1]}, "locft", "rephrase_prompt", "must be a string or a list of strings"),
        ({**COUNTERFACT, "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "prompt": "no slot"}},
         "counterfact", "requested_rewrite.prompt", "has no '\\{\\}' slot"),
        ({**COUNTERFACT, "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "target_new": "English"}},
         "counterfact", "requested_rewrite.target_new", "must be an object"),
        ({**KNOWEDIT, "portability": {"Reasoning": [{"prompt": "q"}]}}, "knowedit",
         "portability.Reasoning[0].ground_truth", "missing"),
        ({**QAEDIT, "locality": [{"loc": "q", "loc_ans": 3}]}, "qaedit", "locality[0].loc_ans", "must be a string"),
        ({**WIKIBIGEDIT, "ans": None}, "wikibigedit", "ans", "missing"),
        (LOCFT_CF, "counterfact", "requested_rewrite", "missing"),  # the wrong explicit format
    ],
)  # fmt: skip
def test_malformed_records_name_the_field(
    tmp_path: Path, record: dict[str, Any], fmt: str, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with _raises_at(f"{path}:1", field, problem):
        load_edits(str(path), fmt)  # type: ignore[arg-type]


def test_unknown_format_and_bad_json_and_json_record_index(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with _raises_at(f"{path}:1", None, "cannot tell the edit format"):
        load_edits(str(path))
    path = write_jsonl(tmp_path / "bad.jsonl", [LOCFT_CF, '{"prompt": "x",'])
    with _raises_at(f"{path}:2", None, "invalid JSON"):
        load_edits(str(path))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([LOCFT_CF, {"prompt": "p", "target_new": ["x"]}]), encoding="utf-8")
    with _raises_at(f"{path}: record 1", "target_new", "must be a string"):
        load_edits(str(path))
    with pytest.raises(ValueError, match="format must be"):
        load_edits(str(path), "zsre")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------- collator


def test_collator_labels_padding_positions(tok: Any) -> None:
    vocab_size = len(tok)
    collate = EditCollator(tok)
    batch = collate([item("Reedy Glacier is in", "Europe", 4), item("The answer is", "positive and good", 9)])
    assert set(batch) == set(EditBatch.__annotations__)
    assert batch["edit_index"].tolist() == [4, 9]
    for row, (prompt, target) in enumerate([("Reedy Glacier is in", "Europe"), ("The answer is", "positive and good")]):
        assert tok.decode(supervised(batch, row)) == " " + target + tok.eos_token
        mask = batch["attention_mask"][row]
        ids = batch["input_ids"][row][mask.bool()].tolist()
        prompt_ids = tok(prompt)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # the prompt, exactly as tokenized alone
        assert ids[len(prompt_ids) :] == supervised(batch, row)  # then the target, all supervised
        n_pad = int((mask == 0).sum())
        assert mask.tolist() == [0] * n_pad + [1] * len(ids)  # left padding
        assert batch["input_ids"][row, :n_pad].tolist() == [tok.pad_token_id] * n_pad
        assert batch["labels"][row, : n_pad + len(prompt_ids)].eq(IGNORE).all()
        assert batch["position_ids"][row].tolist() == [0] * n_pad + list(range(len(ids)))
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # one row was padded
    assert tok.pad_token_id < len(tok) == vocab_size  # an existing token; nothing added


def test_collator_space_is_not_doubled(tok: Any) -> None:
    collate = EditCollator(tok)
    base = collate([item("Reedy Glacier is in", "Europe")])
    for variant in (item("Reedy Glacier is in", " Europe"), item("Reedy Glacier is in ", "Europe")):
        batch = collate([variant])
        assert tok.decode(batch["input_ids"][0]) == "Reedy Glacier is in Europe" + tok.eos_token
    assert torch.equal(collate([item("Reedy Glacier is in", " Europe")])["input_ids"], base["input_ids"])
    no_space = EditCollator(tok, target_prefix_space=False, append_eos=False)([item("The answer is", "positive")])
    assert tok.decode(supervised(no_space, 0)) == "positive"


def test_collator_prompt_formats(tok: Any) -> None:
    batch = EditCollator(tok, prompt_format="qa_inst")([item("who wrote hallelujah?", "Leonard Cohen")])
    expected = QA_INST_TEMPLATE.format(prompt="who wrote hallelujah?") + " Leonard Cohen" + tok.eos_token
    assert tok.decode(batch["input_ids"][0]) == expected
    assert tok.decode(supervised(batch, 0)) == " Leonard Cohen" + tok.eos_token

    batch = EditCollator(tok, prompt_format="chat_template")([item("who wrote hallelujah?", "Leonard Cohen")])
    messages = [{"role": "user", "content": "who wrote hallelujah?"}]
    prompt_ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True))
    assert batch["input_ids"][0, : len(prompt_ids)].tolist() == prompt_ids
    assert tok.decode(supervised(batch, 0)) == "Leonard Cohen" + tok.eos_token  # after "\n": no space


def test_collator_truncates_the_prompt_from_the_left_never_the_target(tok: Any) -> None:
    prompt, target = " ".join(["The answer is"] * 8), "positive and good"
    prompt_ids, target_ids = EditCollator(tok).encode(prompt, target)
    fits = len(prompt_ids) + len(target_ids)
    exact = EditCollator(tok, max_length=fits)([item(prompt, target)])
    assert exact["input_ids"][0].tolist() == prompt_ids + target_ids  # nothing cut while it fits
    cut = EditCollator(tok, max_length=len(target_ids) + 3)
    with pytest.warns(UserWarning, match="cutting prompts from the left"):
        batch = cut([item(prompt, target)])
    assert batch["input_ids"][0].tolist() == prompt_ids[-3:] + target_ids
    assert tok.decode(supervised(batch, 0)) == " " + target + tok.eos_token
    assert cut.truncated == 1
    with pytest.raises(ValueError, match=r"edit 7: the target alone is \d+ tokens"):
        EditCollator(tok, max_length=len(target_ids))([item(prompt, target, 7)])


def test_collator_pads_with_eos_when_there_is_no_pad_token(tok: Any) -> None:
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    batch = EditCollator(no_pad)([item("The answer is", "good"), item("Reedy Glacier is in", "positive and good")])
    assert batch["input_ids"][0, 0].item() == tok.eos_token_id
    assert len(no_pad) == len(tok)
    assert no_pad.pad_token_id is None


def test_collator_sentencepiece_target_gets_one_word_start(sp_tok: Any) -> None:
    assert adds_word_start(sp_tok)
    assert sp_tok(" Paris", add_special_tokens=False)["input_ids"] == [3, 11]  # "▁ ▁Paris": naive prefix doubles
    collate = EditCollator(sp_tok)
    batch = collate([item("The capital of France is", "Paris"), item("The capital of Italy is", " Rome")])
    assert batch["input_ids"][0].tolist() == sp_tok("The capital of France is Paris")["input_ids"] + [2]
    assert batch["input_ids"][1].tolist() == sp_tok("The capital of Italy is Rome")["input_ids"] + [2]
    assert supervised(batch, 0) == sp_tok("Paris", add_special_tokens=False)["input_ids"] + [2]
    with pytest.warns(UserWarning, match="cutting prompts"):
        batch = EditCollator(sp_tok, max_length=4)([item("The capital of France is", "Paris")])  # bos kept
    assert sp_tok.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == ["<s>", "▁is", "▁Paris", "</s>"]


# --------------------------------------------------------------------------------------------------------- DataModule


def datamodule(tok: Any, files: Any, **kwargs: Any) -> EditDataModule:
    dm = EditDataModule(files, **kwargs)
    dm.connect(tok)
    return dm


def test_stream_order_is_file_order(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered(5))
    dm = datamodule(tok, str(path), order="stream", batch_size=2)
    dm.setup("fit")
    assert dm.requests is not None
    assert isinstance(dm.requests, Sequence)
    batches = list(dm.train_dataloader())
    assert [b["edit_index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert tok.decode(supervised(batches[1], 0)) == " good 2" + tok.eos_token


def test_shuffle_is_seeded_and_resumes_mid_epoch(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered(12))

    def loader(seed: int = 3) -> Any:
        dm = datamodule(tok, str(path), batch_size=2, seed=seed)
        dm.setup("fit")
        return dm.train_dataloader()

    def epoch(dataloader: Any, number: int) -> list[list[int]]:
        dataloader.sampler.set_epoch(number)  # what Lightning does at the start of every epoch
        return [b["edit_index"].tolist() for b in dataloader]

    uninterrupted = loader()
    reference = [epoch(uninterrupted, e) for e in range(2)]  # two epochs of 6 batches
    assert sorted(sum(reference[0], [])) == list(range(12))
    assert sum(reference[0], []) != list(range(12))
    assert reference[0] != reference[1]
    assert [b["edit_index"].tolist() for b in loader()] == reference[0]  # same seed, same order
    assert [b["edit_index"].tolist() for b in loader(seed=4)] != reference[0]
    assert isinstance(uninterrupted.sampler, torch.utils.data.RandomSampler)

    first = loader()
    iterator = iter(first)
    for _ in range(4):
        next(iterator)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b["edit_index"].tolist() for b in resumed] == reference[0][4:]
    assert epoch(resumed, 1) == reference[1]  # and the next epoch


def test_augmentation_adds_prefixed_items_with_the_same_target(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered(3))
    dm = datamodule(tok, str(path), order="stream", batch_size=4, augment_prefixes=3, seed=1)
    dm.setup("fit")
    assert dm.train_items is not None
    assert len(dm.train_items) == 12
    items = [dm.train_items[i] for i in range(4, 8)]  # edit 1 and its 3 augmented copies
    assert items[0]["prompt"] == "The answer is 1"
    assert {it["edit_index"] for it in items} == {1}
    assert {it["target"] for it in items} == {"good 1"}
    prefixes = [it["prompt"].removesuffix(" The answer is 1") for it in items[1:]]
    assert len(set(prefixes)) == 3
    assert set(prefixes) <= set(DEFAULT_PREFIXES)
    again = EditItems(dm.requests or [], augment_prefixes=3, seed=1)
    assert [again[i] for i in range(4, 8)] == items  # seeded
    assert EditItems(dm.requests or [], augment_prefixes=3, seed=2).prefixes(1) != prefixes
    batch = next(iter(dm.train_dataloader()))
    assert batch["edit_index"].tolist() == [0, 0, 0, 0]
    assert {tok.decode(supervised(batch, row)) for row in range(4)} == {" good 0" + tok.eos_token}


def test_eval_loaders_yield_raw_requests_and_need_no_tokenizer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered(5))
    dm = EditDataModule(str(path), eval_batch_size=2, max_edits=4)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [2, 2]
    assert all(isinstance(r, EditRequest) for b in batches for r in b)
    assert [r.meta["edit_index"] for b in dm.val_dataloader() for r in b] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dm.setup("fit")
