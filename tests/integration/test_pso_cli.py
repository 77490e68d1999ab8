"""The tiny PSO configs as a user runs them (a separate process, no download): offline and online fit."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("config", "metric"), [("tiny", "train/implicit_accuracy"), ("tiny_online", "train/reward")])
def test_tiny_pso_fits_and_exports_a_loadable_lora(tmp_path, config, metric):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for name in ("tiny/sd", "tiny/clip"):
        resolve_pretrained(name)  # build outside the timed run
    start = time.perf_counter()
    fit = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "-c", f"configs/pso/{config}.yaml"],
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    seconds = time.perf_counter() - start
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert seconds < 60, seconds
    run = tmp_path / "runs" / f"pso_{config}"
    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
    values = [float(r[metric]) for r in rows if r.get(metric)]
    assert len(values) == (12 if config == "tiny" else 8)
    assert all(torch.isfinite(torch.tensor(values)))
    assert sum(1 for r in rows if r.get("val/reward")) == 2
    assert len(list(run.rglob("val_images/*.png"))) == 2
    if config == "tiny":
        assert len(list((run / "references").glob("*.safetensors"))) == 14
        assert values[-1] > values[0]  # implicit accuracy starts at 0 (policy == reference)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny/sd"), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    sample, text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 16, 32)
    with torch.no_grad():
        before = pipe.unet(sample, 999, encoder_hidden_states=text).sample
        pipe.load_lora_weights(run / "lora")
        after = pipe.unet(sample, 999, encoder_hidden_states=text).sample
    assert not torch.allclose(before, after)  # the exported adapter loads into diffusers and changes the UNet
