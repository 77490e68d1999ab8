"""Supervised fine-tuning data: prompt/completion or chat ``messages`` records → token ids and completion-only labels.

Record formats (JSONL, JSON or Parquet; detected per file from the first record):

- prompt/completion: ``{"prompt": str | list[message], "completion": str | list[message]}``. With the chat template
  the prompt becomes a user turn (or the given turns) and the completion the assistant turn; only the completion is
  supervised.
- messages: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``. Every assistant
  turn is supervised (content and end-of-turn marker); everything else is context.

Masks come from token boundaries between renderings of the conversation prefix (never from searching for a response
template), so they work with any chat template that renders prefixes consistently; one that does not (e.g. a template
that rewrites earlier turns) raises an error naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ftmods.datamodules.records import RecordError, as_file_list, check_record, load_datamodule_tokenizer, load_records
from ftmods.datamodules.samplers import epoch_loader
from ftmods.ops.tokens import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]


class ChatBatch(TypedDict, total=False):
    """A collated SFT batch.

    Padded: ``(B, T)`` tensors with ``attention_mask``. Packed: ``(1, ΣT)`` with ``position_ids`` restarting at 0 for
    each example and no ``attention_mask`` (padding-free).
    """

    input_ids: Tensor  # (B, T) long
    labels: Tensor  # (B, T) long, IGNORE_INDEX where not supervised (prompt, padding, first token of a segment)
    attention_mask: Tensor  # (B, T) long, padded batches only
    position_ids: Tensor  # (1, ΣT) long, packed batches only


# ----------------------------------------------------------------------------------------------- record validation


def _check_messages(messages: Any, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TypeError((field, f"must be a non-empty list of messages, got {type(messages).__name__}"))
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError((f"{field}[{i}]", f"must be an object with 'role' and 'content', got {message!r:.60}"))
        if message.get("role") not in ROLES:
            raise ValueError((f"{field}[{i}].role", f"must be one of {ROLES}, got {message.get('role')!r}"))
        if not isinstance(message.get("content"), str):
            got = type(message.get("content")).__name__
            raise TypeError((f"{field}[{i}].content", f"must be a string, got {got}"))


def validate_record(record: dict[str, Any], fmt: str, fields: dict[str, str]) -> None:
    """Check one record of format ``messages`` or ``prompt_completion``; raises with ``(field, problem)`` args."""
    if fmt == "messages":
        field = fields["messages"]
        if field not in record:
            raise KeyError((field, "missing"))
        _check_messages(record[field], field)
        if not any(m["role"] == "assistant" for m in record[field]):
            raise ValueError((field, "has no assistant message, so nothing would be trained on"))
        return
    for key in ("prompt", "completion"):
        field = fields[key]
        if field not in record or record[field] is None:
            raise KeyError((field, "missing"))
        value = record[field]
        if isinstance(value, list):
            _check_messages(value, field)
        elif not isinstance(value, str):
            raise TypeError((field, f"must be a string or a list of messages, got {type(value).__name__}"))
        elif key == "completion" and not value:
            raise ValueError((field, "is empty, so nothing would be trained on"))


# ------------------------------------------------------------------------------------------------------- encoding


class TemplateError(ValueError):
    """The chat template does not render conversation prefixes as prefixes of the whole conversation."""


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError as JinjaError

    try:
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
    except JinjaError as error:  # e.g. the template's raise_exception("roles must alternate ...")
        raise TemplateError(f"the chat template failed: {error}") from None
    return list(ids)


def encode_messages(tokenizer: Any, messages: list[Message], *, supervise_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that supervise assistant turns at index ≥ ``supervise_from``.

    Each assistant turn ``i`` is located as the tokens between the rendering of ``messages[:i]`` with the generation
    prompt and the rendering of ``messages[:i+1]``; the end-of-turn marker (with whatever the template renders after
    it, e.g. ChatML's newline) is part of the target, the role header is not. Raises :class:`TemplateError` when either
    rendering is not a token prefix of the whole conversation, when the template itself raises, or when a supervised
    assistant turn opens the conversation (an empty conversation cannot be rendered, so its header is not locatable).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < supervise_from:
            continue
        if i == 0:
            raise TemplateError(
                "message 0 is an assistant turn; start with a system or user message (or system_prompt)"
            )
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise TemplateError(f"the chat template renders the conversation up to message {i} unlike the whole")
        labels[len(prompt) : len(upto)] = full[len(prompt) : len(upto)]
    return full, labels


def encode_plain(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``[bos] prompt completion eos`` without a chat template; only ``completion eos`` is supervised."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None and completion_ids[-1:] != [tokenizer.eos_token_id]:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _as_messages(value: str | list[Message], role: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else [dict(m) for m in value]


class ChatEncoder:
    """Turns one validated record into ``input_ids`` / ``labels`` (a picklable callable for ``datasets.map``)."""

    def __init__(
        self,
        tokenizer: Any,
        fmt: str,
        fields: dict[str, str],
        *,
        template: Literal["chat", "plain"],
        system_prompt: str | None,
        max_length: int,
        overlong: Literal["truncate", "drop", "error"],
    ) -> None:
        self.tokenizer, self.fmt, self.fields = tokenizer, fmt, fields
        self.template, self.system_prompt = template, system_prompt
        self.max_length, self.overlong = max_length, overlong

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Ids and labels of one record, before length handling."""
        if self.fmt == "messages":
            messages, supervise_from = _as_messages(record[self.fields["messages"]], "user"), 0
        else:
            prompt, completion = record[self.fields["prompt"]], record[self.fields["completion"]]
            if self.template == "plain":
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise TypeError((self.fields["prompt"], "template='plain' needs string prompt and completion"))
                return encode_plain(self.tokenizer, prompt, completion)
            messages = _as_messages(prompt, "user")
            supervise_from = len(messages)
            messages += _as_messages(completion, "assistant")
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
            supervise_from += 1
        if self.template == "plain":
            raise TypeError((self.fields["messages"], "template='plain' needs prompt/completion records"))
        return encode_messages(self.tokenizer, messages, supervise_from=supervise_from)

    def __call__(self, record: dict[str, Any], index: int, *, file: str) -> dict[str, Any]:
        """``datasets.map`` function: adds ``input_ids``, ``labels`` and ``keep`` (false = dropped)."""
        check_record(file, index, record, lambda r: validate_record(r, self.fmt, self.fields))
        try:
            ids, labels = self.encode(record)
        except TemplateError as error:
            field = self.fields["messages"] if self.fmt == "messages" else None
            raise RecordError(file, index, field, str(error)) from None
        except (TypeError, ValueError) as error:
            field, problem = error.args[0] if error.args and isinstance(error.args[0], tuple) else (None, str(error))
            raise RecordError(file, index, field, problem) from None
        too_long = len(ids) > self.max_length
        if too_long:
            if self.overlong == "error":
                raise RecordError(file, index, None, f"{len(ids)} tokens > max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        keep = not (too_long and self.overlong == "drop") and any(x != IGNORE_INDEX for x in labels[1:])
        return {"input_ids": ids, "labels": labels, "keep": keep}


def detect_format(record: dict[str, Any], fields: dict[str, str], file: str) -> str:
    """``messages`` or ``prompt_completion`` from the keys of a file's first record."""
    if fields["messages"] in record:
        return "messages"
    if fields["prompt"] in record and fields["completion"] in record:
        return "prompt_completion"
    wanted = f"{fields['messages']!r}, or {fields['prompt']!r} and {fields['completion']!r}"
    raise RecordError(file, 0, None, f"has keys {sorted(record)} but needs {wanted}")


# -------------------------------------------------------------------------------------------------------- collate


class ChatCollator:
    """Pads a list of ``{"input_ids", "labels"}`` examples, or packs them into one padding-free row.

    Args:
        pad_token_id: Id used for padding (never supervised).
        packing: Concatenate the examples into a single row with ``position_ids`` restarting at 0 per example and no
            attention mask. The model must run with ``use_cache=False`` to keep examples apart.
        pad_to_multiple_of: Round the padded length up (tensor-core friendly shapes).
    """

    def __init__(self, pad_token_id: int, *, packing: bool = False, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.packing, self.pad_to_multiple_of = pad_token_id, packing, pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> ChatBatch:
        """Collate examples into a :class:`ChatBatch`."""
        if self.packing:
            return self._pack(examples)
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
        return ChatBatch(input_ids=input_ids, labels=labels, attention_mask=attention_mask)

    @staticmethod
    def _pack(examples: Sequence[dict[str, Any]]) -> ChatBatch:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        labels = [torch.as_tensor(e["labels"], dtype=torch.long).clone() for e in examples]
        for row in labels:
            row[0] = IGNORE_INDEX  # the previous example's last token must not predict this one's first
        positions = [torch.arange(len(x)) for x in ids]
        return ChatBatch(
            input_ids=torch.cat(ids)[None],  # (1, ΣT)
            labels=torch.cat(labels)[None],  # (1, ΣT)
            position_ids=torch.cat(positions)[None],  # (1, ΣT)
        )


# ----------------------------------------------------------------------------------------------------- DataModule


class ChatDataModule(LightningDataModule):
    """Prompt/completion or chat-messages files for supervised fine-tuning, with completion-only labels.

    Args:
        train_files: Training file(s): ``.jsonl``, ``.json`` or ``.parquet``; glob patterns allowed.
        val_files: Validation file(s). If absent and ``val_fraction > 0``, a seeded split of the training data.
        test_files: Test file(s).
        tokenizer: Hub id or folder of the tokenizer. ``None`` under ``ftmods`` CLI means "the model's
            ``pretrained``" (filled in by the CLI); from Python, pass it or call :meth:`connect`.
        template: ``chat`` renders records with the tokenizer's chat template; ``plain`` concatenates prompt and
            completion text and appends eos (base models without a template).
        system_prompt: System message inserted when a conversation has none (chat template only).
        prompt_field: Record key of the prompt.
        completion_field: Record key of the completion.
        messages_field: Record key of the message list.
        max_length: Longest example in tokens.
        overlong: What to do with longer examples: cut the tail (``truncate``), skip them (``drop``) or stop with an
            error naming the record (``error``). Examples left with no supervised token are always skipped.
        packing: Padding-free packing: each batch becomes one row of concatenated examples.
        batch_size: Examples per batch (per device).
        eval_batch_size: Examples per validation/test batch; defaults to ``batch_size``.
        val_fraction: Fraction of the training records held out for validation when ``val_files`` is not given.
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        seed: Seed of the shuffling and of the validation split.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.

    Example::

        dm = ChatDataModule("train.jsonl", tokenizer="Qwen/Qwen2.5-0.5B-Instruct", batch_size=8)
        trainer.fit(SFTModule("Qwen/Qwen2.5-0.5B-Instruct"), datamodule=dm)
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        *,
        tokenizer: str | None = None,
        template: Literal["chat", "plain"] = "chat",
        system_prompt: str | None = None,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        messages_field: str = "messages",
        max_length: int = 2048,
        overlong: Literal["truncate", "drop", "error"] = "truncate",
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.fields = {"prompt": prompt_field, "completion": completion_field, "messages": messages_field}
        self.tokenizer: Any = None  # loaded in setup()
        self.datasets: dict[str, Any] = {}  # split name -> tokenized datasets.Dataset, built in setup()

    def connect(self, tokenizer: Any) -> None:
        """Use this tokenizer (an object or a hub id / folder) instead of ``tokenizer=``."""
        if isinstance(tokenizer, str):
            self.hparams["tokenizer"] = tokenizer
        else:
            self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """Load the tokenizer and tokenize the splits that ``stage`` needs (cached by ``datasets``)."""
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        hp = self.hparams
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        files = {"train": hp["train_files"], "val": hp["val_files"], "test": hp["test_files"]}
        for split in wanted:
            if split in self.datasets:
                continue
            if split == "val" and hp["val_files"] is None:
                if hp["val_fraction"] > 0:
                    self._split_validation()
                continue
            self.datasets[split] = self._tokenize_files(as_file_list(files[split]), split)

    def _load_tokenizer(self) -> Any:
        return load_datamodule_tokenizer(
            type(self).__name__, self.hparams["tokenizer"], self.hparams["trust_remote_code"]
        )

    def _split_validation(self) -> None:
        if "train" not in self.datasets:
            self.datasets["train"] = self._tokenize_files(as_file_list(self.hparams["train_files"]), "train")
        parts = self.datasets["train"].train_test_split(
            test_size=self.hparams["val_fraction"], seed=self.hparams["seed"]
        )
        self.datasets["train"], self.datasets["val"] = parts["train"], parts["test"]

    def _tokenize_files(self, files: list[str], split: str) -> Any:
        import datasets

        encoder = ChatEncoder(
            self.tokenizer,
            "",
            self.fields,
            template=self.hparams["template"],
            system_prompt=self.hparams["system_prompt"],
            max_length=self.hparams["max_length"],
            overlong=self.hparams["overlong"],
        )
        parts = []
        for file in files:
            raw = load_records(file, self._validate_any)
            if len(raw) == 0:
                rank_zero_warn(f"{file}: no records")
                continue
            encoder.fmt = detect_format(raw[0], self.fields, file)
            encoded = raw.map(
                encoder,
                with_indices=True,
                fn_kwargs={"file": file},
                remove_columns=raw.column_names,
                desc=f"Tokenizing {split} ({file})",
            )
            kept = encoded.filter(lambda keep: keep, input_columns="keep").remove_columns("keep")
            if len(kept) < len(encoded):
                rank_zero_warn(
                    f"{file}: skipped {len(encoded) - len(kept)} of {len(encoded)} records that were longer than "
                    f"max_length={self.hparams['max_length']} (overlong={self.hparams['overlong']!r}) or kept no "
                    "target token"
                )
            if len(kept):
                parts.append(kept)
        if not parts:
            raise ValueError(f"no usable {split} records in {files}")
        dataset = datasets.concatenate_datasets(parts)
        rank_zero_info(f"{split}: {len(dataset)} examples from {len(files)} file(s)")
        return dataset

    def _validate_any(self, record: dict[str, Any]) -> None:
        fmt = "messages" if self.fields["messages"] in record else "prompt_completion"
        validate_record(record, fmt, self.fields)

    def _collator(self) -> ChatCollator:
        hp = self.hparams
        return ChatCollator(
            self.tokenizer.pad_token_id, packing=hp["packing"], pad_to_multiple_of=hp["pad_to_multiple_of"]
        )

    def _loader(self, split: str, *, train: bool) -> Any:
        if split not in self.datasets:
            raise ValueError(f"no {split} data: set {split}_files (or val_fraction for validation)")
        size = self.hparams["batch_size"] if train else (self.hparams["eval_batch_size"] or self.hparams["batch_size"])
        return epoch_loader(
            self.datasets[split],
            trainer=self.trainer,
            seed=self.hparams["seed"],
            shuffle=train,
            batch_size=size,
            collate_fn=self._collator(),
            num_workers=self.hparams["num_workers"],
        )

    def train_dataloader(self) -> Any:
        """Shuffled, resumable mid-epoch (``StatefulDataLoader`` state is saved in Lightning checkpoints)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        """Validation batches in file order; empty when there is no validation data."""
        return self._loader("val", train=False) if "val" in self.datasets else []

    def test_dataloader(self) -> Any:
        """Test batches in file order."""
        return self._loader("test", train=False)
