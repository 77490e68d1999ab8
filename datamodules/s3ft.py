"""S3FT data: raw task items for building the selection (``predict``) and the selection for SFT (``fit``).

One DataModule serves both stages of "Selective Self-to-Supervised Fine-Tuning" (arXiv:2502.08130):

- ``predict``: :class:`S3FTItem` s read from the task files (GSM8K, MBPP, reading-comprehension QA or the generic S3FT
  format; :func:`load_s3ft_items`), minus the ids already in the selection, so an interrupted run resumes. Batches are
  plain lists of items; :class:`ftmods.s3ft.S3FTModule` answers and judges them and
  :class:`ftmods.s3ft.SelectionWriter` appends one selection record per item to ``<selection_file>.rank<r>.part``.
- ``fit`` / ``validate``: the selection records (:func:`read_selection`) tokenized exactly like
  :class:`~ftmods.datamodules.chat.ChatDataModule` tokenizes prompt/completion records (``prompt`` → user turn,
  ``target`` → supervised assistant turn; or ``[bos] prompt target eos`` with ``template="plain"``), collated by
  :class:`S3FTCollator` into an :class:`S3FTBatch`: a chat batch plus ``source_ids`` (index into :data:`SOURCES`).

Task-file formats (JSONL / JSON / Parquet; ``format="auto"`` detects each file from its first record):

- ``gsm8k``: ``{question, answer}``, ``answer`` ending in ``#### <number>``.
- ``mbpp``: ``{text | prompt, code, test_list, test_setup_code?, task_id?}``.
- ``qa``: ``{question, context?, answers | answer}``; ``answers`` a list of strings or SQuAD's ``{"text": [...]}``,
  ``answer`` a string, a list of strings or TriviaQA's ``{"value", "aliases"}``.
- ``s3ft``: ``{id?, task, prompt, gold, answers?, tests?, context?}``.

Selection records (JSONL, one per item) need ``id``, ``prompt``, ``target`` and ``source`` (one of :data:`SOURCES`);
everything else the builder writes (``task``, ``self_response``, verdicts, ...) rides along.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler

from ftmods.datamodules.chat import ChatBatch, ChatCollator, ChatEncoder
from ftmods.datamodules.records import (
    RecordError,
    as_file_list,
    check_record,
    load_datamodule_tokenizer,
    load_records,
    record_location,
)
from ftmods.datamodules.samplers import epoch_loader, resumable_loader

SOURCES: tuple[str, ...] = ("model", "paraphrase", "gold")
"""Where a selection target comes from; ``source_ids`` index into this tuple."""

TaskFormat = Literal["auto", "gsm8k", "mbpp", "qa", "s3ft"]
FORMATS: tuple[str, ...] = ("gsm8k", "mbpp", "qa", "s3ft")
ID_KEYS: tuple[str, ...] = ("id", "task_id", "question_id")
"""Record keys used as the item id (first present wins); otherwise ``<file stem>:<line>``."""


@dataclass
class S3FTItem:
    """One training item of a task, as the S3FT builder answers and judges it."""

    id: str
    """Unique across the task files: the record's ``id`` / ``task_id`` / ``question_id``, else ``<stem>:<line>``."""
    task: str
    """``gsm8k``, ``mbpp``, ``qa`` or any user string (selects the prompt and the judge)."""
    prompt: str
    """The question or task text, without any template."""
    gold: str
    """The full gold response (GSM8K reasoning with ``#### 72``, MBPP code, the first QA answer)."""
    answers: list[str] = field(default_factory=list)
    """Accepted short answers (``["72"]`` for GSM8K, every alias for QA, ``[]`` for code)."""
    tests: list[str] = field(default_factory=list)
    """Unit-test asserts (MBPP)."""
    context: str | None = None
    """Reading-comprehension passage."""
    meta: dict[str, Any] = field(default_factory=dict)
    """``file``, ``index`` (0-based record), ``line`` (JSONL line, else ``None``), ``format``; MBPP adds
    ``test_setup_code`` when the record has one."""


class S3FTBatch(ChatBatch):
    """A collated S3FT training batch: a :class:`~ftmods.datamodules.chat.ChatBatch` plus the source of each example.

    Padded: ``input_ids`` / ``labels`` / ``attention_mask`` ``(B, T)``. Packed: ``input_ids`` / ``labels`` /
    ``position_ids`` ``(1, ΣT)``, one segment per example.
    """

    source_ids: Tensor  # (B,) long for padded rows, (E,) long for packed segments in order; index into SOURCES


