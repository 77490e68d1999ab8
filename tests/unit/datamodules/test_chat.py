"""SFT data pipeline: chat/plain encoding with completion-only labels, collation, packing and the DataModule.

The tokenizer is the offline tiny ChatML one (``tiny/causal-lm``): ``<|im_start|>role\\n...<|im_end|>\\n`` per turn, a
default system turn when the conversation has none, eos ``<|im_end|>`` and a distinct pad ``<|endoftext|>``.

Supervised span of an assistant turn, checked below: its content, ``<|im_end|>`` **and the ``\\n`` that the ChatML
template renders right after it** (the tokens between the generation prompt and the end of the rendered turn). The
template's own ``{% generation %}`` mask stops before that newline; the extra newline is harmless context the model
always sees after ``<|im_end|>``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ftmods.datamodules.chat import (
    ChatCollator,
    ChatDataModule,
    ChatEncoder,
    TemplateError,
    encode_messages,
    encode_plain,
)
from ftmods.datamodules.records import RecordError
from ftmods.models.tiny import DEFAULT_SYSTEM_PROMPT

IGNORE = -100
FIELDS = {"prompt": "prompt", "completion": "completion", "messages": "messages"}
CONVERSATION = [
    {"role": "user", "content": "Input: the movie was great"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Input: the food was terrible"},
    {"role": "assistant", "content": "negative"},
]

# Renders an assistant turn only when it is the last message: earlier turns vanish from longer conversations.
DROPS_EARLIER_ASSISTANT = (
    "{%- for m in messages -%}"
    "{%- if m['role'] != 'assistant' or loop.last -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# The generation prompt opens a think block that rendered assistant turns do not have: not a prefix of the turn.
THINKING_PROMPT = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
# Like many hub templates (roles must alternate, no system role, ...), this one refuses some conversations.
REFUSES_SYSTEM = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- raise_exception('system messages are not supported') -}}{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> Any:
    from ftmods.models.loading import load_tokenizer

    return load_tokenizer("tiny/causal-lm")


@pytest.fixture(scope="module")
def model() -> Any:
    from ftmods.models.loading import load_causal_lm

    return load_causal_lm("tiny/causal-lm").eval()


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` writes its Arrow cache under a test folder, never the user's ``~/.cache``."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))


def with_template(tokenizer: Any, template: str) -> Any:
    """A copy of ``tokenizer`` with another chat template (the shared fixture stays untouched)."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def spans(tokenizer: Any, labels: list[int]) -> list[str]:
    """Decoded runs of consecutive supervised labels."""
    out: list[list[int]] = []
    previous = IGNORE
    for label in labels:
        if label != IGNORE:
            if previous == IGNORE:
                out.append([])
            out[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in out]


def unsupervised_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE])


def check_labels_are_ids_or_ignored(ids: list[int], labels: list[int]) -> None:
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    return write_lines(path, [json.dumps(r) for r in records])


