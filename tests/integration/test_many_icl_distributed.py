"""ManyICL on two CPU processes (gloo) from the command line.

- DDP with 4 episodes per rank = one process with 8 (the same episodes, the global answer-token normalisation): equal
  logged losses at every step and equal final weights; ranks end identical.
- FSDP2 ends where DDP does, and its sharded checkpoint resumes onto DDP's trajectory.
- Evaluation counts every query exactly once whatever the strategy (an odd-sized set, which Lightning's padded
  ``DistributedSampler`` would have split with a repeated query), with the single-process scores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from support.launch import SHARDED, logged_metrics, run_cli

from ftmods.datamodules import ManyShotDataModule
from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed

STEPS = 5
EVAL_RECORDS = {"word_yes_no": 3, "shift_digits": 4}  # 7 queries: option scoring and generation
HELDOUT_QUERIES = 16  # eval_per_task 8 x 2 held-out tasks (the tiny config's files)
QUERIES = sum(EVAL_RECORDS.values()) + HELDOUT_QUERIES  # 23: odd, so 2 ranks cannot split it evenly


def _eval_subset(path: Path) -> Path:
    """The first few evaluation records of one classification and one generative task."""
    left, rows = dict(EVAL_RECORDS), []
    for line in (REPO / "configs/data/many_icl_tiny_eval.jsonl").read_text().splitlines():
        task = json.loads(line)["task"]
        if left.get(task, 0) > 0:
            left[task] -= 1
            rows.append(line)
    path.write_text("\n".join(rows) + "\n")
    return path


def _launch(folder: Path, *extra: str, devices: int = 2, batch: int = 4, strategy: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        "fit", "-c", "configs/many_icl/tiny.yaml", *(["-c", f"configs/strategy/{strategy}.yaml"] if strategy else []),
        "--trainer.devices", str(devices), "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", str(STEPS),
        "--data.init_args.batch_size", str(batch),
        "--data.init_args.eval_files", str(_eval_subset(folder / "eval.jsonl")),
        *extra,
    ]  # fmt: skip
    run_cli(folder, *args)
    return folder / "runs/many_icl_tiny"


def _forgetting(run: Path) -> dict[str, float]:
    return json.loads(next(run.rglob("forgetting.json")).read_text())


def _assert_same_evaluation(run: Path, reference: Path, *, step: int) -> None:
    """Same scores at ``step`` (each query counted once), same held-out scores of the base model."""
    got, want = logged_metrics(run), logged_metrics(reference)
    assert got["val/num_queries"][step] == want["val/num_queries"][step] == QUERIES
    keys = sorted(k for k in want if k.startswith("val/"))
    assert keys == sorted(k for k in got if k.startswith("val/"))
    for key in keys:  # the weights differ by reduction order only: no prediction flips at this scale
        assert got[key][step] == pytest.approx(want[key][step], abs=1e-6), key
    before = {k: v for k, v in _forgetting(reference).items() if k.endswith("/before")}
    assert before
    assert before == {k: v for k, v in _forgetting(run).items() if k.endswith("/before")}


def _assert_same_weights(run: Path, reference: Path) -> None:
    """Equal up to summation order: AdamW after 5 steps amplifies float32 reduction-order noise to ~1e-6."""
    got, want = load_file(run / "pretrained/model.safetensors"), load_file(reference / "pretrained/model.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    resolve_pretrained("tiny/causal-lm")  # build once, outside the processes
    return _launch(tmp_path_factory.mktemp("single") / "run", "--trainer.max_steps", str(STEPS), devices=1, batch=8)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    resolve_pretrained("tiny/causal-lm")
    folder = tmp_path_factory.mktemp("ddp") / "run"
    digest = ("--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")
    return _launch(folder, "--trainer.max_steps", str(STEPS), *digest, strategy="ddp")


def test_episodes_shard_over_ranks_without_repeats_or_drops():
    """Each rank gets a whole share of the epoch's episodes; an odd count is rounded up with fresh episodes (not padded
    by repeating one), and the episodes a single process sees are the same."""
    dm = ManyShotDataModule(
        str(REPO / "configs/data/many_icl_tiny_train.jsonl"), max_length=256, episodes_per_epoch=7, batch_size=2
    )
    dm.connect(resolve_pretrained("tiny/causal-lm"))
    dm.setup("fit")
    keys = {}
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            current_epoch=1, strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        )
        keys[rank] = list(dm.train_dataloader().sampler)
    assert len(dm.episodes) == 8
    assert len(keys[0]) == len(keys[1]) == 4
    assert sorted(keys[0] + keys[1]) == list(range(8, 16))  # epoch 1: keys 8 .. 15, each once
    plans = {(task, tuple(shots)) for task, shots in (dm.episodes.plan(1, i) for i in range(8))}
    assert len(plans) == 8  # eight different episodes, the extra one included
    single = ManyShotDataModule(
        str(REPO / "configs/data/many_icl_tiny_train.jsonl"), max_length=256, episodes_per_epoch=7
    )
    single.connect(dm.tokenizer)
    single.setup("fit")
    assert [single.episodes.plan(1, i) for i in range(7)] == [dm.episodes.plan(1, i) for i in range(7)]


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_global_batch(ddp_run, single_run):
    """Ranks end identical; per step the logged loss (and each shot bucket's) is the global one, equal to a single
    process's on the same 8 episodes; the final weights agree; evaluation counts each query once."""
    ranks = [json.loads((ddp_run.parents[1] / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[0]["digest"] == ranks[1]["digest"]
    ddp, single = logged_metrics(ddp_run), logged_metrics(single_run)
    train = sorted(k for k in single if k.startswith("train/loss"))
    assert "train/loss" in train
    assert len(train) > 2  # the shot buckets too
    assert sorted(k for k in ddp if k.startswith("train/loss")) == train
    assert sorted(ddp["train/loss"]) == list(range(STEPS))
    for key in train:
        assert ddp[key].keys() == single[key].keys(), key
        for step, value in single[key].items():
            tolerance = 1e-6 if step == 0 else 1e-4  # step 0: the same weights; later: reduction order
            assert ddp[key][step] == pytest.approx(value, rel=tolerance), (key, step)
    _assert_same_weights(ddp_run, single_run)
    _assert_same_evaluation(ddp_run, single_run, step=STEPS - 1)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", list(SHARDED))
def test_sharded_matches_ddp_and_its_checkpoint_resumes(ddp_run, tmp_path, sharded):
    """FSDP2 and FSDP1 log DDP's losses, end at DDP's weights and give DDP's evaluation (every query on every rank in
    lock step, each counted by one rank; under FSDP1 the held-out probe before training gathers the root unit's
    parameters); the sharded ``last.ckpt`` resumes with a higher ``max_steps`` to completion."""
    strategy, precision = SHARDED[sharded]
    run = _launch(tmp_path / "run", "--trainer.max_steps", str(STEPS), *precision, strategy=strategy)
    fsdp, ddp = logged_metrics(run), logged_metrics(ddp_run)
    assert sorted(fsdp["train/loss"]) == list(range(STEPS))
    for step, value in ddp["train/loss"].items():
        assert fsdp["train/loss"][step] == pytest.approx(value, rel=1e-4), step
    _assert_same_weights(run, ddp_run)
    _assert_same_evaluation(run, ddp_run, step=STEPS - 1)

    last = run / "checkpoints/last.ckpt"
    assert last.is_dir()  # a distributed checkpoint: one shard per rank
    before = load_file(run / "pretrained/model.safetensors")
    more = ("--trainer.max_steps", str(STEPS + 2), "--ckpt_path", str(last))
    resumed = _launch(tmp_path / "run", *more, *precision, strategy=strategy)
    rows = list(csv.DictReader((resumed / "lightning_logs/version_1/metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2  # global step 5 restored: exactly max_steps - 5 more steps
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert losses[0] < fsdp["train/loss"][0]  # the trained weights, not the base model
    after = load_file(resumed / "pretrained/model.safetensors")
    assert any(not torch.equal(after[k], v) for k, v in before.items())