# ------------------------------------------------------------------------------------------------- task records


def _text(record: dict[str, Any], key: str) -> str | None:
    """An optional string field."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError((key, f"must be a string, got {type(value).__name__}"))
    return value


def _required(record: dict[str, Any], key: str) -> str:
    """A required, non-blank string field."""
    value = _text(record, key)
    if value is None:
        raise KeyError((key, "missing"))
    if not value.strip():
        raise ValueError((key, "is empty"))
    return value


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError((key, f"must be a string or a list of strings, got {value!r:.60}"))
    return list(value)


def _from_gsm8k(record: dict[str, Any]) -> dict[str, Any]:
    question, answer = _required(record, "question"), _required(record, "answer")
    if "####" not in answer:
        raise ValueError(("answer", "has no '#### <final answer>' line"))
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError(("answer", "has nothing after '####'"))
    return {"task": "gsm8k", "prompt": question, "gold": answer, "answers": [final]}


def _from_mbpp(record: dict[str, Any]) -> dict[str, Any]:
    prompt = _required(record, "text" if record.get("text") is not None else "prompt")
    code = _required(record, "code")
    tests = record.get("test_list")
    if tests is None:
        raise KeyError(("test_list", "missing"))
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise TypeError(("test_list", f"must be a list of assert strings, got {tests!r:.60}"))
    if not tests:
        raise ValueError(("test_list", "is empty, so no answer could be judged"))
    setup = _text(record, "test_setup_code")
    meta = {"test_setup_code": setup} if setup and setup.strip() else {}
    return {"task": "mbpp", "prompt": prompt, "gold": code, "tests": list(tests), "meta": meta}


def _qa_answers(record: dict[str, Any]) -> list[str]:
    if record.get("answers") is not None:
        value, key = record["answers"], "answers"
        if isinstance(value, dict):
            value, key = value.get("text"), "answers.text"
    elif record.get("answer") is not None:
        value, key = record["answer"], "answer"
        if isinstance(value, dict):  # TriviaQA: {"value": ..., "aliases": [...]}
            value = [v for v in [value.get("value"), *(value.get("aliases") or [])] if v is not None]
    else:
        raise KeyError(("answers", "missing (give 'answers' or 'answer')"))
    answers = [a for a in _strings(value, key) if a.strip()]
    if not answers:
        raise ValueError((key, "has no non-empty answer"))
    return list(dict.fromkeys(answers))


def _from_qa(record: dict[str, Any]) -> dict[str, Any]:
    question = _required(record, "question")
    context = _text(record, "context")
    answers = _qa_answers(record)
    return {"task": "qa", "prompt": question, "gold": answers[0], "answers": answers, "context": context}


def _from_s3ft(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: _required(record, key) for key in ("task", "prompt", "gold")}
    out["context"] = _text(record, "context")
    for key in ("answers", "tests"):
        if record.get(key) is not None:
            out[key] = _strings(record[key], key)
    return out


_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "gsm8k": _from_gsm8k,
    "mbpp": _from_mbpp,
    "qa": _from_qa,
    "s3ft": _from_s3ft,
}


def detect_task_format(record: dict[str, Any]) -> str:
    """The format of a task file from the keys of its first record; raises ``ValueError((None, problem))``."""
    keys = {k for k, v in record.items() if v is not None}
    if {"task", "prompt", "gold"} <= keys:
        return "s3ft"
    if "test_list" in keys:
        return "mbpp"
    if "question" in keys and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    if "question" in keys and keys & {"answers", "answer"}:
        return "qa"
    raise ValueError(
        (None, f"cannot tell the task format from the keys {sorted(record)}; pass format= one of {FORMATS}")
    )


def _record_id(record: dict[str, Any]) -> str | None:
    for key in ID_KEYS:
        value = record.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return None


def _jsonl_lines(file: str) -> list[int]:
    """1-based line number of each record (non-blank line) of a JSONL file."""
    with Path(file).open(encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def to_item(
    record: dict[str, Any], fmt: str, *, file: str = "<records>", index: int = 0, line: int | None = None
) -> S3FTItem:
    """Convert one task record of format ``fmt``; a malformed record raises :class:`RecordError` (file, line, field)."""
    out: list[dict[str, Any]] = []
    check_record(file, index, record, lambda r: out.append(_CONVERTERS[fmt](r)))
    fields = out[0]
    meta = {"file": file, "index": index, "line": line, "format": fmt, **fields.pop("meta", {})}
    item_id = _record_id(record) or f"{Path(file).stem}:{line if line is not None else index}"
    return S3FTItem(id=item_id, **fields, meta=meta)


def _open_task_file(file: str, fmt: str) -> tuple[Any, str]:
    """Load one file through ``datasets`` and resolve ``auto``; returns (records, format)."""
    state = {"format": fmt}

    def validate(record: dict[str, Any]) -> None:  # used by load_records' line-by-line scan on a parse failure
        if state["format"] == "auto":
            state["format"] = detect_task_format(record)
        _CONVERTERS[state["format"]](record)

    records = load_records(file, validate)
    if fmt == "auto" and len(records):
        check_record(file, 0, records[0], lambda r: state.update(format=detect_task_format(r)))
    return records, state["format"]


def load_s3ft_items(
    files: str | Sequence[str], format: TaskFormat = "auto", limit: int | None = None
) -> list[S3FTItem]:
    """The items of ``files`` (globs allowed) in file order.

    Args:
        files: Task files (``.jsonl``, ``.json`` or ``.parquet``).
        format: The records' format, or ``auto`` to detect it per file from its first record.
        limit: Keep only the first ``limit`` items.

    Raises:
        RecordError: A malformed record, or an id seen twice (the message names both places).
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    items: list[S3FTItem] = []
    seen: dict[str, tuple[str, int]] = {}
    for file in as_file_list(files):
        if limit is not None and len(items) >= limit:
            break
        records, fmt = _open_task_file(file, format)
        if not len(records):
            rank_zero_warn(f"{file}: no records")
            continue
        lines = _jsonl_lines(file) if Path(file).suffix == ".jsonl" else None
        for index, record in enumerate(records):
            if limit is not None and len(items) >= limit:
                break
            item = to_item(record, fmt, file=file, index=index, line=lines[index] if lines else None)
            if item.id in seen:
                first = record_location(*seen[item.id])
                raise RecordError(file, index, "id", f"duplicate id {item.id!r}, first seen at {first}")
            seen[item.id] = (file, index)
            items.append(item)
    return items