def pc_records(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Distinct prompt/completion records (distinct ids, so batches can be matched back to records)."""
    return [
        {"prompt": f"Input: review number {i}", "completion": "positive" if i % 2 else "negative"}
        for i in range(start, start + n)
    ]


def chat_records(n: int) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": f"what is {i} + 4?"}, {"role": "assistant", "content": str(i + 4)}]}
        for i in range(n)
    ]


def datamodule(tokenizer: Any, train_files: Any, **kwargs: Any) -> ChatDataModule:
    dm = ChatDataModule(train_files, **kwargs)
    dm.connect(tokenizer)
    return dm


def rows(dataset: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset]


# -------------------------------------------------------------------------------------------------- encode_messages


def test_tokenizer_fixture_has_distinct_pad_and_eos(tok: Any) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id  # P5: padding never masks the real eos


def test_encode_messages_supervises_each_assistant_turn(tok: Any) -> None:
    ids, labels = encode_messages(tok, CONVERSATION)
    assert ids == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    check_labels_are_ids_or_ignored(ids, labels)
    # Content + <|im_end|> + the "\n" the ChatML template renders after it; nothing else.
    assert spans(tok, labels) == ["positive<|im_end|>\n", "negative<|im_end|>\n"]
    context = unsupervised_text(tok, ids, labels)
    assert context == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nInput: the movie was great<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nInput: the food was terrible<|im_end|>\n<|im_start|>assistant\n"
    )
    assert labels[-1] == ids[-1]
    assert tok.decode(ids[-1:]) == "\n"


def test_encode_messages_matches_generation_mask_plus_trailing_newline(tok: Any) -> None:
    """Cross-check with the template's own ``{% generation %}`` mask: ours adds exactly the newline after each turn."""
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = encode_messages(tok, CONVERSATION)
    assert ids == list(out["input_ids"])
    generation = [bool(m) for m in out["assistant_masks"]]
    ours = [label != IGNORE for label in labels]
    extra = [t for t, (g, o) in enumerate(zip(generation, ours, strict=True)) if o and not g]
    assert not any(g and not o for g, o in zip(generation, ours, strict=True))
    assert [tok.decode([ids[t]]) for t in extra] == ["\n", "\n"]
    assert all(generation[t - 1] for t in extra)  # each right after a generation span


def test_encode_messages_supervise_from_leaves_earlier_turns_unsupervised(tok: Any) -> None:
    ids_all, _ = encode_messages(tok, CONVERSATION)
    ids, labels = encode_messages(tok, CONVERSATION, supervise_from=2)
    assert ids == ids_all  # the input is unchanged, only the labels differ
    assert spans(tok, labels) == ["negative<|im_end|>\n"]
    assert "positive" in unsupervised_text(tok, ids, labels)
    _, labels = encode_messages(tok, CONVERSATION, supervise_from=3)  # index 3 is the last assistant turn
    assert spans(tok, labels) == ["negative<|im_end|>\n"]
    _, labels = encode_messages(tok, CONVERSATION, supervise_from=4)
    assert labels == [IGNORE] * len(ids)


def test_encode_messages_own_system_turn_is_context(tok: Any) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION[:2]]
    ids, labels = encode_messages(tok, messages)
    assert spans(tok, labels) == ["positive<|im_end|>\n"]
    text = unsupervised_text(tok, ids, labels)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert DEFAULT_SYSTEM_PROMPT not in text


def test_encode_messages_assistant_first_is_an_error(tok: Any) -> None:
    """An opening assistant turn has no renderable prompt, so its header (and the template's default system turn)
    cannot be told apart from its content: refuse rather than supervise them."""
    messages = [{"role": "assistant", "content": "positive"}, {"role": "user", "content": "why?"}]
    with pytest.raises(TemplateError, match="message 0 is an assistant turn; start with a system or user message"):
        encode_messages(tok, messages)
    ids, labels = encode_messages(tok, messages, supervise_from=1)  # as context it is fine
    assert labels == [IGNORE] * len(ids)
    ids, labels = encoder(tok, "messages", system_prompt="Be brief.").encode({"messages": messages})
    assert spans(tok, labels) == ["positive<|im_end|>\n"]  # with a system turn first, it is supervised


