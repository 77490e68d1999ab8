"""PSO on two CPU processes (gloo): DDP and FSDP2 (``FSDP2Strategy``), offline and online.

- DDP: references are generated once, split over the ranks; ranks end identical in offline and online (manual
  optimization) mode.
- DDP vs one process with the same global batch (offline): 2 ranks x B take exactly the steps of 1 x 2B. The sampler
  gives step k the same records either way (checked below), ``t`` and noise are drawn per (epoch, item id), not per
  (step, rank), and DDP averages equal-sized rank means; so the logged losses and the LoRA weights agree up to
  floating-point summation order. The reference-latents cache is rank-count independent too (one seed per request).
- FSDP2: the UNet is sharded per block (the checkpoint holds two shards of every UNet tensor and no frozen VAE / text
  encoder / reward weights), references, validation images and online rollouts are sampled with the sharded UNet, the
  gathered LoRA export equals the DDP run's, and a ``--ckpt_path`` resume lands on the single-process run's weights.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import run_cli

from ftmods.datamodules.pso import EpochKeySampler
from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed

RUNS = {"tiny": "runs/pso_tiny", "tiny_online": "runs/pso_tiny_online"}
LORA = "lora/pytorch_lora_weights.safetensors"
# Same records, same draws; only the summation order differs (batch 4 vs 2 + all-reduce, sharded reduce-scatter):
# differences stay at float32 rounding, far below what one Adam step (lr 1e-3) moves a weight.
LOSS_TOL = {"rtol": 1e-4, "atol": 1e-6}
WEIGHT_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _launch(folder: Path, config: str, *extra: str, strategy: str | None = None, devices: int = 2) -> Path:
    for name in ("tiny/sd", "tiny/clip"):
        resolve_pretrained(name)  # build once, outside the processes
    args = ["fit", "-c", f"configs/pso/{config}.yaml"]
    if strategy is not None:
        args += ["-c", f"configs/strategy/{strategy}.yaml"]
    args += ["--trainer.devices", str(devices), "--trainer.accelerator", "cpu", *extra]
    run_cli(folder, *args)
    return folder / RUNS[config]


def _digest_args() -> tuple[str, ...]:
    return ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")


def _losses(run: Path, version: int = 0) -> dict[int, float]:
    rows = csv.DictReader((run / f"lightning_logs/version_{version}/metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _lora_in_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if ".lora_" in k}


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert expected
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **WEIGHT_TOL, msg=name)


@pytest.fixture(scope="module")
def ddp_offline(tmp_path_factory) -> Path:
    """6 steps (1.5 epochs, validation and a checkpoint at step 6), 2 ranks x batch 2."""
    folder = tmp_path_factory.mktemp("ddp_offline")
    return _launch(folder, "tiny", "--trainer.max_steps", "6", *_digest_args(), strategy="ddp")


@pytest.fixture(scope="module")
def single_offline(tmp_path_factory) -> Path:
    """One process, batch 4 (the DDP runs' global batch), 8 steps (checkpoint at 6)."""
    folder = tmp_path_factory.mktemp("single_offline")
    return _launch(folder, "tiny", "--trainer.max_steps", "8", "--data.init_args.batch_size", "4", devices=1)


@pytest.fixture(scope="module")
def ddp_online(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_online")
    return _launch(folder, "tiny_online", "--trainer.max_steps", "4", *_digest_args(), strategy="ddp")


@pytest.mark.parametrize("config", ["tiny", "tiny_online"])
def test_ddp_ranks_end_identical(request, config):
    run = request.getfixturevalue("ddp_offline" if config == "tiny" else "ddp_online")
    ranks = [json.loads((run.parents[1] / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = 6 if config == "tiny" else 4
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == steps
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (run / LORA).is_file()
    if config == "tiny":
        assert len(list((run / "references").glob("*.safetensors"))) == 14


def test_sampler_gives_ranks_the_records_of_the_global_batch():
    """The precondition of the comparison below: per epoch the ranks' shares are disjoint and cover the 14 pairs
    once, and step k of 2 ranks x 2 holds the records of step k of 1 x 4."""
    for epoch in (0, 1):
        single = list(EpochKeySampler(range(14), seed=0, epoch=epoch))
        shares = [list(EpochKeySampler(range(14), seed=0, epoch=epoch, num_replicas=2, rank=r)) for r in (0, 1)]
        assert sorted(shares[0] + shares[1]) == sorted(single) == [(epoch, i) for i in range(14)]
        for step in range(4):
            ranks = shares[0][2 * step : 2 * step + 2] + shares[1][2 * step : 2 * step + 2]
            assert sorted(ranks) == sorted(single[4 * step : 4 * step + 4])


def test_ddp_matches_single_process_with_the_same_global_batch(ddp_offline, single_offline):
    """2 ranks x 2 pairs vs 1 process x 4 pairs: the same reference cache, the same loss at every step and the same
    LoRA weights after 6 steps (t and noise are drawn per item, so neither the rank nor the position matters). The
    LoRA B matrices start at zero: nonzero ones show that training moved them."""
    ddp_refs = sorted((ddp_offline / "references").glob("*"))
    single_refs = sorted((single_offline / "references").glob("*"))
    assert [p.name for p in ddp_refs] == [p.name for p in single_refs]
    assert len(ddp_refs) == 14
    for ddp_ref, single_ref in zip(ddp_refs, single_refs, strict=True):  # sampled in chunks of 7 vs 8 and 6
        torch.testing.assert_close(load_file(ddp_ref)["latents"], load_file(single_ref)["latents"], **WEIGHT_TOL)
    ddp_losses, single_losses = _losses(ddp_offline), _losses(single_offline)
    assert len(ddp_losses) == 6
    assert len(single_losses) == 8
    steps = sorted(ddp_losses)
    assert len({round(ddp_losses[s], 6) for s in steps}) > 1  # the draws differ from step to step
    torch.testing.assert_close(
        torch.tensor([ddp_losses[s] for s in steps]), torch.tensor([single_losses[s] for s in steps]), **LOSS_TOL
    )
    ddp_lora = _lora_in_checkpoint(ddp_offline / "checkpoints/last.ckpt")  # a file: rank 0 wrote it
    single_lora = _lora_in_checkpoint(single_offline / "checkpoints/epoch=1-step=6.ckpt")
    _assert_close(ddp_lora, single_lora)
    assert any(name.endswith("lora_B.default.weight") and v.abs().max() > 0 for name, v in single_lora.items())


@pytest.mark.slow
def test_fsdp2_offline_shards_matches_ddp_and_resumes(ddp_offline, single_offline, tmp_path):
    """FSDP2, offline: references, training and validation with the UNet sharded per block; the gathered LoRA
    export equals DDP's after 6 steps; resumed with ``--ckpt_path`` to step 8 it equals the single process's."""
    from torch.distributed.checkpoint import FileSystemReader

    run = _launch(tmp_path, "tiny", "--trainer.max_steps", "6", strategy="fsdp2_model_parallel")
    _assert_close(load_file(run / LORA), load_file(ddp_offline / LORA))
    assert len(list((run / "references").glob("*.safetensors"))) == 14
    assert list((run / "lightning_logs/version_0/val_images").glob("*.png"))  # sampled at step 6
    checkpoint = run / "checkpoints/last.ckpt"
    assert checkpoint.is_dir()  # one shard per rank
    tensors = {k: v for k, v in FileSystemReader(checkpoint).read_metadata().state_dict_metadata.items()
               if k.startswith("state_dict.")}  # fmt: skip
    assert tensors
    assert all(k.startswith("state_dict.unet.") for k in tensors)
    assert all(len(v.chunks) == 2 for v in tensors.values())  # every UNet tensor (LoRA too) is sharded
    torch.testing.assert_close(
        torch.tensor(list(_losses(run).values())), torch.tensor(list(_losses(ddp_offline).values())), **LOSS_TOL
    )

    shutil.rmtree(run / "lora")
    _launch(tmp_path, "tiny", "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint),
            strategy="fsdp2_model_parallel")  # fmt: skip
    resumed, single = _losses(run, version=1), _losses(single_offline)
    assert len(resumed) == 2
    torch.testing.assert_close(
        torch.tensor(list(resumed.values())), torch.tensor([single[s] for s in resumed]), **LOSS_TOL
    )
    _assert_close(load_file(run / LORA), load_file(single_offline / LORA))


@pytest.mark.slow
def test_fsdp1_offline_matches_ddp_and_resumes(ddp_offline, single_offline, tmp_path):
    """FSDP1 (``fsdp.yaml``: one unit per UNet block; VAE, text encoder and reward model kept out of FSDP and
    replicated), offline: the references are generated outside a training step with the root unit gathered; after 6
    steps the gathered LoRA export and the losses equal DDP's; resumed from the sharded checkpoint to step 8 it equals
    the single process's."""
    precision = ("--trainer.precision", "32-true")
    run = _launch(tmp_path, "tiny", "--trainer.max_steps", "6", *precision, strategy="fsdp")
    assert len(list((run / "references").glob("*.safetensors"))) == 14
    _assert_close(load_file(run / LORA), load_file(ddp_offline / LORA))
    torch.testing.assert_close(
        torch.tensor(list(_losses(run).values())), torch.tensor(list(_losses(ddp_offline).values())), **LOSS_TOL
    )
    checkpoint = run / "checkpoints/last.ckpt"
    assert checkpoint.is_dir()  # sharded state dict: one file per rank
    shutil.rmtree(run / "lora")
    _launch(tmp_path, "tiny", "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint), *precision, strategy="fsdp")
    resumed, single = _losses(run, version=1), _losses(single_offline)
    assert len(resumed) == 2
    torch.testing.assert_close(
        torch.tensor(list(resumed.values())), torch.tensor([single[s] for s in resumed]), **LOSS_TOL
    )
    _assert_close(load_file(run / LORA), load_file(single_offline / LORA))


def test_fsdp1_refuses_manual_optimization(tmp_path):
    """Online PSO steps its optimizer inside training_step; FSDP1 would be left mid-backward: a clear error instead."""
    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[2] / "configs")
    args = ["fit", "-c", "configs/pso/tiny_online.yaml", "-c", "configs/strategy/fsdp.yaml", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "PSOModule optimizes manually inside training_step" in done.stderr
    assert "fsdp2_model_parallel.yaml" in done.stderr


@pytest.mark.slow
def test_fsdp2_online_matches_ddp(ddp_online, tmp_path):
    """FSDP2, online: rollouts, rewards and validation images with the sharded UNet; the gathered LoRA export
    equals the DDP run's (same prompts per rank, same per-(step, rank) rollout noise)."""
    run = _launch(tmp_path, "tiny_online", "--trainer.max_steps", "4", strategy="fsdp2_model_parallel")
    assert (run / "checkpoints/last.ckpt").is_dir()
    assert list((run / "lightning_logs/version_0/val_images").glob("*.png"))
    fsdp, ddp = load_file(run / LORA), load_file(ddp_online / LORA)
    assert all(torch.isfinite(v).all() for v in fsdp.values())
    _assert_close(fsdp, ddp)
    torch.testing.assert_close(
        torch.tensor(list(_losses(run).values())), torch.tensor(list(_losses(ddp_online).values())), **LOSS_TOL
    )
