"""Step time and training-state memory of ``SFTModule`` with ftmods' callbacks: HFT freezing and EMA averaging.

Every run is ``Trainer.fit(SFTModule(model))`` on the fixed synthetic batch of ``overhead.py`` (its ``make_batch`` /
``make_loader``, same ``ChatCollator`` batch every step), AdamW lr 2e-5 from ``configure_optimizers``, and differs only
in the callbacks passed to the ``Trainer``. Two groups (``--what``), each compared with a baseline from the same run:

- ``hft``: ``full`` (no callback, full fine-tuning) versus ``hft`` (``HalfFineTuning(ratio=0.5)``, its defaults:
  category-level draw, ``mode="auto"``, which resolves to ``requires_grad`` on one device). Reported: step time and
  ``ratio`` hft / full (the HFT paper reports about 30 % less training time, ratio ~0.7), the trainable fraction,
  ``train_state_bytes`` (parameters + gradients + optimizer state, read at the end of the last step, where the
  gradients of that step still exist: Lightning zeroes them, ``set_to_none``, just before the next forward) and its
  ratio, and on CUDA ``torch.cuda.max_memory_allocated`` over the fit (peak statistics reset before each run).
  ``hft_grad_mask`` (opt-in, ``--hft-variants``) keeps every gradient and drops the frozen ones before the optimizer.
- ``ema``: ``none`` versus ``lightning_ema`` (``ftmods.callbacks.EMAWeightAveraging(decay=0.999)``, Lightning's
  ``AveragedModel``, a per-tensor ``decay * ema + (1 - decay) * p``) and ``sharded_ema`` (``ShardedEMA(decay=0.999)``,
  one ``torch._foreach_lerp_``). Besides the step-time ratio to ``none``, the averaging callback's
  ``on_train_batch_end`` is timed on its own every step (``update_ms``; CUDA events on a GPU), which gives a
  contention-robust within-run estimate ``ratio_from_update`` = step / (step - update). Checks: the raw weights
  train exactly as without a callback (``raw_loss`` equal everywhere), and both EMAs agree (``ema_loss``, the loss
  under the weights the model holds after fit: both callbacks copy the average in at the end).

Each run also splits its steps into phases with the probe callback's hooks (CUDA events on a GPU): ``forward``
(``on_train_batch_start`` to ``on_before_backward``: zero_grad, forward, loss), ``backward`` (to
``on_after_backward``), ``optimizer`` (to the probe's ``on_train_batch_end``, which runs after every other callback:
gradient rescale, AdamW, e.g. the EMA update) and ``other`` (the rest of the step: data, transfer, loop).

Variants run ``--repeats`` times, interleaved, the order rotating every repeat; medians over repeats are reported.
Timing as in ``overhead.py`` (its ``StepClock``): from the end of step ``warmup - 1`` to the end of step ``warmup +
steps - 1``, stamped by the last callback's ``on_train_batch_end``, ``torch.cuda.synchronize()`` at both ends; the
window mean (``ms_per_step``) and the median single step (``median_step_ms``).

Model: ``--size mid`` (default) is a random Llama built once into ``$FTMODS_CACHE/callbacks-bench`` (``--hidden``,
``--layers``, ``--intermediate``, ``--heads``, ``--vocab``; untied embeddings like Llama-2, multi-head attention so
that HFT's "2 of 4 attention matrices" is half of the attention weights) and loaded through ``from_pretrained``;
``--size tiny`` is ``tiny/causal-lm``; ``--model`` takes any hub id or folder instead. One JSON object goes to stdout;
Lightning's messages go to stderr.

Example::

    python benchmarks/callbacks.py                                   # mid Llama, 1 CPU thread, ~3 min
    python benchmarks/callbacks.py --what ema --size tiny --steps 100
    python benchmarks/callbacks.py --device cuda --precision bf16-true --layers 16 --hidden 2048 --intermediate 5504
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
if str(Path(__file__).resolve().parent) not in sys.path:  # also importable by path (importlib), not only as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from overhead import StepClock, _device_name, _quiet, _trainer, final_loss, make_batch, make_loader  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ftmods.callbacks import EMAWeightAveraging, HalfFineTuning, ShardedEMA  # noqa: E402
from ftmods.models.tiny import tiny_cache_dir  # noqa: E402
from ftmods.ops.tokens import IGNORE_INDEX  # noqa: E402
from ftmods.sft import SFTModule  # noqa: E402

PAPER_HFT_TIME_RATIO = 0.7
"""HFT paper (arXiv 2404.18466), abstract: about 30 % less training time than full fine-tuning."""
DECAY = 0.999
VARIANTS: dict[str, Callable[[], list[Callback]]] = {
    "full": list,
    "hft": lambda: [HalfFineTuning(ratio=0.5)],
    "hft_grad_mask": lambda: [HalfFineTuning(ratio=0.5, mode="grad_mask")],
    "none": list,
    "lightning_ema": lambda: [EMAWeightAveraging(decay=DECAY)],
    "sharded_ema": lambda: [ShardedEMA(decay=DECAY)],
}
EMA_VARIANTS = ("none", "lightning_ema", "sharded_ema")
PHASES = ("forward", "backward", "optimizer", "other")

# ------------------------------------------------------------------------------------------------------------ model


def build_llama(dims: dict[str, int], seed: int = 0) -> Path:
    """A random ``LlamaForCausalLM`` of ``dims``, saved once into ftmods' cache (no tokenizer: training uses none)."""
    digest = hashlib.sha256(json.dumps({**dims, "seed": seed}, sort_keys=True).encode()).hexdigest()[:10]
    folder = (
        tiny_cache_dir() / "callbacks-bench" / f"llama-h{dims['hidden_size']}-l{dims['num_hidden_layers']}-{digest}"
    )
    if (folder / "config.json").exists():
        return folder
    config = transformers.LlamaConfig(
        **dims,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    model.save_pretrained(staging)
    with contextlib.suppress(OSError):  # another process built it first
        staging.rename(folder)
    return folder


def pretrained(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.size == "tiny":
        return "tiny/causal-lm"
    dims = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "vocab_size": args.vocab,
    }
    return str(build_llama(dims))


# ------------------------------------------------------------------------------------------------------ measurement


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def train_state(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of parameters, of the gradients that exist now, and of the optimizer state (AdamW: 2 moments + step)."""
    params = list(module.parameters())
    state = {
        "param_bytes": _nbytes(params),
        "grad_bytes": _nbytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": _nbytes(v for opt in optimizers for s in opt.state.values() for v in s.values()),
    }
    return {"train_state_bytes": sum(state.values()), **state}


class Stamps:
    """Named time points; CUDA events on a GPU (no synchronisation until :meth:`ms` is read), else ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list[dict[str, Any]] = []

    def mark(self, name: str, *, new: bool = False) -> None:
        if new:
            self.points.append({})
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[-1][name] = event
        else:
            self.points[-1][name] = time.perf_counter()

    def ms(self, start: str, end: str, index: int) -> float:
        a, b = self.points[index][start], self.points[index][end]
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1000


class Probe(Callback):
    """The last callback: stamps step phases, feeds the step clock, and reads state and raw loss at the last step."""

    def __init__(self, args: argparse.Namespace, batch: dict[str, Tensor]) -> None:
        self.device = torch.device(args.device)
        self.args, self.batch = args, batch
        self.clock = StepClock(args.warmup, args.steps, self.device)
        self.stamps = Stamps(self.device)
        self.state: dict[str, int] = {}
        self.trainable_fraction = float("nan")
        self.raw_loss = float("nan")

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.stamps.mark("start", new=True)

    def on_before_backward(self, trainer: Trainer, pl_module: Any, loss: Tensor) -> None:
        self.stamps.mark("backward")

    def on_after_backward(self, trainer: Trainer, pl_module: Any) -> None:
        self.stamps.mark("optimizer")

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stamps.mark("end")
        self.clock.step_end(batch_idx)
        if batch_idx != self.clock.last:
            return
        self.state = train_state(pl_module, trainer.optimizers)
        params = list(pl_module.parameters())
        trained = sum(p.numel() for p in params if p.grad is not None)  # grad_mask mode: requires_grad is all True
        self.trainable_fraction = trained / sum(p.numel() for p in params)
        self.raw_loss = final_loss(pl_module, self.batch, self.args)  # before on_train_end swaps any average in

    def phases_ms(self, step_ms: list[float]) -> dict[str, float]:
        """Median over the timed steps of each phase; ``other`` is the rest of the (median) step."""
        steps = range(self.args.warmup, self.args.warmup + self.args.steps)
        bounds = {
            "forward": ("start", "backward"),
            "backward": ("backward", "optimizer"),
            "optimizer": ("optimizer", "end"),
        }
        out = {name: statistics.median(self.stamps.ms(a, b, i) for i in steps) for name, (a, b) in bounds.items()}
        out["other"] = statistics.median(step_ms) - sum(out.values())
        return out


class HookTimer:
    """Wraps one hook of a callback instance and times every call (CUDA events on a GPU, so no extra sync)."""

    def __init__(self, callback: Callback, hook: str, device: torch.device) -> None:
        self.inner = getattr(callback, hook)
        setattr(callback, hook, self)  # Lightning looks hooks up on the instance
        self.stamps = Stamps(device)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.stamps.mark("start", new=True)
        self.inner(*args, **kwargs)
        self.stamps.mark("end")

    def ms(self) -> list[float]:
        return [self.stamps.ms("start", "end", i) for i in range(len(self.stamps.points))]


class Run(NamedTuple):
    """One ``Trainer.fit`` of one variant."""

    ms_per_step: float
    median_step_ms: float
    phases_ms: dict[str, float]
    state: dict[str, int]
    trainable_fraction: float
    raw_loss: float
    """Loss of the batch under the trained (raw) weights at the end of the last step."""
    end_loss: float
    """Loss under the weights the model holds after fit (the average, for the EMA callbacks)."""
    update_ms: float | None
    """Median time of an averaging callback's ``on_train_batch_end`` over the timed steps."""
    averaging_bytes: int | None
    cuda_peak_bytes: int | None
    applied_mode: str | None


def _averaging_bytes(callbacks: list[Callback], module: nn.Module) -> int | None:
    for cb in callbacks:
        if isinstance(cb, ShardedEMA):
            return _nbytes(module.get_submodule("ema_shadow").buffers())
        if isinstance(cb, EMAWeightAveraging):
            average = cb._average_model
            return _nbytes([*average.parameters(), *average.buffers()])
    return None


def run_variant(args: argparse.Namespace, batch: dict[str, Tensor], variant: str) -> Run:
    device = torch.device(args.device)
    callbacks = VARIANTS[variant]()
    probe = Probe(args, batch)
    averaging = [cb for cb in callbacks if isinstance(cb, (EMAWeightAveraging, ShardedEMA))]
    hook = HookTimer(averaging[0], "on_train_batch_end", device) if averaging else None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # the probe goes last: its on_train_batch_end (the step's end stamp) runs after the EMA update
    with tempfile.TemporaryDirectory(prefix="ftmods-bench-") as root, contextlib.redirect_stdout(sys.stderr):
        trainer = _trainer(args, root, [], full=False, callbacks=[*callbacks, probe])
        module = SFTModule(args.pretrained)
        trainer.fit(module, train_dataloaders=make_loader(batch, args.warmup + args.steps))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    clock = probe.clock.result(probe.raw_loss)
    step_ms = [(b - a) * 1000 for a, b in zip(probe.clock.stamps[:-1], probe.clock.stamps[1:], strict=True)]
    freezing = [cb for cb in callbacks if isinstance(cb, HalfFineTuning)]
    return Run(
        ms_per_step=clock.ms_per_step,
        median_step_ms=clock.median_step_ms,
        phases_ms=probe.phases_ms(step_ms),
        state=probe.state,
        trainable_fraction=probe.trainable_fraction,
        raw_loss=probe.raw_loss,
        end_loss=final_loss(module.to(device), batch, args),  # the strategy moved the module to the CPU at teardown
        update_ms=statistics.median(hook.ms()[args.warmup :]) if hook else None,
        averaging_bytes=_averaging_bytes(callbacks, module),
        cuda_peak_bytes=peak,
        applied_mode=freezing[0]._applied if freezing else None,
    )


def measure(args: argparse.Namespace, batch: dict[str, Tensor], order: list[str]) -> dict[str, list[Run]]:
    """Every variant ``args.repeats`` times, interleaved (the order rotates each repeat to spread drift)."""
    runs: dict[str, list[Run]] = {name: [] for name in order}
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            runs[name].append(run_variant(args, batch, name))
            print(f"{name}: {runs[name][-1].ms_per_step:.1f} ms/step", file=sys.stderr)
    return runs


# ---------------------------------------------------------------------------------------------------------- summary


def _median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def _rel_spread(values: list[float]) -> float:
    return float(f"{(max(values) - min(values)) / abs(statistics.median(values)):.2g}")


def _common(runs: dict[str, list[Run]], base: str) -> dict[str, Any]:
    """Step times, ratios to ``base``, phases and per-repeat figures of one group."""
    mean = {name: _median(rs, "ms_per_step") for name, rs in runs.items()}
    step = {name: _median(rs, "median_step_ms") for name, rs in runs.items()}
    others = [name for name in runs if name != base]
    return {
        "ms_per_step": {name: round(v, 2) for name, v in mean.items()},
        "median_step_ms": {name: round(v, 2) for name, v in step.items()},
        "ratio": {name: round(mean[name] / mean[base], 4) for name in others},
        "ratio_median_step": {name: round(step[name] / step[base], 4) for name in others},
        "phases_ms": {
            name: {p: round(statistics.median(r.phases_ms[p] for r in rs), 2) for p in PHASES}
            for name, rs in runs.items()
        },
        "per_repeat_ms_per_step": {name: [round(r.ms_per_step, 2) for r in rs] for name, rs in runs.items()},
        "per_repeat_median_step_ms": {name: [round(r.median_step_ms, 2) for r in rs] for name, rs in runs.items()},
    }


def summarize_hft(runs: dict[str, list[Run]]) -> dict[str, Any]:
    out = _common(runs, "full")
    state = {name: rs[0].state for name, rs in runs.items()}  # deterministic: the same in every repeat
    out |= {
        "paper_ratio": PAPER_HFT_TIME_RATIO,
        "applied_mode": {name: rs[0].applied_mode for name, rs in runs.items() if rs[0].applied_mode},
        "trainable_fraction": {name: round(rs[0].trainable_fraction, 4) for name, rs in runs.items()},
        "train_state_bytes": {name: s["train_state_bytes"] for name, s in state.items()},
        "train_state_ratio": {
            name: round(s["train_state_bytes"] / state["full"]["train_state_bytes"], 4)
            for name, s in state.items()
            if name != "full"
        },
        "train_state_parts": state,
        "final_loss": {name: [round(r.raw_loss, 6) for r in rs] for name, rs in runs.items()},
        "final_loss_rel_spread_per_variant": {name: _rel_spread([r.raw_loss for r in rs]) for name, rs in runs.items()},
    }
    if runs["full"][0].cuda_peak_bytes is not None:
        peak = {name: int(_median(rs, "cuda_peak_bytes")) for name, rs in runs.items()}
        out["cuda_peak_bytes"] = peak
        out["cuda_peak_ratio"] = {name: round(v / peak["full"], 4) for name, v in peak.items() if name != "full"}
    return out


def summarize_ema(runs: dict[str, list[Run]]) -> dict[str, Any]:
    out = _common(runs, "none")
    averaged = [name for name in runs if name != "none"]
    update = {name: _median(runs[name], "update_ms") for name in averaged}
    # within each run: step / (step - update), then the median over runs (drift between runs cancels)
    from_update = {
        name: statistics.median(r.median_step_ms / (r.median_step_ms - r.update_ms) for r in runs[name])
        for name in averaged
    }
    raw = [r.raw_loss for rs in runs.values() for r in rs]
    ema = [r.end_loss for name in averaged for r in runs[name]]
    out |= {
        "update_ms": {name: round(v, 3) for name, v in update.items()},
        "ratio_from_update": {name: round(v, 4) for name, v in from_update.items()},
        "averaging_bytes": {name: runs[name][0].averaging_bytes for name in averaged},
        "param_bytes": runs["none"][0].state["param_bytes"],
        "raw_loss": {name: [round(r.raw_loss, 6) for r in rs] for name, rs in runs.items()},
        "raw_loss_rel_spread": _rel_spread(raw),
        "same_raw_loss": _rel_spread(raw) < 1e-4,
        "ema_loss": {name: [round(r.end_loss, 6) for r in runs[name]] for name in averaged},
        "ema_loss_rel_spread": _rel_spread(ema),
    }
    return out


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="hft,ema", help="comma-separated groups: hft, ema")
    parser.add_argument("--hft-variants", default="full,hft", help=f"of {', '.join(list(VARIANTS)[:3])}")
    parser.add_argument(
        "--model", default=None, help="SFTModule `pretrained` (hub id, folder, tiny/...); overrides --size"
    )
    parser.add_argument(
        "--size", choices=("mid", "tiny"), default="mid", help="mid: the Llama below; tiny: tiny/causal-lm"
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steady-state steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.what = [w for w in args.what.split(",") if w]
    args.hft_variants = [v for v in args.hft_variants.split(",") if v]
    if not args.what or set(args.what) - {"hft", "ema"}:
        parser.error("--what takes hft and/or ema")
    if "full" not in args.hft_variants or set(args.hft_variants) - set(list(VARIANTS)[:3]):
        parser.error("--hft-variants must include full and take only full, hft, hft_grad_mask")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _quiet()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    args.pretrained = pretrained(args)
    probe = SFTModule(args.pretrained)
    probe.configure_model()  # the vocabulary, the parameter count and the loss before training
    config = probe.model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    batch = make_batch(args.batch_size, args.seq_len, config.vocab_size, pad, args.seed)
    result: dict[str, Any] = {
        "benchmark": "callbacks",
        "device": _device_name(args.device),
        "model": args.model or args.size,
        "pretrained": args.pretrained,
        "config": {
            k: getattr(config, k, None)
            for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
        },  # fmt: skip
        "params": sum(p.numel() for p in probe.parameters()),
        "precision": args.precision,
        "batch": [args.batch_size, args.seq_len],
        "supervised_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "initial_loss": round(final_loss(probe.to(args.device), batch, args), 6),
    }
    del probe
    if "hft" in args.what:
        result["hft"] = summarize_hft(measure(args, batch, args.hft_variants))
    if "ema" in args.what:
        result["ema"] = summarize_ema(measure(args, batch, list(EMA_VARIANTS)))
    result |= {
        "code_sha256": {  # sft/module.py, callbacks/freezing.py, callbacks/averaging.py
            Path(inspect.getfile(obj)).name: hashlib.sha256(Path(inspect.getfile(obj)).read_bytes()).hexdigest()[:12]
            for obj in (SFTModule, HalfFineTuning, ShardedEMA)
        },
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
