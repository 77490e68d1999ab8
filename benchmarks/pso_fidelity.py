"""PSO fidelity on the tiny random SD pipeline: offline PSO versus naive MSE fine-tuning towards coloured shapes.

Everything runs on the CPU in fp32 on ``tiny/sd`` (random weights; 64 px images, 8x8x4 latents; Euler-ancestral
trailing sampler) with ``PSOModule`` under ``Trainer.fit``, the settings of ``configs/pso/tiny.yaml``:
``timesteps="sdxl-turbo"`` ([999, 749, 499, 249]), ``num_inference_steps=4``, AdamW (``--lr`` 1e-3, wd 0),
``gradient_clip_val=1.0``, LoRA (gaussian init, B = 0) of rank ``--rank`` (4, alpha = rank) on ``--lora-targets``:
``all`` (default: every Linear / Conv2d of the UNet, :data:`LORA_TARGETS`) or ``attn`` (the config's ``to_q, to_k,
to_v, to_out.0``; on the random tiny UNet these alone hardly move the samples in 200 steps, so both methods look
alike).

- **Data.** Targets come from a distribution the random model never produces: ``--per-class`` (4) images per class of
  ``ftmods.models.shapes_toy.draw_shape`` at 64 px (one filled coloured shape on a light background, seeded jitter),
  for the 6 classes ``red circle, blue square, green triangle, red square, blue circle, yellow star``, captioned
  ``"a <colour> <shape>"``, written as PNG files plus a ``format="manifest"`` JSONL. ``PSODataModule(...,
  reference_source="model_samples", reference_cache=<temp>)``; the references (each item's ``x-``) are generated once
  by the library's own ``ftmods.pso.module.generate_references`` (the frozen model, adapters disabled, 4 steps, cfg 0,
  seed per item from the DataModule's seed 0), i.e. the frozen model's own samples for the same caption. A held-out
  set (``--heldout-per-class`` (2) new draws per class, its own manifest and cache, references generated the same
  way) gives the evaluation pairs.
- **Methods.** Per seed, two fresh runs on the same data, lr, steps, batch size (``--batch-size`` 4) and seed (module
  ``seed``: LoRA init, noise and timesteps; DataModule ``seed``: the order): (i) **PSO**: ``loss="sigmoid"``, beta
  ``--beta`` (50, no 0.5 factor), ``neg_weight`` 1; (ii) **MSE**: ``loss="mse"`` (the naive baseline: epsilon-MSE on
  the targets alone, t uniform over all 1000 training steps, ``--mse-timesteps distilled`` for t in T_K); references
  are unused by (ii).
- **Curve** (per ``--window`` (25) steps, and at step 0): ``train_implicit_accuracy`` and ``train_loss``, the means of
  the module's own ``train/implicit_accuracy`` / ``train/loss`` logs over the window's steps (PSO; computed on the
  training batch before that step's update, so the first step is exactly 0 / ln 2), and for **both** methods at the
  end of the window the held-out ``heldout_implicit_accuracy`` / ``heldout_logit``: ``mean(logit > 0)`` and the mean of
  ``logit = (e_ref(x+) - e_ref(x-)) - (e_theta(x+) - e_theta(x-))`` over every held-out pair at each of the 4
  distilled timesteps with fixed noise (``e`` = per-sample epsilon-MSE; the reference = adapters disabled).
- **Samples at the end** (and of the base model): for each class, ``--eval-per-class`` (4) samples with
  ``module.pipeline`` at 1, 2 and 4 steps, cfg 0, seeds ``1000 + i`` (the same as ``module.sample``; checked), decoded
  with the module's VAE. Measured per step count:
  - ``finite``: every pixel is finite;
  - ``pixel_std``: per image, the std over channels and pixels in [0, 1], averaged (``pixel_std_min``: the lowest image;
    a collapsed, constant image has 0); ``pixel_std_vs_base``: ratio to the base model's;
  - ``sharpness``: mean absolute 3x3 Laplacian of the grey image (mean of RGB, [0, 1]), ``sharpness_vs_base`` its
    ratio to the base model's samples at the same step count and seeds (< 1: blurrier);
  - distance to the targets, per class then averaged: ``colour_dist``: L2 distance between the mean RGB of the class's
    samples and the mean RGB of the class's training targets after a VAE round trip (``decode(encode(x))``, what the
    random VAE can reproduce at all), and ``latent_dist``: L2 distance between the per-channel (mean, std) of the
    samples' latents and of the targets' latents; ``*_closed``: 1 - dist / base dist, the share of the base model's
    distance the method closed (1 = matches the targets, 0 = no move, < 0 = moved away);
  - ``class_acc``: each sample's latent (mean, std) per channel assigned to the nearest target-class centroid; the
    share that lands on its own class (chance 1/6; red circle / red square and blue square / blue circle share a
    colour).
  The targets' own figures (``targets``: VAE round-trip pixel std and sharpness) are reported for scale.

Reported per method: the mean and per-seed values; ``pso_minus_mse`` per metric; the curve per seed and averaged.
No image-text score is used: the tiny CLIP (``tiny/clip``) has random weights, so a CLIP score would be noise.

One JSON object goes to stdout; progress lines go to stderr.

Example::

    python benchmarks/pso_fidelity.py                 # 3 seeds x 2 methods x 200 steps; ~4 min on 2 busy cores
    python benchmarks/pso_fidelity.py --quick         # 1 seed, 40 steps, 2 images per class; ~35 s
    python benchmarks/pso_fidelity.py --seeds 0 1 2 3 4 --steps 400 --lr 3e-4
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
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))

import lightning  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch import Tensor  # noqa: E402

from ftmods.datamodules import PSODataModule  # noqa: E402
from ftmods.datamodules.pso import load_reference_latents  # noqa: E402
from ftmods.models.loading import LoRASpec  # noqa: E402
from ftmods.models.shapes_toy import CLASSES, draw_shape  # noqa: E402
from ftmods.pso import PSOModule  # noqa: E402
from ftmods.pso.loss import denoising_error  # noqa: E402
from ftmods.pso.module import generate_references  # noqa: E402

LORA_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "conv_in", "conv_out"],
}  # fmt: skip
"""LoRA targets: ``attn`` = ``configs/pso/tiny.yaml``'s; ``all`` adds every other Linear / Conv2d of the UNet."""
LORA = LoRASpec(r=4, alpha=4, target_modules=LORA_TARGETS["attn"], init_lora_weights="gaussian")
RESOLUTION = 64
EVAL_STEPS = (1, 2, 4)
EVAL_SEED = 1000
HELDOUT_NOISE_SEED = 1234
METRICS = ("pixel_std", "pixel_std_vs_base", "sharpness_vs_base", "colour_dist", "colour_closed", "latent_dist",
           "latent_closed", "class_acc")  # fmt: skip

