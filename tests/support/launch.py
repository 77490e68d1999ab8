"""Run ``python cli.py ...`` as a user does, in a scratch folder that sees the repository's configs (multi-process
tests: DDP / FSDP2 on CPU)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(folder: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python cli.py *args`` from ``folder`` (created, with a ``configs`` link to the repository's), one OpenMP
    thread per process, ``tests/`` importable (``support.*`` callbacks and rewards); fails the test with the tail of
    stderr if the command fails."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "configs").exists():
        (folder / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def logged_metrics(run: Path) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of every CSVLogger ``metrics.csv`` under ``run`` (versions in order: a resumed run's
    later values win)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(run.rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if value and key not in ("epoch", "step"):
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


SHARDED = {"fsdp2": ("fsdp2_model_parallel", ()), "fsdp1": ("fsdp", ("--trainer.precision", "32-true"))}
"""Sharded strategies on CPU processes: ``id -> (strategy snippet, extra arguments)``. ``fsdp.yaml`` (FSDP1) asks for
bf16-mixed, which gloo processes run in full precision instead."""
