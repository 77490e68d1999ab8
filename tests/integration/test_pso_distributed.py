"""PSO on two CPU processes (gloo, DDP): references are generated once, split over the ranks; ranks end identical in
offline and online (manual optimization) mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.launch import run_cli

from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("config", ["tiny", "tiny_online"])
def test_ddp_ranks_end_identical(tmp_path, config):
    for name in ("tiny/sd", "tiny/clip"):
        resolve_pretrained(name)
    args = [
        "fit", "-c", f"configs/pso/{config}.yaml", "-c",
        "configs/strategy/ddp.yaml", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "4", "--trainer.callbacks+=support.rank_digest.RankDigest",
        "--trainer.callbacks.dirpath", "digests",
    ]  # fmt: skip
    run_cli(tmp_path, *args)
    ranks = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["digest"] == ranks[1]["digest"]
    if config == "tiny":
        assert len(list((tmp_path / "runs/pso_tiny/references").glob("*.safetensors"))) == 14
