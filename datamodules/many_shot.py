r"""Many-shot in-context fine-tuning episodes (ManyICL / ManyICFT, arXiv 2506.11103) from task-labelled records.

One training row is one **episode**: the instruction of one task followed by as many whole examples of that task as
fit in ``max_length`` tokens (never a cut example), with **every answer** supervised. Each token records the index of
the answer it belongs to (``shot_index``: answer ``k`` is conditioned on ``k`` demonstrations), so a module can
bucket the loss by shot count. Episodes are tokenized segment by segment (header, then prefix / answer per shot), so
the supervised spans come from segment boundaries and never from searching for token patterns (spec P1), and
evaluation prompts are built by the same code so that their ids equal what training saw.

Record format (``.jsonl``, ``.json`` or ``.parquet``; many tasks per file, or many files)::

    {"task": "sst2", "instruction": "Classify the sentiment.", "input": "the movie was great", "output": "positive",
     "options": ["positive", "negative"], "metric": "accuracy", "family": "classification", "split": "train"}

- required: ``task``, ``input``, ``output`` (non-empty) strings;
- optional: ``instruction`` (the task's instruction is the first non-empty one seen), ``options`` (a list of strings
  containing ``output``; evaluation then scores options), ``metric`` (one of :data:`METRICS`; default ``accuracy``
  with options, else ``exact_match``), ``family`` and ``split`` (informational: the files decide a record's role).

Plain template (the default; the separator sits inside the answer span so the model learns to stop, spec P5)::

    [bos] {instruction}{sep} | Input: {x_0}\nOutput: | ␣{y_0}{sep} | Input: {x_1}\nOutput: | ␣{y_1}{sep} | ...

Chat template (``template="chat"``): ``system = instruction``, then ``user = x_i`` / ``assistant = y_i`` per shot,
rendered with the tokenizer's chat template; the segments are the text differences between renderings of growing
conversation prefixes (as :func:`~ftmods.datamodules.chat.encode_messages` does with tokens). An answer segment is
the assistant content plus whatever the template renders up to the next turn (end-of-turn marker, newline). Without
an instruction, a default system turn that the template inserts belongs to the first prefix segment.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from ftmods.datamodules.chat import TemplateError
from ftmods.datamodules.records import (
    as_file_list,
    check_record,
    load_datamodule_tokenizer,
    load_records,
    record_location,
)
from ftmods.datamodules.samplers import resumable_loader
from ftmods.ops.tokens import IGNORE_INDEX

METRICS = ("accuracy", "rouge_l", "f1_em", "exact_match", "exact_match_numeric")
"""Allowed values of a record's ``metric``."""
DEFAULT_INPUT_TEMPLATE = "Input: {input}\nOutput:"
"""Prefix of every shot in the plain template; the answer follows as ``" {output}{separator}"``."""
DEFAULT_SEPARATOR = "\n\n"
"""Ends the instruction and every answer (inside the supervised span)."""

Template = Literal["plain", "chat"]
TargetScope = Literal["answers", "examples"]
TaskSampling = Literal["uniform", "proportional", "temperature"]
PieceKind = Literal["header", "prefix", "answer"]
Piece = tuple[str, PieceKind]
Shots = int | tuple[int, int] | None

_EVAL_SPLITS = ("eval", "validation", "val", "dev", "test")


# ------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ManyShotRecord:
    """One example of a task, as read from a file (``file`` / ``index`` locate it for error messages)."""

    task: str
    input: str
    output: str
    instruction: str | None = None
    options: tuple[str, ...] | None = None
    metric: str = "exact_match"
    family: str | None = None
    split: str | None = None
    file: str = "<records>"
    index: int = 0

    @property
    def location(self) -> str:
        """``file:line`` of a JSONL record, else ``file: record N``."""
        return record_location(self.file, self.index)


def _fields(
    instruction_field: str = "instruction", input_field: str = "input", output_field: str = "output"
) -> dict[str, str]:
    return {
        "task": "task",
        "instruction": instruction_field,
        "input": input_field,
        "output": output_field,
        "options": "options",
        "metric": "metric",
        "family": "family",
        "split": "split",
    }


def _required_str(record: dict[str, Any], field: str, *, empty_ok: bool = False) -> None:
    value = record.get(field)
    if value is None:
        raise KeyError((field, "missing"))
    if not isinstance(value, str):
        raise TypeError((field, f"must be a string, got {type(value).__name__}"))
    if not empty_ok and not value.strip():
        raise ValueError((field, "is empty"))


def _optional_str(record: dict[str, Any], field: str) -> None:
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise TypeError((field, f"must be a string, got {type(value).__name__}"))


def _check_options(record: dict[str, Any], fields: dict[str, str]) -> None:
    options, name = record.get(fields["options"]), fields["options"]
    if options is None:
        return
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
        raise TypeError((name, f"must be a non-empty list of non-empty strings, got {options!r:.80}"))
    if record[fields["output"]] not in options:
        raise ValueError((name, f"does not contain the output {record[fields['output']]!r:.60}: {options!r:.80}"))


def validate_many_shot_record(record: dict[str, Any], fields: dict[str, str] | None = None) -> None:
    """Check one record; raises ``KeyError`` / ``TypeError`` / ``ValueError`` with ``(field, problem)`` args.

    Args:
        record: The record as read from the file.
        fields: Key overrides (``instruction``, ``input``, ``output``, ...); the defaults are the key names.
    """
    fields = fields or _fields()
    _required_str(record, fields["task"])
    _required_str(record, fields["input"], empty_ok=True)
    _required_str(record, fields["output"])
    for key in ("instruction", "family", "split", "metric"):
        _optional_str(record, fields[key])
    _check_options(record, fields)
    metric = record.get(fields["metric"])
    if metric is not None and metric not in METRICS:
        raise ValueError((fields["metric"], f"must be one of {METRICS}, got {metric!r}"))


