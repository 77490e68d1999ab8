"""``ThroughputMeter``: tokens/s, model TFLOP/s, MFU and peak memory of training, summed over every rank."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ftmods.ops.flops import DecoderShape, sequence_lengths_of, train_flops

_GIB = 2**30


def _compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def decoder_shape_of(module: torch.nn.Module) -> DecoderShape | None:
    """The shape of the first decoder-only transformer (a ``transformers`` model) inside ``module``, if any."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            continue
        try:
            return DecoderShape.from_config(config)
        except ValueError:
            continue
    return None


def _peak_rss_gib() -> float:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _GIB if sys.platform == "darwin" else peak / 2**20


class ThroughputMeter(Callback):
    """Measure training throughput: real tokens/s, model TFLOP/s per device, MFU and peak memory.

    Tokens are the batch's real tokens (``attention_mask`` ones; every ``input_ids`` position without a mask), summed
    over all ranks and gradient-accumulation micro-batches. FLOPs follow PaLM's MFU convention for the first
    decoder-only ``transformers`` model found in the LightningModule (:mod:`ftmods.ops.flops`: ``6 N`` per token plus
    attention per packed sequence; gradient-checkpointing recomputation not counted). Modules without one (PSO's UNet)
    get tokens/s only, if their batches carry token ids. MFU divides by the device's peak FLOP/s for the trainer's
    precision (Lightning's table of GPUs: H100 SXM bf16 = 989.4 TFLOP/s), or by ``peak_flops``.

    The first ``warmup_steps`` optimizer steps of every fit (compilation, allocator warm-up; a resumed run warms up
    again) are left out, and so is time spent in validation. Every ``log_every_n_steps`` optimizer steps it logs, on
    every rank, the values of that window:

    - ``perf/tokens_per_sec`` (all ranks), ``perf/tokens_per_sec_per_device``, ``perf/samples_per_sec``
    - ``perf/tflops_per_device`` and ``perf/mfu`` (when the FLOPs are known)
    - ``perf/peak_mem_gib``: ``torch.cuda.max_memory_allocated``, the largest over ranks, since the start of training
      (on CPU: ``perf/peak_rss_gib``, the process's peak resident memory)

    At the end of training :attr:`summary` holds the same figures over all post-warm-up steps (with the totals
    ``tokens``, ``flops`` and ``seconds``), and rank 0 writes them to ``<log_dir>/throughput.json``.

    Args:
        warmup_steps: Optimizer steps left out at the start.
        log_every_n_steps: Length of the logged window in optimizer steps; default the trainer's ``log_every_n_steps``.
        peak_flops: Peak FLOP/s of one device, for MFU on devices Lightning does not know (or CPUs).
        summary_file: File name of the summary under the log dir (``None``: do not write it).

    Example::

        trainer = Trainer(precision="bf16-true", callbacks=[ThroughputMeter(warmup_steps=5)])
        trainer.fit(SFTModule("Qwen/Qwen2.5-0.5B"), datamodule=dm)
        print(trainer.callbacks[0].summary["mfu"])
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 2,
        log_every_n_steps: int | None = None,
        peak_flops: float | None = None,
        summary_file: str | None = "throughput.json",
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be positive, got {peak_flops}")
        self.warmup_steps, self.log_every_n_steps, self.summary_file = warmup_steps, log_every_n_steps, summary_file
        self.peak_flops: float | None = peak_flops
        self.shape: DecoderShape | None = None
        self.summary: dict[str, Any] = {}
        self._pending = [0.0, 0.0, 0.0]  # tokens, flops, sequences of micro-batches since the last optimizer step
        self._window = [0.0, 0.0, 0.0, 0.0]  # tokens, flops, sequences, steps since the last log
        self._total = [0.0, 0.0, 0.0, 0.0, 0.0]  # tokens, flops, sequences, steps, seconds after warm-up (global)
        self._window_start = 0.0
        self._last_step = self._start_step = 0
        self._val_start: float | None = None

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.shape = decoder_shape_of(pl_module)
        if self.shape is None:
            rank_zero_warn(f"ThroughputMeter: no decoder-only transformer in {type(pl_module).__name__}; no FLOPs/MFU")
        device = trainer.strategy.root_device
        if self.peak_flops is None:
            available = get_available_flops(device, _compute_dtype(str(trainer.precision)))
            self.peak_flops = float(available) if available else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._pending, self._window, self._total = [0.0] * 3, [0.0] * 4, [0.0] * 5
        self._last_step = self._start_step = trainer.global_step  # a resumed run warms up again
        self._window_start = self._now(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lengths = sequence_lengths_of(batch)
        if lengths is not None:
            self._pending[0] += float(lengths.sum())
            self._pending[1] += float(train_flops(self.shape, lengths)) if self.shape is not None else 0.0
            self._pending[2] += float(len(lengths))
        if trainer.global_step == self._last_step:
            return  # accumulating: the micro-batch belongs to the coming optimizer step
        steps, self._last_step = trainer.global_step - self._last_step, trainer.global_step
        if trainer.global_step - self._start_step <= self.warmup_steps:
            self._pending = [0.0] * 3
            self._window_start = self._now(trainer)
            return
        for i in range(3):
            self._window[i] += self._pending[i]
        self._window[3] += steps
        self._pending = [0.0] * 3
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 1
        if trainer.global_step % every == 0:
            self._flush(trainer, log=True)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._val_start = self._now(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_start is not None:
            self._window_start += self._now(trainer) - self._val_start  # validation time does not count
            self._val_start = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, log=False)
        tokens, flops, sequences, steps, seconds = self._total
        self.summary = {
            "steps": int(steps),
            "warmup_steps": self.warmup_steps,
            "devices": trainer.world_size,
            "precision": str(trainer.precision),
            "device_name": self._device_name(trainer),
            "tokens": int(tokens),
            "flops": flops if self.shape is not None else None,
            "seconds": seconds,
            **self._figures(trainer, tokens, flops, sequences, seconds),
            "peak_flops_per_device": self.peak_flops,
        }
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank asks
        if self.summary_file and trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.summary_file).write_text(json.dumps(self.summary, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _now(trainer: Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    @staticmethod
    def _device_name(trainer: Trainer) -> str:
        device = trainer.strategy.root_device
        return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

    def _flush(self, trainer: Trainer, *, log: bool) -> None:
        """Sum the window over ranks (a collective: every rank calls it at the same step), log it, add it to totals."""
        now = self._now(trainer)
        local = torch.tensor(self._window, dtype=torch.float64, device=trainer.strategy.root_device)
        tokens, flops, sequences, steps = (float(v) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        seconds = now - self._window_start
        self._window, self._window_start = [0.0] * 4, now
        if steps == 0 or seconds <= 0:
            return
        steps /= trainer.world_size  # every rank counted the same optimizer steps
        for i, value in enumerate((tokens, flops, sequences, steps, seconds)):
            self._total[i] += value
        if log:
            figures = {f"perf/{k}": v for k, v in self._figures(trainer, tokens, flops, sequences, seconds).items()}
            for logger in trainer.loggers:  # straight to the loggers: the window is ours, not log_every_n_steps'
                logger.log_metrics({k: v for k, v in figures.items() if v is not None}, step=trainer.global_step)

    def _figures(
        self, trainer: Trainer, tokens: float, flops: float, sequences: float, seconds: float
    ) -> dict[str, float | None]:
        devices = trainer.world_size
        per_device_flops = flops / seconds / devices if seconds > 0 and self.shape is not None else None
        figures: dict[str, float | None] = {
            "tokens_per_sec": tokens / seconds if seconds > 0 else None,
            "tokens_per_sec_per_device": tokens / seconds / devices if seconds > 0 else None,
            "samples_per_sec": sequences / seconds if seconds > 0 else None,
            "tflops_per_device": per_device_flops / 1e12 if per_device_flops is not None else None,
            "mfu": per_device_flops / self.peak_flops if per_device_flops is not None and self.peak_flops else None,
        }
        device = trainer.strategy.root_device
        if device.type == "cuda":
            local = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
            figures["peak_mem_gib"] = float(trainer.strategy.reduce(local, reduce_op="max")) / _GIB
        else:
            local = torch.tensor(_peak_rss_gib(), dtype=torch.float64, device=device)
            figures["peak_rss_gib"] = float(trainer.strategy.reduce(local, reduce_op="max"))
        return {k: (None if v is not None and not math.isfinite(v) else v) for k, v in figures.items()}
