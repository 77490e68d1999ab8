"""Record-file helpers: file lists and globs, ``file:line`` locations, and errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftmods.datamodules.records import RecordError, as_file_list, check_record, load_records, record_location


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` writes its Arrow cache under a test folder, never the user's ``~/.cache``."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _completion_is_string(record: dict[str, Any]) -> None:
    if not isinstance(record.get("completion"), str):
        raise TypeError(("completion", f"must be a string, got {type(record.get('completion')).__name__}"))


# --------------------------------------------------------------------------------------------------- record_location


def test_record_location_counts_only_nonblank_lines(tmp_path: Path) -> None:
    # lines: 1 rec0, 2 blank, 3 rec1, 4 whitespace-only, 5 blank, 6 rec2
    path = write_lines(tmp_path / "d.jsonl", ['{"a": 0}', "", '{"a": 1}', "   \t", "", '{"a": 2}'])
    assert record_location(path, 0) == f"{path}:1"
    assert record_location(path, 1) == f"{path}:3"
    assert record_location(path, 2) == f"{path}:6"


def test_record_location_falls_back_to_record_index(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"a": 0}'])
    assert record_location(path, 5) == f"{path}: record 5"  # past the end of the file
    assert record_location(tmp_path / "missing.jsonl", 2) == f"{tmp_path / 'missing.jsonl'}: record 2"
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"not read")  # only the suffix matters: rows of non-JSONL files have no line
    assert record_location(parquet, 3) == f"{parquet}: record 3"
    assert record_location(str(tmp_path / "d.json"), 0) == f"{tmp_path / 'd.json'}: record 0"


def test_record_error_message_and_attributes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", '{"a": 0}', '{"a": 1}'])
    error = RecordError(path, 1, "completion", "must be a string")
    assert str(error) == f"{path}:3: field 'completion': must be a string"
    assert (error.file, error.index, error.field) == (str(path), 1, "completion")
    assert isinstance(error, ValueError)
    assert str(RecordError(path, 0, None, "invalid JSON")) == f"{path}:2: invalid JSON"


# ------------------------------------------------------------------------------------------------------ as_file_list


def test_as_file_list_plain_paths(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", ["{}"])
    b = write_lines(tmp_path / "b.jsonl", ["{}"])
    assert as_file_list(None) == []
    assert as_file_list([]) == []
    assert as_file_list(str(a)) == [str(a)]
    assert as_file_list([str(b), str(a)]) == [str(b), str(a)]  # explicit order is kept
    assert as_file_list((str(a),)) == [str(a)]


def test_as_file_list_expands_globs_sorted(tmp_path: Path) -> None:
    for name in ("c.jsonl", "a.jsonl", "b.jsonl", "notes.txt"):
        write_lines(tmp_path / name, ["{}"])
    (tmp_path / "dir.jsonl").mkdir()  # a folder that matches the pattern is not a data file
    expected = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    assert as_file_list(str(tmp_path / "*.jsonl")) == expected
    assert as_file_list(str(tmp_path / "[ab].jsonl")) == expected[:2]
    assert as_file_list(str(tmp_path / "?.jsonl")) == expected
    assert as_file_list([str(tmp_path / "notes.txt"), str(tmp_path / "c*.jsonl")]) == [
        str(tmp_path / "notes.txt"),
        expected[2],
    ]


def test_as_file_list_globs_in_folders(tmp_path: Path) -> None:
    for part in ("p1", "p2"):
        (tmp_path / part).mkdir()
        write_lines(tmp_path / part / "train.jsonl", ["{}"])
    (tmp_path / "p2" / "deep").mkdir()
    write_lines(tmp_path / "p2" / "deep" / "train.jsonl", ["{}"])
    assert as_file_list(str(tmp_path / "*" / "train.jsonl")) == [
        str(tmp_path / "p1" / "train.jsonl"),
        str(tmp_path / "p2" / "train.jsonl"),
    ]
    assert as_file_list(str(tmp_path / "**" / "train.jsonl")) == [
        str(tmp_path / "p1" / "train.jsonl"),
        str(tmp_path / "p2" / "deep" / "train.jsonl"),
        str(tmp_path / "p2" / "train.jsonl"),
    ]


def test_as_file_list_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_lines(tmp_path / "a.jsonl", ["{}"])
    assert as_file_list("~/a.jsonl") == [str(path)]
    assert as_file_list("~/*.jsonl") == [str(path)]


@pytest.mark.parametrize("spec", ["missing.jsonl", "*.parquet", "sub"])
def test_as_file_list_missing_raises(tmp_path: Path, spec: str) -> None:
    write_lines(tmp_path / "a.jsonl", ["{}"])
    (tmp_path / "sub").mkdir()  # a folder is not a file
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*" + spec.replace("*", r"\*")):
        as_file_list([str(tmp_path / "a.jsonl"), str(tmp_path / spec)])


# ------------------------------------------------------------------------------------------------------ check_record


def test_check_record_turns_field_problem_into_record_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"completion": "x"}', "", '{"completion": 3}'])
    check_record(str(path), 0, {"completion": "x"}, _completion_is_string)  # valid: no error
    check_record(str(path), 1, {"completion": 3}, None)  # no validator: nothing checked
    with pytest.raises(RecordError, match=rf"^{path}:3: field 'completion': must be a string, got int$"):
        check_record(str(path), 1, {"completion": 3}, _completion_is_string)


def test_check_record_plain_message_has_no_field(tmp_path: Path) -> None:
    def validate(record: dict[str, Any]) -> None:
        raise ValueError("too short")

    with pytest.raises(RecordError, match=r"d.jsonl: record 4: too short$") as info:
        check_record(str(tmp_path / "d.jsonl"), 4, {}, validate)
    assert info.value.field is None


def test_check_record_lets_other_errors_through() -> None:
    def validate(record: dict[str, Any]) -> None:
        raise RuntimeError("a bug in the validator, not in the data")

    with pytest.raises(RuntimeError, match="a bug in the validator"):
        check_record("d.jsonl", 0, {}, validate)


# ------------------------------------------------------------------------------------------------------ load_records


def test_load_records_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', "", "  ", '{"prompt": "c"}'])
    dataset = load_records(str(path))
    assert dataset.to_list() == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]


def test_load_records_json_array_and_parquet(tmp_path: Path) -> None:
    import datasets

    records = [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    assert load_records(str(tmp_path / "d.json")).to_list() == records
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(str(tmp_path / "d.parquet")).to_list() == records


@pytest.mark.parametrize("suffix", [".csv", ".txt", ".JSONL", ""])
def test_load_records_unsupported_suffix(tmp_path: Path, suffix: str) -> None:
    path = write_lines(tmp_path / f"d{suffix}", ['{"a": 1}'])
    with pytest.raises(ValueError, match=rf"d{suffix}: unsupported data file type '{suffix}'; use one of"):
        load_records(str(path))


def test_load_records_invalid_json_names_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "file.jsonl", ['{"a": 1}', '{"a": 2}', '{"a": 3', '{"a": 4}'])
    with pytest.raises(RecordError, match=r"file\.jsonl:3: invalid JSON \(Expecting ',' delimiter at column 8\)"):
        load_records(str(path))


def test_load_records_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "file.jsonl", ["", '{"a": 1}', "", "", '{"a": 2}', "{oops}", '{"a": 3}'])
    with pytest.raises(RecordError, match=r"file\.jsonl:6: invalid JSON") as info:
        load_records(str(path))
    assert info.value.index == 2  # the third record


def test_load_records_non_object_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "file.jsonl", ['{"a": 1}', "[1, 2]"])
    with pytest.raises(RecordError, match=r"file\.jsonl:2: expected a JSON object, got list"):
        load_records(str(path))


def test_load_records_validator_pinpoints_record_datasets_cannot_read(tmp_path: Path) -> None:
    # Duplicate keys are valid JSON for Python but make ``datasets`` fail, so the file is rescanned with the validator.
    lines = ['{"completion": "x"}', '{"completion": "y"}', "", '{"completion": "z", "completion": 5}']
    path = write_lines(tmp_path / "file.jsonl", lines)
    with pytest.raises(RecordError, match=r"file\.jsonl:4: field 'completion': must be a string, got int"):
        load_records(str(path), _completion_is_string)
    # Without a validator (or when every record passes) the error still names the file.
    with pytest.raises(ValueError, match=r"file\.jsonl: could not be read as jsonl"):
        load_records(str(path))


def test_load_records_missing_file(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_load_records_blank_jsonl_is_empty(tmp_path: Path) -> None:
    """A JSONL file with no records loads as an empty dataset (the DataModule skips it with a warning)."""
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    write_lines(tmp_path / "blank.jsonl", ["", "  "])
    assert len(load_records(str(tmp_path / "empty.jsonl"))) == 0
    assert len(load_records(str(tmp_path / "blank.jsonl"))) == 0
