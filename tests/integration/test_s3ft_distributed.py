"""S3FT on two CPU processes (gloo) from the command line, on a selection built once by a single-process ``predict``.

DDP: ranks end identical and match one process with the same global batch (weights, and the per-source losses, which
are summed over ranks). FSDP2: ``predict`` generates with sharded parameters (every rank in lock step, also when one
rank has nothing to paraphrase or one item fewer) and the merged selection is the single-process one; ``fit`` ends
where DDP does and its sharded checkpoint resumes with ``--ckpt_path`` to the uninterrupted weights.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import SHARDED, run_cli

pytestmark = pytest.mark.distributed
CONFIG = "configs/s3ft/tiny.yaml"
STEPS = 12  # one epoch of the 96-record selection at a global batch of 8
SOURCES = ("model", "paraphrase", "gold")


def _fit(folder: Path, selection: Path, *extra: str, strategy: str | None, batch_size: int) -> Path:
    """``fit`` of the tiny config on ``selection`` for one epoch, logging every step; returns the run folder."""
    args = ["fit", "-c", CONFIG, *(["-c", f"configs/strategy/{strategy}.yaml"] if strategy else [])]
    args += [
        "--trainer.devices", "2" if strategy else "1", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
        "--data.init_args.selection_file", str(selection), "--data.init_args.batch_size", str(batch_size), *extra,
    ]  # fmt: skip
    run_cli(folder, *args)
    return folder / "runs/s3ft_tiny"


def _steps(run: Path) -> dict[int, dict[str, float]]:
    """The training rows of the run's (only) ``metrics.csv``, by step."""
    rows = csv.DictReader(next(run.rglob("metrics.csv")).open())
    return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in rows if r.get("train/loss")}


def _assert_same_source_losses(got: dict[str, float], want: dict[str, float], step: int) -> None:
    for source in SOURCES:
        key = f"train/loss_{source}"
        if math.isnan(want[key]):  # no example of that source in the global batch of that step
            assert math.isnan(got[key]), (step, key)
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def selection(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("s3ft_selection")
    run_cli(folder, "predict", "-c", CONFIG)
    return folder / "runs/s3ft_tiny/selection.jsonl"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, selection) -> Path:
    folder = tmp_path_factory.mktemp("s3ft_ddp") / "run"
    digest = ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")
    return _fit(folder, selection, *digest, strategy="ddp", batch_size=4)


def test_ddp_ranks_agree_and_match_one_process_with_the_same_global_batch(ddp_run, selection, tmp_path):
    """Lightning's seeded DistributedSampler deals rank r the records r, r + 2, ... of the epoch's permutation, the
    one the single process walks through in batches of 8: each global batch holds the same 8 records (none repeated
    or dropped over the epoch), the SFT loss is normalised by the global token count, so the two runs take the same
    steps. ``train/loss_<source>`` sums NLL and tokens over both ranks before dividing: it is the one-process value
    at every step, and NaN in the same steps (no example of that source in the global batch)."""
    digests = ddp_run.parents[1] / "digests"
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[0]["digest"] == ranks[1]["digest"]

    single = _fit(tmp_path / "single", selection, strategy=None, batch_size=8)
    ddp_steps, single_steps = _steps(ddp_run), _steps(single)
    assert sorted(ddp_steps) == sorted(single_steps) == list(range(STEPS))
    for step in range(STEPS):
        _assert_same_source_losses(ddp_steps[step], single_steps[step], step)
    assert any(math.isnan(row["train/loss_paraphrase"]) for row in single_steps.values())  # the NaN path is tested

    ddp_w = load_file(ddp_run / "pretrained/model.safetensors")
    single_w = load_file(single / "pretrained/model.safetensors")
    assert ddp_w.keys() == single_w.keys()
    for name, tensor in single_w.items():  # 12 Adam steps on gradients equal up to summation order (padding differs)
        torch.testing.assert_close(ddp_w[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", list(SHARDED))
def test_sharded_predict_generates_with_sharded_parameters(selection, tmp_path, sharded):
    """One item per batch over 7 items: rank 1 gets items 1, 3, 5 and item 0 again (the sampler evens the ranks out
    rather than giving rank 0 a fourth batch alone), and in most batches one rank has no rejected answer yet must join
    the other's paraphrase generation. Greedy decoding: every record is the single-process one, each exactly once."""
    folder = tmp_path / "run"
    extra = ("--data.init_args.limit", "7", "--data.init_args.predict_batch_size", "1")
    strategy, precision = SHARDED[sharded]
    args = ["predict", "-c", CONFIG, "-c", f"configs/strategy/{strategy}.yaml", *precision]
    run_cli(folder, *args, "--trainer.devices", "2", "--trainer.accelerator", "cpu", *extra, timeout=180)
    run = folder / "runs/s3ft_tiny"
    records = [json.loads(line) for line in (run / "selection.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in selection.read_text().splitlines()][:7]  # file order on one process
    assert len(records) == 7
    assert sorted(r["id"] for r in records) == [r["id"] for r in reference]
    assert sorted(records, key=lambda r: r["id"]) == reference  # answers, paraphrases, verdicts and sources
    assert {r["source"] for r in records} == set(SOURCES)  # both generations (answer, paraphrase) ran
    assert not list(run.glob("*.part"))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", list(SHARDED))
def test_sharded_fit_matches_ddp_and_resumes_from_its_sharded_checkpoint(ddp_run, selection, tmp_path, sharded):
    """FSDP2 and FSDP1 end at the DDP weights (same split, same normalisation); the mid-epoch checkpoint (a folder of
    shards) resumes with --ckpt_path and finishes at the uninterrupted run's weights, with the same losses on the
    way."""
    mid = (
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", "mid",
        "--trainer.callbacks.every_n_train_steps", str(STEPS // 2), "--trainer.callbacks.save_top_k", "-1",
    )  # fmt: skip
    strategy, precision = SHARDED[sharded]
    full = _fit(tmp_path / "full", selection, *mid, *precision, strategy=strategy, batch_size=4)
    checkpoint = tmp_path / "full/mid" / f"epoch=0-step={STEPS // 2}.ckpt"
    assert checkpoint.is_dir()  # one shard file per rank
    assert (full / "checkpoints/last.ckpt").is_dir()

    ddp_w = load_file(ddp_run / "pretrained/model.safetensors")
    full_w = load_file(full / "pretrained/model.safetensors")
    assert ddp_w.keys() == full_w.keys()
    for name, tensor in ddp_w.items():
        torch.testing.assert_close(full_w[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    full_steps = _steps(full)
    for step, row in _steps(ddp_run).items():
        _assert_same_source_losses(full_steps[step], row, step)

    resumed = _fit(tmp_path / "resumed", selection, "--ckpt_path", str(checkpoint), *precision, strategy=strategy,
                   batch_size=4)  # fmt: skip
    resumed_steps = _steps(resumed)
    assert sorted(resumed_steps) == list(range(STEPS // 2, STEPS))  # it continued where the checkpoint stopped
    for step, row in resumed_steps.items():
        assert row["epoch"] == 0  # still the first epoch
        assert row["train/loss"] == pytest.approx(full_steps[step]["train/loss"], rel=1e-5), step
    resumed_w = load_file(resumed / "pretrained/model.safetensors")
    for name, tensor in full_w.items():  # same shards, same optimizer state, same batches: the same computation
        torch.testing.assert_close(resumed_w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
