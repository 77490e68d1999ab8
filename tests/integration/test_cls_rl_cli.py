"""The tiny CLS-RL configs as a user runs them (a separate process, no download): fit in both modes, then test."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(("config", "reward"), [("tiny", "accuracy"), ("tiny_no_think", "equality")])
def test_tiny_cls_rl_fits_then_tests(tmp_path, config, reward):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    subprocess.run([sys.executable, "-c", "from ftmods.models.tiny import resolve_pretrained as r; "
                    "r('tiny/qwen2-vl-shapes')"], check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    start = time.perf_counter()
    fit = _cli(tmp_path, "fit", "-c", f"configs/cls_rl/{config}.yaml")
    seconds = time.perf_counter() - start
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert seconds < 60, seconds  # the bound for a tiny config (about 10 s here)
    run = tmp_path / "runs" / f"cls_rl_{config}"
    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
    rewards = [float(r[f"train/rewards/{reward}"]) for r in rows if r.get(f"train/rewards/{reward}")]
    assert len(rewards) == 12  # 2 epochs x 24 prompts / (2 prompts x 2 accumulation)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    for key in ("train/kl", "train/reward_std", "train/frac_reward_zero_std", "train/completion_length"):
        assert any(r.get(key) for r in rows), key
    assert sum(1 for r in rows if r.get("val/acc_lenient")) == 2  # after each epoch
    table = sorted((run / "lightning_logs").rglob("train_completions/*.jsonl"))
    assert table
    assert {"id", "label", "completion", "reward", "advantage"} <= set(json.loads(table[0].read_text().splitlines()[0]))
    assert (run / "pretrained" / "model.safetensors").is_file()
    assert (run / "pretrained" / "processor_config.json").is_file()

    test = _cli(tmp_path, "test", "-c", f"configs/cls_rl/{config}.yaml",
                "--data.init_args.test_root_or_file", "configs/data/shapes/test",
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc_lenient" in test.stdout + test.stderr
