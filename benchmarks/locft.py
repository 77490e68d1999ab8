"""LocFT-BF efficiency: seconds per edit at 100 / 1K / 10K edits, and breadth-first versus depth-first at equal edits.

Two parts, both through ``LocFTModule`` under the Lightning ``Trainer`` (CPU, no logger, no checkpointing):

1. **Scaling** (``scaling``): is the cost per edit flat in the number of edits?
   - World: ``make_world(max(--sizes) + 100, 48, 16, n_probe=100)``, so every size gets distinct subjects; edits are
     the first N of ``edit_requests(world, max(--sizes), seed)``, written as LocFT JSONL.
   - Model: a randomly initialised 4-layer Llama (hidden 96, intermediate 384, untied embeddings) over the world's
     word-level tokenizer (vocabulary ~10.3 K for 10K edits), saved with ``save_pretrained`` to a temporary folder and
     loaded by ``LocFTModule(pretrained=folder)``. The weights do not matter for timing: ``loss_tol=0`` means no batch
     is skipped and no early stop, so every size runs exactly ``--epochs`` epochs of ``ceil(N / --batch-size)``
     optimizer steps (Adam lr 1e-2 on ``model.layers.2.mlp.down_proj.weight``).
   - Reported per size: ``module_s_per_edit`` (``LocFTModule.seconds_per_edit``: wall time from ``on_fit_start`` to
     ``on_fit_end`` / N), ``fit_s_per_edit`` (our clock around ``Trainer.fit`` / N, which adds model loading and the
     DataModule's one-off conversion of every record), ``ms_per_step`` (module time / optimizer steps),
     ``data_ms_per_batch`` (one epoch of the train DataLoader alone after the fit: records -> collated batches, no
     model) and the optimizer steps. Sizes up to ``--repeat-limit`` edits run ``--repeats`` times (the run with the
     median time is reported); one untimed fit runs first, so lazy initialisation does not land on the first size.
   - ``flatness``: per-edit time at the largest size / at the smallest (1.0 = perfectly flat).
2. **BF vs DF** (``bf_vs_df``): the same ``--edits`` (200) counterfactual edits on a pre-trained toy (the cached
   toy of ``locft_fidelity.py``: 350 train subjects, 0.68 M parameters, pre-trained once, ~35 s), edited by
   - ``BF``: shuffled mini-batches of 20, Adam lr 1e-2, at most ``--bf-epochs`` (150) epochs, skip / early stop
     below loss 1e-2;
   - ``DF``: EasyEdit FT-M: stream order, batch 1, one pass, at most 25 steps per request, a fresh Adam (lr 1e-3)
     per request.

   Reported: fit wall time, seconds per edit, optimizer steps and WILD reliability / generalization / locality of the
   final model (``evaluate_requests``).

One JSON object goes to stdout; Lightning's messages go to stderr.

Example::

    python benchmarks/locft.py                           # sizes 100 1000 10000, 3 epochs; ~2-2.5 min
    python benchmarks/locft.py --quick                   # sizes 100 300 1000, BF vs DF on 60 edits
    python benchmarks/locft.py --sizes 100 1000 10000 30000 --epochs 2 --skip-bf-vs-df
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))
if str(Path(__file__).resolve().parent) not in sys.path:  # also importable by path (importlib), not only as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from locft_fidelity import (  # noqa: E402  (this folder: the shared toy, trainer and pipeline runner)
    adam,
    device_name,
    make_trainer,
    pretrained_world,
    quiet,
    run_pipeline,
    versions,
    write_edits,
)

from ftmods.datamodules.edits import EditDataModule  # noqa: E402
from ftmods.locft import LocFTModule  # noqa: E402
from ftmods.models.toy_world import ToyWorld, build_word_tokenizer, make_world, toy_config  # noqa: E402

TARGET = r"model\.layers\.2\.mlp\.down_proj\.weight"
DIMS: dict[str, int] = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4}

# ---------------------------------------------------------------------------------------------------- scaling


def build_timing_model(world: ToyWorld, folder: Path, seed: int) -> dict[str, Any]:
    """A randomly initialised toy Llama over the world's tokenizer, saved to ``folder``; returns its description."""
    from transformers import LlamaForCausalLM

    tokenizer = build_word_tokenizer(world)
    config = toy_config(tokenizer, DIMS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {**DIMS, "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


def time_fit(folder: Path, edit_file: Path, n_edits: int, args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """One fixed-epoch BF fit over the first ``n_edits`` edits; timing and counters."""
    module = LocFTModule(str(folder), target_modules=[TARGET], optimizer=adam(1e-2), loss_tol=0.0)
    data = EditDataModule(
        str(edit_file), tokenizer=str(folder), batch_size=args.batch_size, max_edits=n_edits, max_length=32
    )
    trainer = make_trainer(edit_file.parent, epochs)
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    module_s = float(module.seconds_per_edit or float("nan")) * n_edits
    steps = module.stats["opt_steps"]
    start = time.perf_counter()
    batches = sum(1 for _ in data.train_dataloader())  # one epoch of records -> collated batches, no model
    data_ms = 1000 * (time.perf_counter() - start) / max(1, batches)
    return {
        "fit_wall_s": wall,
        "module_s_per_edit": module_s / n_edits,
        "fit_s_per_edit": wall / n_edits,
        "ms_per_step": 1000 * module_s / max(1, steps),
        "data_ms_per_batch": data_ms,
        "opt_steps": steps,
        "skipped_steps": module.stats["skipped_steps"],
        "epochs_run": trainer.current_epoch,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median module time per edit, plus every run's per-edit time."""
    ordered = sorted(runs, key=lambda r: r["module_s_per_edit"])
    chosen = ordered[(len(ordered) - 1) // 2]
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in chosen.items()}
    out["repeats"] = len(runs)
    out["module_s_per_edit_all"] = [round(r["module_s_per_edit"], 6) for r in runs]
    return out


def scaling(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Seconds per edit at each of ``--sizes`` (fixed epochs, nothing skipped)."""
    largest = max(args.sizes)
    started = time.perf_counter()
    world = make_world(largest + 100, 48, 16, args.seed, n_probe=100)
    folder = root / "timing-model"
    model = build_timing_model(world, folder, args.seed)
    edit_file = write_edits(world, largest, args.seed, root / "timing-edits.jsonl")
    build_s = time.perf_counter() - started
    time_fit(folder, edit_file, min(args.sizes), args, 1)  # untimed warm-up
    per_size: dict[str, Any] = {}
    for n in sorted(args.sizes):
        repeats = args.repeats if n <= args.repeat_limit else 1
        per_size[str(n)] = _median_run([time_fit(folder, edit_file, n, args, args.epochs) for _ in range(repeats)])
        print(f"scaling {n}: {json.dumps(per_size[str(n)])}", file=sys.stderr, flush=True)
    small, big = per_size[str(min(args.sizes))], per_size[str(largest)]
    return {
        "model": model,
        "world_subjects": len(world.subjects),
        "build_s": round(build_s, 2),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "target": TARGET.replace("\\", ""),
        "sizes": per_size,
        "flatness": {
            "module_s_per_edit_ratio": round(big["module_s_per_edit"] / small["module_s_per_edit"], 3),
            "fit_s_per_edit_ratio": round(big["fit_s_per_edit"] / small["fit_s_per_edit"], 3),
            "ms_per_step_ratio": round(big["ms_per_step"] / small["ms_per_step"], 3),
            "of": [largest, min(args.sizes)],
        },
    }


# -------------------------------------------------------------------------------------------------- BF vs DF


def bf_vs_df(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Time and WILD reliability of BF and DF on the same edits of the pre-trained toy."""
    folder, world, info = pretrained_world(args.seed)
    edit_file = write_edits(world, args.edits, args.seed, root / "edits.jsonl")
    settings = {
        "BF": {
            "module": {"pipeline": "breadth_first", "lr": 1e-2},
            "data": {"order": "shuffle", "batch_size": 20},
            "max_epochs": args.bf_epochs,
        },
        "DF": {
            "module": {"pipeline": "depth_first", "lr": 1e-3, "df_max_steps": 25, "fresh_optimizer": True},
            "data": {"order": "stream", "batch_size": 1},
            "max_epochs": 1,
        },
    }
    out: dict[str, Any] = {
        "edits": args.edits,
        "toy": {"train_subjects": info["train_subjects"], "pretrain": info["report"], "cached": info["cached"]},
        "target": TARGET.replace("\\", ""),
    }
    for name, setting in settings.items():
        module, trainer, timing = run_pipeline(folder, edit_file, 2, setting, root, protocols=["wild_em"])
        scores = module.evaluate_requests(list(trainer.datamodule.requests))  # type: ignore[attr-defined]
        wild = {k.split("/")[-1]: round(v, 4) for k, v in scores.items() if k.startswith("eval/wild_em/")}
        out[name] = {**timing, "wild_em": wild}
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    out["wall_ratio_df_to_bf"] = round(out["DF"]["fit_wall_s"] / out["BF"]["fit_wall_s"], 3)
    out["reliability_bf_minus_df"] = round(out["BF"]["wild_em"]["reliability"] - out["DF"]["wild_em"]["reliability"], 4)
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="numbers of edits to time")
    parser.add_argument("--epochs", type=int, default=3, help="fixed epochs per timed fit")
    parser.add_argument("--batch-size", type=int, default=100, help="edits per optimizer step (the paper: 100)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each size up to --repeat-limit (median)")
    parser.add_argument("--repeat-limit", type=int, default=1000)
    parser.add_argument("--edits", type=int, default=200, help="edits of the BF vs DF comparison (<= 350)")
    parser.add_argument("--bf-epochs", type=int, default=150, help="most BF epochs in the BF vs DF comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-bf-vs-df", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 100 300 1000, 1 repeat, 60 edits")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.edits = [100, 300, 1000], 1, min(args.edits, 60)
    if min(args.sizes) < 1 or args.epochs < 1:
        parser.error("--sizes and --epochs must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "locft_efficiency", "device": device_name(), "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="locft-bench-") as tmp:
        if not args.skip_scaling:
            result["scaling"] = scaling(args, Path(tmp))
        if not args.skip_bf_vs_df:
            result["bf_vs_df"] = bf_vs_df(args, Path(tmp))
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
