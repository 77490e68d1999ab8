"""Training throughput of ``ManyICLModule`` under Lightning versus TRL ``SFTTrainer``, and packing efficiency.

Both sides train the same thing:

- **Same model and weights:** a Llama built once per size with the tiny ChatML tokenizer (``tiny``: ``tiny/causal-lm``,
  hidden 64, 2 layers, about 0.1 M parameters; ``small``: hidden 256, 4 layers, 8 / 4 heads, intermediate 768, about
  3.2 M parameters), loaded fresh in fp32 with the default attention (sdpa) for every run.
- **Same episodes, same order, same batches:** ``ManyShotDataModule`` builds epoch 0's episodes of the shipped
  synthetic tasks (``configs/data/many_icl_tiny_train.jsonl``). Lightning reads them through the DataModule's own
  ``train_dataloader`` (episodes built on the fly, ``ManyShotCollator``); TRL gets ``to_trl_dataset()`` (pre-tokenized
  ``input_ids`` + ``labels``, which TRL passes through untouched) with ``train_sampling_strategy="sequential"``.
  Before timing, every batch of TRL's dataloader is compared with the DataModule's: ``input_ids``, ``labels`` and
  ``attention_mask`` / ``position_ids`` must be equal (``same_batches``), and the supervised tokens (label positions
  the loss trains on) are counted on both sides (``supervised_tokens``).
- **Padded and packed:** ``packing=False``: right-padded ``(B, T)`` rows with an attention mask on both sides.
  ``packing=True``: the DataModule concatenates the batch's episodes into one padding-free row with ``position_ids``
  restarting per episode; TRL's equivalent for pre-tokenized data is ``padding_free=True`` (same row, same
  ``position_ids``, first label of each episode -100). TRL's ``packing=True`` (BFD) would regroup episodes into
  ``max_length`` rows, so the batches would no longer be the same; it is not used.
- **Same loss and optimizer:** all-answers token-mean NLL (``supervise="all"``; ManyICL sums and rescales the gradient
  by the step's token count, TRL divides the sum by ``num_items_in_batch``), logits only at supervised positions on
  both sides (ManyICL ``logits_to_keep``, TRL's fused LM head), ``torch.optim.AdamW(lr, weight_decay=0)`` at a
  constant learning rate, no gradient clipping (TRL ``max_grad_norm=0``), no gradient checkpointing, fp32, CPU,
  ``use_cache=False``.
- **Check:** ``final_loss`` is the token-mean loss of the first batch under each run's trained weights (the HF loss
  of the plain forward); after identical training it must agree between the two sides.
- **Settings:** Lightning: ``Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False)``, no validation. TRL: ``SFTConfig(report_to=[], save_strategy="no",
  disable_tqdm=True, logging_steps=10**6)``; its per-step entropy / token-accuracy metrics stay on (TRL always
  computes them).

Timing: the steady state only, from the end of step ``warmup - 1`` to the end of step ``warmup + steps - 1``
(Lightning: ``on_train_batch_end``; TRL: ``TrainerCallback.on_step_end``). Throughput is the real (non-pad) tokens of
the timed steps per second: context and supervised tokens alike, padding excluded. Each configuration is run
``--rounds`` times per side, alternating which side runs first. Reported per side: ``tokens_per_s`` (median over
rounds of each run's window throughput), ``median_step_ms`` (median single step over all rounds) and every round's
figure. ``ratio = ftmods tokens_per_s / trl tokens_per_s`` is the headline (goal >= 1.0); ``ratio_per_step`` is the
median over steps of (TRL time / ftmods time) of the same batch, each the median over rounds: it is robust to other
processes taking the CPU for a while, which on a shared 2-core VM slows a 2-thread run several times over.

Packing efficiency: over one epoch of the DataModule (the same episodes collated both ways), real tokens / tokens
computed (a padded batch computes ``B x T`` tokens, a packed row its length), for episodes that fill ``max_length``
(``shots=None``) and for a varying number of shots (``--shots``). A packed row computes no padding by construction, so
its efficiency is 1.0; note that on CPU (sdpa, no variable-length kernel) the attention of a packed row is computed
over the whole ``ΣT x ΣT`` block-masked square, so packing can still be slower per real token than padding.

Example::

    python benchmarks/many_icl.py                  # tiny and small model, padded and packed, 5 rounds (~4 min)
    python benchmarks/many_icl.py --quick          # smoke run (< 60 s)
    python benchmarks/many_icl.py --models small --packing off --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))

import datasets  # noqa: E402
import lightning  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from ftmods.datamodules import ManyShotDataModule  # noqa: E402
from ftmods.many_icl import ManyICLModule  # noqa: E402
from ftmods.many_icl.loss import select_answers  # noqa: E402
from ftmods.models.tiny import build_tiny_chat_tokenizer, resolve_pretrained, tiny_cache_dir  # noqa: E402
from ftmods.ops.tokens import IGNORE_INDEX  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FILE = ROOT / "configs" / "data" / "many_icl_tiny_train.jsonl"
GOAL_RATIO = 1.0
GOAL_PACKING = 0.98
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
"""Dimensions of the ``small`` model (spec §3.4's "Llama small")."""

# ------------------------------------------------------------------------------------------------------------ models


def build_llama(dims: dict[str, int], seed: int = 0) -> Path:
    """A random Llama of ``dims`` with the tiny ChatML tokenizer, built once into the ftmods cache (seeded)."""
    digest = hashlib.sha256(json.dumps({**dims, "seed": seed}, sort_keys=True).encode()).hexdigest()[:10]
    folder = tiny_cache_dir() / "many-icl-bench" / f"llama-h{dims['hidden_size']}-l{dims['num_hidden_layers']}-{digest}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tiny_chat_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with contextlib.suppress(OSError):  # another process built it first
        staging.rename(folder)
    return folder


def model_path(name: str) -> Path:
    return Path(resolve_pretrained("tiny/causal-lm")) if name == "tiny" else build_llama(SMALL)


def load_model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)