# ------------------------------------------------------------------------------------------------------ shared


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return f"cuda ({name}), {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions() -> dict[str, str]:
    import diffusers
    import peft

    from ftmods.datamodules import pso as pso_data
    from ftmods.pso import loss as pso_loss

    def sha(obj: Any) -> str:
        return hashlib.sha256(Path(inspect.getfile(obj)).read_bytes()).hexdigest()[:12]

    return {
        "pso_module_sha256": sha(PSOModule),
        "pso_loss_sha256": sha(pso_loss),
        "pso_datamodule_sha256": sha(pso_data),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "datasets", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*Converting a tensor with requires_grad.*", ".*module\\(s\\) in eval mode.*",
                    ".*across ranks is zero.*", ".*LeafSpec.*", ".*set_vital.*"):  # fmt: skip
        warnings.filterwarnings("ignore", message=message)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pso_module(pretrained: str = "tiny/sd", *, lr: float = 1e-3, **kwargs: Any) -> PSOModule:
    """``PSOModule`` with the settings of ``configs/pso/tiny.yaml`` (LoRA unless ``lora=None`` is given)."""
    kwargs.setdefault("lora", LORA)
    kwargs.setdefault("beta", 50.0)
    return PSOModule(
        pretrained,
        mode="offline",
        timesteps="sdxl-turbo",
        num_inference_steps=4,
        resolution=RESOLUTION,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        **kwargs,
    )