def to_record(record: dict[str, Any], fields: dict[str, str], *, file: str, index: int) -> ManyShotRecord:
    """Validate one raw record and convert it; a malformed one raises ``RecordError`` naming file, line and field."""
    check_record(file, index, record, lambda r: validate_many_shot_record(r, fields))
    options = record.get(fields["options"])
    metric = record.get(fields["metric"]) or ("accuracy" if options else "exact_match")
    return ManyShotRecord(
        task=record[fields["task"]],
        input=record[fields["input"]],
        output=record[fields["output"]],
        instruction=record.get(fields["instruction"]) or None,
        options=tuple(options) if options else None,
        metric=metric,
        family=record.get(fields["family"]),
        split=record.get(fields["split"]),
        file=file,
        index=index,
    )


def load_many_shot_records(files: str | Sequence[str], *, fields: dict[str, str] | None = None) -> list[ManyShotRecord]:
    """All records of ``files`` (globs allowed), in file order; malformed ones raise ``RecordError``."""
    fields = fields or _fields()
    out: list[ManyShotRecord] = []
    for file in as_file_list(files):
        raw = load_records(file, lambda r: validate_many_shot_record(r, fields))
        out += [to_record(row, fields, file=file, index=index) for index, row in enumerate(raw)]
    return out


def group_by_task(records: Iterable[ManyShotRecord]) -> dict[str, list[ManyShotRecord]]:
    """Records per task, tasks in order of first appearance."""
    tasks: dict[str, list[ManyShotRecord]] = {}
    for record in records:
        tasks.setdefault(record.task, []).append(record)
    return tasks


def task_instruction(records: Iterable[ManyShotRecord]) -> str | None:
    """The first non-empty instruction among a task's records."""
    return next((r.instruction for r in records if r.instruction), None)


# ------------------------------------------------------------------------------------------------ episode builder


class EncodedEpisode(NamedTuple):
    """Token ids of an episode with, per token, its label and the answer (shot) it belongs to."""

    input_ids: list[int]
    labels: list[int]  # the token id where supervised (HF convention: shifted later), IGNORE_INDEX elsewhere
    shot_index: list[int]  # k on tokens of answer k (k demonstrations precede it), -1 elsewhere


def _render_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError as JinjaError

    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    except JinjaError as error:
        raise TemplateError(f"the chat template failed: {error}") from None


def _extend(pieces: list[Piece], before: str, after: str, kind: PieceKind) -> str:
    if not after.startswith(before):
        raise TemplateError(f"the chat template does not render the conversation before a {kind} as its prefix")
    pieces.append((after[len(before) :], kind))
    return after


def _chat_pieces(
    tokenizer: Any, instruction: str | None, shots: Sequence[tuple[str, str]], query: str | None
) -> list[Piece]:
    if tokenizer is None:
        raise ValueError("template='chat' needs the tokenizer (its chat template renders the episode)")
    messages = [{"role": "system", "content": instruction}] if instruction else []
    text = _render_text(tokenizer, messages, add_generation_prompt=False) if messages else ""
    pieces: list[Piece] = [(text, "header")] if text else []
    turns: list[tuple[str, str | None]] = [*shots, *([(query, None)] if query is not None else [])]
    for x, y in turns:
        messages.append({"role": "user", "content": x})
        text = _extend(pieces, text, _render_text(tokenizer, messages, add_generation_prompt=True), "prefix")
        if y is not None:
            messages.append({"role": "assistant", "content": y})
            text = _extend(pieces, text, _render_text(tokenizer, messages, add_generation_prompt=False), "answer")
    return pieces


def episode_pieces(
    instruction: str | None,
    shots: Sequence[tuple[str, str]],
    *,
    template: Template = "plain",
    input_template: str = DEFAULT_INPUT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
    query: str | None = None,
    tokenizer: Any = None,
) -> list[Piece]:
    r"""The text segments of an episode, each tagged ``header``, ``prefix`` or ``answer``.

    Args:
        instruction: The task instruction (plain: ``instruction + separator``; chat: the system turn); ``None`` or
            empty omits it.
        shots: ``(input, output)`` pairs in order.
        template: ``plain`` or ``chat`` (needs ``tokenizer``).
        input_template: Plain-template prefix of a shot; ``{input}`` is replaced by the input.
        separator: Plain-template separator after the instruction and after every answer (inside the answer).
        query: A final input without answer (an evaluation prompt ends with its prefix).
        tokenizer: The tokenizer whose chat template renders ``template="chat"``.

    Example:
        >>> episode_pieces("Add one.", [("1", "2")], query="5")
        [('Add one.\n\n', 'header'), ('Input: 1\nOutput:', 'prefix'), (' 2\n\n', 'answer'), ('Input: 5\nOutput:', 'prefix')]
    """  # noqa: E501
    if template == "chat":
        return _chat_pieces(tokenizer, instruction, shots, query)
    pieces: list[Piece] = [(instruction + separator, "header")] if instruction else []
    for x, y in shots:
        pieces += [(input_template.format(input=x), "prefix"), (f" {y}{separator}", "answer")]
    if query is not None:
        pieces.append((input_template.format(input=query), "prefix"))
    return pieces


def assemble_episode(
    parts: Iterable[tuple[Sequence[int], PieceKind]], *, target_scope: TargetScope = "answers", bos: int | None = None
) -> EncodedEpisode:
    """Concatenate tokenized pieces; answers (and with ``target_scope="examples"`` prefixes) are supervised.

    A prefix belongs to the shot whose answer follows it; the header is never supervised.

    Example:
        >>> assemble_episode([([7], "header"), ([1, 2], "prefix"), ([3], "answer"), ([4], "prefix"), ([5], "answer")])
        EncodedEpisode(input_ids=[7, 1, 2, 3, 4, 5], labels=[-100, -100, -100, 3, -100, 5], shot_index=[-1, -1, -1, 0, -1, 1])
    """  # noqa: E501
    ids, labels, shots = ([bos], [IGNORE_INDEX], [-1]) if bos is not None else ([], [], [])
    k = 0
    for chunk, kind in parts:
        supervised = kind == "answer" or (kind == "prefix" and target_scope == "examples")
        ids += chunk
        labels += chunk if supervised else [IGNORE_INDEX] * len(chunk)
        shots += [k if supervised else -1] * len(chunk)
        k += kind == "answer"
    return EncodedEpisode(ids, labels, shots)


