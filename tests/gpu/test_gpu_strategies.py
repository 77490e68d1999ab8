"""On one CUDA GPU (``RUN_ONLY_GPU_TESTS=1 python -m pytest tests/gpu``): every method's tiny config and a real-size
architecture with random weights train in bf16 under FSDP (``BlockFSDPStrategy``) and DeepSpeed ZeRO-3, and SFT
resumes from each strategy's sharded checkpoint. DeepSpeed must be installed (``pip install deepspeed``).

Each run is the README's command line (``python cli.py fit -c <config> -c configs/strategy/<strategy>.yaml``) with
``--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from support.launch import logged_metrics, run_cli

pytestmark = pytest.mark.gpu

TINY = {
    "sft": "configs/sft/tiny.yaml",
    "many_icl": "configs/many_icl/tiny.yaml",
    "s3ft": "configs/s3ft/tiny.yaml",
    "locft": "configs/locft/tiny.yaml",
    "cls_rl": "configs/cls_rl/tiny.yaml",
    "cls_rl_no_think": "configs/cls_rl/tiny_no_think.yaml",
    "pso": "configs/pso/tiny.yaml",
    "pso_online": "configs/pso/tiny_online.yaml",
}
REAL = {  # the tiny config's data and settings, the model swapped for a real-size architecture
    "sft": "random/qwen2.5-0.5b",
    "many_icl": "random/qwen2.5-0.5b",
    "s3ft": "random/qwen2.5-0.5b",
    "locft": "random/llama-3.2-1b",
    "cls_rl": "random/qwen2-vl-2b",
    "pso": "random/sd-1.5",
}
STRATEGIES = ("fsdp", "deepspeed_zero3")
MANUAL = {"locft", "pso_online"}  # optimize inside training_step: FSDP1 refuses them (tested on CPU), FSDP2 runs them


def _pairs(methods) -> list[tuple[str, str]]:
    return [(m, s) for m in methods for s in STRATEGIES if not (s == "fsdp" and m in MANUAL)]


GPU = ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed")


def _fit(folder: Path, config: str, strategy: str, *extra: str) -> dict[str, dict[int, float]]:
    args = ("-c", config, "-c", f"configs/strategy/{strategy}.yaml", *GPU, *extra)
    if "s3ft" in config:  # S3FT's selection first (generation and judging under the strategy), then fit
        run_cli(folder, "predict", *args, timeout=900)
    run_cli(folder, "fit", *args, timeout=900)
    metrics = logged_metrics(folder / "runs")
    losses = [v for key, values in metrics.items() if key.startswith("train/") for v in values.values()]
    assert losses, f"no train/ metrics logged: {sorted(metrics)}"
    assert all(math.isfinite(v) for v in losses)
    return metrics


def _last_checkpoint(folder: Path) -> Path:
    found = sorted((folder / "runs").rglob("last.ckpt"))
    assert found, "no last.ckpt written"
    return found[0]


@pytest.mark.parametrize(("method", "strategy"), _pairs(TINY))
def test_tiny_config_trains_in_bf16(tmp_path, method, strategy):
    """The whole tiny config (validation, generation, rollouts, online sampling included) and its checkpoint."""
    _fit(tmp_path, TINY[method], strategy)
    _last_checkpoint(tmp_path)  # a file (FSDP sharded state is a folder too) in the strategy's format


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sft_resumes_from_the_strategys_checkpoint(tmp_path, strategy):
    _fit(tmp_path, TINY["sft"], strategy, "--trainer.max_steps", "12")
    checkpoint = _last_checkpoint(tmp_path)
    metrics = _fit(tmp_path, TINY["sft"], strategy, "--trainer.max_steps", "24", "--ckpt_path", str(checkpoint))
    assert max(step for values in metrics.values() for step in values) >= 20  # continued past the checkpoint


@pytest.mark.parametrize(("method", "strategy"), _pairs(REAL))
def test_real_size_architecture_trains_in_bf16(tmp_path, method, strategy):
    """4 steps of the tiny config's recipe on a 0.5B-2.2B model (random weights from the published config)."""
    pretrained = ("--model.init_args.pretrained", REAL[method])
    _fit(tmp_path, TINY[method], strategy, *pretrained, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0")
