"""CLS-RL fidelity: does GRPO with ``CLSRLModule`` raise the accuracy reward of a warm-started tiny VLM?

The paper's claim (arXiv 2503.16188): rule-based GRPO on few-shot images (CLS-RL: think-then-answer prompts,
``accuracy`` + ``format`` rewards; No-Thinking CLS-RL: direct answers, the exact ``equality`` reward) raises
classification accuracy. Here the same loop on the offline toy, fully through the library under the Lightning
``Trainer`` (CPU, fp32):

- **Model:** ``tiny/qwen2-vl-shapes`` (``ftmods.models.shapes_toy``): a random 0.2 M-parameter Qwen2-VL given a short
  supervised warm start on freshly drawn coloured shapes in both prompt modes (greedy exact accuracy about 0.31
  think / 0.33 no_think on fresh shapes), so sampled completions differ in reward and GRPO has a signal.
- **Data:** ``FewShotImageDataModule`` on ``configs/data/shapes/train`` (48 images, 6 classes, 8 each; ``--shots``
  limits it) for training and ``configs/data/shapes/test`` (24 images, 4 per class) for testing, 56x56 images, the
  paper's prompts of the mode (``mode`` = ``think`` / ``no_think``), all 6 classes in the choice list, the DataModule
  seeded by the run's seed (choice lists, order).
- **Training:** ``CLSRLModule("tiny/qwen2-vl-shapes", thinking=mode == "think", num_generations=G,
  max_completion_length=L, beta, loss_type="grpo", temperature=1.0, seed=seed)`` with ``torch.optim.AdamW(lr,
  weight_decay=0)`` at a constant rate, ``gradient_clip_val=1.0`` (the paper's HF default), ``--steps`` optimizer
  steps of ``--batch-size`` prompts x G completions, ``seed_everything(seed)``, fresh weights per run. Defaults
  (from a small sweep on this toy, see the README): G 4, 8 prompts per step (32 completions), lr 3e-4, 60 steps (10
  epochs of the 48 images), beta 0.04, L 48 (the warm-started answers are about 35 tokens think / 9 no_think). The
  paper's lr 1e-6 is for a 2 B model; the toy does not move at it in 60 steps, and 3e-3 collapses it.
- **Reward curve:** a ``Callback`` reads ``trainer.callback_metrics["train/rewards/accuracy"]`` (think) or
  ``["train/rewards/equality"]`` (no_think) at ``on_train_batch_end`` (checked to equal the step's own rollout): the
  mean exact-match reward of the step's ``B x G`` sampled completions (think also records ``train/rewards/format``;
  both ``train/completion_length``, ``train/frac_reward_zero_std`` and ``train/kl``). Reported per mode: the mean
  over seeds per step (``reward_per_step``) and per ``--window``-step window (``reward_per_window``), ``first_mean``
  / ``last_mean`` (the first and last ``--window`` steps, averaged over seeds), ``rise = last_mean - first_mean``
  and ``seeds_rising`` (seeds whose own last window beats their first).
- **Test accuracy** (greedy, ``trainer.test`` on the 24 test images, percent; one image is 4.2 points) before and
  after training, ``exact`` (``test/acc_exact``: the mode's training matcher) and ``lenient`` (``test/acc_lenient``:
  the paper's lenient matcher), per seed and as mean +- std over seeds, with two prompts: ``train`` (the test images
  asked with the training prompt, ``eval_prompt_template=TRAIN_PROMPTS[mode]``: the prompt the toy was warm-started
  on) and ``paper`` (the DataModule's default evaluation prompt from the paper's test scripts, which the toy never
  saw: near chance before training).

One JSON object goes to stdout; progress lines go to stderr.

Example::

    python benchmarks/cls_rl_fidelity.py                     # 2 modes x 3 seeds x 60 steps; ~2.5 min on 2 cores
    python benchmarks/cls_rl_fidelity.py --quick             # 2 modes x 1 seed x 20 steps; ~25 s
    python benchmarks/cls_rl_fidelity.py --modes no_think --seeds 0 1 2 3 4 --lr 3e-4 --steps 100
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))

import lightning  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from ftmods.cls_rl.module import CLSRLModule  # noqa: E402
from ftmods.datamodules import FewShotImageDataModule  # noqa: E402
from ftmods.datamodules.fewshot_images import TRAIN_PROMPTS  # noqa: E402
from ftmods.models import shapes_toy  # noqa: E402
from ftmods.models.shapes_toy import SIDECAR_FILE  # noqa: E402
from ftmods.models.tiny import resolve_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "configs" / "data" / "shapes"
TRAIN_ROOT, TEST_ROOT, CLASS_NAMES = SHAPES / "train", SHAPES / "test", SHAPES / "classnames.txt"
MODEL = "tiny/qwen2-vl-shapes"
MODES = ("think", "no_think")
TEST_PROMPTS = ("train", "paper")
MATCHERS = ("exact", "lenient")
ACCURACY_KEY = {"think": "train/rewards/accuracy", "no_think": "train/rewards/equality"}
"""The exact-match training reward of each mode (CLS-RL accuracy, No-Thinking equality)."""
EXTRA_KEYS = ("train/rewards/format", "train/completion_length", "train/frac_reward_zero_std", "train/kl")

# ------------------------------------------------------------------------------------------------- shared helpers


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def model_fingerprint() -> dict[str, Any]:
    """Which build of ``tiny/qwen2-vl-shapes`` ran: a hash of its weights and its recorded greedy accuracies."""
    folder = Path(resolve_pretrained(MODEL))
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    sidecar = folder / SIDECAR_FILE
    greedy = json.loads(sidecar.read_text()).get("greedy_accuracy") if sidecar.is_file() else None
    return {"weights_sha256": digest.hexdigest()[:12], "greedy_accuracy": greedy}


def source_sha256(obj: Any) -> str:
    return hashlib.sha256(Path(inspect.getfile(obj)).read_bytes()).hexdigest()[:12]


def versions() -> dict[str, str]:
    return {
        "cls_rl_module_sha256": source_sha256(CLSRLModule),
        "shapes_toy_sha256": source_sha256(shapes_toy),
        "datamodule_sha256": source_sha256(FewShotImageDataModule),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def adamw(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer factory: ``torch.optim.AdamW(lr, weight_decay=0)`` (the paper's optimizer, constant rate)."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def shapes_data(
    mode: str, batch_size: int, *, seed: int = 0, shots: int | None = None, test_prompt: str | None = None
) -> FewShotImageDataModule:
    """The shapes DataModule of ``mode`` (56x56 images, all classes in the choice list).

    ``test_prompt``: ``None`` (no test set), ``"paper"`` (the test set with the paper's evaluation prompt) or
    ``"train"`` (the test set asked with the training prompt, the one the toy was warm-started on).
    """
    return FewShotImageDataModule(
        str(TRAIN_ROOT),
        test_root_or_file=str(TEST_ROOT) if test_prompt else None,
        class_names=str(CLASS_NAMES),
        shots=shots,
        batch_size=batch_size,
        eval_batch_size=24,
        image_size=56,
        mode=mode,  # type: ignore[arg-type]
        eval_prompt_template=TRAIN_PROMPTS[mode] if test_prompt == "train" else None,
        seed=seed,
    )


def shapes_module(mode: str, **kwargs: Any) -> CLSRLModule:
    """``CLSRLModule`` on ``tiny/qwen2-vl-shapes`` in ``mode``, no completion tables; ``kwargs`` override."""
    return CLSRLModule(MODEL, thinking=mode == "think", log_completions=0, **kwargs)


def make_trainer(root: Path, max_steps: int = -1, callbacks: list[Any] | None = None) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=callbacks or [],
        default_root_dir=str(root),
    )


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


# ------------------------------------------------------------------------------------------------------- training


class RewardCurve(Callback):
    """Per optimizer step: the mode's exact-match reward and a few diagnostics from ``trainer.callback_metrics``."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        row = {"accuracy": float(metrics[self.key])}
        for key in EXTRA_KEYS:
            if key in metrics:
                row[key.rsplit("/", 1)[-1]] = float(metrics[key])
        self.rows.append(row)


def test_accuracy(module: CLSRLModule, mode: str, seed: int, root: Path) -> dict[str, dict[str, float]]:
    """Greedy test accuracy (percent), exact and lenient, through ``trainer.test``, with each test prompt."""
    out = {}
    for prompt in TEST_PROMPTS:
        data = shapes_data(mode, 1, seed=seed, test_prompt=prompt)
        metrics = make_trainer(root).test(module, datamodule=data, verbose=False)[0]
        out[prompt] = {matcher: round(float(metrics[f"test/acc_{matcher}"]), 2) for matcher in MATCHERS}
    return out


def run(mode: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One GRPO run: test before, ``args.steps`` steps with the reward curve, test after."""
    seed_everything(seed, verbose=False)
    module = shapes_module(
        mode,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        beta=args.beta,
        loss_type="grpo",
        temperature=1.0,
        seed=seed,
        optimizer=adamw(args.lr),
    )
    data = shapes_data(mode, args.batch_size, seed=seed, shots=args.shots)
    before = test_accuracy(module, mode, seed, root)
    curve = RewardCurve(ACCURACY_KEY[mode])
    started = time.perf_counter()
    make_trainer(root, args.steps, [curve]).fit(module, datamodule=data)
    fit_s = time.perf_counter() - started
    after = test_accuracy(module, mode, seed, root)
    rewards = [row["accuracy"] for row in curve.rows]
    w = min(args.window, len(rewards))
    out = {
        "seed": seed,
        "test_before": before,
        "test_after": after,
        "reward_first": round(statistics.fmean(rewards[:w]), 4),
        "reward_last": round(statistics.fmean(rewards[-w:]), 4),
        "fit_s": round(fit_s, 1),
        "s_per_step": round(fit_s / max(len(rewards), 1), 3),
        "rewards": [round(r, 4) for r in rewards],
    }
    for key in ("format", "completion_length", "frac_reward_zero_std", "kl"):
        values = [row[key] for row in curve.rows if key in row]
        if values:
            out[f"{key}_first"] = round(statistics.fmean(values[:w]), 4)
            out[f"{key}_last"] = round(statistics.fmean(values[-w:]), 4)
    return out


def summarize(runs: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Mean curve over seeds (per step and per window), first / last window, test accuracies."""
    steps = min(len(r["rewards"]) for r in runs)
    curve = [statistics.fmean(r["rewards"][s] for r in runs) for s in range(steps)]
    windows = [round(statistics.fmean(curve[i : i + window]), 4) for i in range(0, steps, window)]
    w = min(window, steps)
    first, last = statistics.fmean(curve[:w]), statistics.fmean(curve[-w:])
    out: dict[str, Any] = {
        "first_mean": round(first, 4),
        "last_mean": round(last, 4),
        "rise": round(last - first, 4),
        "seeds_rising": sum(r["reward_last"] > r["reward_first"] for r in runs),
        "seeds": len(runs),
        "reward_per_window": windows,
        "reward_per_step": [round(v, 4) for v in curve],
    }
    for prompt in TEST_PROMPTS:
        for matcher in MATCHERS:
            before = [r["test_before"][prompt][matcher] for r in runs]
            after = [r["test_after"][prompt][matcher] for r in runs]
            out[f"test_{prompt}_prompt_{matcher}"] = {
                "before": mean_std(before),
                "after": mean_std(after),
                "delta": mean_std([a - b for a, b in zip(after, before, strict=True)]),
            }
    for key in ("completion_length", "format"):
        if f"{key}_first" in runs[0]:
            out[f"{key}_first"] = round(statistics.fmean(r[f"{key}_first"] for r in runs), 3)
            out[f"{key}_last"] = round(statistics.fmean(r[f"{key}_last"] for r in runs), 3)
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling / data seeds")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=48, help="new-token limit of a rollout")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient")
    parser.add_argument("--shots", type=int, default=None, help="training images per class (default: all 8)")
    parser.add_argument("--window", type=int, default=10, help="steps per window of the reported curve")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 20 steps, window 5")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.window = args.seeds[:1], 20, 5
    if args.steps < 1 or args.window < 1 or args.batch_size < 1:
        parser.error("--steps, --window and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    settings = {
        k: getattr(args, k)
        for k in ("steps", "lr", "batch_size", "num_generations", "max_completion_length", "beta", "shots", "window")
    }
    result: dict[str, Any] = {
        "benchmark": "cls_rl_fidelity",
        "device": device_name(),
        "model": {"name": MODEL, **model_fingerprint()},  # builds the toy once (about 20 s) if needed
        "settings": settings,
    }
    with tempfile.TemporaryDirectory(prefix="cls-rl-fidelity-") as tmp, contextlib.redirect_stdout(sys.stderr):
        for mode in args.modes:
            runs = []
            for seed in args.seeds:
                runs.append(run(mode, seed, args, Path(tmp)))
                brief = {k: v for k, v in runs[-1].items() if k != "rewards"}
                print(f"{mode} seed {seed}: {json.dumps(brief)}", file=sys.stderr, flush=True)
            result[mode] = {"summary": summarize(runs, args.window), "runs": runs}
            print(f"{mode}: {json.dumps(result[mode]['summary'])}", file=sys.stderr, flush=True)
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