def encode_episode(
    tokenizer: Any, pieces: Sequence[Piece], *, target_scope: TargetScope = "answers", add_bos: bool = True
) -> EncodedEpisode:
    """Tokenize ``pieces`` one by one (no special tokens) and concatenate, with labels and shot indices.

    Args:
        tokenizer: A Hugging Face tokenizer.
        pieces: Output of :func:`episode_pieces`.
        target_scope: ``answers`` supervises answer tokens; ``examples`` also the prefix (input) tokens of each shot.
        add_bos: Prepend ``tokenizer.bos_token_id`` when the tokenizer has one (use ``False`` for chat templates,
            which render their own).
    """
    texts = [text for text, _ in pieces]
    chunks = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id if add_bos else None
    return assemble_episode(zip(chunks, [kind for _, kind in pieces], strict=True), target_scope=target_scope, bos=bos)


# ------------------------------------------------------------------------------------------------------- encoder


@dataclass
class EncodedTask:
    """A task's demonstration pool with cached token counts (and, for the plain template, cached token ids)."""

    name: str
    instruction: str | None
    records: list[ManyShotRecord]
    header: list[int]
    """bos + instruction segment ids (plain); the rendered system turn (chat)."""
    lengths: list[int]
    """Tokens per example (prefix + answer); exact for the plain template, first-shot estimate for chat."""
    prefix_ids: list[list[int]]
    """Plain template: ids of each record's prefix (empty for chat)."""
    answer_ids: list[list[int]]
    """Plain template: ids of each record's answer span (empty for chat)."""

    @property
    def files(self) -> list[str]:
        """The files the records come from."""
        return sorted({r.file for r in self.records})


class ManyShotEncoder:
    """Builds training episodes and evaluation prompts of tasks with one template, consistently.

    Args:
        tokenizer: A Hugging Face tokenizer.
        template: ``plain`` or ``chat``.
        input_template: Plain-template shot prefix with ``{input}``.
        separator: Plain-template separator (inside every answer span).
        target_scope: ``answers`` or ``examples`` (see :func:`encode_episode`).
        max_length: Longest episode / prompt + answer in tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: Template = "plain",
        input_template: str = DEFAULT_INPUT_TEMPLATE,
        separator: str = DEFAULT_SEPARATOR,
        target_scope: TargetScope = "answers",
        max_length: int = 2048,
    ) -> None:
        self.tokenizer, self.template, self.target_scope = tokenizer, template, target_scope
        self.input_template, self.separator, self.max_length = input_template, separator, max_length
        bos = tokenizer.bos_token_id
        self.bos: int | None = bos if template == "plain" else None

    @property
    def stop(self) -> str:
        """The text that ends an answer: the separator (plain), or the tokenizer's eos token (chat)."""
        return self.separator if self.template == "plain" else str(self.tokenizer.eos_token or self.separator)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def pieces(
        self, instruction: str | None, shots: Sequence[tuple[str, str]], query: str | None = None
    ) -> list[Piece]:
        """:func:`episode_pieces` with this encoder's template settings."""
        return episode_pieces(
            instruction,
            shots,
            template=self.template,
            input_template=self.input_template,
            separator=self.separator,
            query=query,
            tokenizer=self.tokenizer,
        )

    def encode_pieces(self, pieces: Sequence[Piece]) -> EncodedEpisode:
        """:func:`encode_episode` with this encoder's settings."""
        return encode_episode(self.tokenizer, pieces, target_scope=self.target_scope, add_bos=self.bos is not None)

    def task(self, name: str, records: list[ManyShotRecord], instruction: str | None = None) -> EncodedTask:
        """Tokenize a task's pool once (plain) or measure its examples (chat)."""
        instruction = instruction or task_instruction(records)
        if self.template == "plain":
            header = self._bos_list + (self._tokenize([instruction + self.separator])[0] if instruction else [])
            prefixes = self._tokenize([self.input_template.format(input=r.input) for r in records])
            answers = self._tokenize([f" {r.output}{self.separator}" for r in records])
            lengths = [len(p) + len(a) for p, a in zip(prefixes, answers, strict=True)]
            return EncodedTask(name, instruction, records, header, lengths, prefixes, answers)
        header = self.encode_pieces(self.pieces(instruction, [])).input_ids
        lengths = [
            len(self.encode_pieces(self.pieces(instruction, [(r.input, r.output)])).input_ids) - len(header)
            for r in records
        ]
        return EncodedTask(name, instruction, records, header, lengths, [], [])

    def episode(self, task: EncodedTask, shots: Sequence[int]) -> EncodedEpisode:
        """The episode of ``task`` with the records ``shots`` (pool indices) as its examples, in order."""
        if self.template == "plain":
            parts: list[tuple[Sequence[int], PieceKind]] = [(task.header[len(self._bos_list) :], "header")]
            for i in shots:
                parts += [(task.prefix_ids[i], "prefix"), (task.answer_ids[i], "answer")]
            return assemble_episode(parts, target_scope=self.target_scope, bos=self.bos)
        records = [task.records[i] for i in shots]
        return self.encode_pieces(self.pieces(task.instruction, [(r.input, r.output) for r in records]))

    @property
    def _bos_list(self) -> list[int]:
        return [] if self.bos is None else [self.bos]

    def fit(self, task: EncodedTask, shots: list[int]) -> tuple[EncodedEpisode, list[int]]:
        """The episode with the longest prefix of ``shots`` that fits ``max_length`` (whole examples only)."""
        shots = list(shots)
        while True:
            episode = self.episode(task, shots)
            if len(episode.input_ids) <= self.max_length or not shots:
                return episode, shots
            shots.pop()

    def prompt_ids(self, task: EncodedTask, demos: Sequence[int], query: str) -> list[int]:
        """Ids of ``header + demos + query prefix``: exactly a training episode's ids up to the query's prefix."""
        if self.template == "plain":
            ids = list(self.episode(task, demos).input_ids)
            return ids + self._tokenize([self.input_template.format(input=query)])[0]
        shots = [(task.records[i].input, task.records[i].output) for i in demos]
        return self.encode_pieces(self.pieces(task.instruction, shots, query=query)).input_ids

    def answer_ids(self, task: EncodedTask, demos: Sequence[int], query: str, answer: str) -> list[int]:
        """Ids of the answer span of ``answer`` after the prompt (plain: the tokens of ``" {answer}{sep}"``)."""
        if self.template == "plain":
            return self._tokenize([f" {answer}{self.separator}"])[0]
        shots = [(task.records[i].input, task.records[i].output) for i in demos]
        text, kind = self.pieces(task.instruction, [*shots, (query, answer)])[-1]
        assert kind == "answer"
        return self._tokenize([text])[0]


