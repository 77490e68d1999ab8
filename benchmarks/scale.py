"""Training throughput, MFU and peak memory of SFT and ManyICL under each strategy, against a plain PyTorch loop.

Every ftmods run is what a user launches: ``python cli.py fit -c <generated config> -c configs/strategy/<name>.yaml``
in its own process, with ``ftmods.callbacks.ThroughputMeter`` as the only callback (no logger, no checkpoints) and
the method's own DataModule on synthetic data written once per run of this script:

- ``sft``: ``SFTModule`` + ``ChatDataModule``; single-turn chats of random made-up words, each longer than ``--seq-len``
  tokens and cut there (in the reply), so rows are full; completion-only loss on the reply (what follows a prompt of
  about 40 % of the row).
- ``many_icl``: ``ManyICLModule`` (all answers supervised) + ``ManyShotDataModule``; 4 synthetic word-mapping tasks
  of 2000 examples each, episodes filling ``--seq-len`` tokens.

The model is ``--model``: by default ``random/qwen2.5-0.5b`` (Qwen2.5-0.5B's architecture with seeded random
weights, :mod:`ftmods.models.architectures`), loaded through ``from_pretrained`` with sdpa attention.

The baseline, measured in the same run of this script (before the ftmods runs, on one device, same model folder,
precision, batch size, sequence length and gradient checkpointing), is a hand-written loop: ``model(input_ids,
labels=input_ids).loss.backward(); AdamW.step(); zero_grad()`` on full rows of random tokens (``bf16-true``: bf16
weights; ``bf16-mixed``: fp32 weights under autocast). ``ratio`` = ftmods tokens/s / baseline tokens/s (per device).

Figures: ``tokens_per_sec`` (real tokens of all ranks per second; padding excluded), ``mfu`` (PaLM's model FLOPs,
:mod:`ftmods.ops.flops`, over the device's peak for the precision: Lightning's table, or ``--peak-tflops``),
``peak_mem_gib`` (``torch.cuda.max_memory_allocated``, largest over ranks; on CPU the process's peak RSS) over the
steps after ``--warmup``. One JSON object goes to stdout.

Example::

    # on one GPU: single device, FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, bf16, Qwen2.5-0.5B architecture
    python benchmarks/scale.py --strategies single,fsdp,fsdp2_model_parallel,deepspeed_zero2,deepspeed_zero3
    # CPU smoke run (tiny model, 2 gloo processes for FSDP2), about a minute
    python benchmarks/scale.py --model tiny/causal-lm --accelerator cpu --precision 32-true --seq-len 128 \\
        --batch-size 4 --steps 4 --warmup 2 --strategies single,fsdp2_model_parallel --devices 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_checkpointing", "fsdp2_model_parallel", "deepspeed_zero2",
              "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload")  # fmt: skip
METHODS = ("sft", "many_icl")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


# ------------------------------------------------------------------------------------------------------------- data


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 3)))


def write_data(folder: Path, seq_len: int, rows: int, tokens_per_word: float) -> dict[str, Path]:
    """Synthetic SFT chats (each filling ``seq_len``) and ManyICL tasks, written as JSONL into ``folder``."""
    rng = random.Random(0)
    prompt_words = max(4, int(0.4 * seq_len / tokens_per_word))  # the template adds a system turn (~20 tokens)
    reply_words = max(4, int(0.8 * seq_len / tokens_per_word))  # overflows: every row is cut at seq_len in the reply
    sft = folder / "sft.jsonl"
    with sft.open("w") as f:
        for _ in range(rows):
            prompt = " ".join(_word(rng) for _ in range(prompt_words))
            reply = " ".join(_word(rng) for _ in range(reply_words))
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    many = folder / "many_icl.jsonl"
    with many.open("w") as f:
        for task in range(4):
            mapping = {w: _word(rng) for w in {_word(rng) for _ in range(300)}}
            keys = sorted(mapping)
            for _ in range(2000):
                query = " ".join(rng.choice(keys) for _ in range(3))
                answer = " ".join(mapping[w] for w in query.split())
                f.write(json.dumps({"task": f"map{task}", "input": query, "output": answer}) + "\n")
    return {"sft": sft, "many_icl": many}


def tokens_per_word(tokenizer: Any) -> float:
    rng = random.Random(1)
    text = " ".join(_word(rng) for _ in range(400))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / 400


# --------------------------------------------------------------------------------------------------------- baseline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_baseline(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """The hand-written loop on one device; figures over the steps after the warm-up."""
    from transformers import AutoModelForCausalLM

    from ftmods.callbacks.throughput import _peak_rss_gib
    from ftmods.ops.flops import DecoderShape, train_flops

    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 4096)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.seq_len
    flops = args.steps * train_flops(DecoderShape.from_config(model.config), [args.seq_len] * args.batch_size)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _peak_rss_gib()
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "tokens_per_sec": tokens / seconds,
        "tflops_per_device": flops / seconds / 1e12,
        "mfu": flops / seconds / args.peak_flops if args.peak_flops else None,
        "peak_mem_gib" if device.type == "cuda" else "peak_rss_gib": peak,
        "final_loss": loss.item(),
    }


# ----------------------------------------------------------------------------------------------------- ftmods runs


def run_config(args: argparse.Namespace, method: str, data: dict[str, Path], root: Path) -> dict[str, Any]:
    module = {"sft": "ftmods.sft.SFTModule", "many_icl": "ftmods.many_icl.ManyICLModule"}[method]
    load = {"attn_implementation": "sdpa", "gradient_checkpointing": args.gradient_checkpointing}
    init: dict[str, Any] = {"pretrained": args.model, "load": load,
                            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}}}  # fmt: skip
    if method == "sft":
        datamodule = {"class_path": "ftmods.datamodules.ChatDataModule",
                      "init_args": {"train_files": str(data["sft"]), "max_length": args.seq_len,
                                    "batch_size": args.batch_size}}  # fmt: skip
    else:
        init["supervise"] = "all"
        datamodule = {"class_path": "ftmods.datamodules.ManyShotDataModule",
                      "init_args": {"train_files": str(data["many_icl"]), "max_length": args.seq_len,
                                    "batch_size": args.batch_size, "eval_fraction": 0.0}}  # fmt: skip
    meter: dict[str, Any] = {"warmup_steps": args.warmup, "log_every_n_steps": 10**6}
    if args.peak_flops:
        meter["peak_flops"] = args.peak_flops
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": args.accelerator,
            "devices": 1,
            "precision": args.precision,
            "max_steps": args.warmup + args.steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            "callbacks": [{"class_path": "ftmods.callbacks.ThroughputMeter", "init_args": meter}],
        },
        "model": {"class_path": module, "init_args": init},
        "data": datamodule,
    }


def run_ftmods(args: argparse.Namespace, method: str, strategy: str, data: dict[str, Path], work: Path) -> dict:
    root = work / f"{method}-{strategy}"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(args, method, data, root), sort_keys=False))
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "-c", str(config)]
    devices = 1 if strategy == "single" else args.devices
    if strategy != "single":
        command += ["-c", str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")]
    command += ["--trainer.devices", str(devices), "--trainer.precision", args.precision]  # over the snippets'
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    result: dict[str, Any] = {"method": method, "strategy": strategy, "devices": devices, "rc": done.returncode,
                              "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    summary = root / "throughput.json"
    if done.returncode != 0 or not summary.is_file():
        result["error"] = (done.stderr or done.stdout)[-3000:]
        return result
    result.update(json.loads(summary.read_text()))
    return result


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="random/qwen2.5-0.5b", help="causal LM: random/..., tiny/..., hub id, folder"
    )
    parser.add_argument("--methods", default="sft,many_icl")
    parser.add_argument("--strategies", default="single,fsdp,fsdp2_model_parallel,deepspeed_zero3")
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--devices", type=int, default=1, help="processes for the strategies other than single")
    parser.add_argument("--precision", choices=("bf16-true", "bf16-mixed", "32-true"), default="bf16-true")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps left out first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak of one device (default: Lightning's)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per ftmods run")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.strategies = [s for s in args.strategies.split(",") if s]
    bad = [m for m in args.methods if m not in METHODS] + [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        parser.error(f"unknown method / strategy {bad}; methods {METHODS}, strategies {STRATEGIES}")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu but CUDA is not available")
    args.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lightning.fabric.utilities.throughput import get_available_flops

    from ftmods.models.loading import load_tokenizer
    from ftmods.models.tiny import resolve_pretrained

    started = time.perf_counter()
    path = resolve_pretrained(args.model)  # built once here (random/ and tiny/ ids), reused by every run
    build_s = time.perf_counter() - started
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    if args.peak_flops is None and device.type == "cuda":
        dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
        args.peak_flops = get_available_flops(device, dtype)
    with tempfile.TemporaryDirectory(prefix="ftmods-scale-") as tmp:
        work = Path(tmp)
        rows = (args.warmup + args.steps) * args.batch_size * max(args.devices, 1) + 16
        data = write_data(work, args.seq_len, rows, tokens_per_word(load_tokenizer(args.model)))
        baseline = run_baseline(args, path)
        runs = [run_ftmods(args, m, s, data, work) for m in args.methods for s in args.strategies]
    for run in runs:
        if run.get("tokens_per_sec_per_device"):
            run["ratio"] = run["tokens_per_sec_per_device"] / baseline["tokens_per_sec"]
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__},
        "model": args.model,
        "model_build_s": round(build_s, 1),
        "precision": args.precision,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_flops_per_device": args.peak_flops,
        "baseline": baseline,
        "runs": runs,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