def test_encode_messages_multi_token_and_empty_content(tok: Any) -> None:
    answer = "<think> The image shows a small animal. </think> <answer> cat </answer>"
    messages = [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": answer}]
    _, labels = encode_messages(tok, messages)
    assert spans(tok, labels) == [answer + "<|im_end|>\n"]
    _, labels = encode_messages(tok, [messages[0], {"role": "assistant", "content": ""}])
    assert spans(tok, labels) == ["<|im_end|>\n"]  # an empty answer still teaches the model to stop


def test_encode_messages_template_dropping_earlier_turns_raises(tok: Any) -> None:
    dropping = with_template(tok, DROPS_EARLIER_ASSISTANT)
    with pytest.raises(TemplateError, match="renders the conversation up to message 1"):
        encode_messages(dropping, CONVERSATION)
    # Supervising only the last turn needs no consistent rendering of the earlier ones.
    ids, labels = encode_messages(dropping, CONVERSATION, supervise_from=3)
    assert spans(dropping, labels) == ["negative<|im_end|>\n"]
    assert "positive" not in dropping.decode(ids)


def test_encode_messages_generation_prompt_not_a_prefix_raises(tok: Any) -> None:
    """Taking ``len(prompt)`` as the start would silently skip the first answer tokens here (P1): fail loudly."""
    with pytest.raises(TemplateError, match="renders the conversation up to message 1"):
        encode_messages(with_template(tok, THINKING_PROMPT), CONVERSATION[:2])


def test_encode_messages_template_exception_becomes_template_error(tok: Any) -> None:
    refusing = with_template(tok, REFUSES_SYSTEM)
    encode_messages(refusing, CONVERSATION)  # no system turn: fine
    with pytest.raises(TemplateError, match="the chat template failed: system messages are not supported"):
        encode_messages(refusing, [{"role": "system", "content": "x"}, *CONVERSATION])


# ----------------------------------------------------------------------------------------------------- encode_plain


def test_encode_plain_supervises_completion_and_eos(tok: Any) -> None:
    prompt, completion = "Question: what is 3 + 4?\nAnswer:", " 7"
    ids, labels = encode_plain(tok, prompt, completion)
    prompt_ids = list(tok(prompt)["input_ids"])
    completion_ids = list(tok(completion, add_special_tokens=False)["input_ids"])
    assert ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    assert spans(tok, labels) == [" 7<|im_end|>"]
    assert tok.decode(ids) == prompt + completion + "<|im_end|>"


def test_encode_plain_appends_eos_once(tok: Any) -> None:
    ids, labels = encode_plain(tok, "The answer is", " yes<|im_end|>")
    assert ids.count(tok.eos_token_id) == 1
    assert ids[-1] == labels[-1] == tok.eos_token_id
    assert spans(tok, labels) == [" yes<|im_end|>"]


# ------------------------------------------------------------------------------------------------------- ChatEncoder


def encoder(tokenizer: Any, fmt: str, **kwargs: Any) -> ChatEncoder:
    options = {"template": "chat", "system_prompt": None, "max_length": 512, "overlong": "truncate"} | kwargs
    return ChatEncoder(tokenizer, fmt, FIELDS, **options)


def test_prompt_completion_supervises_only_the_completion(tok: Any) -> None:
    record = {"prompt": "Classify the sentiment of the review.", "completion": "positive"}
    ids, labels = encoder(tok, "prompt_completion").encode(record)
    expected = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": "positive"}]
    assert ids == list(tok.apply_chat_template(expected, tokenize=True, return_dict=False))
    check_labels_are_ids_or_ignored(ids, labels)
    assert spans(tok, labels) == ["positive<|im_end|>\n"]


def test_conversational_prompt_supervises_only_the_completion_turn(tok: Any) -> None:
    record = {"prompt": CONVERSATION[:3], "completion": [{"role": "assistant", "content": "negative"}]}
    ids, labels = encoder(tok, "prompt_completion").encode(record)
    assert ids == encode_messages(tok, CONVERSATION)[0]
    assert spans(tok, labels) == ["negative<|im_end|>\n"]  # the earlier assistant turn is context
    assert "positive" in unsupervised_text(tok, ids, labels)
    # A string completion after a conversational prompt is the same assistant turn.
    assert encoder(tok, "prompt_completion").encode({**record, "completion": "negative"}) == (ids, labels)


def test_system_prompt_is_inserted_as_context(tok: Any) -> None:
    record = {"prompt": "Input: the movie was great", "completion": "positive"}
    ids, labels = encoder(tok, "prompt_completion", system_prompt="Be brief.").encode(record)
    text = unsupervised_text(tok, ids, labels)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert DEFAULT_SYSTEM_PROMPT not in tok.decode(ids)
    assert spans(tok, labels) == ["positive<|im_end|>\n"]
    # Messages records get it too; the earlier assistant turns stay supervised (every assistant turn is a target).
    ids, labels = encoder(tok, "messages", system_prompt="Be brief.").encode({"messages": CONVERSATION})
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert spans(tok, labels) == ["positive<|im_end|>\n", "negative<|im_end|>\n"]
    # A conversation with its own system turn keeps it.
    own = {"messages": [{"role": "system", "content": "Mine."}, *CONVERSATION[:2]]}
    ids, _ = encoder(tok, "messages", system_prompt="Be brief.").encode(own)
    assert "Be brief." not in tok.decode(ids)
    assert tok.decode(ids).startswith("<|im_start|>system\nMine.<|im_end|>\n")


def test_plain_template_encoder(tok: Any) -> None:
    record = {"prompt": "The sentiment is", "completion": " positive"}
    plain = encoder(tok, "prompt_completion", template="plain")
    assert plain.encode(record) == encode_plain(tok, "The sentiment is", " positive")
    with pytest.raises(RecordError, match=r"d\.jsonl: record 0: field 'prompt': template='plain' needs string"):
        plain({"prompt": CONVERSATION[:1], "completion": "x"}, 0, file="d.jsonl")
    with pytest.raises(RecordError, match=r"field 'messages': template='plain' needs prompt/completion records"):
        encoder(tok, "messages", template="plain")({"messages": CONVERSATION}, 0, file="d.jsonl")


def test_encoder_length_handling_at_the_boundary(tok: Any) -> None:
    record = {"prompt": "Input: the movie was great", "completion": "positive"}
    ids, labels = encoder(tok, "prompt_completion").encode(record)
    n = len(ids)
    for overlong in ("truncate", "drop", "error"):  # exactly max_length tokens is not overlong
        out = encoder(tok, "prompt_completion", max_length=n, overlong=overlong)(record, 0, file="d.jsonl")
        assert out == {"input_ids": ids, "labels": labels, "keep": True}
    out = encoder(tok, "prompt_completion", max_length=n - 1, overlong="truncate")(record, 0, file="d.jsonl")
    assert out == {"input_ids": ids[:-1], "labels": labels[:-1], "keep": True}
    out = encoder(tok, "prompt_completion", max_length=n - 1, overlong="drop")(record, 0, file="d.jsonl")
    assert out["keep"] is False
    with pytest.raises(RecordError, match=rf"d\.jsonl: record 0: {n} tokens > max_length={n - 1}"):
        encoder(tok, "prompt_completion", max_length=n - 1, overlong="error")(record, 0, file="d.jsonl")
    # Cut before the answer: no target token is left, so the example is not kept.
    first_target = next(t for t, label in enumerate(labels) if label != IGNORE)
    out = encoder(tok, "prompt_completion", max_length=first_target)(record, 0, file="d.jsonl")
    assert out["keep"] is False
    out = encoder(tok, "prompt_completion", max_length=first_target + 1)(record, 0, file="d.jsonl")
    assert out["keep"] is True  # one target token left is enough


# ------------------------------------------------------------------------------------------------------ ChatCollator


EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, 10, 11, 12]},
]