def load_gsm8k(file: str | Sequence[str]) -> list[S3FTItem]:
    """GSM8K: ``question`` and ``answer`` (reasoning ending in ``#### 72``); ``answers`` = the final number."""
    return load_s3ft_items(file, "gsm8k")


def load_mbpp(file: str | Sequence[str]) -> list[S3FTItem]:
    """MBPP: ``text`` (or ``prompt``), ``code``, non-empty ``test_list``, optional ``test_setup_code`` / ``task_id``."""
    return load_s3ft_items(file, "mbpp")


def load_rc_qa(file: str | Sequence[str]) -> list[S3FTItem]:
    """Reading-comprehension / open QA: ``question``, optional ``context``, ``answers`` or ``answer``; gold = first."""
    return load_s3ft_items(file, "qa")


def load_s3ft_generic(file: str | Sequence[str]) -> list[S3FTItem]:
    """The generic format ``{id?, task, prompt, gold, answers?, tests?, context?}``."""
    return load_s3ft_items(file, "s3ft")


# ---------------------------------------------------------------------------------------------- selection records


class SelectionRecordError(RecordError):
    """A malformed line of a selection file (or one of its part files); the message names file, line and field."""

    def __init__(self, file: str | Path, line: int, index: int, field: str | None, problem: str) -> None:
        self.file, self.index, self.field, self.line = str(file), index, field, line
        what = f"field {field!r}: " if field else ""
        ValueError.__init__(self, f"{file}:{line}: {what}{problem}")


