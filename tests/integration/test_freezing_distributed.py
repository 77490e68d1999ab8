"""Freezing on two CPU processes (gloo) from the command line: DDP ranks stay identical and frozen weights bit-exact,
with the selection fixed at setup and re-drawn every epoch (gradient mask), and under FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import run_cli

from ftmods.callbacks.freezing import HalfFineTuning, find_blocks
from ftmods.models.tiny import resolve_pretrained
from ftmods.sft import SFTModule

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny/causal-lm"
pytestmark = pytest.mark.distributed


def _launch(folder: Path, strategy: str, *extra: str) -> tuple[Path, str]:
    """6 steps of configs/sft/tiny.yaml + configs/callbacks/hft.yaml on 2 processes; returns the run folder and log."""
    args = [
        "fit",
        "-c", "configs/sft/tiny.yaml", "-c", f"configs/strategy/{strategy}.yaml", "-c", "configs/callbacks/hft.yaml",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", *extra,
    ]  # fmt: skip
    result = run_cli(folder, *args)
    return folder / "runs/sft_tiny", result.stdout + result.stderr


def _digests(run: Path) -> list[dict]:
    return [json.loads((run.parents[1] / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _changed(run: Path) -> dict[str, bool]:
    """Per exported weight: whether it differs from the tiny model's own pretrained weights."""
    pretrained = load_file(Path(resolve_pretrained(TINY)) / "model.safetensors")
    exported = load_file(run / "pretrained/model.safetensors")
    assert exported.keys() == pretrained.keys()
    return {name: not torch.equal(tensor, pretrained[name]) for name, tensor in exported.items()}


def _selection(epoch: int = 0, **kwargs) -> set[str]:
    """The HFT draw of configs/callbacks/hft.yaml recomputed here, in the exported (Hugging Face) names."""
    module = SFTModule(TINY)
    module.configure_model()
    hft = HalfFineTuning(**kwargs)
    hft._params = [(n, p.numel()) for n, p in module.named_parameters()]
    hft._blocks = find_blocks(module)
    return {n.removeprefix("model.") for n in hft.selection(epoch)}


DIGEST = ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")


def test_ddp_freezing_at_setup(tmp_path):
    """requires_grad set in setup(), before DDP wraps the model: identical ranks, frozen weights untouched."""
    run, log = _launch(tmp_path / "run", "ddp", *DIGEST)
    ranks = _digests(run)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert "mode requires_grad" in log
    changed = _changed(run)
    trainable = _selection()
    assert 0 < len(trainable) < len(changed)
    assert {n for n, c in changed.items() if c} == trainable


def test_ddp_reselect_every_epoch_with_gradient_mask(tmp_path):
    """3 epochs of 2 steps, a new draw each: 'auto' picks the gradient mask under DDP, ranks stay identical, weights
    frozen in all three epochs are bit-exact, all others moved."""
    hft_args = ("--trainer.callbacks.init_args.reselect", "epoch")  # before RankDigest: the last callback is HFT's
    run, log = _launch(tmp_path / "run", "ddp", *hft_args, "--trainer.limit_train_batches", "2", *DIGEST)
    ranks = _digests(run)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert "mode grad_mask" in log
    draws = [_selection(epoch, reselect="epoch") for epoch in range(3)]
    assert len({frozenset(d) for d in draws}) == 3
    changed = _changed(run)
    never_trained = set(changed) - set().union(*draws)
    assert never_trained  # seed 0 leaves some projections frozen in all three epochs
    assert {n for n, c in changed.items() if not c} == never_trained


def test_fsdp2_freezing_keeps_frozen_shards_unchanged(tmp_path):
    """FSDP2 (ModelParallelStrategy, DTensor parameters): the frozen set is applied after configure_model sharded the
    model and before the optimizer is built; the gathered export shows frozen weights untouched."""
    run, log = _launch(tmp_path / "run", "fsdp2_model_parallel")
    assert (run / "checkpoints/last.ckpt").is_dir()  # sharded checkpoint: callback state from rank 0
    changed = _changed(run)
    assert {n for n, c in changed.items() if c} == _selection()