def test_collator_pads_right_with_mask_and_ignored_labels() -> None:
    batch = ChatCollator(pad_token_id=0)(EXAMPLES)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    torch.testing.assert_close(
        batch["labels"], torch.tensor([[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 10, 11, 12]])
    )


def test_collator_pad_to_multiple_of() -> None:
    batch = ChatCollator(pad_token_id=3, pad_to_multiple_of=4)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, 3:].tolist() == [3] * 5
    assert batch["labels"][1, 5:].tolist() == [IGNORE] * 3
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    exact = ChatCollator(pad_token_id=3, pad_to_multiple_of=5)(EXAMPLES)
    assert exact["input_ids"].shape == (2, 5)  # already a multiple: unchanged


def test_collator_packs_into_one_row() -> None:
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}, *EXAMPLES]
    batch = ChatCollator(pad_token_id=0, packing=True)(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # padding-free: no attention mask
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 3, 4]]
    # The first label of every example is ignored: the previous example's last token must not predict it.
    assert batch["labels"].tolist() == [[IGNORE, 2, IGNORE, 6, 7, IGNORE, IGNORE, 10, 11, 12]]
    assert examples[0]["labels"] == [1, 2]  # the inputs are not modified


def test_packed_batch_logits_equal_separate_runs(tok: Any, model: Any) -> None:
    """many_icl.md §3.3: restarting position_ids, no attention mask and use_cache=False keep examples apart."""
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "what is 3 + 4?"}, {"role": "assistant", "content": "7"}],
        [{"role": "user", "content": "a photo of a dog"}, {"role": "assistant", "content": "dog"}],
    ]
    examples = [dict(zip(("input_ids", "labels"), encode_messages(tok, c), strict=True)) for c in conversations]
    batch = ChatCollator(tok.pad_token_id, packing=True)(examples)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        )
        alone = [
            model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]), use_cache=False)
            for e in examples
        ]
        causal = model(input_ids=batch["input_ids"], use_cache=False).logits  # one long sequence, for contrast
    offset = 0
    for example, out in zip(examples, alone, strict=True):
        n = len(example["input_ids"])
        torch.testing.assert_close(packed.logits[0, offset : offset + n], out.logits[0], atol=1e-5, rtol=0)
        if offset:  # later examples really would see earlier ones without the packed positions
            assert (causal[0, offset : offset + n] - out.logits[0]).abs().max() > 1e-3
        offset += n
    # Mean loss over all targets == target-count-weighted mean of the separate losses (no target crosses a boundary).
    counts = [sum(label != IGNORE for label in e["labels"][1:]) for e in examples]
    separate = sum(c * o.loss for c, o in zip(counts, alone, strict=True)) / sum(counts)
    torch.testing.assert_close(packed.loss, separate, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- ChatDataModule


def test_datamodule_needs_a_tokenizer(tmp_path: Path) -> None:
    dm = ChatDataModule(write_jsonl(tmp_path / "d.jsonl", pc_records(2)))
    with pytest.raises(ValueError, match=r"ChatDataModule needs a tokenizer: pass tokenizer=.*connect\(\)"):
        dm.setup("fit")


def test_datamodule_connect_by_name_loads_the_tokenizer(tok: Any, tmp_path: Path) -> None:
    dm = ChatDataModule(write_jsonl(tmp_path / "d.jsonl", pc_records(2)), batch_size=2)
    dm.connect("tiny/causal-lm")
    assert dm.hparams.tokenizer == "tiny/causal-lm"
    dm.setup("fit")
    assert dm.tokenizer is not tok
    assert dm.tokenizer.get_vocab() == tok.get_vocab()
    assert len(dm.datasets["train"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_length": 1}, "max_length must be >= 2"), ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)")],
    ids=["max_length", "val_fraction"],
)
def test_datamodule_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChatDataModule("unused.jsonl", **kwargs)