def caption(name: str) -> str:
    return f"a {name}"


def shape_image(name: str, rng: random.Random, size: int = RESOLUTION) -> Any:
    """One ``draw_shape`` image as RGB."""
    return draw_shape(name, rng, size=size).convert("RGB")


def attach_trainer(module: PSOModule, root: Path) -> Trainer:
    """A single-process CPU ``Trainer`` attached to ``module`` (``generate_references`` reads its rank / world)."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    module.trainer = trainer
    return trainer


# -------------------------------------------------------------------------------------------------------- data


def write_manifest(folder: Path, per_class: int, seed: int) -> Path:
    """``per_class`` shapes per class as PNGs and a manifest JSONL (``id``, ``caption``, ``target``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(per_class):
        for name in CLASSES:
            item = f"{name.replace(' ', '_')}_{i}"
            shape_image(name, rng).save(folder / f"{item}.png")
            lines.append(json.dumps({"id": item, "caption": caption(name), "target": f"{item}.png"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def datamodule(manifest: Path, cache: Path, batch_size: int, seed: int) -> PSODataModule:
    return PSODataModule(str(manifest), format="manifest", reference_source="model_samples",
                         reference_cache=str(cache), resolution=RESOLUTION, batch_size=batch_size,
                         seed=seed)  # fmt: skip


def load_items(data: PSODataModule) -> dict[str, Any]:
    """All items of a DataModule (targets in [-1, 1], captions, cached reference latents), in item order."""
    data.setup("fit")
    assert data.train_dataset is not None
    samples = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    return {
        "captions": [s["caption"] for s in samples],
        "target": torch.stack([s["target"] for s in samples]),  # (N, 3, R, R)
        "reference_latents": torch.stack([s["reference_latents"] for s in samples]),  # (N, C, h, w)
        "keys": [s["id"] for s in samples],
    }


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_logits(module: PSOModule, pairs: dict[str, Any]) -> Tensor:
    """``(T, P)`` PSO logits of every held-out pair at every distilled timestep (fixed noise), policy vs reference."""
    win = module.encode_images(pairs["target"])  # (P, C, h, w)
    lose = pairs["reference_latents"].to(win)
    count = win.shape[0]
    latents = torch.cat([win, lose])  # (2P, C, h, w)
    cond = module._repeat_cond(module.encode_prompts(pairs["captions"]), 2)
    generator = torch.Generator().manual_seed(HELDOUT_NOISE_SEED)
    alphas_all = module.noise_scheduler.alphas_cumprod
    rows = []
    for t in module.train_timesteps():
        noise = torch.randn(win.shape, generator=generator).repeat(2, 1, 1, 1)  # shared by x+ and x-
        alpha = alphas_all[t].to(win)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        steps = torch.full((2 * count,), t)
        policy = denoising_error(module._unet(module.unet, noisy, steps, cond), noise)  # (2P,)
        with module.reference_unet() as ref:
            reference = denoising_error(module._unet(ref, noisy, steps, cond), noise)  # (2P,)
        rows.append((reference[:count] - reference[count:]) - (policy[:count] - policy[count:]))
    return torch.stack(rows)  # (T, P)


@torch.no_grad()
def sample_latents(module: PSOModule, captions: Sequence[str], steps: int, seed: int = EVAL_SEED) -> Tensor:
    """What ``module.sample`` draws (same pipeline call, generators and seeds), as latents."""
    generators = [torch.Generator(device=module.device).manual_seed(seed + i) for i in range(len(captions))]
    return module.pipeline(prompt=list(captions), **module._steps_kwargs(steps), guidance_scale=0.0,
                           height=RESOLUTION, width=RESOLUTION, generator=generators,
                           output_type="latent").images.float()  # fmt: skip


def sharpness(images: Tensor) -> Tensor:
    """``(B,)`` mean absolute 3x3 Laplacian of the grey image (valid region)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    grey = images.float().mean(1, keepdim=True)  # (B, 1, H, W)
    return F.conv2d(grey, kernel).abs().flatten(1).mean(1)


def latent_features(latents: Tensor) -> Tensor:
    """``(B, 2C)`` per-channel mean and std of latents ``(B, C, h, w)``."""
    flat = latents.float().flatten(2)
    return torch.cat([flat.mean(2), flat.std(2)], 1)


def class_means(values: Tensor, labels: Sequence[int], classes: int) -> Tensor:
    index = torch.tensor(labels)
    return torch.stack([values[index == c].mean(0) for c in range(classes)])


def target_stats(module: PSOModule, items: dict[str, Any]) -> dict[str, Any]:
    """Per-class colour (VAE round trip) and latent features of the training targets."""
    labels = [CLASSES.index(c.removeprefix("a ")) for c in items["captions"]]
    latents = module.encode_images(items["target"])
    images = module.decode(latents)  # (N, 3, R, R) in [0, 1]
    return {
        "colour": class_means(images.mean((2, 3)), labels, len(CLASSES)),  # (K, 3)
        "latent": class_means(latent_features(latents), labels, len(CLASSES)),  # (K, 2C)
        "pixel_std": float(images.flatten(1).std(1).mean()),
        "sharpness": float(sharpness(images).mean()),
        "raw_pixel_std": float(((items["target"] + 1) / 2).flatten(1).std(1).mean()),
        "raw_sharpness": float(sharpness((items["target"] + 1) / 2).mean()),
    }


def sample_metrics(module: PSOModule, per_class: int, targets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finite / pixel std / sharpness / distances to the targets of the end-of-training samples, per step count."""
    labels = [k for k in range(len(CLASSES)) for _ in range(per_class)]
    captions = [caption(CLASSES[k]) for k in labels]
    out: dict[str, dict[str, Any]] = {}
    for steps in EVAL_STEPS:
        latents = sample_latents(module, captions, steps)
        images = module.decode(latents).float()  # (B, 3, R, R)
        stds = images.flatten(1).std(1)
        features = latent_features(latents)
        colour = class_means(images.mean((2, 3)), labels, len(CLASSES))
        nearest = torch.cdist(features, targets["latent"]).argmin(1)
        out[str(steps)] = {
            "finite": bool(torch.isfinite(latents).all() and torch.isfinite(images).all()),
            "pixel_std": float(stds.mean()),
            "pixel_std_min": float(stds.min()),
            "sharpness": float(sharpness(images).mean()),
            "colour_dist": float((colour - targets["colour"]).norm(dim=1).mean()),
            "latent_dist": float((class_means(features, labels, len(CLASSES)) - targets["latent"]).norm(dim=1).mean()),
            "class_acc": float((nearest == torch.tensor(labels)).float().mean()),
        }
    return out


def relative_to_base(metrics: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]) -> None:
    for steps, row in metrics.items():
        ref = base[steps]
        row["pixel_std_vs_base"] = row["pixel_std"] / ref["pixel_std"]
        row["sharpness_vs_base"] = row["sharpness"] / ref["sharpness"]
        row["colour_closed"] = 1 - row["colour_dist"] / ref["colour_dist"]
        row["latent_closed"] = 1 - row["latent_dist"] / ref["latent_dist"]


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- training


class Curve(Callback):
    """Windowed means of the module's training logs and held-out logits at each window's end."""

    def __init__(self, window: int, heldout: dict[str, Any]) -> None:
        self.window, self.heldout = window, heldout
        self.rows: list[dict[str, Any]] = []
        self._logs: dict[str, list[float]] = {}

    def evaluate(self, module: PSOModule, step: int) -> None:
        logits = heldout_logits(module, self.heldout)
        row: dict[str, Any] = {"step": step}
        for name, values in self._logs.items():
            row[f"train_{name}"] = statistics.fmean(values)
        row["heldout_implicit_accuracy"] = float((logits > 0).float().mean())
        row["heldout_logit"] = float(logits.mean())
        self.rows.append(row)
        self._logs = {}

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.evaluate(pl_module, 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        for name in ("implicit_accuracy", "loss"):
            if f"train/{name}" in metrics:
                self._logs.setdefault(name, []).append(float(metrics[f"train/{name}"]))
        if trainer.global_step % self.window == 0 or trainer.global_step == trainer.max_steps:
            self.evaluate(pl_module, trainer.global_step)


def train(method: str, seed: int, args: argparse.Namespace, data: dict[str, Any], root: Path) -> dict[str, Any]:
    """One fresh run of ``method`` (``pso`` or ``mse``); its curve and end-of-training sample metrics."""
    kwargs: dict[str, Any] = {"loss": "sigmoid", "beta": args.beta}
    if method == "mse":
        kwargs = {"loss": "mse", "mse_timesteps": args.mse_timesteps}
    lora = LoRASpec(r=args.rank, alpha=args.rank, target_modules=LORA_TARGETS[args.lora_targets],
                    init_lora_weights="gaussian")  # fmt: skip
    module = pso_module(lr=args.lr, seed=seed, lora=lora, **kwargs)
    curve = Curve(args.window, data["heldout"])
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.steps, gradient_clip_val=1.0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[curve], default_root_dir=root)  # fmt: skip
    dm = datamodule(data["manifest"], data["cache"], args.batch_size, seed)
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - started
    module.eval()
    samples = sample_metrics(module, args.eval_per_class, data["targets"])
    relative_to_base(samples, data["base"])
    return {"fit_s": fit_s, "steps": trainer.global_step, "curve": curve.rows, "samples": samples}


# ------------------------------------------------------------------------------------------------------ report


def summarise(runs: dict[str, dict[int, dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, per_seed in runs.items():
        seeds = sorted(per_seed)
        samples: dict[str, Any] = {}
        for steps in map(str, EVAL_STEPS):
            row: dict[str, Any] = {"finite_all": all(per_seed[s]["samples"][steps]["finite"] for s in seeds)}
            for metric in (*METRICS, "pixel_std_min", "sharpness"):
                values = [per_seed[s]["samples"][steps][metric] for s in seeds]
                row[metric] = {"mean": statistics.fmean(values), "per_seed": values}
            samples[steps] = row
        curve = []
        for index, point in enumerate(per_seed[seeds[0]]["curve"]):
            averaged: dict[str, Any] = {"step": point["step"]}
            for key in point:
                if key != "step":
                    averaged[key] = statistics.fmean(per_seed[s]["curve"][index][key] for s in seeds)
            curve.append(averaged)
        out[method] = {"samples": samples, "curve_mean": curve, "fit_s_mean": statistics.fmean(
            per_seed[s]["fit_s"] for s in seeds)}  # fmt: skip
    if "pso" in out and "mse" in out:
        out["pso_minus_mse"] = {
            steps: {
                metric: out["pso"]["samples"][steps][metric]["mean"] - out["mse"]["samples"][steps][metric]["mean"]
                for metric in METRICS
            }
            for steps in map(str, EVAL_STEPS)
        }
        last = {m: out[m]["curve_mean"][-1] for m in ("pso", "mse")}
        out["heldout_implicit_accuracy_end"] = {m: last[m]["heldout_implicit_accuracy"] for m in last}
        out["heldout_logit_end"] = {m: last[m]["heldout_logit"] for m in last}
    return out


# -------------------------------------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Write both manifests, generate their references with the frozen model, and measure the base model."""
    train_manifest = write_manifest(root / "train", args.per_class, seed=0)
    heldout_manifest = write_manifest(root / "heldout", args.heldout_per_class, seed=1)
    base = pso_module()
    base.configure_model()
    base.eval()
    attach_trainer(base, root)
    timings = {}
    for name, manifest in (("train", train_manifest), ("heldout", heldout_manifest)):
        data = datamodule(manifest, root / f"cache_{name}", args.batch_size, seed=0)
        started = time.perf_counter()
        count = generate_references(base, data)
        timings[name] = {"references": count, "s": round(time.perf_counter() - started, 3)}
    train_items = load_items(datamodule(train_manifest, root / "cache_train", args.batch_size, seed=0))
    heldout = load_items(datamodule(heldout_manifest, root / "cache_heldout", args.batch_size, seed=0))
    cached = load_reference_latents(root / "cache_train", train_items["keys"][0])
    targets = target_stats(base, train_items)
    base_samples = sample_metrics(base, args.eval_per_class, targets)
    direct = base.sample([caption(CLASSES[0])], seed=EVAL_SEED, steps=4)
    via_latents = base.decode(sample_latents(base, [caption(CLASSES[0])], 4))
    logits = heldout_logits(base, heldout)
    return {
        "manifest": train_manifest,
        "cache": root / "cache_train",
        "heldout": heldout,
        "targets": targets,
        "base": base_samples,
        "report": {
            "train_items": len(train_items["captions"]),
            "heldout_pairs": len(heldout["captions"]),
            "reference_generation": timings,
            "reference_latent_shape": list(cached.shape),
            "sample_path_max_abs_diff": float((direct - via_latents).abs().max()),
            "base_heldout_logit_abs_max": float(logits.abs().max()),
            "targets": {k: v for k, v in targets.items() if isinstance(v, float)},
            "base_samples": base_samples,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one PSO and one MSE run per seed")
    parser.add_argument("--methods", nargs="+", choices=["pso", "mse"], default=["pso", "mse"])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--window", type=int, default=25, help="steps per window of the curve")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs (PSO) / targets (MSE) per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant, wd 0)")
    parser.add_argument("--beta", type=float, default=50.0, help="PSO beta (multiplies the logit, no 0.5 factor)")
    parser.add_argument("--lora-targets", choices=sorted(LORA_TARGETS), default="all", help="LoRA target set")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (= alpha)")
    parser.add_argument("--mse-timesteps", choices=["all", "distilled"], default="all", help="t of the MSE baseline")
    parser.add_argument("--per-class", type=int, default=4, help="training targets per class (6 classes)")
    parser.add_argument("--heldout-per-class", type=int, default=2, help="held-out pairs per class")
    parser.add_argument("--eval-per-class", type=int, default=4, help="end-of-training samples per class and steps")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 40 steps, 2 images per class")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.window = args.seeds[:1], 40, 10
        args.per_class, args.heldout_per_class, args.eval_per_class = 2, 1, 2
    if min(args.steps, args.window, args.batch_size, args.per_class, args.heldout_per_class, args.eval_per_class) < 1:
        parser.error("--steps, --window, --batch-size and the per-class counts must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "pso_fidelity", "device": device_name()}
    result["settings"] = {k: v for k, v in vars(args).items() if k != "quick"} | {
        "pretrained": "tiny/sd", "lora": "r4 alpha4 to_q,to_k,to_v,to_out.0 gaussian", "timesteps": "sdxl-turbo",
        "gradient_clip_val": 1.0, "eval_steps": list(EVAL_STEPS), "eval_seed": EVAL_SEED}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pso-fidelity-") as tmp:
        root = Path(tmp)
        data = prepare(args, root)
        result["data"] = data["report"]
        log(f"prepared: {json.dumps(rounded(data['report']))}")
        runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                run = train(method, seed, args, data, root / f"{method}_{seed}")
                runs[method][seed] = run
                end, samples = json.dumps(rounded(run["curve"][-1])), json.dumps(rounded(run["samples"]["4"]))
                log(f"seed {seed} {method}: fit {run['fit_s']:.1f} s, {run['steps']} steps, end {end}, "
                    f"samples@4 {samples}")  # fmt: skip
    result["summary"] = summarise(runs, args)
    result["per_seed"] = {m: {str(s): r for s, r in per_seed.items()} for m, per_seed in runs.items()}
    result |= versions()
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(rounded(result)))


if __name__ == "__main__":
    main()