# -------------------------------------------------------------------------------------------------------------- data


def parse_shots(text: str) -> Any:
    """``none`` (fill ``max_length``), ``16`` or ``4,40`` (a range drawn per episode)."""
    if text.lower() == "none":
        return None
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def make_datamodule(args: argparse.Namespace, path: Path, *, packing: bool, shots: Any, episodes: int) -> Any:
    dm = ManyShotDataModule(
        str(TRAIN_FILE),
        tokenizer=str(path),
        max_length=args.max_length,
        shots=shots,
        batch_size=args.batch_size,
        eval_fraction=0.0,
        episodes_per_epoch=episodes,
        packing=packing,
        seed=args.seed,
    )
    dm.setup("fit")
    return dm


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch (a packed row has no padding)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())


def supervised_ftmods(batch: dict[str, torch.Tensor]) -> int:
    """Label positions ``ManyICLModule(supervise="all")`` trains on (its own selection code)."""
    targets, shots, episodes = ManyICLModule.aligned_fields(batch)
    return int((select_answers(shots, episodes, supervise="all") & (targets != IGNORE_INDEX)).sum())


def supervised_trl(batch: dict[str, torch.Tensor]) -> int:
    """Label positions TRL's fused LM head trains on (``labels[:, 1:] != -100``)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def same_batch(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    keys = ["input_ids", "labels", "attention_mask" if "attention_mask" in ours else "position_ids"]
    return all(k in theirs and torch.equal(ours[k], theirs[k].cpu()) for k in keys)


def packing_efficiency(args: argparse.Namespace, path: Path, shots: Any) -> dict[str, Any]:
    """Real / computed tokens over one epoch of the same episodes, padded and packed."""
    out: dict[str, Any] = {"shots": shots}
    for packing in (False, True):
        dm = make_datamodule(args, path, packing=packing, shots=shots, episodes=args.efficiency_episodes)
        real = computed = 0
        for batch in dm.train_dataloader():
            real += real_tokens(batch)
            computed += int(batch["input_ids"].numel())
        out["packed" if packing else "padded"] = round(real / computed, 4)
        out["real_tokens"] = real
    out["ratio"] = round(out["packed"] / out["padded"], 4)
    out["goal_met"] = out["packed"] >= GOAL_PACKING
    return out


# ------------------------------------------------------------------------------------------------------------ timing


class Clock:
    """Timestamps at the end of steps ``warmup - 1 .. warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.last = warmup, warmup + steps - 1
        self.stamps: list[float] = []

    def step_end(self, step: int) -> None:
        if self.warmup - 1 <= step <= self.last:
            self.stamps.append(time.perf_counter())

    def deltas(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]