def _describe(task: EncodedTask, indices: Iterable[int]) -> str:
    return ", ".join(f"{task.records[i].location} ({task.lengths[i]} tokens)" for i in indices)


def check_task_fits(task: EncodedTask, *, min_shots: int, max_length: int) -> None:
    """Raise ``ValueError`` unless every episode of ``task`` can hold ``min_shots`` whole examples.

    That is: the task has at least ``min_shots`` records, and its ``min_shots`` longest examples plus the header fit
    ``max_length``. The message names the task, its files and the longest records.
    """
    files = ", ".join(task.files)
    if len(task.records) < min_shots:
        raise ValueError(
            f"task {task.name!r} ({files}) has {len(task.records)} training record(s), fewer than min_shots="
            f"{min_shots}; add records, lower min_shots, or move the task to heldout_files"
        )
    longest = sorted(range(len(task.records)), key=lambda i: -task.lengths[i])[:min_shots]
    needed = len(task.header) + sum(task.lengths[i] for i in longest)
    if needed > max_length:
        raise ValueError(
            f"task {task.name!r} ({files}): {min_shots} whole example(s) with the instruction need up to {needed} "
            f"tokens > max_length={max_length}; longest: {_describe(task, longest)}. Raise max_length, lower "
            "min_shots, or shorten / remove these records (examples are never cut)"
        )


# ------------------------------------------------------------------------------------------------------ episodes


class ManyShotExample(TypedDict):
    """One encoded episode, the input of :class:`ManyShotCollator`."""

    input_ids: list[int]
    labels: list[int]
    shot_index: list[int]
    task_id: int  # index into the task list
    num_shots: int


