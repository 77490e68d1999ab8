"""PSO efficiency: the offline PSO step versus a plain epsilon-MSE step, reference-latent caching, and peak memory.

Three parts, with the library's own code and no Trainer (the calls ``training_step`` makes), fp32, on the tiny random
pipelines of ``ftmods.models.tiny`` (64 px images, 8x8x4 latents) and optionally a wider UNet:

- ``sd``: ``tiny/sd`` (UNet ``block_out_channels`` (32, 64), 0.99 M parameters); ``sdxl``: ``tiny/sdxl`` (two text
  encoders, micro-conditioning); ``sd-wide`` (``--width W``, default 128, 0 = none): ``tiny/sd`` with a randomly
  initialised UNet built from its config with ``block_out_channels`` (W, 2W) (about 15 M parameters at 128), saved
  with ``save_pretrained`` to a temporary folder and loaded through ``PSOModule(pretrained=<folder>)``, so that the
  UNet's compute is not dominated by per-call overhead.
- Every module has the settings of ``configs/pso/tiny.yaml`` (``timesteps="sdxl-turbo"``, ``resolution=64``, beta
  50, AdamW lr 1e-3 wd 0 from ``module.configure_optimizers()``), either LoRA (``lora``: r 4, alpha 4 on ``to_q, to_k,
  to_v, to_out.0``; the reference is the same UNet with adapters disabled) or full fine-tuning (``full``: the whole
  UNet trains; the reference is a frozen copy).

1. **Step time** (``steps``): per pipeline and tuning, one ``PSOModule(loss="sigmoid")`` and one
   ``PSOModule(loss="mse")`` (the naive baseline: epsilon-MSE on the targets alone, t uniform over the 1000 training
   steps), the same seed (same LoRA init), the same batch of ``--batch-size`` (4) items (``draw_shape`` coloured-shape
   targets in [-1, 1], captions ``"a red circle"`` ..., reference latents ``randn(B, 4, 8, 8)``: values do not change
   the cost) and the same optimizer. One step:
   - ``pso``: ``loss = module.offline_loss(module.pair_errors(batch, g))[0]`` (VAE-encode the B targets, encode the
     captions, one policy forward on the concatenated 2B batch (targets + references, shared t and noise), one
     reference forward on the same 2B batch under ``no_grad`` with adapters disabled / the frozen copy, the loss),
     ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``;
   - ``mse``: ``loss = module.mse_loss(batch, g)[0]`` (the same B targets, one policy forward on B), then the same.
   Gradient clipping is left out of both. Parts (ms, median over timed steps): ``policy_fwd`` / ``ref_fwd`` (the UNet
   calls, split by grad mode), ``ref_toggle`` (entering and leaving ``module.reference_unet()``: ``disable_adapters``
   / ``enable_adapters``), ``inputs`` (the rest of the forward: VAE encode, text encode, noising, errors, loss),
   ``backward``, ``optimizer``, ``total``. Timing: ``--warmup`` (3) untimed steps per module, then ``--repeats`` (5)
   rounds of ``--steps`` (8) steps per module with PSO and MSE steps alternating (which goes first alternates per
   round; step k of both uses the generator ``module._generator(round, k)``). ``ratio_vs_mse`` = median PSO total /
   median MSE total (the goal: <= 2.2); ``ratio_per_pair`` = the median over adjacent (PSO, MSE) step pairs of their
   ratio (robust to other processes taking the CPU for a while). ``ratio_parts`` divides each part. Model sizes:
   UNet and trainable parameters.
2. **Reference caching** (``references``, on ``--ref-pipelines``: ``sd`` and ``sdxl``; add ``sd-wide`` for the wide
   UNet): ``ftmods.pso.module.generate_references(module, datamodule)`` (4-step sampling of the frozen model,
   adapters disabled, cfg 0, one seed per row, batches of ``--ref-batch-size`` (8), one safetensors file per
   reference) with a LoRA module attached to a single-process CPU ``Trainer``, for a generated Pick-a-Pic v2-style
   Parquet (``caption, jpg_0, jpg_1, label_0, label_1, ranking_id``; 64 px PNG images; every 8th row a tie, dropped)
   of ``--ref-rows`` (256) rows through ``PSODataModule(format="pickapic", reference_source="model_samples")``, into
   a fresh temporary cache each time; versus **sampling alone**: the same pipeline calls (same batches, generators,
   adapters disabled) without the writes. ``--ref-repeats`` (3) rounds, order alternating; the DataModule reads its
   source before the clock starts (``reference_requests()``), the file checks inside ``generate_references`` are
   timed. Reported: references per second of each, ``ratio`` = generate / sampling median time (end to end; within
   the timing noise when the writes are cheap), ``write_ms_per_ref``: ``save_reference_latents`` alone (the same
   latents, metadata and keys, into a fresh folder, median of ``--ref-repeats``; what the generate loop adds),
   ``ratio_from_parts`` = (sampling + writes) / sampling, bytes per file, and ``same_latents`` (the cached latents
   equal the sampling-only latents bit for bit, i.e. both loops do the same sampling work).
3. **Peak memory** (``memory``): **CPU RSS**, all probes in one fresh Python process (``--probe``) started with
   ``MALLOC_MMAP_THRESHOLD_=16384`` and ``MALLOC_TRIM_THRESHOLD_=0``, so that glibc serves every block of 16 KiB or
   more with its own mmap and gives it back when freed: RSS then follows the live tensors instead of the allocator's
   caches. Per pipeline, tuning and step type, one after another: build the module, optimizer and batch, run one
   untimed forward + backward without an optimizer step (lazy set-up, first-call caches), then 4 steps, each after
   ``gc.collect()`` and glibc ``malloc_trim(0)``, reading ``/proc/self/status`` with the peak reset through
   ``/proc/self/clear_refs`` (a 1 ms polling thread where that is not allowed): ``first_step_peak_mb`` (VmHWM during
   step 1 minus VmRSS before it: activations, gradients and the AdamW state that step creates), ``retained_mb``
   (VmRSS after step 1 minus before: the AdamW state; the gradients are freed by ``zero_grad(set_to_none=True)``),
   ``step_peak_mb`` (median over steps 2-4 of VmHWM during the step minus VmRSS before it: activations, gradients,
   temporaries) and ``loaded_rss_mb`` (VmRSS with the module loaded: mostly the imported libraries); then the module
   is deleted. ``step_peak_ratio`` = PSO / MSE ``step_peak_mb``. With CUDA (``--device cuda``, the default when
   available) also ``cuda_first_step_peak_mb`` / ``cuda_step_peak_mb``: ``torch.cuda.max_memory_allocated`` minus
   ``memory_allocated`` before the step (peaks reset per step).

One JSON object goes to stdout; progress lines go to stderr.

Example::

    python benchmarks/pso.py                      # sd, sdxl, sd-wide x lora, full; ~3 min on 2 busy cores
    python benchmarks/pso.py --quick              # sd only, 2 rounds of 3 steps, 32 rows, LoRA memory; ~40 s
    python benchmarks/pso.py --pipelines sd --width 256 --batch-size 8 --skip-memory
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))
if str(Path(__file__).resolve().parent) not in sys.path:  # also importable by path (importlib), not only as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from pso_fidelity import (  # noqa: E402
    LORA,
    attach_trainer,
    caption,
    device_name,
    log,
    pso_module,
    quiet,
    rounded,
    shape_image,
    versions,
)

from ftmods.datamodules import PSODataModule  # noqa: E402
from ftmods.datamodules.pso import load_reference_latents, save_reference_latents  # noqa: E402
from ftmods.models.shapes_toy import CLASSES  # noqa: E402
from ftmods.models.tiny import resolve_pretrained  # noqa: E402
from ftmods.pso import PSOModule  # noqa: E402
from ftmods.pso.module import generate_references  # noqa: E402

TINY = {"sd": "tiny/sd", "sdxl": "tiny/sdxl"}
MMAP_THRESHOLD = 16384
"""``MALLOC_MMAP_THRESHOLD_`` of the memory probes: freed tensors of 16 KiB or more go back to the OS at once."""
PARTS = ("policy_fwd", "ref_fwd", "ref_toggle", "inputs", "backward", "optimizer", "total")

# -------------------------------------------------------------------------------------------------------- setup


def build_wide(folder: Path, width: int, seed: int) -> dict[str, Any]:
    """``tiny/sd`` with a random UNet of ``block_out_channels`` (width, 2 * width), saved to ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny/sd"), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["block_out_channels"] = [width, 2 * width]
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(folder)
    return {"block_out_channels": config["block_out_channels"], "unet_parameters": count(pipe.unet)}


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def make_batch(batch_size: int, device: str, seed: int = 0) -> dict[str, Any]:
    """``batch_size`` coloured-shape targets in [-1, 1] with captions, random reference latents, micro-conditioning."""
    rng = random.Random(seed)
    names = [CLASSES[i % len(CLASSES)] for i in range(batch_size)]
    images = [torch.frombuffer(bytearray(shape_image(n, rng).tobytes()), dtype=torch.uint8) for n in names]
    target = torch.stack([im.view(64, 64, 3).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    generator = torch.Generator().manual_seed(seed)
    return {
        "ids": [str(i) for i in range(batch_size)],
        "captions": [caption(n) for n in names],
        "target": target.to(device),  # (B, 3, 64, 64)
        "reference_latents": torch.randn(batch_size, 4, 8, 8, generator=generator).to(device),
        "original_sizes": torch.tensor([[64, 64]] * batch_size),
        "crop_top_lefts": torch.tensor([[0, 0]] * batch_size),
    }


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def build_module(pretrained: str, tuning: str, kind: str, seed: int, device: str) -> tuple[PSOModule, Any]:
    """A configured module (``kind`` ``pso`` = sigmoid, ``mse`` = the baseline) on ``device`` and its optimizer."""
    loss = "sigmoid" if kind == "pso" else "mse"
    module = pso_module(pretrained, loss=loss, lora=LORA if tuning == "lora" else None, seed=seed)
    module.configure_model()
    module.to(device)
    optimizer = module.configure_optimizers()
    return module, optimizer


# ------------------------------------------------------------------------------------------------- step timing


class Clock:
    """Per-step part times, with ``PSOModule._unet`` and ``reference_unet`` wrapped to time the UNet calls."""

    def __init__(self, module: PSOModule, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        unet_call, reference = module._unet, module.reference_unet

        def timed_unet(unet: Any, latents: Any, timesteps: Any, cond: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = unet_call(unet, latents, timesteps, cond)
            sync()
            self.current["policy_fwd" if torch.is_grad_enabled() else "ref_fwd"] += time.perf_counter() - start
            return out

        @contextlib.contextmanager
        def timed_reference() -> Iterator[Any]:
            start = time.perf_counter()
            manager = reference()
            unet = manager.__enter__()
            self.current["ref_toggle"] += time.perf_counter() - start
            try:
                yield unet
            finally:
                start = time.perf_counter()
                manager.__exit__(None, None, None)
                self.current["ref_toggle"] += time.perf_counter() - start

        module._unet = timed_unet  # type: ignore[method-assign]
        module.reference_unet = timed_reference  # type: ignore[method-assign]

    def step(self, module: PSOModule, kind: str, batch: dict[str, Any], generator: Any, optimizer: Any) -> float:
        """One optimizer step; records its parts and returns its total seconds."""
        self.current = defaultdict(float)
        self.sync()
        start = time.perf_counter()
        if kind == "mse":
            loss = module.mse_loss(batch, generator)[0]
        else:
            loss = module.offline_loss(module.pair_errors(batch, generator))[0]
        self.sync()
        forward_end = time.perf_counter()
        loss.backward()
        self.sync()
        backward_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.sync()
        end = time.perf_counter()
        parts = dict(self.current)
        parts["inputs"] = forward_end - start - sum(parts.values())
        parts |= {"backward": backward_end - forward_end, "optimizer": end - backward_end, "total": end - start}
        self.steps.append(parts)
        return parts["total"]


def time_config(pretrained: str, tuning: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved PSO / MSE step times of one pipeline and tuning."""
    sync = synchronizer(args.device)
    batch = make_batch(args.batch_size, args.device)
    modules, clocks, optimizers = {}, {}, {}
    for kind in ("pso", "mse"):
        modules[kind], optimizers[kind] = build_module(pretrained, tuning, kind, args.seed, args.device)
        clocks[kind] = Clock(modules[kind], sync)
    for k in range(args.warmup):
        for kind in ("pso", "mse"):
            clocks[kind].step(modules[kind], kind, batch, modules[kind]._generator(-1, k), optimizers[kind])
    for kind in clocks:
        clocks[kind].steps.clear()
    pair_ratios = []
    for round_ in range(args.repeats):
        order = ("pso", "mse") if round_ % 2 == 0 else ("mse", "pso")
        for k in range(args.steps):
            totals = {}
            for kind in order:
                module = modules[kind]
                totals[kind] = clocks[kind].step(module, kind, batch, module._generator(round_, k), optimizers[kind])
            pair_ratios.append(totals["pso"] / totals["mse"])
    out: dict[str, Any] = {
        "unet_parameters": count(modules["pso"].unet),
        "trainable_parameters": count(modules["pso"].unet, trainable=True),
        "reference": "adapters disabled" if tuning == "lora" else "frozen copy",
    }
    for kind, clock in clocks.items():
        medians = {part: 1000 * statistics.median(s.get(part, 0.0) for s in clock.steps) for part in PARTS}
        out[kind] = {"median_ms": medians, "timed_steps": len(clock.steps),
                     "total_ms_all": [round(1000 * s["total"], 2) for s in clock.steps]}  # fmt: skip
    pso, mse = out["pso"]["median_ms"], out["mse"]["median_ms"]
    out["ratio_vs_mse"] = pso["total"] / mse["total"]
    out["ratio_per_pair"] = statistics.median(pair_ratios)
    out["ratio_parts"] = {p: pso[p] / mse[p] for p in ("policy_fwd", "inputs", "backward", "optimizer") if mse[p] > 0}
    return out


def steps_part(pipelines: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pretrained in pipelines.items():
        for tuning in args.tunings:
            started = time.perf_counter()
            result = time_config(pretrained, tuning, args)
            result["wall_s"] = time.perf_counter() - started
            out[f"{name}/{tuning}"] = result
            summary = {k: result[k] for k in ("ratio_vs_mse", "ratio_per_pair", "trainable_parameters")}
            summary |= {kind: result[kind]["median_ms"] for kind in ("pso", "mse")}
            log(f"steps {name}/{tuning}: {json.dumps(rounded(summary, 2))}")
    return out


# -------------------------------------------------------------------------------------------- reference caching


def write_pickapic(path: Path, rows: int, seed: int = 0) -> int:
    """A Pick-a-Pic v2-style Parquet of ``rows`` rows (PNG bytes; every 8th row a tie); the number of non-ties."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)

    def png(name: str) -> bytes:
        buffer = io.BytesIO()
        shape_image(name, rng).save(buffer, format="PNG")
        return buffer.getvalue()

    names = [CLASSES[i % len(CLASSES)] for i in range(rows)]
    ties = [i % 8 == 7 for i in range(rows)]
    table = {
        "ranking_id": list(range(rows)),
        "caption": [f"{caption(n)}, photo {i}" for i, n in enumerate(names)],
        "jpg_0": [png(n) for n in names],
        "jpg_1": [png(n) for n in names],
        "label_0": [0.5 if tie else float(i % 2) for i, tie in enumerate(ties)],
        "label_1": [0.5 if tie else float(1 - i % 2) for i, tie in enumerate(ties)],
    }
    pq.write_table(pa.table(table), path)
    return rows - sum(ties)


def sample_only(module: PSOModule, data: PSODataModule, batch_size: int, sync: Callable[[], None]) -> Any:
    """``generate_references``' sampling loop without the writes; the first reference's latents."""
    requests = data.reference_requests()
    pipe, steps = module.pipeline, module.hparams["num_inference_steps"]
    first = None
    with module.reference_unet() as unet:
        original, pipe.unet = pipe.unet, unet
        try:
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                generators = [torch.Generator(device=module.device).manual_seed(r.seed) for r in chunk]
                with torch.no_grad():
                    latents = pipe(prompt=[r.prompt for r in chunk], **module._steps_kwargs(steps),
                                   guidance_scale=module.hparams["guidance_scale"], height=64, width=64,
                                   generator=generators, output_type="latent").images  # fmt: skip
                latents = latents.float().cpu()
                first = latents[0] if first is None else first
        finally:
            pipe.unet = original
    sync()
    return first


def time_writes(source: Path, target: Path, requests: list[Any], module: PSOModule) -> float:
    """Seconds of ``save_reference_latents`` for every request's cached latents (the writes of the generate loop)."""
    latents = [load_reference_latents(source, r.key) for r in requests]
    steps, model = str(module.hparams["num_inference_steps"]), str(module.hparams["pretrained"])
    start = time.perf_counter()
    for request, latent in zip(requests, latents, strict=True):
        metadata = {"prompt": request.prompt, "seed": str(request.seed), "steps": steps, "model": model}
        save_reference_latents(target, request.key, latent, metadata)
    return time.perf_counter() - start


def references_part(pipelines: dict[str, str], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    source = root / "pickapic.parquet"
    expected = write_pickapic(source, args.ref_rows)
    sync = synchronizer(args.device)
    out: dict[str, Any] = {"rows": args.ref_rows, "references": expected, "batch_size": args.ref_batch_size}
    for name, pretrained in pipelines.items():
        module, _ = build_module(pretrained, "lora", "pso", args.seed, args.device)
        attach_trainer(module, root)
        warm = PSODataModule(str(source), format="pickapic", reference_cache=str(root / f"warm_{name}"),
                             resolution=64, max_items=args.ref_batch_size)  # fmt: skip
        generate_references(module, warm, batch_size=args.ref_batch_size)  # untimed: first pipeline calls
        times: dict[str, list[float]] = {"generate": [], "sampling": []}
        same = True
        for round_ in range(args.ref_repeats):
            order = ("generate", "sampling") if round_ % 2 == 0 else ("sampling", "generate")
            for what in order:
                cache = root / f"cache_{name}_{round_}_{what}"
                data = PSODataModule(str(source), format="pickapic", reference_cache=str(cache), resolution=64)
                requests = data.reference_requests()  # reads the source; every reference is missing
                assert len(requests) == expected, (len(requests), expected)
                gc.collect()
                start = time.perf_counter()
                if what == "generate":
                    generated = generate_references(module, data, batch_size=args.ref_batch_size)
                    sync()
                    assert generated == expected
                else:
                    first = sample_only(module, data, args.ref_batch_size, sync)
                times[what].append(time.perf_counter() - start)
                generated_cache = root / f"cache_{name}_{round_}_generate"
                if what == "sampling" and generated_cache.is_dir():
                    same &= bool(torch.equal(load_reference_latents(generated_cache, requests[0].key), first))
        generate, sampling = statistics.median(times["generate"]), statistics.median(times["sampling"])
        files = sorted((root / f"cache_{name}_0_generate").glob("*.safetensors"))
        writes = statistics.median(
            time_writes(root / f"cache_{name}_0_generate", root / f"writes_{name}_{r}", requests, module)
            for r in range(args.ref_repeats)
        )
        out[name] = {
            "generate_refs_per_s": expected / generate,
            "sampling_refs_per_s": expected / sampling,
            "ratio": generate / sampling,
            "write_ms_per_ref": 1000 * writes / expected,
            "ratio_from_parts": (sampling + writes) / sampling,
            "bytes_per_file": statistics.median(f.stat().st_size for f in files),
            "files": len(files),
            "same_latents": same,
            "generate_s_all": times["generate"],
            "sampling_s_all": times["sampling"],
        }
        log(f"references {name}: {json.dumps(rounded({k: v for k, v in out[name].items() if '_all' not in k}, 3))}")
    return out


# ----------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak RSS (MB) over a block: VmHWM after resetting it via ``/proc/self/clear_refs``, else 1 ms polling."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "clear_refs"
        except OSError:
            self.method = "polling"

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        result: dict[str, float] = {"before_mb": _status_kb("VmRSS") / 1024}
        if self.method == "clear_refs":
            Path("/proc/self/clear_refs").write_text("5")
            yield result
            result["peak_mb"] = _status_kb("VmHWM") / 1024
        else:
            import psutil

            process, stop, peak = psutil.Process(), threading.Event(), [0]

            def poll() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], process.memory_info().rss)
                    time.sleep(0.001)

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            try:
                yield result
            finally:
                stop.set()
                thread.join()
            result["peak_mb"] = max(peak[0], process.memory_info().rss) / 2**20
        result["after_mb"] = _status_kb("VmRSS") / 1024


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak-memory figures of one pipeline / tuning / step type, built fresh in this process."""
    device = spec["device"]
    module, optimizer = build_module(spec["pretrained"], spec["tuning"], spec["kind"], 0, device)
    batch = make_batch(spec["batch_size"], device)
    generator = module._generator(-1)
    loss = module.mse_loss(batch, generator)[0] if spec["kind"] == "mse" else module.offline_loss(
        module.pair_errors(batch, generator))[0]  # fmt: skip
    loss.backward()  # untimed: lazy set-up and first-call caches; no optimizer step, so no AdamW state yet
    optimizer.zero_grad(set_to_none=True)
    del loss
    clock = Clock(module, synchronizer(device))
    peak = PeakRSS()
    cuda = device.startswith("cuda")
    figures: list[dict[str, float]] = []
    for step in range(4):
        trim()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        with peak.measure() as rss:
            clock.step(module, spec["kind"], batch, module._generator(0, step), optimizer)
        if cuda:
            rss["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        figures.append(rss)
    out = {
        "loaded_rss_mb": figures[0]["before_mb"],
        "first_step_peak_mb": figures[0]["peak_mb"] - figures[0]["before_mb"],
        "retained_mb": figures[0]["after_mb"] - figures[0]["before_mb"],
        "step_peak_mb": statistics.median(f["peak_mb"] - f["before_mb"] for f in figures[1:]),
        "method": peak.method,
    }
    if cuda:
        out["cuda_first_step_peak_mb"] = figures[0]["cuda_peak_mb"]
        out["cuda_step_peak_mb"] = statistics.median(f["cuda_peak_mb"] for f in figures[1:])
    del module, optimizer, clock, batch
    trim()
    return out


def memory_part(pipelines: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """All probes in one fresh process whose glibc serves every block of 16 KiB or more with its own mmap."""
    out: dict[str, Any] = {"unit": "MB (2^20 bytes)", "what": "CPU RSS (VmHWM / VmRSS) of a fresh process",
                           "malloc_mmap_threshold": MMAP_THRESHOLD}  # fmt: skip
    common = {"batch_size": args.batch_size, "device": args.device}
    specs = {
        f"{name}/{tuning}/{kind}": {"pretrained": pretrained, "tuning": tuning, "kind": kind, **common}
        for name, pretrained in pipelines.items()
        for tuning in args.memory_tunings
        for kind in ("pso", "mse")
    }
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": "0"}
    request = json.dumps({"threads": args.threads, "specs": specs})
    done = subprocess.run([sys.executable, __file__, "--probe", request], capture_output=True, text=True,
                          check=False, env=env)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memory probes failed:\n{done.stderr[-3000:]}")
    out |= json.loads(done.stdout.strip().splitlines()[-1])
    for name in pipelines:
        for tuning in args.memory_tunings:
            pso, mse = out[f"{name}/{tuning}/pso"], out[f"{name}/{tuning}/mse"]
            out[f"{name}/{tuning}/step_peak_ratio"] = pso["step_peak_mb"] / max(mse["step_peak_mb"], 1e-9)
            log(f"memory {name}/{tuning}: pso {json.dumps(rounded(pso, 1))} mse {json.dumps(rounded(mse, 1))}")
    return out


def run_probes(request: dict[str, Any]) -> dict[str, Any]:
    if request["threads"] > 0:
        torch.set_num_threads(request["threads"])
    quiet()
    return {key: probe(spec) for key, spec in request["specs"].items()}


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", nargs="+", choices=sorted(TINY), default=["sd", "sdxl"])
    parser.add_argument("--width", type=int, default=128, help="sd-wide UNet block_out_channels (W, 2W); 0: none")
    parser.add_argument("--tunings", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--batch-size", type=int, default=4, help="targets (MSE) / pairs (PSO) per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per module and round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per module first")
    parser.add_argument("--ref-pipelines", nargs="+", choices=[*sorted(TINY), "sd-wide"], default=["sd", "sdxl"],
                        help="pipelines of the reference-caching part (sd-wide needs --width)")  # fmt: skip
    parser.add_argument("--ref-rows", type=int, default=256, help="rows of the generated Pick-a-Pic-style Parquet")
    parser.add_argument("--ref-batch-size", type=int, default=8, help="generate_references batch size")
    parser.add_argument("--ref-repeats", type=int, default=3, help="rounds of generate vs sampling alone")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="LoRA init, wide UNet init, noise")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--memory-tunings", nargs="+", choices=["lora", "full"], help="default: --tunings")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: sd only, 2 rounds of 3 steps, 32 rows")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe (JSON spec)
    args = parser.parse_args(argv)
    if args.quick:
        args.pipelines, args.ref_pipelines, args.width = ["sd"], ["sd"], 0
        args.steps, args.repeats, args.warmup = 3, 2, 1
        args.ref_rows, args.ref_repeats, args.memory_tunings = 32, 1, ["lora"]
    if min(args.batch_size, args.steps, args.repeats, args.ref_rows, args.ref_batch_size, args.ref_repeats) < 1:
        parser.error("--batch-size, --steps, --repeats and the --ref-* counts must be positive")
    args.memory_tunings = args.memory_tunings or args.tunings
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(run_probes(json.loads(args.probe))))
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "pso_efficiency", "device": device_name(args.device)}
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("quick", "probe")}
    with tempfile.TemporaryDirectory(prefix="pso-bench-") as tmp:
        root = Path(tmp)
        pipelines = {name: TINY[name] for name in args.pipelines}
        if args.width:
            result["wide"] = build_wide(root / "wide", args.width, args.seed)
            pipelines["sd-wide"] = str(root / "wide")
        if not args.skip_steps:
            result["steps"] = steps_part(pipelines, args)
        if not args.skip_references:
            chosen = {name: pipelines[name] for name in args.ref_pipelines if name in pipelines}
            result["references"] = references_part(chosen, args, root)
        if not args.skip_memory:
            result["memory"] = memory_part(pipelines, args)
    result |= versions()
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(rounded(result)))


if __name__ == "__main__":
    main()
