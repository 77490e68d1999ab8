"""Read JSONL / JSON / Parquet record files through ``datasets``, with errors that name file, line and field.

Shared by every ftmods DataModule that reads user files. ``datasets``' own parse errors name neither the line nor the
field, so on failure the file is scanned again line by line to report exactly where it breaks.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class RecordError(ValueError):
    """A record in a data file is malformed; the message names file, line (or row) and field."""

    def __init__(self, file: str | Path, index: int, field: str | None, problem: str) -> None:
        self.file, self.index, self.field = str(file), index, field
        where = record_location(file, index)
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


def as_file_list(files: str | Sequence[str] | None) -> list[str]:
    """Normalise a path, a list of paths or ``None`` to a list; globs are expanded, missing files raise."""
    if files is None:
        return []
    out: list[str] = []
    for spec in [files] if isinstance(files, str) else list(files):
        path = Path(spec).expanduser()
        if any(c in spec for c in "*?["):
            matches = sorted(m for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
        else:
            matches = [str(path)] if path.is_file() else []
        if not matches:
            raise FileNotFoundError(f"data file not found: {spec}")
        out.extend(matches)
    return out


def record_location(file: str | Path, index: int) -> str:
    """``file:line`` for the ``index``-th record of a JSONL file (blank lines skipped), else ``file: record N``."""
    path = Path(file)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8") as handle:
            seen = -1
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{path}:{line_no}"
    return f"{path}: record {index}"


def load_records(file: str, validate: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Load one file as a ``datasets.Dataset``; malformed content raises :class:`RecordError`.

    Args:
        file: A ``.jsonl``, ``.json`` or ``.parquet`` file.
        validate: Checks one record and raises ``KeyError``/``TypeError``/``ValueError`` whose first argument is
            ``(field, problem)``; used to pinpoint the record when ``datasets`` cannot build a table.
    """
    import datasets

    suffix = Path(file).suffix
    if suffix not in _LOADERS:
        raise ValueError(f"{file}: unsupported data file type {suffix!r}; use one of {sorted(_LOADERS)}")
    try:
        return datasets.load_dataset(_LOADERS[suffix], data_files=file, split="train")
    except Exception as error:
        if suffix == ".jsonl" and _scan_jsonl(file, validate) == 0:
            return datasets.Dataset.from_dict({})  # only blank lines: an empty dataset, not a parse error
        raise ValueError(f"{file}: could not be read as {suffix[1:]}: {error}") from error


def _scan_jsonl(file: str, validate: Callable[[dict[str, Any]], None] | None) -> int:
    """Raise :class:`RecordError` at the first malformed record; otherwise return the number of records."""
    with Path(file).open(encoding="utf-8") as handle:
        index = -1
        for line in handle:
            if not line.strip():
                continue
            index += 1
            try:
                record = json.loads(line.rstrip())  # without the newline, so the column is on this line
            except json.JSONDecodeError as error:
                raise RecordError(file, index, None, f"invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise RecordError(file, index, None, f"expected a JSON object, got {type(record).__name__}")
            check_record(file, index, record, validate)
    return index + 1


def check_record(
    file: str, index: int, record: dict[str, Any], validate: Callable[[dict[str, Any]], None] | None
) -> None:
    """Run ``validate`` on one record, turning its ``(field, problem)`` exception into a :class:`RecordError`."""
    if validate is None:
        return
    try:
        validate(record)
    except (KeyError, TypeError, ValueError) as error:
        field, problem = error.args[0] if error.args and isinstance(error.args[0], tuple) else (None, str(error))
        raise RecordError(file, index, field, problem) from None


def load_datamodule_tokenizer(owner: str, tokenizer: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer a DataModule was configured with, or a clear error when none was given.

    Args:
        owner: The DataModule's class name, for the message.
        tokenizer: Hub id or folder (``None`` when neither ``tokenizer=`` nor the CLI link supplied one).
        trust_remote_code: Allow custom tokenizer code from the repository.
    """
    from ftmods.models.loading import LoadOptions, load_tokenizer

    if tokenizer is None:
        raise ValueError(
            f"{owner} needs a tokenizer: pass tokenizer=<hub id or folder>, call connect(), or run through the ftmods "
            "CLI, which takes it from model.init_args.pretrained"
        )
    return load_tokenizer(tokenizer, LoadOptions(trust_remote_code=trust_remote_code))
