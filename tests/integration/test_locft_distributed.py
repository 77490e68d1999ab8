"""LocFT-BF on two CPU processes (gloo) from the command line: FSDP2 ends where DDP does, and its sharded checkpoint
resumes to the uninterrupted weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TARGET = "model.layers.1.mlp.down_proj.weight"
pytestmark = pytest.mark.distributed


def _edits(path: Path) -> Path:
    rows = [
        {"prompt": f"The capital of {name} is", "target_new": city, "rephrase_prompt": f"{name} has its capital at",
         "locality_prompt": "What is 2 + 3?", "locality_ground_truth": "5"}
        for name, city in [("Tepiva", "Lorsk"), ("Maldo", "Venn"), ("Ostra", "Bram"), ("Quill", "Teal"),
                           ("Yarrow", "Polo"), ("Zent", "Mira"), ("Arbo", "Kest"), ("Brin", "Sola")]
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _launch(folder: Path, strategy: str, *extra: str, epochs: int = 4) -> Path:
    folder.mkdir(parents=True)
    (folder / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "-c", "configs/locft/tiny.yaml", "-c", f"configs/strategy/{strategy}.yaml",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(epochs),
        "--trainer.callbacks+=ftmods.callbacks.PretrainedExport", "--trainer.callbacks.dirpath", "pretrained",
        "--model.init_args.pretrained", "tiny/causal-lm",
        "--model.init_args.target_modules", f"[{TARGET.replace('.', chr(92) + '.')}]",
        "--data.init_args.edit_files", str(_edits(folder / "edits.jsonl")), "--data.init_args.batch_size", "4", *extra,
    ]  # fmt: skip
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("locft_ddp") / "run", "ddp")


def test_fsdp2_edits_like_ddp_and_changes_only_the_tuned_tensor(ddp_run, tmp_path):
    """The same global batches (two ranks of 2 edits), the rank-mean loss for the skip rule, one Adam on the tuned
    tensor: the sharded run exports the DDP weights (up to reduction order), frozen tensors bit-identical to the base
    model, and its final evaluation (every request on every rank, in lock step) matches."""
    fsdp = _launch(tmp_path / "run", "fsdp2_model_parallel")
    from ftmods.models.tiny import resolve_pretrained

    base = load_file(Path(resolve_pretrained("tiny/causal-lm")) / "model.safetensors")
    ddp_w = load_file(ddp_run / "pretrained/model.safetensors")
    fsdp_w = load_file(fsdp / "pretrained/model.safetensors")
    assert ddp_w.keys() == fsdp_w.keys()
    for name, tensor in fsdp_w.items():
        if name == TARGET:
            assert not torch.equal(tensor, base[name])
            torch.testing.assert_close(tensor, ddp_w[name], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(tensor, base[name]), name
    reports = [json.loads(next((r / "runs/locft_tiny").rglob("edit_eval.json")).read_text()) for r in (ddp_run, fsdp)]
    for key in ("eval/teacher_forced_token/reliability", "eval/wild_em/reliability", "eval/wild_em/locality"):
        assert reports[1][key] == pytest.approx(reports[0][key], abs=1e-6), key


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_to_the_uninterrupted_weights(ddp_run, tmp_path):
    """Two epochs under FSDP2 leave a distributed ``last.ckpt`` (one shard per rank, the fp32 tuned tensor and its
    Adam state); resuming it for epochs 3 and 4 ends on the weights of the uninterrupted 4-epoch run, with the frozen
    tensors still the base model's."""
    first = _launch(tmp_path / "first", "fsdp2_model_parallel", epochs=2)
    last = first / "runs/locft_tiny/checkpoints/last.ckpt"
    assert last.is_dir()
    halfway = load_file(first / "pretrained/model.safetensors")[TARGET]
    resumed = _launch(tmp_path / "resumed", "fsdp2_model_parallel", "--ckpt_path", str(last))
    got, want = load_file(resumed / "pretrained/model.safetensors"), load_file(ddp_run / "pretrained/model.safetensors")
    assert got.keys() == want.keys()
    assert not torch.equal(got[TARGET], halfway)  # epochs 3 and 4 did train
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
