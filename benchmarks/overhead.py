"""Per-step training time of ``SFTModule`` under the Lightning ``Trainer`` versus a bare PyTorch loop.

Both sides train the same thing: the same pretrained weights (loaded through ``SFTModule.configure_model``), the same
fixed batch (a synthetic padded batch with a completion-only label mask, built by the real ``ChatCollator``), the same
completion NLL (``SFTModule.compute_loss``; the bare loop calls ``compute_loss(batch)``, the token mean, on a module
that is not attached to a trainer), the same optimizer (``SFTModule.configure_optimizers``: AdamW, lr 2e-5) and
``zero_grad(set_to_none=True)``. Both pull the batch from the same kind of ``DataLoader`` and move it to the device
every step. The difference is what training through ``Trainer.fit(SFTModule)`` adds per step: Lightning's loops,
hooks, closure and plugins, and ``SFTModule``'s own training-only work (``self.log`` calls, the global-normalisation
bookkeeping of ``training_step`` / ``on_before_optimizer_step``). As a check that both sides compute the same thing,
the loss of the trained weights on the batch is reported for every variant (``final_loss``); it must agree.

Variants, each run ``--repeats`` times, interleaved (the order rotates every repeat); medians over repeats are reported:

- ``bare``: the hand-written loop;
- ``lightning``: ``Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
  enable_model_summary=False)``;
- ``lightning_pbar_log``: the same with the default progress bar (``RichProgressBar`` when ``rich`` is installed,
  else TQDM) and the default logger (TensorBoard when installed, else CSV; ``log_every_n_steps=50``);
- ``paired`` (unless ``--no-paired``): one ``Trainer.fit`` (as ``lightning``) whose callback runs one bare step on a
  second, independent copy of the model after every Lightning step, so each Lightning step has a bare step timed right
  next to it. Slow drifts in CPU contention (other processes on a shared VM) then cancel out of the ratio. On CUDA this
  variant synchronises after every step.

Timing covers the steady state only: from the end of step ``warmup - 1`` to the end of step ``warmup + steps - 1``
(``torch.cuda.synchronize()`` at both ends on a GPU). Reported per variant: the window mean (``*_ms_per_step``, the
headline) and the median single step (``median_step_ms``, robust to bursts of contention, but blind to work done only
every N steps such as logger writes). One JSON object goes to stdout; Lightning's messages and the progress bar go to
stderr.

Example::

    python benchmarks/overhead.py                                  # tiny/causal-lm, fp32, CPU, about a minute
    python benchmarks/overhead.py --device cuda --precision bf16-true --batch-size 8 --seq-len 1024
    python benchmarks/overhead.py --profile 30 2>profile.txt       # cProfile of each variant's steady state
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import inspect
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))

import lightning  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from ftmods.datamodules import ChatCollator  # noqa: E402
from ftmods.ops.tokens import IGNORE_INDEX  # noqa: E402
from ftmods.sft import SFTModule  # noqa: E402

GOAL = 1.05
VARIANTS = ("bare", "lightning", "lightning_pbar_log")

# ------------------------------------------------------------------------------------------------------------ batch


def make_batch(batch_size: int, seq_len: int, vocab_size: int, pad_token_id: int, seed: int) -> dict[str, torch.Tensor]:
    """A padded SFT batch: rows of length in [seq_len/2, seq_len] (the first is full), the last 40% supervised."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for row in range(batch_size):
        length = seq_len if row == 0 else int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen))
        prompt = max(1, int(length * 0.6))
        ids = torch.randint(0, vocab_size, (length,), generator=gen)
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return dict(ChatCollator(pad_token_id)(examples))


