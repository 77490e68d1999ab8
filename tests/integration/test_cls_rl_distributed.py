"""CLS-RL on two CPU processes (gloo) from the command line.

- DDP with 1 prompt per rank = one process with 2 prompts: keyed rollouts give every prompt the same completions
  wherever it runs, so the logged loss, rewards and KL agree at every step and the final weights agree; ranks end
  identical. With mu = 2 the repeat sampler shards the data itself and ranks still end identical.
- FSDP2 ends where DDP does (generation with the root gathered, the reference sharded too), and a mid-epoch sharded
  checkpoint resumes to the uninterrupted weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import SHARDED, logged_metrics, run_cli

from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed

STEPS = 5  # accumulate 2: 10 micro-batches of the 24-image epoch (6 steps), checkpoint at step 3 (the tiny config)
RUN = "runs/cls_rl_tiny_no_think"
DIGEST = ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")


def _launch(folder: Path, *extra: str, devices: int = 2, batch: int = 1, strategy: str | None = "ddp") -> Path:
    args = [
        "fit", "-c", "configs/cls_rl/tiny_no_think.yaml",
        *(["-c", f"configs/strategy/{strategy}.yaml"] if strategy else []),
        "--trainer.devices", str(devices), "--trainer.accelerator", "cpu", "--trainer.max_steps", str(STEPS),
        "--trainer.max_epochs", "1", "--data.init_args.batch_size", str(batch),
        "--model.init_args.rewards", "[support.rewards.length_parity, equality]", *extra,
    ]  # fmt: skip
    run_cli(folder, *args)
    return folder / RUN


def _assert_same_weights(run: Path, reference: Path) -> None:
    """Equal up to summation order (float32, a few AdamW steps)."""
    got, want = load_file(run / "pretrained/model.safetensors"), load_file(reference / "pretrained/model.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    resolve_pretrained("tiny/qwen2-vl-shapes")  # build once, outside the processes
    return _launch(tmp_path_factory.mktemp("single") / "run", devices=1, batch=2, strategy=None)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    resolve_pretrained("tiny/qwen2-vl-shapes")
    folder = tmp_path_factory.mktemp("ddp") / "run"
    _launch(folder, *DIGEST)
    return folder


def test_ddp_ranks_end_identical_with_two_iterations(tmp_path):
    """mu = 2: each rank samples its own prompts (groups never split over ranks), the repeat sampler shards the data
    and brings each group back for the second pass, gradients are averaged: the ranks' weights stay identical."""
    resolve_pretrained("tiny/qwen2-vl-shapes")
    iterations = ("--model.init_args.num_iterations", "2", "--data.init_args.num_iterations", "2")
    run = _launch(tmp_path / "run", *iterations, *DIGEST, "--trainer.max_steps", "4", batch=2)
    ranks = _ranks(tmp_path / "run")
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert sorted(logged_metrics(run)["train/rewards/equality"]) == [0, 1, 2, 3]
    assert "train/clip_fraction" in logged_metrics(run)


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_global_batch(ddp_run, single_run):
    """Rank r's prompt at each micro-batch is the single process's prompt r (Lightning's DistributedSampler and the
    EpochShuffleSampler draw the same ``seed + epoch`` permutation), and keyed sampling gives it the same 4
    completions: the logged loss, rewards, reward std and KL (reduced over ranks) equal the single process's at every
    step, and the weights agree after 5 steps; the ranks end identical."""
    ranks = _ranks(ddp_run)
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[0]["digest"] == ranks[1]["digest"]
    ddp, single = logged_metrics(ddp_run / RUN), logged_metrics(single_run)
    keys = ["train/loss", "train/reward", "train/reward_std", "train/kl", "train/completion_length"]
    keys += ["train/rewards/equality", "train/rewards/support.rewards.length_parity"]
    assert len(set(single["train/reward_std"].values())) > 1  # the rollouts vary: there is something to compare
    for key in keys:
        assert sorted(ddp[key]) == sorted(single[key]) == list(range(STEPS)), key
        for step, value in single[key].items():
            assert ddp[key][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, step)
    _assert_same_weights(ddp_run / RUN, single_run)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", list(SHARDED))
def test_sharded_matches_ddp_and_resumes_from_its_sharded_checkpoint(ddp_run, tmp_path, sharded):
    """FSDP2 (policy and reference sharded per block, generation with the root gathered) and FSDP1 (one unit per
    block, rollouts inside the redirected training step, gradient clipping by the root unit) log DDP's losses and
    export DDP's weights; restarting from the step-3 sharded checkpoint (mid-epoch, between optimizer steps of an
    accumulation of 2) ends on the uninterrupted run's weights and logs its last two losses."""
    strategy, precision = SHARDED[sharded]
    run = _launch(tmp_path / "run", *precision, strategy=strategy)
    fsdp, ddp = logged_metrics(run), logged_metrics(ddp_run / RUN)
    for step, value in ddp["train/loss"].items():
        assert fsdp["train/loss"][step] == pytest.approx(value, rel=1e-4, abs=1e-6), step
    _assert_same_weights(run, ddp_run / RUN)

    checkpoint = run / "checkpoints/epoch=0-step=3.ckpt"
    assert checkpoint.is_dir()  # a distributed checkpoint: one shard per rank
    resumed = _launch(tmp_path / "resumed", "--ckpt_path", str(checkpoint), *precision, strategy=strategy)
    again = logged_metrics(resumed)
    assert sorted(again["train/loss"]) == [3, 4]
    for step in (3, 4):
        assert again["train/loss"][step] == pytest.approx(fsdp["train/loss"][step], rel=1e-5, abs=1e-7), step
    _assert_same_weights(resumed, run)


@pytest.mark.slow
def test_batch_reward_scaling_uses_the_global_batch(tmp_path):
    """``scale_rewards: batch`` divides by the std of the whole micro-batch over all ranks (one all-reduce of count,
    sum and sum of squares), so 2 ranks x 1 prompt still end on the weights of 1 process x 2 prompts; with each rank's
    own std they do not (the per-rank scales change the averaged gradient's direction)."""
    resolve_pretrained("tiny/qwen2-vl-shapes")
    scale = ("--model.init_args.scale_rewards", "batch", "--trainer.max_steps", "3")
    single = _launch(tmp_path / "single", *scale, devices=1, batch=2, strategy=None)
    ddp = _launch(tmp_path / "ddp", *scale)
    got, want = logged_metrics(ddp), logged_metrics(single)
    for step, value in want["train/reward"].items():
        assert got["train/reward"][step] == pytest.approx(value, rel=1e-6), step
    _assert_same_weights(ddp, single)
