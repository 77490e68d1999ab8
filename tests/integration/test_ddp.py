"""DDP on 2 CPU processes (gloo) from the command line: both ranks end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_ddp_two_cpu_ranks_end_identical(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "-c", "configs/sft/tiny.yaml", "-c", "configs/strategy/ddp.yaml",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
        "--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (tmp_path / "runs/sft_tiny/checkpoints/last.ckpt").is_file()  # rank 0 wrote the checkpoint
    assert (tmp_path / "runs/sft_tiny/pretrained/model.safetensors").is_file()
