"""CLS-RL on two CPU processes (gloo): DDP ranks end identical (also with mu = 2), FSDP2 trains and exports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import run_cli

from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _launch(folder: Path, strategy: str, *extra: str) -> Path:
    args = [
        "fit",
        "-c", "configs/cls_rl/tiny_no_think.yaml", "-c", f"configs/strategy/{strategy}.yaml",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
        "--model.init_args.rewards", "[support.rewards.length_parity, equality]", *extra,
    ]  # fmt: skip
    run_cli(folder, *args)
    return folder / "runs/cls_rl_tiny_no_think"


@pytest.mark.parametrize("mu", [1, 2])
def test_ddp_ranks_end_identical(tmp_path, mu):
    """Each rank samples its own prompts (per-rank seeds, groups never split over ranks); gradients are averaged, so
    the ranks' weights stay identical; with mu = 2 the repeat sampler shards the data itself."""
    resolve_pretrained("tiny/qwen2-vl-shapes")  # build once, outside the two processes
    digest = ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")
    iterations = ("--model.init_args.num_iterations", str(mu), "--data.init_args.num_iterations", str(mu))
    run = _launch(tmp_path / "run", "ddp", *iterations, *digest)
    ranks = [json.loads((tmp_path / "run" / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["digest"] == ranks[1]["digest"]
    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
    assert sum(1 for r in rows if r.get("train/rewards/equality")) == 4


def test_fsdp2_trains_and_exports_full_weights(tmp_path):
    """Generation under FSDP2 (root gathered for the call: transformers encodes images before the first forward)."""
    path = resolve_pretrained("tiny/qwen2-vl-shapes")
    run = _launch(tmp_path / "run", "fsdp2_model_parallel")
    assert (run / "checkpoints/last.ckpt").is_dir()
    before, after = load_file(Path(path) / "model.safetensors"), load_file(run / "pretrained/model.safetensors")
    assert before.keys() == after.keys()
    assert all(after[k].shape == v.shape for k, v in before.items())
    assert any(not torch.equal(after[k], v) for k, v in before.items())
