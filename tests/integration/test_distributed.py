"""Two CPU processes (gloo) from the command line: DDP ranks end identical, and FSDP2 and FSDP1 end where DDP does."""

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


def _launch(folder: Path, strategy: str, *extra: str) -> Path:
    args = [
        "fit",
        "-c", "configs/sft/tiny.yaml", "-c", f"configs/strategy/{strategy}.yaml",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", *extra,  # the config's own validation interval: README's command as is
    ]  # fmt: skip
    run_cli(folder, *args)
    return folder / "runs/sft_tiny"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "run"
    meter = "--trainer.callbacks+=ftmods.callbacks.ThroughputMeter"
    extra = (meter, "--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests")
    return _launch(folder, "ddp", *extra)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The DDP run's global batch (16) in one process."""
    one = tmp_path_factory.mktemp("one") / "run"
    run_cli(one, "fit", "-c", "configs/sft/tiny.yaml", "--trainer.max_steps", "6", "--data.init_args.batch_size", "16",
            "--trainer.callbacks+=ftmods.callbacks.ThroughputMeter")  # fmt: skip
    return one / "runs/sft_tiny"


def test_ddp_ranks_end_identical(ddp_run):
    digests = ddp_run.parents[1] / "digests"
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (ddp_run / "checkpoints/last.ckpt").is_file()  # rank 0 wrote one checkpoint file
    assert (ddp_run / "pretrained/model.safetensors").is_file()


@pytest.mark.parametrize("sharded", list(SHARDED))
def test_sharded_matches_ddp(ddp_run, tmp_path, sharded):
    """Same data split, same global token normalisation: FSDP2 and FSDP1 (``BlockFSDPStrategy``, one unit per
    decoder layer) end at the DDP weights (up to reduction order), their checkpoint is a folder of shards, and the
    export gathers full tensors (under FSDP1 also the root unit's embeddings, norm and head)."""
    strategy, precision = SHARDED[sharded]
    fsdp = _launch(tmp_path / "run", strategy, *precision)
    assert (fsdp / "checkpoints/last.ckpt").is_dir()
    ddp_weights = load_file(ddp_run / "pretrained/model.safetensors")
    fsdp_weights = load_file(fsdp / "pretrained/model.safetensors")
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, tensor in ddp_weights.items():
        assert fsdp_weights[name].shape == tensor.shape, name
        torch.testing.assert_close(fsdp_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_matches_one_process_with_the_global_batch(ddp_run, one_process_run):
    """2 ranks x 8 records (epoch-ordered sampler: rank r takes every other record of the shuffled order) against one
    process x 16 records: the same global batches and the global token mean, so the same gradients up to summation
    order and padding; after 6 AdamW steps the weights agree to float32 rounding (rtol 1e-4)."""
    single = load_file(one_process_run / "pretrained/model.safetensors")
    ddp = load_file(ddp_run / "pretrained/model.safetensors")
    base = load_file(Path(resolve_pretrained("tiny/causal-lm")) / "model.safetensors")
    assert any(not torch.equal(single[k], base[k]) for k in base)  # it trained
    for name, tensor in ddp.items():
        torch.testing.assert_close(single[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_throughput_meter_sums_tokens_over_ranks(ddp_run, one_process_run):
    """ThroughputMeter under DDP counts every rank's tokens: the 4 measured steps (after the 2 warm-up steps) of the
    2-rank run hold exactly the tokens and model FLOPs of the one-process run with the same global batches. Only rank
    0 writes the summary, and the run does not hang on the summary's collective calls."""
    ddp = [json.loads(p.read_text()) for p in ddp_run.rglob("throughput.json")]
    one = [json.loads(p.read_text()) for p in one_process_run.rglob("throughput.json")]
    assert len(ddp) == len(one) == 1
    (ddp_summary,), (one_summary,) = ddp, one
    assert (ddp_summary["devices"], one_summary["devices"]) == (2, 1)
    assert ddp_summary["steps"] == one_summary["steps"] == 4
    assert ddp_summary["tokens"] == one_summary["tokens"] > 0
    assert ddp_summary["flops"] == one_summary["flops"] > 0
    logged = logged_metrics(ddp_run)
    assert list(logged["perf/tokens_per_sec"]) == [4]  # every log_every_n_steps (4, the config's) optimizer steps


@pytest.mark.slow
def test_ddp_extension_of_a_finished_run_equals_the_uninterrupted_run(tmp_path):
    """DDP run stopped at max_steps 4 (mid-epoch: 6 steps per epoch), last.ckpt written at the end of training, then
    extended to 9 with ``--ckpt_path``: the ftmods sampler (``EpochShardSampler``, built at Lightning's epoch, kept by
    Lightning instead of its own ``DistributedSampler``) lets the loader finish the stopped epoch and then follow on,
    so the weights equal a straight 9-step DDP run bit for bit."""
    straight = _launch(tmp_path / "straight", "ddp", "--trainer.max_steps", "9")
    stopped = _launch(tmp_path / "extended", "ddp", "--trainer.max_steps", "4")
    last = stopped / "checkpoints/last.ckpt"
    extended = _launch(tmp_path / "extended", "ddp", "--trainer.max_steps", "9", "--ckpt_path", str(last))
    want = load_file(straight / "pretrained/model.safetensors")
    got = load_file(extended / "pretrained/model.safetensors")
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