def test_datamodule_end_to_end_mixed_files(tok: Any, tmp_path: Path) -> None:
    import datasets

    messages = chat_records(3)
    prompt_completion = pc_records(4)
    parquet = chat_records(6)[3:]
    write_jsonl(tmp_path / "a_chat.jsonl", messages)
    write_jsonl(tmp_path / "b_pc.jsonl", prompt_completion)
    datasets.Dataset.from_list(parquet).to_parquet(str(tmp_path / "c_chat.parquet"))
    dm = datamodule(tok, [str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")], batch_size=3)
    dm.setup("fit")
    assert "val" not in dm.datasets
    assert dm.val_dataloader() == []

    expected = [encode_messages(tok, r["messages"]) for r in messages]
    for r in prompt_completion:
        turns = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        expected.append(encode_messages(tok, turns, supervise_from=1))
    expected += [encode_messages(tok, r["messages"]) for r in parquet]
    expected_rows = [(tuple(i), tuple(label)) for i, label in expected]
    assert rows(dm.datasets["train"]) == expected_rows  # files in glob order, records in file order

    seen = []
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[0] <= 3
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            assert mask[:n].all()
            assert (ids[n:] == tok.pad_token_id).all()
            assert (labels[n:] == IGNORE).all()
            seen.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    assert sorted(seen) == sorted(expected_rows)  # one epoch yields every example exactly once
    assert seen != expected_rows  # shuffled


def test_datamodule_custom_fields_plain_template_and_packing(tok: Any, tmp_path: Path) -> None:
    records = [{"question": f"Question: what is {i} + 4?\nAnswer:", "answer": f" {i + 4}"} for i in range(4)]
    dm = datamodule(
        tok,
        write_jsonl(tmp_path / "qa.jsonl", records),
        template="plain",
        prompt_field="question",
        completion_field="answer",
        packing=True,
        batch_size=4,
    )
    dm.setup("fit")
    expected = [encode_plain(tok, r["question"], r["answer"]) for r in records]
    assert rows(dm.datasets["train"]) == [(tuple(i), tuple(label)) for i, label in expected]
    batch = next(iter(dm.train_dataloader()))
    total = sum(len(i) for i, _ in expected)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["position_ids"].shape == (1, total)
    assert int((batch["position_ids"] == 0).sum()) == 4
    assert int((batch["labels"] == tok.eos_token_id).sum()) == 4  # every example keeps its eos target


def test_datamodule_pad_to_multiple_and_eval_batch_size(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", pc_records(4))
    val = write_jsonl(tmp_path / "val.jsonl", pc_records(5, start=10))
    dm = datamodule(tok, train, val_files=val, batch_size=2, eval_batch_size=4, pad_to_multiple_of=16, val_fraction=0.5)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4  # val_files given: val_fraction does not split the training data
    val_rows = rows(dm.datasets["val"])
    assert val_rows == [
        (tuple(i), tuple(label))
        for i, label in (encoder(tok, "prompt_completion").encode(r) for r in pc_records(5, start=10))
    ]
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 1]
    assert all(b["input_ids"].shape[1] % 16 == 0 for b in batches)
    unpadded = [
        tuple(ids[mask.bool()].tolist())
        for b in batches
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]
    assert unpadded == [ids for ids, _ in val_rows]  # validation batches keep file order


def test_datamodule_val_fraction_split_is_seeded(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", pc_records(20))

    def split(seed: int, stage: str = "fit") -> tuple[list[Any], list[Any]]:
        dm = datamodule(tok, path, val_fraction=0.25, seed=seed)
        dm.setup(stage)
        return rows(dm.datasets["train"]), rows(dm.datasets["val"])

    train, val = split(0)
    assert len(train) == 15
    assert len(val) == 5
    everything = datamodule(tok, path)
    everything.setup("fit")
    assert sorted(train + val) == sorted(rows(everything.datasets["train"]))  # a partition of all records
    assert split(0) == (train, val)  # same seed, same split
    assert split(0, "validate")[1] == val  # validate alone builds the same held-out part
    assert set(split(1)[1]) != set(val)  # another seed, another split


def test_datamodule_stages_and_missing_splits(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", pc_records(2))
    test = write_jsonl(tmp_path / "test.jsonl", chat_records(3))
    dm = datamodule(tok, train, test_files=test, batch_size=2)
    dm.setup("test")
    assert set(dm.datasets) == {"test"}  # only what the stage needs
    assert [b["input_ids"].shape[0] for b in dm.test_dataloader()] == [2, 1]
    with pytest.raises(ValueError, match="no train data"):
        dm.train_dataloader()
    dm = datamodule(tok, train)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"no test data: set test_files"):
        dm.test_dataloader()


def test_datamodule_system_prompt(tok: Any, tmp_path: Path) -> None:
    dm = datamodule(tok, write_jsonl(tmp_path / "d.jsonl", chat_records(2)), system_prompt="Be brief.")
    dm.setup("fit")
    for row in dm.datasets["train"]:
        assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        assert "Be brief." not in "".join(spans(tok, row["labels"]))


def overlong_file(tok: Any, tmp_path: Path) -> tuple[str, int, int]:
    """Two records, the second longer and on line 3 (after a blank line); returns the file and both lengths."""
    records = [
        {"prompt": "Input: the movie was great", "completion": "positive"},
        {"prompt": "Input: the movie was great", "completion": "positive, but the food was terrible"},
    ]
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(records[0]), "", json.dumps(records[1])])
    short, long = (len(encoder(tok, "prompt_completion").encode(r)[0]) for r in records)
    assert short < long
    return path, short, long


def test_datamodule_overlong_truncate(tok: Any, tmp_path: Path) -> None:
    path, short, long = overlong_file(tok, tmp_path)
    dm = datamodule(tok, path, max_length=short)
    dm.setup("fit")
    (ids0, labels0), (ids1, labels1) = rows(dm.datasets["train"])
    assert len(ids0) == len(ids1) == short
    full1, full_labels1 = encoder(tok, "prompt_completion").encode(
        {"prompt": "Input: the movie was great", "completion": "positive, but the food was terrible"}
    )
    assert (list(ids1), list(labels1)) == (full1[:short], full_labels1[:short])  # the tail is cut
    assert spans(tok, list(labels1))[0].startswith("positive")


def test_datamodule_overlong_drop_warns(tok: Any, tmp_path: Path) -> None:
    path, short, long = overlong_file(tok, tmp_path)
    dm = datamodule(tok, path, max_length=short, overlong="drop")
    with pytest.warns(UserWarning, match=rf"long\.jsonl: skipped 1 of 2 records .*max_length={short}"):
        dm.setup("fit")
    assert [len(r["input_ids"]) for r in dm.datasets["train"]] == [short]  # exactly max_length is kept


def test_datamodule_overlong_error_names_line(tok: Any, tmp_path: Path) -> None:
    path, short, long = overlong_file(tok, tmp_path)
    dm = datamodule(tok, path, max_length=short, overlong="error")
    with pytest.raises(RecordError, match=rf"long\.jsonl:3: {long} tokens > max_length={short}$"):
        dm.setup("fit")


def test_datamodule_skips_records_without_target_tokens(tok: Any, tmp_path: Path) -> None:
    long_prompt = " ".join(["the movie was great"] * 8)
    records = [{"prompt": "Input: ok", "completion": "positive"}, {"prompt": long_prompt, "completion": "negative"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    max_length = len(encoder(tok, "prompt_completion").encode(records[0])[0])
    dm = datamodule(tok, path, max_length=max_length)  # truncating the long prompt cuts its answer away
    with pytest.warns(UserWarning, match="skipped 1 of 2 records .*kept no target token"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 1
    dm = datamodule(tok, write_jsonl(tmp_path / "only.jsonl", records[1:]), max_length=max_length)
    with (
        pytest.raises(ValueError, match=r"no usable train records in \[.*only\.jsonl'\]"),
        pytest.warns(UserWarning, match="skipped 1 of 1"),
    ):
        dm.setup("fit")


def test_datamodule_skips_empty_file_with_warning(tok: Any, tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", [""])
    write_jsonl(tmp_path / "b.jsonl", pc_records(2))
    dm = datamodule(tok, str(tmp_path / "*.jsonl"))
    with pytest.warns(UserWarning, match=r"a\.jsonl: no records"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 2


# ------------------------------------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "invalid_json": (
        ['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a", "completion": "b"'],
        r":3: invalid JSON",
    ),
    "completion_number": (
        ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 5}'],
        r":2: field 'completion': must be a string or a list of messages, got int",
    ),
    "missing_prompt": (
        ['{"prompt": "a", "completion": "b"}', "", "", '{"completion": "b"}'],
        r":4: field 'prompt': missing",
    ),
    "empty_completion": (['{"prompt": "a", "completion": ""}'], r":1: field 'completion': is empty"),
    "bad_role": (
        [
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        ],
        r":2: field 'messages\[1\]\.role': must be one of \('system', 'user', 'assistant', 'tool'\), got 'bot'",
    ),
    "content_not_string": (
        ['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}'],
        r":1: field 'messages\[0\]\.content': must be a string, got int",
    ),
    "messages_not_list": (
        ['{"messages": [{"role": "assistant", "content": "b"}]}', "", '{"messages": "hello"}'],
        r":3: field 'messages': must be a non-empty list of messages, got str",
    ),
    "no_assistant": (
        ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "", "", ""]
        + ['{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}'],
        r":5: field 'messages': has no assistant message, so nothing would be trained on",
    ),
    "conversational_prompt_bad_role": (
        ['{"prompt": [{"role": "human", "content": "a"}], "completion": "b"}'],
        r":1: field 'prompt\[0\]\.role': must be one of",
    ),
    "unknown_keys": (
        ['{"text": "a"}'],
        r":1: has keys \['text'\] but needs 'messages', or 'prompt' and 'completion'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_datamodule_bad_input_names_file_line_and_field(tok: Any, tmp_path: Path, case: str) -> None:
    lines, match = BAD_INPUT[case]
    path = write_lines(tmp_path / "file.jsonl", lines)
    dm = datamodule(tok, path)
    with pytest.raises(RecordError, match=r"file\.jsonl" + match):
        dm.setup("fit")


def test_datamodule_unsupported_suffix_and_missing_file(tok: Any, tmp_path: Path) -> None:
    dm = datamodule(tok, write_lines(tmp_path / "train.csv", ["prompt,completion", "a,b"]))
    with pytest.raises(ValueError, match=r"train\.csv: unsupported data file type '\.csv'"):
        dm.setup("fit")
    dm = datamodule(tok, str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl"):
        dm.setup("fit")
    dm = datamodule(tok, str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nothing\*\.jsonl"):
        dm.setup("fit")


def test_datamodule_inconsistent_template_names_record(tok: Any, tmp_path: Path) -> None:
    records = [{"messages": CONVERSATION[:2]}, {"messages": CONVERSATION}]  # one turn renders fine, two do not
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(records[0]), "", json.dumps(records[1])])
    dm = datamodule(with_template(tok, DROPS_EARLIER_ASSISTANT), path)
    with pytest.raises(RecordError, match=r"chat\.jsonl:3: field 'messages': the chat template renders .* message 1"):
        dm.setup("fit")


def test_datamodule_template_exception_names_record(tok: Any, tmp_path: Path) -> None:
    records = [{"messages": CONVERSATION}, {"messages": [{"role": "system", "content": "x"}, *CONVERSATION]}]
    dm = datamodule(with_template(tok, REFUSES_SYSTEM), write_jsonl(tmp_path / "chat.jsonl", records))
    with pytest.raises(RecordError, match=r"chat\.jsonl:2: field 'messages': .*system messages are not supported"):
        dm.setup("fit")


def test_datamodule_template_error_on_prompt_completion_names_no_absent_field(tok: Any, tmp_path: Path) -> None:
    dm = datamodule(with_template(tok, THINKING_PROMPT), write_jsonl(tmp_path / "pc.jsonl", pc_records(1)))
    with pytest.raises(RecordError, match=r"pc\.jsonl:1: the chat template renders") as info:
        dm.setup("fit")
    assert info.value.field is None  # the record has no 'messages' field to blame


def test_datamodule_plain_template_rejects_messages(tok: Any, tmp_path: Path) -> None:
    dm = datamodule(tok, write_jsonl(tmp_path / "chat.jsonl", chat_records(1)), template="plain")
    with pytest.raises(RecordError, match=r"chat\.jsonl:1: field 'messages': template='plain' needs prompt/completion"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------------------------- resume


def test_train_dataloader_resumes_mid_epoch(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", pc_records(12))

    def loader() -> Any:
        dm = datamodule(tok, path, batch_size=2, seed=3)
        dm.setup("fit")
        return dm.train_dataloader()

    def epoch(dataloader: Any, number: int) -> list[Any]:
        dataloader.sampler.set_epoch(number)  # what Lightning does at the start of every epoch
        return [b["input_ids"] for b in dataloader]

    uninterrupted = loader()
    reference = [epoch(uninterrupted, e) for e in range(2)]  # two epochs, 6 batches each
    assert not all(torch.equal(a, b) for a, b in zip(*reference, strict=True))  # epochs are reshuffled

    # torch's RandomSampler: Lightning recognises it as shuffled and shuffles its DistributedSampler under DDP.
    assert isinstance(uninterrupted.sampler, torch.utils.data.RandomSampler)

    first = loader()
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == 3
    for got, want in zip(rest, reference[0][3:], strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(epoch(resumed, 1), reference[1], strict=True):  # and the next epoch
        torch.testing.assert_close(got, want)
