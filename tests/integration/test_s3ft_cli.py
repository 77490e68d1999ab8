"""The tiny S3FT config as a user runs it: ``predict`` builds the selection, ``fit`` trains on it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, subcommand: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), subcommand, "-c", "configs/s3ft/tiny.yaml", *extra],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_s3ft_predict_then_fit(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    predict = _cli(tmp_path, "predict")
    assert predict.returncode == 0, predict.stderr[-3000:]
    run = tmp_path / "runs/s3ft_tiny"
    records = [json.loads(line) for line in (run / "selection.jsonl").read_text().splitlines()]
    assert len(records) == 96
    report = json.loads((run / "selection.jsonl.mixture.json").read_text())
    assert all(report["counts"][s] > 0 for s in ("model", "paraphrase", "gold"))  # observed 38 / 29 / 29
    assert "model" in predict.stderr + predict.stdout  # the mixture table is printed

    again = _cli(tmp_path, "predict")  # a finished selection: nothing left to do, nothing duplicated
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((run / "selection.jsonl").read_text().splitlines()) == 96

    fit = _cli(tmp_path, "fit")
    assert fit.returncode == 0, fit.stderr[-3000:]
    fit_log = sorted(run.rglob("metrics.csv"))[-1]  # predict logged to version_0, fit to version_1
    rows = list(csv.DictReader(fit_log.open()))
    assert any(r.get("train/loss_model") for r in rows)
    assert any(r.get("train/loss_gold") for r in rows)
    assert any(r.get("s3ft/percent_model") for r in rows)
    assert (run / "pretrained/model.safetensors").is_file()


@pytest.mark.distributed
def test_predict_is_sharded_over_two_ddp_processes(tmp_path):
    """Each rank generates its share and appends its own part file; rank 0 merges them, deduplicating the items the
    distributed sampler repeats to even out the ranks: the selection equals the single-process one."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    result = _cli(tmp_path, "predict", "-c", "configs/strategy/ddp.yaml", "--trainer.devices", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/s3ft_tiny"
    records = [json.loads(line) for line in (run / "selection.jsonl").read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}) == 96
    assert not list(run.glob("*.part"))
    counts = json.loads((run / "selection.jsonl.mixture.json").read_text())["counts"]
    assert counts == {"model": 38, "paraphrase": 29, "gold": 29}  # as on one process (greedy decoding)