class LightningClock(Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.step_end(batch_idx)


class TRLClock(TrainerCallback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.step_end(state.global_step - 1)


@torch.no_grad()
def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """HF token-mean loss of ``batch`` (plain forward, no cache)."""
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    was_training = model.training
    model.eval()
    loss = float(model(**{k: batch[k] for k in keys if k in batch}, use_cache=False).loss)
    model.train(was_training)
    return loss


def run_ftmods(args: argparse.Namespace, path: Path, dm: Any, check: dict[str, torch.Tensor]) -> dict[str, Any]:
    clock = Clock(args.warmup, args.steps)
    lr = args.lr
    module = ManyICLModule(
        str(path),
        supervise="all",
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        forgetting=False,
        sample_completions=0,
    )
    with tempfile.TemporaryDirectory(prefix="ftmods-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_steps=args.warmup + args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[LightningClock(clock)],
        )
        trainer.fit(module, datamodule=dm)
    return {"deltas": clock.deltas(), "final_loss": batch_loss(module.model, check)}


def trl_trainer(args: argparse.Namespace, path: Path, dataset: Any, root: str, *, packing: bool) -> SFTTrainer:
    config = SFTConfig(
        output_dir=root,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        max_grad_norm=0.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        max_length=None,  # episodes already fit the DataModule's max_length
        padding_free=packing,
        seed=args.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return SFTTrainer(model=load_model(path), args=config, train_dataset=dataset, processing_class=tokenizer)


def run_trl(
    args: argparse.Namespace, path: Path, dataset: Any, check: dict[str, torch.Tensor], *, packing: bool
) -> Any:
    clock = Clock(args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        trainer = trl_trainer(args, path, dataset, root, packing=packing)
        trainer.add_callback(TRLClock(clock))
        trainer.train()
    return {"deltas": clock.deltas(), "final_loss": batch_loss(trainer.model, check)}


def verify(
    args: argparse.Namespace, path: Path, dm: Any, dataset: Any, *, packing: bool
) -> tuple[list[int], dict[str, Any]]:
    """Tokens per step, and the batch-by-batch comparison of the DataModule's and TRL's dataloaders."""
    ours = list(dm.train_dataloader())
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        theirs = list(trl_trainer(args, path, dataset, root, packing=packing).get_train_dataloader())
    same = len(ours) == len(theirs) and all(same_batch(a, b) for a, b in zip(ours, theirs, strict=True))
    timed = slice(args.warmup, args.warmup + args.steps)
    info = {
        "same_batches": same,
        "steps_compared": len(ours),
        "supervised_tokens": {"ftmods": sum(map(supervised_ftmods, ours)), "trl": sum(map(supervised_trl, theirs))},
        "real_tokens": {"ftmods": sum(map(real_tokens, ours)), "trl": sum(map(real_tokens, theirs))},
        "computed_tokens": sum(int(b["input_ids"].numel()) for b in ours),
        "timed_real_tokens": sum(map(real_tokens, ours[timed])),
        "timed_supervised_tokens": sum(map(supervised_ftmods, ours[timed])),
        "mean_shots_per_episode": round(sum(float(b["num_shots"].float().mean()) for b in ours) / len(ours), 2),
        "batch_shape": list(ours[0]["input_ids"].shape),
    }
    info["same_supervised_tokens"] = info["supervised_tokens"]["ftmods"] == info["supervised_tokens"]["trl"]
    return [real_tokens(b) for b in ours], info


def per_step_ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> float:
    """Median over steps of (TRL / ftmods) time of the same batch, each the median over rounds (burst-robust)."""
    trl_step = [statistics.median(step) for step in zip(*(r["deltas"] for r in theirs), strict=True)]
    ftmods_step = [statistics.median(step) for step in zip(*(r["deltas"] for r in ours), strict=True)]
    return statistics.median(t / f for t, f in zip(trl_step, ftmods_step, strict=True))


def summarize(runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    per_round = [tokens / sum(r["deltas"]) for r in runs]
    return {
        "tokens_per_s": round(statistics.median(per_round), 1),
        "median_step_ms": round(statistics.median(d * 1000 for r in runs for d in r["deltas"]), 2),
        "per_round_tokens_per_s": [round(x, 1) for x in per_round],
        "final_loss": [round(r["final_loss"], 6) for r in runs],
    }


def benchmark_config(args: argparse.Namespace, name: str, path: Path, *, packing: bool) -> dict[str, Any]:
    episodes = (args.warmup + args.steps) * args.batch_size
    dm = make_datamodule(args, path, packing=packing, shots=args.shots, episodes=episodes)
    dataset = dm.to_trl_dataset().select_columns(["input_ids", "labels"])
    _, info = verify(args, path, dm, dataset, packing=packing)
    padded = make_datamodule(args, path, packing=False, shots=args.shots, episodes=episodes)
    check = next(iter(padded.train_dataloader()))  # the first batch, padded: the final-loss check of every run
    runs: dict[str, list[dict[str, Any]]] = {"ftmods": [], "trl": []}
    for round_ in range(args.rounds):
        order = ["ftmods", "trl"] if round_ % 2 == 0 else ["trl", "ftmods"]
        for side in order:
            started = time.perf_counter()
            if side == "ftmods":
                runs[side].append(run_ftmods(args, path, dm, check))
            else:
                runs[side].append(run_trl(args, path, dataset, check, packing=packing))
            seconds = time.perf_counter() - started
            print(f"[many_icl] {name} packing={packing} round {round_} {side}: {seconds:.1f} s", file=sys.stderr)
    tokens = info["timed_real_tokens"]
    initial = batch_loss(load_model(path), check)
    ours, theirs = summarize(runs["ftmods"], tokens), summarize(runs["trl"], tokens)
    losses = ours["final_loss"] + theirs["final_loss"]
    return {
        "ftmods": ours,
        "trl": theirs,
        "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 4),
        "ratio_median_step": round(theirs["median_step_ms"] / ours["median_step_ms"], 4),
        "ratio_per_step": round(per_step_ratio(runs["ftmods"], runs["trl"]), 4),
        "goal_met": ours["tokens_per_s"] / theirs["tokens_per_s"] >= GOAL_RATIO,
        "initial_loss": round(initial, 6),
        "final_loss_rel_spread": round((max(losses) - min(losses)) / abs(statistics.mean(losses)), 7),
        **info,
    }


# -------------------------------------------------------------------------------------------------------------- main


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "datasets", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def versions() -> dict[str, str]:
    return {
        "many_icl_module_sha256": hashlib.sha256(Path(inspect.getfile(ManyICLModule)).read_bytes()).hexdigest()[:12],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--packing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--max-length", type=int, default=512, help="DataModule max_length (tokens per episode)")
    parser.add_argument("--batch-size", type=int, default=4, help="episodes per step on both sides")
    parser.add_argument("--shots", type=parse_shots, default=[4, 48], help="'none' (fill), N, or MIN,MAX per episode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 30, small 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=5, help="runs per side and configuration, alternating order")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides, constant)")
    parser.add_argument("--efficiency-episodes", type=int, default=400, help="episodes of the packing-efficiency epoch")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--seed", type=int, default=0, help="episode seed")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model only, 1 round, few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.warmup = ["tiny"], 1, 2
        args.steps = min(args.steps or 6, 6)
        args.efficiency_episodes = min(args.efficiency_episodes, 100)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    steps_given = args.steps
    tiny = model_path("tiny")
    result: dict[str, Any] = {
        "benchmark": "many_icl_throughput",
        "device": device_name(),
        "precision": "32-true",
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "shots": args.shots,
        "lr": args.lr,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "goal": {"ratio": GOAL_RATIO, "packing_efficiency": GOAL_PACKING},
        "packing_efficiency": {
            "fill": packing_efficiency(args, tiny, None),
            "varied_shots": packing_efficiency(args, tiny, args.shots),
        },
        "throughput": {},
    }
    for name in args.models:
        path = model_path(name)
        args.steps = steps_given or (30 if name == "tiny" else 8)
        params = sum(p.numel() for p in load_model(path).parameters())
        entry: dict[str, Any] = {"params": params, "steps": args.steps}
        for packing in args.packing:
            entry[f"packing_{packing}"] = benchmark_config(args, name, path, packing=packing == "on")
        result["throughput"][name] = entry
    result.update(versions())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
