"""S3FT data: task loaders, the resumable selection files (read / merge / mixture), predict and fit setup, collate.

The tokenizer is the offline tiny ChatML one (``tiny/causal-lm``): a default system turn when the conversation has
none, eos ``<|im_end|>``, a distinct pad ``<|endoftext|>``. A supervised assistant turn is its content, ``<|im_end|>``
and the newline the template renders after it (as in ``test_chat.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ftmods.datamodules.records import RecordError
from ftmods.datamodules.s3ft import (
    SOURCES,
    S3FTCollator,
    S3FTDataModule,
    S3FTItem,
    done_ids,
    format_mixture,
    load_gsm8k,
    load_mbpp,
    load_rc_qa,
    load_s3ft_generic,
    load_s3ft_items,
    merge_parts,
    mixture_report,
    part_files,
    read_selection,
)

IGNORE = -100

GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "What is 1,000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"},
]
MBPP = [
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_setup_code": "",
    },
    {
        "task_id": 12,
        "text": "Write a function to square a number.",
        "code": "def sq(x):\n    return x * x",
        "test_list": ["assert sq(3) == 9"],
        "test_setup_code": "import math",
    },
]
SQUAD = [
    {
        "id": "q1",
        "question": "Where is the tower?",
        "context": "The tower is in Paris.",
        "answers": {"text": ["Paris", "in Paris"], "answer_start": [16, 13]},
    },
    {
        "id": "q2",
        "question": "What colour is the sky?",
        "context": "The sky is blue.",
        "answers": {"text": ["blue"], "answer_start": [11]},
    },
]
GENERIC = [
    {"id": "g1", "task": "gsm8k", "prompt": "2 + 2?", "gold": "2 + 2 = 4\n#### 4", "answers": ["4"]},
    {"task": "poetry", "prompt": "A haiku about rain.", "gold": "Rain on the roof", "context": "autumn"},
]


def write_lines(path: Path, lines: list[str], *, end: str = "\n") -> str:
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    return write_lines(path, [json.dumps(r) for r in records])


def selection_record(item_id: str, source: str = "model", task: str = "gsm8k", **extra: Any) -> dict[str, Any]:
    return {
        "id": item_id,
        "task": task,
        "prompt": f"Question {item_id}?",
        "target": f"Answer {item_id}.",
        "source": source,
        **extra,
    }


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` writes its Arrow cache under a test folder, never the user's ``~/.cache``."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))


@pytest.fixture(scope="module")
def tok() -> Any:
    from ftmods.models.loading import load_tokenizer

    return load_tokenizer("tiny/causal-lm")


def fit_datamodule(tok: Any, selection: str, **kwargs: Any) -> S3FTDataModule:
    dm = S3FTDataModule("unused.jsonl", selection, **kwargs)
    dm.connect(tok)
    dm.setup("fit")
    return dm


def supervised(labels: torch.Tensor) -> list[int]:
    return [int(x) for x in labels if x != IGNORE]


# ----------------------------------------------------------------------------------------------------------- loaders


def test_load_gsm8k(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n\n" + json.dumps(GSM8K[1]) + "\n", encoding="utf-8")  # blank line 2
    items = load_gsm8k(str(path))
    assert [i.id for i in items] == ["gsm8k_train:1", "gsm8k_train:3"]  # file stem + JSONL line
    assert items[1] == S3FTItem(
        id="gsm8k_train:3",
        task="gsm8k",
        prompt="What is 1,000 + 234?",
        gold="1000 + 234 = 1234\n#### 1,234",
        answers=["1234"],  # commas stripped
        tests=[],
        context=None,
        meta={"file": str(path), "index": 1, "line": 3, "format": "gsm8k"},
    )
    assert items[0].answers == ["7"]


def test_load_mbpp(tmp_path: Path) -> None:
    items = load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", MBPP))
    assert [i.id for i in items] == ["11", "12"]  # task_id, as a string
    assert items[0].task == "mbpp"
    assert items[0].prompt == "Write a function to add two numbers."
    assert items[0].gold == "def add(a, b):\n    return a + b"
    assert items[0].tests == ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert items[0].answers == []
    assert "test_setup_code" not in items[0].meta  # empty setup code is dropped
    assert items[1].meta["test_setup_code"] == "import math"


def test_load_mbpp_accepts_prompt_instead_of_text(tmp_path: Path) -> None:
    record = {"task_id": 2, "prompt": "Return 1.", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"]}
    (item,) = load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", [record]))
    assert item.prompt == "Return 1."


def test_load_rc_qa_squad_list_and_string_answers(tmp_path: Path) -> None:
    squad = load_rc_qa(write_jsonl(tmp_path / "squad.jsonl", SQUAD))
    assert [(i.id, i.gold, i.answers, i.context) for i in squad] == [
        ("q1", "Paris", ["Paris", "in Paris"], "The tower is in Paris."),
        ("q2", "blue", ["blue"], "The sky is blue."),
    ]
    assert squad[0].task == "qa"
    assert squad[0].prompt == "Where is the tower?"
    nq = load_rc_qa(
        write_jsonl(tmp_path / "nq.jsonl", [{"question": "Capital of Italy?", "answers": ["Rome", "Roma"]}])
    )
    assert (nq[0].id, nq[0].gold, nq[0].answers, nq[0].context) == ("nq:1", "Rome", ["Rome", "Roma"], None)
    single = load_rc_qa(write_jsonl(tmp_path / "one.jsonl", [{"question_id": 7, "question": "1+1?", "answer": "2"}]))
    assert (single[0].id, single[0].gold, single[0].answers) == ("7", "2", ["2"])


def test_load_s3ft_generic(tmp_path: Path) -> None:
    items = load_s3ft_generic(write_jsonl(tmp_path / "generic.jsonl", GENERIC))
    assert items[0] == S3FTItem(
        id="g1",
        task="gsm8k",
        prompt="2 + 2?",
        gold="2 + 2 = 4\n#### 4",
        answers=["4"],
        meta={"file": str(tmp_path / "generic.jsonl"), "index": 0, "line": 1, "format": "s3ft"},
    )
    assert (items[1].id, items[1].task, items[1].context, items[1].tests) == ("generic:2", "poetry", "autumn", [])


def test_load_s3ft_items_auto_detects_each_file(tmp_path: Path) -> None:
    files = [
        write_jsonl(tmp_path / "a_gsm8k.jsonl", GSM8K),
        write_jsonl(tmp_path / "b_mbpp.jsonl", MBPP),
        write_jsonl(tmp_path / "c_squad.jsonl", SQUAD),
        write_jsonl(tmp_path / "d_generic.jsonl", GENERIC),
    ]
    items = load_s3ft_items(files)
    assert [i.meta["format"] for i in items] == ["gsm8k"] * 2 + ["mbpp"] * 2 + ["qa"] * 2 + ["s3ft"] * 2
    assert [i.task for i in items] == ["gsm8k"] * 2 + ["mbpp"] * 2 + ["qa"] * 2 + ["gsm8k", "poetry"]
    assert [i.id for i in load_s3ft_items(files, limit=3)] == ["a_gsm8k:1", "a_gsm8k:2", "11"]


def test_load_s3ft_items_json_array(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps(GSM8K), encoding="utf-8")
    items = load_s3ft_items(str(path))
    assert [(i.id, i.answers, i.meta["line"]) for i in items] == [("gsm8k:0", ["7"], None), ("gsm8k:1", ["1234"], None)]


def test_undetectable_format_lists_the_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": "x"}])
    with pytest.raises(RecordError, match=r"odd\.jsonl:1: .*\['bar', 'foo'\].*format="):
        load_s3ft_items(path)


@pytest.mark.parametrize(
    ("loader", "records", "line", "field", "problem"),
    [
        (load_gsm8k, [GSM8K[0], {"question": "No answer?"}], 2, "answer", "missing"),
        (load_gsm8k, [GSM8K[0], {"question": "Q?", "answer": "just 5"}], 2, "answer", "####"),
        (load_mbpp, [MBPP[0], {"task_id": 3, "text": "T", "code": "pass"}], 2, "test_list", "missing"),
        (load_mbpp, [MBPP[0], {**MBPP[1], "test_list": []}], 2, "test_list", "empty"),
        (load_rc_qa, [SQUAD[0], {"id": "q3", "question": "Q?", "context": "C."}], 2, "answers", "missing"),
        (load_s3ft_generic, [GENERIC[0], {"task": "t", "prompt": "p"}], 2, "gold", "missing"),
    ],
)
def test_malformed_records_name_file_line_and_field(
    tmp_path: Path, loader: Any, records: list[dict[str, Any]], line: int, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(RecordError, match=rf"bad\.jsonl:{line}: field '{field}': .*{problem}") as info:
        loader(path)
    assert (info.value.file, info.value.field) == (path, field)


def test_invalid_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "broken.jsonl", [json.dumps(GSM8K[0]), '{"question": "Q?", "answer": ', json.dumps(GSM8K[1])]
    )
    with pytest.raises(RecordError, match=r"broken\.jsonl:2: invalid JSON"):
        load_s3ft_items(path)


def test_duplicate_ids_across_files_name_both_places(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "one.jsonl", [{"id": "x", "task": "t", "prompt": "p", "gold": "g"}])
    second = write_jsonl(
        tmp_path / "two.jsonl",
        [{"id": "y", "task": "t", "prompt": "p", "gold": "g"}, {"id": "x", "task": "t", "prompt": "q", "gold": "h"}],
    )
    with pytest.raises(RecordError, match=r"two\.jsonl:2: field 'id': duplicate id 'x', first seen at .*one\.jsonl:1"):
        load_s3ft_items([first, second])


# ------------------------------------------------------------------------------------------------ selection files


def make_interrupted_selection(tmp_path: Path) -> Path:
    """Merged: a, b. rank0 part: c, b (duplicate), then a cut-off line (id e). rank1 part: d."""
    selection = tmp_path / "selection.jsonl"
    write_jsonl(selection, [selection_record("a"), selection_record("b", "gold")])
    cut = json.dumps(selection_record("e", "paraphrase"))[:30]
    write_lines(
        tmp_path / "selection.jsonl.rank0.part",
        [json.dumps(selection_record("c", "paraphrase")), json.dumps(selection_record("b", "model")), cut],
        end="",  # killed mid-write: no newline after the partial record
    )
    write_jsonl(tmp_path / "selection.jsonl.rank1.part", [selection_record("d", "gold", task="mbpp")])
    return selection


def test_read_selection_merges_parts_dedupes_and_skips_a_cut_off_last_line(tmp_path: Path) -> None:
    selection = make_interrupted_selection(tmp_path)
    with pytest.warns(UserWarning, match=r"selection\.jsonl\.rank0\.part:3: skipping an incomplete last line"):
        records = read_selection(selection)
    assert [(r["id"], r["source"]) for r in records] == [
        ("a", "model"),
        ("b", "gold"),
        ("c", "paraphrase"),
        ("d", "gold"),
    ]
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert done_ids(selection) == {"a", "b", "c", "d"}
    assert done_ids(tmp_path / "nothing.jsonl") == set()


def test_read_selection_raises_on_a_bad_line_before_the_last(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "sel.jsonl", [json.dumps(selection_record("a")), "{not json", json.dumps(selection_record("b"))]
    )
    with pytest.raises(RecordError, match=r"sel\.jsonl:2: invalid JSON"):
        read_selection(path)
    with pytest.raises(FileNotFoundError, match="no S3FT selection"):
        read_selection(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p", "target": "t", "source": "gold"}, "id"),
        ({"id": "a", "target": "t", "source": "gold"}, "prompt"),
        ({"id": "a", "prompt": "p", "target": "", "source": "gold"}, "target"),
        ({"id": "a", "prompt": "p", "target": "t", "source": "self"}, "source"),
    ],
)
def test_malformed_selection_record_names_the_field(tmp_path: Path, record: dict[str, Any], field: str) -> None:
    path = write_jsonl(tmp_path / "sel.jsonl", [selection_record("ok"), record, selection_record("ok2")])
    with pytest.raises(RecordError, match=rf"sel\.jsonl:2: field '{field}'") as info:
        read_selection(path)
    assert info.value.field == field


def test_merge_parts_is_deduplicated_and_removes_the_parts(tmp_path: Path) -> None:
    selection = make_interrupted_selection(tmp_path)
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert merge_parts(selection) == 4
    lines = selection.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c", "d"]  # order of first appearance
    assert json.loads(lines[1])["source"] == "gold"  # the first record of an id wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selection.jsonl"]  # parts and temporary file gone
    assert merge_parts(selection) == 0  # nothing left to merge: untouched
    assert selection.read_text(encoding="utf-8").splitlines() == lines


def test_merge_parts_into_a_new_selection_file(tmp_path: Path) -> None:
    selection = tmp_path / "out" / "sel.jsonl"
    selection.parent.mkdir()
    write_jsonl(tmp_path / "out" / "sel.jsonl.rank10.part", [selection_record("z")])
    write_jsonl(tmp_path / "out" / "sel.jsonl.rank2.part", [selection_record("y")])
    assert [p.name for p in part_files(selection)] == ["sel.jsonl.rank2.part", "sel.jsonl.rank10.part"]  # by rank
    assert merge_parts(selection) == 2
    assert [r["id"] for r in read_selection(selection)] == ["y", "z"]


def test_merge_parts_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    selection = tmp_path / "sel.jsonl"
    write_jsonl(selection, [selection_record("a")])
    write_jsonl(tmp_path / "sel.jsonl.rank0.part", [selection_record("b")])
    before = selection.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        merge_parts(selection)
    assert selection.read_bytes() == before  # the selection is never half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel.jsonl", "sel.jsonl.rank0.part"]  # no temp left over


def test_mixture_report_by_hand() -> None:
    records = [
        selection_record("1", "model"),
        selection_record("2", "model"),
        selection_record("3", "gold"),
        selection_record("4", "paraphrase", task="mbpp"),
        selection_record("5", "gold", task="mbpp"),
    ]
    report = mixture_report(records)
    # 5 records: model 2 (40 %), paraphrase 1 (20 %), gold 2 (40 %).
    assert report == {
        "total": 5,
        "counts": {"model": 2, "paraphrase": 1, "gold": 2},
        "percent": {"model": 40.0, "paraphrase": 20.0, "gold": 40.0},
        "by_task": {
            "gsm8k": {"model": 2, "paraphrase": 0, "gold": 1},
            "mbpp": {"model": 0, "paraphrase": 1, "gold": 1},
        },
    }
    table = format_mixture(report)
    assert table.splitlines()[:5] == [
        "source      count      %",
        "model           2   40.0",
        "paraphrase      1   20.0",
        "gold            2   40.0",
        "total           5  100.0",
    ]
    assert "66.7" in table
    assert "50.0" in table
    assert mixture_report([]) == {
        "total": 0,
        "counts": dict.fromkeys(SOURCES, 0),
        "percent": dict.fromkeys(SOURCES, 0.0),
        "by_task": {},
    }


# ---------------------------------------------------------------------------------------------------------- predict


def test_predict_setup_skips_done_ids_and_resumes(tmp_path: Path) -> None:
    tasks = write_jsonl(
        tmp_path / "tasks.jsonl",
        [{"id": k, "task": "gsm8k", "prompt": f"Question {k}?", "gold": "#### 1"} for k in "abcdef"],
    )
    selection = make_interrupted_selection(tmp_path)  # a, b, c, d done; e cut off
    dm = S3FTDataModule(tasks, str(selection), predict_batch_size=4)
    with pytest.warns(UserWarning, match=r"rank0\.part:3: skipping an incomplete last line"):
        dm.setup("predict")
    assert [item.id for item in dm.items or []] == ["e", "f"]  # e's cut-off line does not count as done
    assert (dm.num_total, dm.num_done) == (6, 4)
    assert part_files(selection) == []  # the interrupted run's parts were merged first
    assert [r["id"] for r in read_selection(selection)] == ["a", "b", "c", "d"]
    (batch,) = list(dm.predict_dataloader())
    assert isinstance(batch, list)
    assert all(isinstance(item, S3FTItem) for item in batch)
    assert [item.id for item in batch] == ["e", "f"]


def test_predict_setup_without_selection_and_with_limit(tmp_path: Path) -> None:
    tasks = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    dm = S3FTDataModule(tasks, str(tmp_path / "sel.jsonl"), limit=1)
    dm.setup("predict")
    assert [item.id for item in dm.items or []] == ["gsm8k:1"]
    assert (dm.num_total, dm.num_done) == (1, 0)
    assert not (tmp_path / "sel.jsonl").exists()


# -------------------------------------------------------------------------------------------------------------- fit


def test_fit_plain_labels_are_target_and_eos(tmp_path: Path, tok: Any) -> None:
    records = [selection_record("a", "model"), selection_record("b", "paraphrase"), selection_record("c", "gold")]
    dm = fit_datamodule(tok, write_jsonl(tmp_path / "sel.jsonl", records), template="plain")
    examples = dm.datasets["train"]
    assert [e["source_id"] for e in examples] == [0, 1, 2]
    for record, example in zip(records, examples, strict=True):
        assert tok.decode(supervised(example["labels"])) == record["target"] + "<|im_end|>"
        prompt_ids = tok(record["prompt"], add_special_tokens=True)["input_ids"]
        assert example["input_ids"][: len(prompt_ids)].tolist() == prompt_ids
    assert dm.mixture == mixture_report(records)


def test_fit_chat_labels_are_the_assistant_turn(tmp_path: Path, tok: Any) -> None:
    records = [selection_record("a", "gold"), selection_record("b", "model")]
    dm = fit_datamodule(tok, write_jsonl(tmp_path / "sel.jsonl", records), system_prompt="Be brief.")
    for record, example in zip(records, dm.datasets["train"], strict=True):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["target"]},
        ]
        assert example["input_ids"].tolist() == list(
            tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        )
        assert tok.decode(supervised(example["labels"])) == record["target"] + "<|im_end|>\n"


def test_train_loader_padded_batches_carry_source_ids(tmp_path: Path, tok: Any) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ftmods.datamodules.samplers import EpochShuffleSampler

    records = [selection_record(str(i), SOURCES[i % 3]) for i in range(6)]
    dm = fit_datamodule(tok, write_jsonl(tmp_path / "sel.jsonl", records), batch_size=3, template="plain")
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader)
    assert isinstance(loader.sampler, EpochShuffleSampler)
    seen = []
    for batch in loader:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "source_ids"}
        assert batch["source_ids"].shape == (3,)
        assert batch["source_ids"].dtype == torch.long
        for row in range(3):
            target = tok.decode(supervised(batch["labels"][row]))  # "Answer <i>.<|im_end|>"
            index = int(target.removeprefix("Answer ").removesuffix(".<|im_end|>"))
            assert int(batch["source_ids"][row]) == index % 3
            seen.append(index)
    assert sorted(seen) == list(range(6))
    assert dm.val_dataloader() == []


def test_packed_batches_restart_positions_and_keep_source_per_segment(tmp_path: Path, tok: Any) -> None:
    records = [selection_record("a", "gold"), selection_record("bb", "model"), selection_record("ccc", "paraphrase")]
    dm = fit_datamodule(tok, write_jsonl(tmp_path / "sel.jsonl", records), template="plain", packing=True)
    examples = dm.datasets["train"]
    batch = dm.collator()(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "source_ids"}
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]  # positions restart at each segment
    assert batch["source_ids"].tolist() == [SOURCES.index("gold"), SOURCES.index("model"), SOURCES.index("paraphrase")]


def test_collator_on_hand_built_examples() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "source_id": 2},
        {"input_ids": [8, 9], "labels": [IGNORE, 9], "source_id": 0},
    ]
    padded = S3FTCollator(0)(examples)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["source_ids"].tolist() == [2, 0]
    packed = S3FTCollator(0, packing=True)(examples)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert packed["source_ids"].tolist() == [2, 0]


def test_val_fraction_split_is_seeded(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "sel.jsonl", [selection_record(str(i)) for i in range(10)])
    first = fit_datamodule(tok, path, val_fraction=0.2, template="plain")
    again = fit_datamodule(tok, path, val_fraction=0.2, template="plain")
    assert (len(first.datasets["train"]), len(first.datasets["val"])) == (8, 2)
    assert [e["input_ids"].tolist() for e in first.datasets["val"]] == [
        e["input_ids"].tolist() for e in again.datasets["val"]
    ]
    (batch,) = list(first.val_dataloader())
    assert batch["source_ids"].shape == (2,)


def test_fit_with_tokenizer_name_and_overlong_drop(tmp_path: Path) -> None:
    records = [selection_record("a"), {**selection_record("b"), "target": "word " * 200}]
    dm = S3FTDataModule(
        "unused.jsonl", write_jsonl(tmp_path / "sel.jsonl", records), tokenizer="tiny/causal-lm", max_length=64
    )
    with pytest.warns(UserWarning, match="skipped 1 of 2 records"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 1
    assert dm.mixture is not None
    assert dm.mixture["total"] == 2


def test_fit_without_selection_says_to_run_predict(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"python cli\.py predict -c"):
        fit_datamodule(tok, str(tmp_path / "missing.jsonl"))


def test_fit_rejects_an_unknown_source(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "sel.jsonl", [selection_record("a"), selection_record("b", "self")])
    with pytest.raises(RecordError, match=r"sel\.jsonl:2: field 'source': must be one of") as info:
        fit_datamodule(tok, path)
    assert info.value.field == "source"


def test_fit_warns_about_unmerged_parts(tmp_path: Path, tok: Any) -> None:
    selection = tmp_path / "sel.jsonl"
    write_jsonl(tmp_path / "sel.jsonl.rank0.part", [selection_record("a"), selection_record("b", "gold")])
    with pytest.warns(UserWarning, match="unmerged part files"):
        dm = fit_datamodule(tok, str(selection), template="plain")
    assert [e["source_id"] for e in dm.datasets["train"]] == [0, 2]