def validate_selection_record(record: dict[str, Any]) -> None:
    """Check one selection record; raises ``KeyError``/``TypeError``/``ValueError`` with ``(field, problem)`` args.

    Required: ``id`` (string or integer), ``prompt`` (string), ``target`` (non-empty string) and ``source`` (one of
    :data:`SOURCES`); ``task``, when present, is a string.
    """
    if record.get("id") is None:
        raise KeyError(("id", "missing"))
    if isinstance(record["id"], bool) or not isinstance(record["id"], str | int):
        raise TypeError(("id", f"must be a string or an integer, got {type(record['id']).__name__}"))
    _required(record, "prompt")
    _required(record, "target")
    if record.get("source") not in SOURCES:
        raise ValueError(("source", f"must be one of {SOURCES}, got {record.get('source')!r}"))
    if record.get("task") is not None and not isinstance(record["task"], str):
        raise TypeError(("task", f"must be a string, got {type(record['task']).__name__}"))


def part_files(path: str | Path) -> list[Path]:
    """The per-rank part files ``<path>.rank<r>.part`` that exist, by rank."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)\.part")
    if not path.parent.is_dir():
        return []
    found = [(m, p) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_file()]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1)))]


def _parse_lines(file: Path, validate: bool) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(record, index, line) of each non-blank line; a bad *last* line (a write cut short) is skipped with a warning."""
    lines = file.read_bytes().split(b"\n")
    numbered = [(number, raw) for number, raw in enumerate(lines, start=1) if raw.strip()]
    for index, (number, raw) in enumerate(numbered):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if index == len(numbered) - 1:
                rank_zero_warn(f"{file}:{number}: skipping an incomplete last line (an interrupted write?): {error}")
                return
            raise SelectionRecordError(file, number, index, None, f"invalid JSON ({error})") from None
        if not isinstance(record, dict):
            raise SelectionRecordError(
                file, number, index, None, f"expected a JSON object, got {type(record).__name__}"
            )
        if validate:
            try:
                validate_selection_record(record)
            except (KeyError, TypeError, ValueError) as error:
                name, problem = error.args[0]
                raise SelectionRecordError(file, number, index, name, problem) from None
        yield record, index, number


def _read_located(path: str | Path, validate: bool = True) -> list[tuple[dict[str, Any], Path, int]]:
    """Deduplicated (first wins) selection records with their file and record index, selection file first."""
    path = Path(path)
    files = ([path] if path.is_file() else []) + part_files(path)
    if not files:
        raise FileNotFoundError(f"no S3FT selection at {path} (nor part files {path.name}.rank*.part)")
    out, seen = [], set()
    for file in files:
        for record, index, _ in _parse_lines(file, validate):
            key = str(record.get("id"))
            if key not in seen:
                seen.add(key)
                out.append((record, file, index))
    return out


def read_selection(path: str | Path, *, validate: bool = True) -> list[dict[str, Any]]:
    """The selection records of ``path`` and of its part files ``<path>.rank*.part``, deduplicated by ``id``.

    The selection file comes first, then the parts by rank; the first record of an id wins. The last line of a file
    may be incomplete (a killed run): it is skipped with a warning naming file and line. Any other bad line raises.

    Args:
        path: The selection file (JSONL).
        validate: Check each record with :func:`validate_selection_record`.

    Raises:
        FileNotFoundError: Neither the file nor a part file exists.
        RecordError: A line that is not a JSON object (except the last), or a malformed record.
    """
    return [record for record, _, _ in _read_located(path, validate)]


def done_ids(path: str | Path) -> set[str]:
    """Ids (as strings) already in the selection or its part files; empty when there is none yet."""
    try:
        return {str(record["id"]) for record in read_selection(path)}
    except FileNotFoundError:
        return set()


