"""Two CPU processes (gloo) from the command line: Lightning's EMA under DDP, ShardedEMA under FSDP2 with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import run_cli

from ftmods.soup import load_ingredient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed

DECAY = ("--trainer.callbacks.init_args.decay", "0.5")  # right after the snippet: sets the EMA callback's decay


def _launch(folder: Path, strategy: str, ema: str, *extra: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "configs").symlink_to(REPO / "configs")
    args = [
        "fit",
        "-c", "configs/sft/tiny.yaml", "-c", f"configs/strategy/{strategy}.yaml",
        "-c", f"configs/callbacks/{ema}.yaml", *DECAY,
        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
        "--model.init_args.sample_completions", "0", *extra,
    ]  # fmt: skip
    result = run_cli(folder, *args)
    assert "not averaged" not in result.stderr  # ShardedEMA follows every trainable (sharded) parameter
    return folder / "runs/sft_tiny"


@pytest.fixture(scope="module")
def ddp_ema(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "run"
    return _launch(folder, "ddp", "ema", "--trainer.callbacks+=support.rank_digest.RankDigest",
                   "--trainer.callbacks.dirpath", "digests")  # fmt: skip


CHECKPOINT_EVERY_3 = (
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.dirpath", "every3", "--trainer.callbacks.every_n_train_steps", "3",
    "--trainer.callbacks.save_top_k", "-1",
)  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2_sharded_ema(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("fsdp2") / "run", "fsdp2_model_parallel", "sharded_ema", *CHECKPOINT_EVERY_3)


def test_ddp_lightning_ema_ranks_identical(ddp_ema):
    digests = ddp_ema.parents[1] / "digests"
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the averaged model, copied in at the end, is the same
    checkpoint = torch.load(ddp_ema / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["averaging_state"]["n_averaged"] == 6  # one update per optimizer step
    # The last checkpoint is written at the end of training, after Lightning copied the average into the model: both
    # slots hold the average (ShardedEMA with swap_at_end=True behaves the same way).
    exported = load_file(ddp_ema / "pretrained/model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(tensor, checkpoint["state_dict"][f"model.{name}"]), name
        assert torch.equal(tensor, checkpoint["current_model_state"][f"model.{name}"]), name


def test_fsdp2_sharded_ema_is_sharded_and_matches_lightning_ema_under_ddp(fsdp2_sharded_ema, ddp_ema):
    """The shadow is saved as two shards (one per rank) in the DCP folder, and the EMA it ends with (copied into the
    model and exported) is the one Lightning's EMA computes under DDP (same data split and update rule)."""
    from torch.distributed.checkpoint import FileSystemReader

    last = fsdp2_sharded_ema / "checkpoints/last.ckpt"
    assert last.is_dir()
    metadata = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    shadow = metadata["state_dict.ema_shadow.model.model.layers.0.self_attn.q_proj.weight"]
    assert len(shadow.chunks) == 2  # one shard per rank
    assert sorted(c.offsets[0] for c in shadow.chunks) == [0, shadow.size[0] // 2]

    ours = load_file(fsdp2_sharded_ema / "pretrained/model.safetensors")
    theirs = load_file(ddp_ema / "pretrained/model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_resume_from_a_sharded_checkpoint_equals_uninterrupted(fsdp2_sharded_ema, tmp_path):
    """Resuming at step 3 from the DCP folder restores weights, EMA shards, optimizer and callback state: steps 4-6
    end where the uninterrupted run ended (live weights and EMA, read back from the step-6 folders)."""
    step3 = next((fsdp2_sharded_ema.parents[1] / "every3").glob("*step=3.ckpt"))
    resumed = _launch(tmp_path / "run", "fsdp2_model_parallel", "sharded_ema", *CHECKPOINT_EVERY_3,
                      "--ckpt_path", str(step3))  # fmt: skip
    straight = load_ingredient(next((fsdp2_sharded_ema.parents[1] / "every3").glob("*step=6.ckpt")), weights="all")
    again = load_ingredient(next((resumed.parents[1] / "every3").glob("*step=6.ckpt")), weights="all")
    assert straight.keys() == again.keys()
    assert any(k.startswith("ema_shadow.") for k in straight)
    for name, tensor in straight.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
