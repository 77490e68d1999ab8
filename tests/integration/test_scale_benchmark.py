"""``benchmarks/scale.py`` on CPU: the baseline loop and every (method, strategy) run through the CLI report their
figures, SFT rows are full (every measured row holds ``--seq-len`` real tokens), and DDP-style strategies count the
tokens of all ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scale_benchmark_reports_every_run(tmp_path):
    args = ["--model", "tiny/causal-lm", "--accelerator", "cpu", "--precision", "32-true", "--seq-len", "128",
            "--batch-size", "4", "--steps", "3", "--warmup", "1", "--strategies", "single,fsdp2_model_parallel",
            "--devices", "2", "--peak-tflops", "1.0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/scale.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["baseline"]["tokens_per_sec"] > 0
    assert report["baseline"]["mfu"] > 0  # against the given peak of 1 TFLOP/s
    runs = {(r["method"], r["strategy"]): r for r in report["runs"]}
    assert set(runs) == {(m, s) for m in ("sft", "many_icl") for s in ("single", "fsdp2_model_parallel")}
    for key, run in runs.items():
        assert run["rc"] == 0, (key, run.get("error"))
        assert run["steps"] == 3, key
        assert run["devices"] == (1 if key[1] == "single" else 2), key
        assert min(run["flops"], run["mfu"], run["ratio"]) > 0, key
    for devices, strategy in ((1, "single"), (2, "fsdp2_model_parallel")):
        assert runs[("sft", strategy)]["tokens"] == 3 * 4 * 128 * devices  # 3 steps x 4 full rows x ranks
    assert 0 < runs[("many_icl", "single")]["tokens"] <= 3 * 4 * 128  # episodes of whole shots, up to 128 tokens