def task_probabilities(sizes: Sequence[int], sampling: TaskSampling, temperature: float = 1.0) -> list[float]:
    """Probability of each task: ``uniform``, ``proportional`` to its size, or ``temperature``: ∝ n^(1/T).

    Example:
        >>> task_probabilities([100, 25], "temperature", 2.0)
        [0.6666666666666666, 0.3333333333333333]
    """
    if sampling == "uniform":
        weights = [1.0] * len(sizes)
    elif sampling == "proportional":
        weights = [float(n) for n in sizes]
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = [n ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(f"task_sampling must be uniform, proportional or temperature, got {sampling!r}")
    total = sum(weights)
    return [w / total for w in weights]


class ManyShotEpisodes(Dataset[ManyShotExample]):
    """Episodes as a pure function of ``(seed, epoch, index)``: kill-and-resume replays exactly the same batches.

    ``dataset[key]`` with ``key = epoch * len(dataset) + index`` is episode ``index`` of ``epoch`` (so plain indices
    ``0 .. len-1`` are epoch 0); :class:`EpisodeSampler` yields such keys. An episode picks a task with
    ``probabilities``, then draws shots from the task's pool without replacement and keeps whole examples up to
    ``max_length``, stopping before the first one that would overflow.

    Args:
        encoder: Builds the token ids.
        tasks: The training tasks.
        num_episodes: Episodes per epoch.
        probabilities: Task sampling probabilities (see :func:`task_probabilities`).
        shots: Shots per episode: a number, an inclusive ``(min, max)`` range drawn per episode, or ``None`` (as many
            as fit); always capped by the pool and ``max_length``.
        seed: Seed of everything random.
    """

    def __init__(
        self,
        encoder: ManyShotEncoder,
        tasks: Sequence[EncodedTask],
        *,
        num_episodes: int,
        probabilities: Sequence[float],
        shots: Shots = None,
        seed: int = 0,
    ) -> None:
        self.encoder, self.tasks, self.num_episodes = encoder, list(tasks), num_episodes
        self.probabilities, self.shots, self.seed = list(probabilities), shots, seed

    def __len__(self) -> int:
        return self.num_episodes

    def _target(self, rng: random.Random) -> int | None:
        if self.shots is None or isinstance(self.shots, int):
            return self.shots
        return rng.randint(*self.shots)

    def plan(self, epoch: int, index: int) -> tuple[int, list[int]]:
        """``(task id, pool indices of the shots)`` of an episode (before the exact length check)."""
        rng = random.Random(f"many_shot:{self.seed}:{epoch}:{index}")
        task_id = rng.choices(range(len(self.tasks)), weights=self.probabilities)[0]
        task, target = self.tasks[task_id], self._target(rng)
        budget = self.encoder.max_length - len(task.header)
        most = min(len(task.records), budget // max(1, min(task.lengths)) + 1)
        order = rng.sample(range(len(task.records)), most if target is None else min(target, most))
        chosen: list[int] = []
        for i in order:
            budget -= task.lengths[i]
            if budget < 0:
                break
            chosen.append(i)
        return task_id, chosen

    def episode(self, epoch: int, index: int) -> ManyShotExample:
        """Episode ``index`` of ``epoch``."""
        task_id, shots = self.plan(epoch, index)
        episode, shots = self.encoder.fit(self.tasks[task_id], shots)
        if not shots or all(label == IGNORE_INDEX for label in episode.labels[1:]):  # spec P2: never train on nothing
            raise RuntimeError(f"episode {index} of epoch {epoch} ({self.tasks[task_id].name!r}) has no target token")
        return ManyShotExample(
            input_ids=episode.input_ids,
            labels=episode.labels,
            shot_index=episode.shot_index,
            task_id=task_id,
            num_shots=len(shots),
        )

    def __getitem__(self, key: int) -> ManyShotExample:
        epoch, index = divmod(int(key), self.num_episodes)
        return self.episode(epoch, index)


class EpisodeSampler(DistributedSampler):
    """Yields the keys ``epoch * len(dataset) + i`` of this rank's episodes ``i`` (in order) for the current epoch.

    A ``DistributedSampler`` so that Lightning keeps it under DDP (each rank gets a strided share) and calls
    :meth:`set_epoch` every epoch, which selects fresh episodes. Build it with ``epoch=trainer.current_epoch`` so that
    a resumed run fast-forwards through the right epoch (as :class:`~ftmods.datamodules.samplers.EpochShuffleSampler`).
    """

    def __init__(self, dataset: ManyShotEpisodes, *, epoch: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.size = len(dataset)
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        """This rank's episode keys of the current epoch."""
        offset = self.epoch * self.size
        return (offset + i for i in super().__iter__())


class ReplicatedSampler(DistributedSampler):
    """Every index in order on every rank: a ``DistributedSampler`` so that Lightning keeps it under DDP / FSDP.

    For evaluation queries that the module shares out itself (:class:`~ftmods.many_icl.ManyICLModule` scores each
    query on exactly one rank, and runs all of them on every rank when the weights are sharded). Lightning's own
    evaluation sampler would pad the ranks' shares by repeating queries, which then count twice in the means.

    Example:
        >>> list(ReplicatedSampler(range(3)))
        [0, 1, 2]
    """

    def __init__(self, dataset: Sized) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------- collate


class ManyShotBatch(TypedDict, total=False):
    """A collated batch of ``E`` episodes.

    Padded: ``(E, T)`` tensors with ``attention_mask``. Packed: one row ``(1, ΣT)`` with ``position_ids`` restarting
    at 0 for each episode and no ``attention_mask`` (run the model with ``use_cache=False``); the first label of each
    episode is ``IGNORE_INDEX`` (and its ``shot_index`` -1).
    """

    input_ids: Tensor  # (B, T) long; B = E padded, B = 1 packed
    labels: Tensor  # (B, T) long, token ids on supervised positions, IGNORE_INDEX elsewhere (HF convention)
    shot_index: Tensor  # (B, T) long, k on tokens of answer k (k demonstrations before it), -1 elsewhere
    attention_mask: Tensor  # (B, T) long, padded batches only
    position_ids: Tensor  # (1, ΣT) long, packed batches only
    task_ids: Tensor  # (E,) long, index of each episode's task in ``ManyShotDataModule.task_names``
    num_shots: Tensor  # (E,) long, examples per episode


class ManyShotCollator:
    """Pads episodes into ``(E, T)`` rows, or packs them into one padding-free row.

    Args:
        pad_token_id: Id used for padding (never supervised).
        packing: Concatenate the episodes into one row with ``position_ids`` restarting at 0 per episode and no
            attention mask; the model must run with ``use_cache=False`` to keep episodes apart (spec §1.4.4).
        pad_to_multiple_of: Round the padded length up (padded batches only).
    """

    def __init__(self, pad_token_id: int, *, packing: bool = False, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.packing, self.pad_to_multiple_of = pad_token_id, packing, pad_to_multiple_of

    def __call__(self, episodes: Sequence[ManyShotExample]) -> ManyShotBatch:
        """Collate episodes into a :class:`ManyShotBatch`."""
        task_ids = torch.tensor([e["task_id"] for e in episodes], dtype=torch.long)  # (E,)
        num_shots = torch.tensor([e["num_shots"] for e in episodes], dtype=torch.long)  # (E,)
        batch = self._pack(episodes) if self.packing else self._pad(episodes)
        batch["task_ids"], batch["num_shots"] = task_ids, num_shots
        return batch

    def _pad(self, episodes: Sequence[ManyShotExample]) -> ManyShotBatch:
        length = max(len(e["input_ids"]) for e in episodes)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(episodes), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (E, T)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (E, T)
        shot_index = torch.full(shape, -1, dtype=torch.long)  # (E, T)
        attention_mask = torch.zeros(shape, dtype=torch.long)  # (E, T)
        for row, episode in enumerate(episodes):
            n = len(episode["input_ids"])
            input_ids[row, :n] = torch.as_tensor(episode["input_ids"])
            labels[row, :n] = torch.as_tensor(episode["labels"])
            shot_index[row, :n] = torch.as_tensor(episode["shot_index"])
            attention_mask[row, :n] = 1
        return ManyShotBatch(input_ids=input_ids, labels=labels, shot_index=shot_index, attention_mask=attention_mask)

    @staticmethod
    def _pack(episodes: Sequence[ManyShotExample]) -> ManyShotBatch:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in episodes]
        labels = [torch.as_tensor(e["labels"], dtype=torch.long).clone() for e in episodes]
        shots = [torch.as_tensor(e["shot_index"], dtype=torch.long).clone() for e in episodes]
        for row_labels, row_shots in zip(labels, shots, strict=True):
            row_labels[0], row_shots[0] = IGNORE_INDEX, -1  # the previous episode's last token must not predict it
        return ManyShotBatch(
            input_ids=torch.cat(ids)[None],  # (1, ΣT)
            labels=torch.cat(labels)[None],  # (1, ΣT)
            shot_index=torch.cat(shots)[None],  # (1, ΣT)
            position_ids=torch.cat([torch.arange(len(x)) for x in ids])[None],  # (1, ΣT)
        )


# ------------------------------------------------------------------------------------------------------ evaluation


@dataclass
class ManyShotQuery:
    """One evaluation query: a many-shot prompt (built like training) and what to score it against."""

    task: str
    prompt_ids: list[int]
    """``[bos] header + k_shots demonstrations + the query's prefix``, tokenized like training."""
    prompt: str
    """The decoded prompt (for logging)."""
    output: str
    """The gold answer, raw."""
    options: list[str] | None
    """Candidate answers for option scoring (classification), or ``None`` (generate and compare)."""
    option_ids: list[list[int]] | None
    """Ids of each option's answer span, exactly as a training answer (plain: ``" {option}{separator}"``)."""
    metric: str
    """One of :data:`METRICS`."""
    k_shots: int
    """Demonstrations in the prompt (``k_test``, or fewer to fit ``max_length``)."""
    stop: str
    """Stop string for generation: the separator (plain) or the eos token (chat)."""
    output_ids: list[int]
    """Ids of the gold answer span (as in training), e.g. for a teacher-forced loss."""
    heldout: bool = False
    """The task was never trained on (from ``heldout_files``; a forgetting / ICL probe)."""


def build_query(
    encoder: ManyShotEncoder,
    task: EncodedTask,
    record: ManyShotRecord,
    pool: Sequence[int],
    *,
    k_test: int,
    seed: str,
    heldout: bool = False,
) -> ManyShotQuery:
    """A query for ``record`` with up to ``k_test`` demonstrations drawn from ``pool`` with the fixed ``seed``.

    Demonstrations are dropped from the end (never cut) until the prompt plus the longest option (or the task's
    longest answer, for generation) fits ``encoder.max_length``.
    """
    demos = random.Random(seed).sample(list(pool), min(k_test, len(pool)))
    candidates = list(record.options) if record.options else [record.output]
    answer_budget = max((len(a) for a in task.answer_ids), default=0) if not record.options else 0
    while True:
        prompt_ids = encoder.prompt_ids(task, demos, record.input)
        answers = [encoder.answer_ids(task, demos, record.input, c) for c in candidates]
        need = len(prompt_ids) + max(answer_budget, *(len(a) for a in answers))
        if need <= encoder.max_length:
            break
        if not demos:
            raise ValueError(
                f"task {task.name!r}: the query {record.location} needs {need} tokens without any demonstration "
                f"> max_length={encoder.max_length}"
            )
        demos.pop()
    gold = answers[candidates.index(record.output)] if record.options else answers[0]
    return ManyShotQuery(
        task=task.name,
        prompt_ids=prompt_ids,
        prompt=encoder.tokenizer.decode(prompt_ids),
        output=record.output,
        options=list(record.options) if record.options else None,
        option_ids=answers if record.options else None,
        metric=record.metric,
        k_shots=len(demos),
        stop=encoder.stop,
        output_ids=gold,
        heldout=heldout,
    )


def _cap(items: list[Any], limit: int | None, seed: str) -> list[Any]:
    """At most ``limit`` items (a seeded choice, kept in order)."""
    if limit is None or len(items) <= limit:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def split_holdout(records: list[ManyShotRecord], fraction: float, seed: str) -> tuple[list[int], list[int]]:
    """Seeded ``(train, held-out)`` indices: ``round(fraction * n)`` held out, at least 1 when ``fraction > 0``."""
    if fraction <= 0:
        return list(range(len(records))), []
    n_eval = max(1, round(fraction * len(records)))
    held = set(random.Random(seed).sample(range(len(records)), min(n_eval, len(records))))
    return [i for i in range(len(records)) if i not in held], sorted(held)


# ----------------------------------------------------------------------------------------------------- DataModule


class ManyShotDataModule(LightningDataModule):
    """Many-shot in-context fine-tuning episodes (ManyICL, arXiv 2506.11103) and many-shot evaluation queries.

    Training batches are :class:`ManyShotBatch` es of episodes (one task per episode, whole examples only, every
    answer supervised); validation and test batches are lists of :class:`ManyShotQuery` (the evaluation set, then the
    held-out tasks' queries, flagged ``heldout``). See the module docstring for the record format and templates.

    Args:
        train_files: Training record file(s) (``.jsonl``, ``.json`` or ``.parquet``; globs allowed; many tasks each).
        eval_files: Evaluation records of the training tasks; their demonstrations come from the training pool. If
            absent, ``eval_fraction`` of each task's records is held out instead.
        heldout_files: Records of tasks never trained on (forgetting / in-context learning probe); each query's
            demonstrations come from the other records of its task.
        tokenizer: Hub id or folder of the tokenizer. ``None`` under the ``ftmods`` CLI means "the model's
            ``pretrained``" (filled in by the CLI); from Python, pass it or call :meth:`connect`.
        template: ``plain`` text (``input_template`` + answer + ``separator``) or ``chat`` (the tokenizer's chat
            template: system = instruction, then user / assistant turns).
        input_template: Plain-template prefix of a shot, with ``{input}``; the answer follows as
            ``" {output}{separator}"``.
        separator: Plain-template separator after the instruction and after every answer (supervised with it).
        instruction_field: Record key of the instruction.
        input_field: Record key of the input.
        output_field: Record key of the output.
        max_length: Longest episode (and evaluation prompt plus answer) in tokens; examples are never cut.
        shots: Examples per episode: a number, an inclusive ``[min, max]`` range drawn per episode, or ``None`` to
            fill ``max_length``; always capped by the task's pool and ``max_length``.
        min_shots: Every task must fit this many of its longest examples in ``max_length`` (checked in ``setup``).
        task_sampling: Task of each episode: ``uniform``, ``proportional`` to the task's training records, or
            ``temperature`` (∝ n^(1/temperature)).
        temperature: Temperature of ``task_sampling="temperature"``.
        episodes_per_epoch: Episodes per epoch; default: training records / mean shots per episode (at least one
            per task). Rounded up to a multiple of the data-parallel ranks (each rank gets a whole share, none
            repeated).
        target_scope: ``answers`` supervises every answer (with its separator); ``examples`` also every shot's
            prefix segment (plain: ``input_template`` with the input; chat: the user turn and the assistant header),
            never the instruction.
        packing: Padding-free packing: each batch becomes one row of concatenated episodes.
        batch_size: Episodes per training batch (per device).
        eval_batch_size: Queries per validation / test batch.
        k_test: Demonstrations per evaluation prompt (fewer when they do not fit ``max_length``).
        eval_fraction: Fraction of each task's records held out as queries when ``eval_files`` is not given
            (at least one per task when > 0); held-out records are neither trained on nor used as demonstrations.
        eval_per_task: At most this many queries per task (a seeded choice).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        seed: Seed of the episodes, the held-out split and the evaluation demonstrations.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.

    Example::

        dm = ManyShotDataModule("tasks.jsonl", tokenizer="google/gemma-7b", max_length=4096, k_test=16)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # ManyShotBatch
        dm.task_names[batch["task_ids"][0]]  # the task of the first episode
        query = dm.eval_queries[0]  # ManyShotQuery: prompt_ids, option_ids, metric, stop, ...
    """

    def __init__(
        self,
        train_files: str | list[str],
        eval_files: str | list[str] | None = None,
        heldout_files: str | list[str] | None = None,
        *,
        tokenizer: str | None = None,
        template: Template = "plain",
        input_template: str = DEFAULT_INPUT_TEMPLATE,
        separator: str = DEFAULT_SEPARATOR,
        instruction_field: str = "instruction",
        input_field: str = "input",
        output_field: str = "output",
        max_length: int = 2048,
        shots: int | tuple[int, int] | None = None,
        min_shots: int = 1,
        task_sampling: TaskSampling = "temperature",
        temperature: float = 2.0,
        episodes_per_epoch: int | None = None,
        target_scope: TargetScope = "answers",
        packing: bool = False,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        k_test: int = 8,
        eval_fraction: float = 0.1,
        eval_per_task: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        _check_settings(locals())
        self.save_hyperparameters()
        self.fields = _fields(instruction_field, input_field, output_field)
        self.tokenizer: Any = None  # loaded in setup()
        self.encoder: ManyShotEncoder | None = None  # built in setup()
        self.train_tasks: list[EncodedTask] = []  # training pools, built in setup()
        self.episodes: ManyShotEpisodes | None = None  # built in setup()
        self.eval_queries: list[ManyShotQuery] = []  # built in setup()
        self.heldout_queries: list[ManyShotQuery] = []  # built in setup()

    @property
    def task_names(self) -> list[str]:
        """Training task names; ``ManyShotBatch["task_ids"]`` index into this list."""
        return [t.name for t in self.train_tasks]

    @property
    def tasks(self) -> dict[str, list[ManyShotRecord]]:
        """Training pool (records used in episodes and as evaluation demonstrations) per task."""
        return {t.name: t.records for t in self.train_tasks}

    def connect(self, tokenizer: Any) -> None:
        """Use this tokenizer (an object or a hub id / folder) instead of ``tokenizer=``."""
        if isinstance(tokenizer, str):
            self.hparams["tokenizer"] = tokenizer
        else:
            self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """Load the tokenizer, read and check every file, and build the episodes and queries (once, any stage)."""
        if self.tokenizer is None:
            self.tokenizer = load_datamodule_tokenizer(
                type(self).__name__, self.hparams["tokenizer"], self.hparams["trust_remote_code"]
            )
        if self.encoder is not None:
            return
        hp = self.hparams
        self.encoder = ManyShotEncoder(
            self.tokenizer,
            template=hp["template"],
            input_template=hp["input_template"],
            separator=hp["separator"],
            target_scope=hp["target_scope"],
            max_length=hp["max_length"],
        )
        held_out = self._build_train_tasks()
        self._build_eval_queries(held_out)
        self._build_heldout_queries()
        sizes = [len(t.records) for t in self.train_tasks]
        probabilities = task_probabilities(sizes, hp["task_sampling"], hp["temperature"])
        self.episodes = ManyShotEpisodes(
            self.encoder,
            self.train_tasks,
            num_episodes=hp["episodes_per_epoch"] or self._default_episodes(probabilities),
            probabilities=probabilities,
            shots=_as_shots(hp["shots"]),
            seed=hp["seed"],
        )
        rank_zero_info(
            f"many-shot: {len(self.train_tasks)} tasks, {sum(sizes)} training records, {len(self.episodes)} episodes "
            f"per epoch, {len(self.eval_queries)} eval and {len(self.heldout_queries)} held-out queries"
        )

    def _build_train_tasks(self) -> dict[str, list[ManyShotRecord]]:
        """Training pools (checked to fit ``min_shots``); returns the records held out per task by ``eval_fraction``."""
        hp, encoder = self.hparams, self.encoder
        assert encoder is not None
        records = load_many_shot_records(hp["train_files"], fields=self.fields)
        if not records:
            raise ValueError(f"no training records in {hp['train_files']}")
        _warn_eval_splits(records)
        fraction = 0.0 if hp["eval_files"] is not None else hp["eval_fraction"]
        held_out: dict[str, list[ManyShotRecord]] = {}
        for name, task_records in group_by_task(records).items():
            train, held = split_holdout(task_records, fraction, f"{hp['seed']}:holdout:{name}")
            held_out[name] = [task_records[i] for i in held]
            task = encoder.task(name, [task_records[i] for i in train], task_instruction(task_records))
            check_task_fits(task, min_shots=hp["min_shots"], max_length=hp["max_length"])
            self.train_tasks.append(task)
        return held_out

    def _build_eval_queries(self, held_out: dict[str, list[ManyShotRecord]]) -> None:
        hp, encoder = self.hparams, self.encoder
        assert encoder is not None
        if hp["eval_files"] is not None:
            held_out = group_by_task(load_many_shot_records(hp["eval_files"], fields=self.fields))
        by_name = {t.name: t for t in self.train_tasks}
        for name, queries in held_out.items():
            if name not in by_name:
                raise ValueError(
                    f"task {name!r} of the evaluation records ({queries[0].location}) has no training records; "
                    "put tasks that are not trained on in heldout_files"
                )
            task = by_name[name]
            for i, record in enumerate(_cap(queries, hp["eval_per_task"], f"{hp['seed']}:cap:{name}")):
                pool = range(len(task.records))
                seed = f"{hp['seed']}:query:{name}:{i}"
                self.eval_queries.append(build_query(encoder, task, record, pool, k_test=hp["k_test"], seed=seed))

    def _build_heldout_queries(self) -> None:
        hp, encoder = self.hparams, self.encoder
        assert encoder is not None
        if hp["heldout_files"] is None:
            return
        records = load_many_shot_records(hp["heldout_files"], fields=self.fields)
        trained = set(self.task_names)
        for name, task_records in group_by_task(records).items():
            if name in trained:
                rank_zero_warn(f"held-out task {name!r} ({task_records[0].location}) is also a training task")
            task = encoder.task(name, task_records)
            chosen = _cap(list(range(len(task_records))), hp["eval_per_task"], f"{hp['seed']}:cap:heldout:{name}")
            for i, j in enumerate(chosen):
                pool = [p for p in range(len(task_records)) if p != j]
                seed = f"{hp['seed']}:heldout:{name}:{i}"
                self.heldout_queries.append(
                    build_query(encoder, task, task_records[j], pool, k_test=hp["k_test"], seed=seed, heldout=True)
                )

    def _default_episodes(self, probabilities: Sequence[float]) -> int:
        """Training records / expected shots per episode, at least one episode per task."""
        hp, shots = self.hparams, _as_shots(self.hparams["shots"])
        expected = 0.0
        for task, p in zip(self.train_tasks, probabilities, strict=True):
            mean_length = sum(task.lengths) / len(task.lengths)
            fit = max(1.0, (hp["max_length"] - len(task.header)) / mean_length)
            wanted = len(task.records) if shots is None else (sum(shots) / 2 if isinstance(shots, tuple) else shots)
            expected += p * min(float(wanted), fit, float(len(task.records)))
        total = sum(len(t.records) for t in self.train_tasks)
        return max(len(self.train_tasks), math.ceil(total / max(expected, 1.0)))

    def collator(self) -> ManyShotCollator:
        """The training collate function for the current tokenizer and settings."""
        hp = self.hparams
        return ManyShotCollator(
            self.tokenizer.pad_token_id, packing=hp["packing"], pad_to_multiple_of=hp["pad_to_multiple_of"]
        )

    def train_dataloader(self) -> Any:
        """:class:`ManyShotBatch` batches of this epoch's episodes; resumable mid-epoch (``StatefulDataLoader``)."""
        if self.episodes is None:
            raise RuntimeError("call setup('fit') first")
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        # data-parallel share (Lightning keeps a DistributedSampler as it is); single-device strategies have none
        shard = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        shard = shard or {"num_replicas": 1, "rank": 0}
        replicas, size = shard["num_replicas"], len(self.episodes)
        if size % replicas:  # whole shares, so that DistributedSampler does not pad them by repeating episodes
            self.episodes.num_episodes = -(-size // replicas) * replicas  # fresh episodes (a function of the index)
            rank_zero_info(f"many-shot: {size} -> {len(self.episodes)} episodes per epoch ({replicas} ranks)")
        sampler = EpisodeSampler(self.episodes, epoch=epoch, num_replicas=shard["num_replicas"], rank=shard["rank"])
        return resumable_loader(
            self.episodes,
            batch_size=self.hparams["batch_size"],
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams["num_workers"],
        )

    def _eval_loader(self) -> Any:
        queries = self.eval_queries + self.heldout_queries
        if not queries:
            return []
        return resumable_loader(
            queries,  # type: ignore[arg-type]
            batch_size=self.hparams["eval_batch_size"],
            sampler=ReplicatedSampler(queries),  # the same batches on every rank; the module shares them out
            collate_fn=list,
            num_workers=self.hparams["num_workers"],
        )

    def val_dataloader(self) -> Any:
        """Lists of :class:`ManyShotQuery`: the evaluation queries, then the held-out tasks' (``heldout=True``).

        Every rank gets every batch (:class:`ReplicatedSampler`): the module scores each query on one rank only.
        """
        return self._eval_loader()

    def test_dataloader(self) -> Any:
        """Lists of :class:`ManyShotQuery`, as :meth:`val_dataloader`."""
        return self._eval_loader()

    def to_trl_dataset(self, epoch: int = 0) -> Any:
        """The episodes of ``epoch`` as a ``datasets.Dataset`` with pre-tokenized ``input_ids`` and ``labels``.

        Also has ``shot_index`` and ``task`` columns. TRL's ``SFTTrainer`` passes a dataset that already has
        ``labels`` through untouched (and can pack it), so every answer stays supervised.
        """
        import datasets

        if self.episodes is None:
            self.setup("fit")
        assert self.episodes is not None
        rows = [self.episodes.episode(epoch, i) for i in range(len(self.episodes))]
        return datasets.Dataset.from_dict(
            {
                "input_ids": [r["input_ids"] for r in rows],
                "labels": [r["labels"] for r in rows],
                "shot_index": [r["shot_index"] for r in rows],
                "task": [self.task_names[r["task_id"]] for r in rows],
            }
        )


def _as_shots(shots: Any) -> Shots:
    return tuple(shots) if isinstance(shots, list | tuple) else shots  # type: ignore[return-value]


def _warn_eval_splits(records: Sequence[ManyShotRecord]) -> None:
    marked = [r for r in records if r.split in _EVAL_SPLITS]
    if marked:
        rank_zero_warn(
            f"{len(marked)} training record(s) have split in {_EVAL_SPLITS} (e.g. {marked[0].location}); records of "
            "train_files are all trained on: put evaluation records in eval_files"
        )


def _check_settings(settings: dict[str, Any]) -> None:
    """Reject impossible ``ManyShotDataModule`` settings early."""
    shots, min_shots = _as_shots(settings["shots"]), settings["min_shots"]
    if min_shots < 1:
        raise ValueError(f"min_shots must be >= 1, got {min_shots}")
    if isinstance(shots, int) and shots < min_shots:
        raise ValueError(f"shots={shots} is below min_shots={min_shots}")
    if isinstance(shots, tuple) and (len(shots) != 2 or not min_shots <= shots[0] <= shots[1]):
        raise ValueError(f"shots must be [min, max] with min_shots <= min <= max, got {list(shots)}")
    _check_ranges(settings)


def _check_ranges(settings: dict[str, Any]) -> None:
    if "{input}" not in settings["input_template"]:
        raise ValueError(f"input_template must contain '{{input}}', got {settings['input_template']!r}")
    settings["input_template"].format(input="x")  # other braces must be escaped ({{ }})
    if not 0.0 <= settings["eval_fraction"] < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {settings['eval_fraction']}")
    if settings["temperature"] <= 0:
        raise ValueError(f"temperature must be > 0, got {settings['temperature']}")
    for name in ("max_length", "batch_size", "eval_batch_size"):
        if settings[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {settings[name]}")
    if settings["k_test"] < 0:
        raise ValueError(f"k_test must be >= 0, got {settings['k_test']}")
    for name in ("episodes_per_epoch", "eval_per_task"):
        if settings[name] is not None and settings[name] < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {settings[name]}")