class RepeatBatch(Dataset):
    """``length`` times the same (already collated) batch; use with ``DataLoader(batch_size=None)``."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


def make_loader(batch: dict[str, torch.Tensor], length: int) -> DataLoader:
    return DataLoader(RepeatBatch(batch, length), batch_size=None, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _precision_contexts(precision: str, device: torch.device) -> tuple[Any, Any]:
    """(context for model creation, context for forward + loss) doing what Lightning's precision plugin does."""
    if precision == "bf16-true":  # weights created in bf16, default dtype bf16 inside training_step
        return (lambda: _default_dtype(torch.bfloat16)), (lambda: _default_dtype(torch.bfloat16))
    if precision == "bf16-mixed":  # fp32 weights, autocast around training_step
        return contextlib.nullcontext, (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    return contextlib.nullcontext, contextlib.nullcontext


class Measurement(NamedTuple):
    """One timed run of a variant (milliseconds)."""

    ms_per_step: float
    """Mean over the timed window (what a long run's throughput is)."""
    median_step_ms: float
    """Median single step in the window (robust to other processes stealing the CPU for a while)."""
    final_loss: float
    """Token-mean loss of the batch under the trained weights (same start, batch and optimizer: equal everywhere)."""


def _measurement(deltas_s: list[float], final_loss: float = float("nan")) -> Measurement:
    ms = [d * 1000 for d in deltas_s]
    return Measurement(sum(ms) / len(ms), statistics.median(ms), final_loss)


class StepClock:
    """Timestamps at the end of steps ``warmup - 1`` .. ``warmup + steps - 1`` (CUDA synchronised at both ends)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profile: cProfile.Profile | None = None) -> None:
        self.warmup, self.steps, self.device, self.profile = warmup, steps, device, profile
        self.last = warmup + steps - 1
        self.stamps: list[float] = []

    def step_end(self, step: int) -> None:
        """Call at the end of every step (after ``optimizer.step`` and ``zero_grad``)."""
        if step < self.warmup - 1:
            return
        if step == self.last and self.profile is not None:
            self.profile.disable()
        if step in (self.warmup - 1, self.last):
            _sync(self.device)
        self.stamps.append(time.perf_counter())
        if step == self.warmup - 1 and self.profile is not None:
            self.profile.enable()

    def result(self, final_loss: float) -> Measurement:
        if len(self.stamps) != self.steps + 1:
            raise RuntimeError(f"timed {len(self.stamps) - 1} steps instead of {self.steps}")
        return _measurement([b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)], final_loss)


class BareLoop:
    """The hand-written training step: the module's own methods, no trainer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        init_ctx, self.step_ctx = _precision_contexts(args.precision, self.device)
        self.module = SFTModule(args.model)  # never attached to a trainer
        with init_ctx():
            self.module.configure_model()
        self.module.to(self.device).train()
        if args.precision == "bf16-true":  # Lightning's HalfPrecision.convert_module also casts fp32 buffers (RoPE)
            self.module.to(dtype=torch.bfloat16)
        optimizer = self.module.configure_optimizers()  # AdamW(trainable, lr=2e-5, weight_decay=0), as in fit
        self.optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step(self, cpu_batch: dict[str, torch.Tensor]) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu_batch.items()}
        with self.step_ctx():
            loss = self.module.compute_loss(batch).loss  # token mean over the batch's supervised tokens
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def final_loss(module: SFTModule, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """Token-mean loss of ``batch`` under the module's current weights (no gradient)."""
    device = torch.device(args.device)
    _, step_ctx = _precision_contexts(args.precision, device)
    with torch.no_grad(), step_ctx():
        return float(module.compute_loss({k: v.to(device) for k, v in batch.items()}).loss)


def run_bare(
    args: argparse.Namespace, batch: dict[str, torch.Tensor], profile: cProfile.Profile | None = None
) -> Measurement:
    loop = BareLoop(args)
    clock = StepClock(args.warmup, args.steps, loop.device, profile)
    for step, cpu_batch in enumerate(make_loader(batch, args.warmup + args.steps)):
        loop.step(cpu_batch)
        clock.step_end(step)
    return clock.result(final_loss(loop.module, batch, args))


class StepTimer(Callback):
    """Feeds a :class:`StepClock` from ``on_train_batch_end`` (after Lightning's optimizer step and zero_grad)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.step_end(batch_idx)


class PairedBareStep(Callback):
    """After every Lightning step, one bare step on an independent copy; times both, side by side."""

    def __init__(self, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> None:
        self.loop = BareLoop(args)
        self.batches = iter(make_loader(batch, args.warmup + args.steps))
        self.warmup = args.warmup
        self.previous = 0.0
        self.lightning: list[float] = []
        self.bare: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        _sync(self.loop.device)
        lightning_end = time.perf_counter()
        self.loop.step(next(self.batches))
        _sync(self.loop.device)
        bare_end = time.perf_counter()
        if batch_idx >= self.warmup:
            self.lightning.append(lightning_end - self.previous)
            self.bare.append(bare_end - lightning_end)
        self.previous = bare_end


def _trainer(args: argparse.Namespace, root: str, timers: list[Callback], *, full: bool, **kwargs: Any) -> Trainer:
    settings: dict[str, Any] = {
        "accelerator": args.device,
        "devices": 1,
        "precision": args.precision,
        "max_steps": args.warmup + args.steps,
        "logger": full,
        "enable_progress_bar": full,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    settings |= kwargs
    return Trainer(callbacks=timers + settings.pop("callbacks", []), **settings)


def run_lightning(
    args: argparse.Namespace, batch: dict[str, torch.Tensor], *, full: bool, profile: cProfile.Profile | None = None
) -> Measurement:
    """``Trainer.fit`` on a fresh ``SFTModule``; ``full`` turns on the default progress bar and logger."""
    clock = StepClock(args.warmup, args.steps, torch.device(args.device), profile)
    # RichProgressBar (the default when rich is installed) writes to stdout: send it to stderr, keep stdout for JSON
    with tempfile.TemporaryDirectory(prefix="ftmods-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        trainer = _trainer(args, root, [StepTimer(clock)], full=full)
        module = SFTModule(args.model)
        trainer.fit(module, train_dataloaders=make_loader(batch, args.warmup + args.steps))
    return clock.result(final_loss(module, batch, args))


class Paired(NamedTuple):
    """One paired run: Lightning and bare steps timed alternately in the same ``Trainer.fit``."""

    lightning: Measurement
    bare: Measurement
    overhead_median_ms: float
    """Median over steps of (Lightning step - the bare step right after it)."""


def run_paired(args: argparse.Namespace, batch: dict[str, torch.Tensor], **trainer_kwargs: Any) -> Paired:
    """(Lightning, bare) measured in one ``Trainer.fit``, one bare step after every Lightning step."""
    paired = PairedBareStep(args, batch)
    with tempfile.TemporaryDirectory(prefix="ftmods-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        trainer = _trainer(args, root, [paired], full=False, **trainer_kwargs)
        trainer.fit(SFTModule(args.model), train_dataloaders=make_loader(batch, args.warmup + args.steps))
    diffs = [(a - b) * 1000 for a, b in zip(paired.lightning, paired.bare, strict=True)]
    return Paired(_measurement(paired.lightning), _measurement(paired.bare), statistics.median(diffs))


# ------------------------------------------------------------------------------------------------------------- main


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny/causal-lm", help="SFTModule `pretrained` (hub id, folder, tiny/...)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="timed steady-state steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-paired", dest="paired", action="store_false", help="skip the paired variant")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of benchmarking, cProfile the steady state of each variant once and print its top N functions "
        "(by cumulative time) to stderr",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def profile(args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> None:
    """cProfile of the steady state of each variant, top ``args.profile`` functions by cumulative time, to stderr."""
    for name in VARIANTS:
        prof = cProfile.Profile()
        if name == "bare":
            run = run_bare(args, batch, prof)
        else:
            run = run_lightning(args, batch, full=name == "lightning_pbar_log", profile=prof)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(f"== {name}: {run.ms_per_step:.3f} ms/step under cProfile", file=sys.stderr)
        print(text.getvalue(), file=sys.stderr)


def measure(
    args: argparse.Namespace, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, list[Measurement]], list[Paired]]:
    """Every variant ``args.repeats`` times, interleaved (the order rotates each repeat to spread drift)."""
    runners = {
        "bare": lambda: run_bare(args, batch),
        "lightning": lambda: run_lightning(args, batch, full=False),
        "lightning_pbar_log": lambda: run_lightning(args, batch, full=True),
        "paired": lambda: run_paired(args, batch),
    }
    order = [*VARIANTS, "paired"] if args.paired else list(VARIANTS)
    runs: dict[str, list[Measurement]] = {name: [] for name in VARIANTS}
    paired: list[Paired] = []
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            run = runners[name]()
            if isinstance(run, Paired):
                paired.append(run)
            else:
                runs[name].append(run)
    return runs, paired


def summarize(
    args: argparse.Namespace, batch: dict[str, torch.Tensor], runs: dict[str, list[Measurement]], paired: list[Paired]
) -> dict:
    """The JSON report: medians over repeats of the window means (headline) and of the per-step medians."""
    mean = {name: statistics.median(r.ms_per_step for r in rs) for name, rs in runs.items()}
    step = {name: statistics.median(r.median_step_ms for r in rs) for name, rs in runs.items()}
    losses = [r.final_loss for rs in runs.values() for r in rs]
    spread = (max(losses) - min(losses)) / abs(statistics.median(losses))
    result: dict[str, Any] = {
        "benchmark": "sft_overhead",
        "device": _device_name(args.device),
        "model": args.model,
        "precision": args.precision,
        "batch": [args.batch_size, args.seq_len],
        "supervised_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "lightning_ms_per_step": round(mean["lightning"], 3),
        "bare_ms_per_step": round(mean["bare"], 3),
        "ratio": round(mean["lightning"] / mean["bare"], 4),
        "lightning_pbar_log_ms_per_step": round(mean["lightning_pbar_log"], 3),
        "ratio_pbar_log": round(mean["lightning_pbar_log"] / mean["bare"], 4),
        "goal": GOAL,
        "overhead_ms_per_step": round(mean["lightning"] - mean["bare"], 3),
        "overhead_pbar_log_ms_per_step": round(mean["lightning_pbar_log"] - mean["bare"], 3),
        "median_step_ms": {name: round(value, 3) for name, value in step.items()},
        "ratio_median_step": round(step["lightning"] / step["bare"], 4),
        "ratio_pbar_log_median_step": round(step["lightning_pbar_log"] / step["bare"], 4),
    }
    if paired:  # ratios within each run first, then the median over runs
        result["paired"] = {
            "lightning_ms_per_step": round(statistics.median(p.lightning.ms_per_step for p in paired), 3),
            "bare_ms_per_step": round(statistics.median(p.bare.ms_per_step for p in paired), 3),
            "ratio": round(statistics.median(p.lightning.ms_per_step / p.bare.ms_per_step for p in paired), 4),
            "ratio_median_step": round(
                statistics.median(p.lightning.median_step_ms / p.bare.median_step_ms for p in paired), 4
            ),
            "overhead_ms_per_step": round(statistics.median(p.overhead_median_ms for p in paired), 3),
            "per_repeat_ratio": [round(p.lightning.ms_per_step / p.bare.ms_per_step, 4) for p in paired],
            "per_repeat_ms_per_step": {
                "lightning": [round(p.lightning.ms_per_step, 3) for p in paired],
                "bare": [round(p.bare.ms_per_step, 3) for p in paired],
            },
        }
    result |= {
        "per_repeat_ms_per_step": {name: [round(r.ms_per_step, 3) for r in rs] for name, rs in runs.items()},
        "per_repeat_median_step_ms": {name: [round(r.median_step_ms, 3) for r in rs] for name, rs in runs.items()},
        "final_loss": {name: [round(r.final_loss, 6) for r in rs] for name, rs in runs.items()},
        "final_loss_rel_spread": float(f"{spread:.2g}"),
        "same_final_loss": spread < 1e-4,
        "sft_module_sha256": hashlib.sha256(Path(inspect.getfile(SFTModule)).read_bytes()).hexdigest()[:12],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _quiet()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    probe = SFTModule(args.model)
    probe.configure_model()  # builds tiny/... once into FTMODS_CACHE, and gives the vocabulary
    config = probe.model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    batch = make_batch(args.batch_size, args.seq_len, config.vocab_size, pad, args.seed)
    del probe
    if args.profile:
        profile(args, batch)
        return
    result = summarize(args, batch, *measure(args, batch))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