def merge_parts(path: str | Path) -> int:
    """Merge the part files into ``path`` atomically (temporary file + ``os.replace``), then delete the parts.

    Records are deduplicated by ``id`` (first wins) and keep their order of first appearance: the selection file,
    then the parts by rank. An incomplete last line of a part is dropped (with a warning).

    Returns:
        The number of records in ``path`` after the merge; 0 (and nothing rewritten) when there are no parts.
    """
    path = Path(path)
    parts = part_files(path)
    if not parts:
        return 0
    records = read_selection(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for part in parts:
        part.unlink(missing_ok=True)
    return len(records)


def mixture_report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts and percentages of the target sources, overall and per task (the paper's Table 3).

    Every source of :data:`SOURCES` appears (with 0); a record without ``task`` counts under ``"unknown"``.

    Example:
        >>> report = mixture_report([{"source": "model", "task": "gsm8k"}, {"source": "gold", "task": "gsm8k"}])
        >>> report["total"], report["counts"], report["percent"]["model"]
        (2, {'model': 1, 'paraphrase': 0, 'gold': 1}, 50.0)
    """
    counts = dict.fromkeys(SOURCES, 0)
    by_task: dict[str, dict[str, int]] = {}
    for record in records:
        source = str(record.get("source"))
        counts[source] = counts.get(source, 0) + 1
        task = by_task.setdefault(str(record.get("task") or "unknown"), dict.fromkeys(SOURCES, 0))
        task[source] = task.get(source, 0) + 1
    total = sum(counts.values())
    percent = {source: 100.0 * n / total if total else 0.0 for source, n in counts.items()}
    return {"total": total, "counts": counts, "percent": percent, "by_task": by_task}


def format_mixture(report: dict[str, Any]) -> str:
    """A text table of a :func:`mixture_report`: source / count / %, then % per task when there are several tasks.

    Example:
        >>> print(format_mixture(mixture_report([{"source": "model"}, {"source": "gold"}])))
        source      count      %
        model           1   50.0
        paraphrase      0    0.0
        gold            1   50.0
        total           2  100.0
    """
    lines = [f"{'source':<10} {'count':>6} {'%':>6}"]
    for source, count in report["counts"].items():
        lines.append(f"{source:<10} {count:>6} {report['percent'][source]:>6.1f}")
    lines.append(f"{'total':<10} {report['total']:>6} {100.0 if report['total'] else 0.0:>6.1f}")
    tasks = report.get("by_task", {})
    if len(tasks) > 1:
        sources = list(report["counts"])
        width = max(len(t) for t in [*tasks, "task"])
        lines += ["", f"{'task':<{width}} " + " ".join(f"{s + ' %':>12}" for s in sources) + f" {'n':>6}"]
        for task, task_counts in tasks.items():
            n = sum(task_counts.values())
            cells = " ".join(f"{100.0 * task_counts.get(s, 0) / n if n else 0.0:>12.1f}" for s in sources)
            lines.append(f"{task:<{width}} {cells} {n:>6}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- collate


class S3FTCollator:
    """:class:`~ftmods.datamodules.chat.ChatCollator` (padded or packed) plus ``source_ids`` per example.

    Args:
        pad_token_id: Id used for padding (never supervised).
        packing: One padding-free row per batch with ``position_ids`` restarting per example.
        pad_to_multiple_of: Round the padded length up.
    """

    def __init__(self, pad_token_id: int, *, packing: bool = False, pad_to_multiple_of: int | None = None) -> None:
        self.chat = ChatCollator(pad_token_id, packing=packing, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> S3FTBatch:
        """Collate ``{"input_ids", "labels", "source_id"}`` examples into an :class:`S3FTBatch`."""
        batch = self.chat(examples)
        source_ids = torch.tensor([int(e["source_id"]) for e in examples], dtype=torch.long)  # (B,) or (E,)
        return S3FTBatch(**batch, source_ids=source_ids)


# ----------------------------------------------------------------------------------------------------- DataModule


class S3FTDataModule(LightningDataModule):
    """Task items for building the S3FT selection (``predict``) and the selection for SFT (``fit``).

    ``predict`` yields lists of :class:`S3FTItem` not yet in ``selection_file`` (leftover part files of an interrupted
    run are merged first), so re-running ``predict`` resumes. ``fit`` trains on the selection's ``prompt`` → ``target``
    with completion-only labels, batches being :class:`S3FTBatch` (``source_ids`` for per-source losses);
    :attr:`mixture` holds its :func:`mixture_report`.

    Args:
        task_files: Task file(s) (``.jsonl``, ``.json``, ``.parquet``; globs allowed) with the raw items.
        selection_file: The selection JSONL written by ``predict`` (:class:`ftmods.s3ft.SelectionWriter`) and read by
            ``fit``.
        format: Task-file format (``gsm8k``, ``mbpp``, ``qa``, ``s3ft``), or ``auto`` to detect it per file.
        tokenizer: Hub id or folder of the tokenizer. ``None`` under the ``ftmods`` CLI means "the model's
            ``pretrained``" (filled in by the CLI); from Python, pass it or call :meth:`connect`.
        template: ``chat`` renders prompt and target as a user and an assistant turn with the tokenizer's chat
            template; ``plain`` is ``[bos] prompt target eos``. Must match the module's ``template``.
        system_prompt: System message inserted before the user turn (chat template only); must match the module's.
        max_length: Longest training example in tokens.
        overlong: Longer examples: cut the tail (``truncate``), skip them (``drop``) or stop with an error naming the
            record (``error``). Examples left with no supervised token are always skipped.
        packing: Padding-free packing of training batches (one row per batch).
        batch_size: Training examples per batch (per device).
        predict_batch_size: Items per ``predict`` batch (per device).
        val_fraction: Fraction of the selection held out (seeded) for validation.
        limit: Use only the first ``limit`` task items (quick trials).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        seed: Seed of the shuffling and of the validation split.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.

    Example::

        module = S3FTModule("mistralai/Mistral-7B-Instruct-v0.2", judge="numeric")
        dm = S3FTDataModule("gsm8k_train.jsonl", "runs/s3ft/gsm8k.jsonl", tokenizer=module.hparams.pretrained)
        Trainer(callbacks=[SelectionWriter()]).predict(module, datamodule=dm, return_predictions=False)
        Trainer(max_epochs=3).fit(module, datamodule=dm)
        print(format_mixture(dm.mixture))
    """

    def __init__(
        self,
        task_files: str | list[str],
        selection_file: str,
        *,
        format: TaskFormat = "auto",
        tokenizer: str | None = None,
        template: Literal["chat", "plain"] = "chat",
        system_prompt: str | None = None,
        max_length: int = 1024,
        overlong: Literal["truncate", "drop", "error"] = "drop",
        packing: bool = False,
        batch_size: int = 8,
        predict_batch_size: int = 16,
        val_fraction: float = 0.0,
        limit: int | None = None,
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
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.save_hyperparameters()
        self.tokenizer: Any = None  # loaded in setup("fit")
        self.items: list[S3FTItem] | None = None  # predict: items still to select, built in setup("predict")
        self.num_total = 0  # predict: task items (after limit)
        self.num_done = 0  # predict: of those, already in the selection
        self.datasets: dict[str, list[dict[str, Any]]] = {}  # fit: "train" / "val" encoded examples
        self.mixture: dict[str, Any] | None = None  # fit: mixture_report of the selection

    def connect(self, tokenizer: Any) -> None:
        """Use this tokenizer (an object or a hub id / folder) instead of ``tokenizer=``."""
        if isinstance(tokenizer, str):
            self.hparams["tokenizer"] = tokenizer
        else:
            self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """``predict``: the task items still to select; ``fit`` / ``validate``: the tokenized selection."""
        if stage == "predict":
            self._setup_predict()
        elif stage in ("fit", "validate") and "train" not in self.datasets:
            self._setup_fit()

    # ------------------------------------------------------------------------------------------------ predict

    def _setup_predict(self) -> None:
        hp, path = self.hparams, self.hparams["selection_file"]
        trainer = self.trainer
        if trainer is None or trainer.is_global_zero:
            merge_parts(path)  # a killed run's parts: merged now, so this run's parts start clean
        if trainer is not None:
            trainer.strategy.barrier("s3ft_merge_parts")
        items = load_s3ft_items(hp["task_files"], hp["format"], hp["limit"])
        done = done_ids(path)
        self.items = [item for item in items if item.id not in done]
        self.num_total, self.num_done = len(items), len(items) - len(self.items)
        rank_zero_info(
            f"S3FT predict: {self.num_total} items, {self.num_done} already selected in {path}, {len(self.items)} to go"
        )

    def predict_dataloader(self) -> Any:
        """Lists of :class:`S3FTItem` (``predict_batch_size`` each) in file order; each data-parallel rank's share.

        Distributed, every rank gets the same number of items (a ``DistributedSampler`` that repeats the first items to
        even out the ranks; :class:`ftmods.s3ft.SelectionWriter` drops the repeats when it merges): Lightning's own
        predict sampler does not repeat, so with an item count that does not divide evenly one rank would run a batch
        more than the others, and under FSDP2 that rank's generation waits forever for the others' all-gathers.
        """
        if self.items is None:
            raise RuntimeError("call setup('predict') first")
        sampler: DistributedSampler[Any] | None = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            shard = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}  # data-parallel size / rank
            sampler = DistributedSampler(
                self.items,  # type: ignore[arg-type]
                num_replicas=shard.get("num_replicas", trainer.world_size),
                rank=shard.get("rank", trainer.global_rank),
                shuffle=False,
                drop_last=False,
            )
        return resumable_loader(
            self.items,  # type: ignore[arg-type]
            batch_size=self.hparams["predict_batch_size"],
            sampler=sampler,
            collate_fn=list,
            num_workers=self.hparams["num_workers"],
        )

    # ---------------------------------------------------------------------------------------------------- fit

    def _setup_fit(self) -> None:
        path = Path(self.hparams["selection_file"])
        try:
            located = _read_located(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no S3FT selection at {path}: build it first with `python cli.py predict -c <your config>` "
                "(same config), then run fit"
            ) from None
        if part_files(path):
            rank_zero_warn(
                f"{path}: unmerged part files {[p.name for p in part_files(path)]} (an interrupted predict?); "
                "training on their records too. Re-run predict to finish the selection."
            )
        self.mixture = mixture_report(record for record, _, _ in located)
        rank_zero_info(f"S3FT selection {path}:\n{format_mixture(self.mixture)}")
        if self.tokenizer is None:
            self.tokenizer = load_datamodule_tokenizer(
                type(self).__name__, self.hparams["tokenizer"], self.hparams["trust_remote_code"]
            )
        examples = self._encode(located)
        self._split(examples)

    def _encode(self, located: list[tuple[dict[str, Any], Path, int]]) -> list[dict[str, Any]]:
        hp = self.hparams
        encoder = ChatEncoder(
            self.tokenizer,
            "prompt_completion",
            {"prompt": "prompt", "completion": "target", "messages": "messages"},
            template=hp["template"],
            system_prompt=hp["system_prompt"],
            max_length=hp["max_length"],
            overlong=hp["overlong"],
        )
        examples = []
        for record, file, index in located:
            encoded = encoder(record, index, file=str(file))
            if encoded["keep"]:
                examples.append(
                    {
                        "input_ids": torch.tensor(encoded["input_ids"], dtype=torch.int32),
                        "labels": torch.tensor(encoded["labels"], dtype=torch.int32),
                        "source_id": SOURCES.index(record["source"]),
                    }
                )
        if len(examples) < len(located):
            rank_zero_warn(
                f"{hp['selection_file']}: skipped {len(located) - len(examples)} of {len(located)} records that were "
                f"longer than max_length={hp['max_length']} (overlong={hp['overlong']!r}) or kept no target token"
            )
        if not examples:
            raise ValueError(f"no usable S3FT training records in {hp['selection_file']}")
        return examples

    def _split(self, examples: list[dict[str, Any]]) -> None:
        fraction = self.hparams["val_fraction"]
        if fraction <= 0:
            self.datasets["train"] = examples
            return
        if len(examples) < 2:
            raise ValueError(f"val_fraction={fraction} needs at least 2 examples, got {len(examples)}")
        n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.hparams["seed"])).tolist()
        val = set(order[:n_val])
        self.datasets["train"] = [e for i, e in enumerate(examples) if i not in val]
        self.datasets["val"] = [e for i, e in enumerate(examples) if i in val]
        rank_zero_info(f"S3FT: {len(self.datasets['train'])} training / {n_val} validation examples")

    def collator(self) -> S3FTCollator:
        """The training collate function for the current tokenizer and settings."""
        hp = self.hparams
        return S3FTCollator(
            self.tokenizer.pad_token_id, packing=hp["packing"], pad_to_multiple_of=hp["pad_to_multiple_of"]
        )

    def _loader(self, split: str, *, train: bool) -> Any:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: call setup('fit') first")
        return epoch_loader(
            self.datasets[split],
            trainer=self.trainer,
            seed=self.hparams["seed"],
            shuffle=train,
            batch_size=self.hparams["batch_size"],
            collate_fn=self.collator(),
            num_workers=self.hparams["num_workers"],
        )

    def train_dataloader(self) -> Any:
        """:class:`S3FTBatch` batches, reshuffled per epoch and resumable mid-epoch (``StatefulDataLoader``)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        """Held-out :class:`S3FTBatch` batches in selection order; empty without ``val_fraction``."""
        return self._loader("val", train=False) if "val" in self.datasets else []
