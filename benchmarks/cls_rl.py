"""CLS-RL efficiency: where a GRPO step's time goes (think vs no_think) and ``CLSRLModule`` vs TRL ``GRPOTrainer``.

Everything runs on the CPU in fp32 on ``tiny/qwen2-vl-shapes`` (``ftmods.models.shapes_toy``: a 0.2 M-parameter
Qwen2-VL warm-started on coloured shapes; 56x56 images = 4 image tokens; prompts of 190 (think) / 158 (no_think)
tokens with its 400-token byte-level vocabulary), with the shapes training set (``configs/data/shapes/train``, 48
images, 6 classes) through ``FewShotImageDataModule`` (seed 0, all classes in the choice list, the paper's prompt of
the mode). Both parts use the same G (``--num-generations``, 4),
the same prompts per step (``--batch-size``, 4: 16 completions per step), the same ``--max-completion-length``
(128) and temperature 1.0 without top-k / top-p for both modes, beta 0.04 (so a frozen reference model is scored),
``loss_type="grpo"`` and ``torch.optim.AdamW(lr=--lr, weight_decay=0)`` at a constant rate (default 1e-6, the paper's:
the policy hardly moves during the measurement, so completion lengths stay those of the warm-started model).

1. **Step split** (``modes``): ``CLSRLModule`` driven by hand, one optimizer step = ``rollout(batch, seed)`` +
   ``compute_loss(rollout).loss.backward()`` + ``clip_grad_norm_(1.0)`` + ``optimizer.step()`` / ``zero_grad()``,
   timed per part:
   - ``generate``: the batched sampling ``generate`` (one call, ``num_return_sequences=G``, KV cache);
   - ``score``: the reference model's log-probs over prompt + completion (one no-grad forward);
   - ``rollout_other``: the rest of ``rollout`` (processor encoding of the prompts and images, completion mask,
     decoding, rewards, advantages, building the scoring inputs);
   - ``policy_fwd_bwd``: the policy forward over prompt + completion, the GRPO loss and its backward;
   - ``optimizer``: gradient clipping and the AdamW step;
   - ``total``: the whole step.
   Both modes' modules are built up front; after ``--warmup`` untimed steps each, ``--repeats`` rounds run
   ``--steps`` steps per mode, with the mode order alternating per round; step ``k`` of every round uses the same
   batch (the DataModule's ``k``-th) and sampling seed ``k`` in both modes (the images and choice lists are the same,
   only the prompt's instruction differs). Reported per mode: the median of each part over all timed steps (ms), each
   part's share of the summed medians, the mean completion length (tokens through the first eos), the mean padded
   length (the batch's longest completion: what ``generate`` and the forwards pay for), the share of completions
   without eos, and the mean accuracy reward. ``ratio_think_over_no_think`` divides think's figures by no_think's:
   ``total`` (step time) and ``completion_length`` are the headline (the paper: No-Thinking trains about 17x faster
   on ImageNet because its rollouts are much shorter; here the think answers are ``<think> c, s </think><answer> c s
   </answer>``, so the gap is that of a ~34- versus ~9-token completion, not of a 2 B model's long reasoning).
2. **Versus TRL** (``trl``): seconds per optimizer step of ``CLSRLModule`` under the Lightning ``Trainer`` versus
   TRL's ``GRPOTrainer`` (``use_vllm=False``, transformers generate) on the same model:
   - **Same data, same order:** TRL gets a ``datasets.Dataset`` of the DataModule's training batches in their
     training order (``prompt``: the same conversational messages with an image part, ``image``: the same 56x56 PIL
     image, ``label``, ``id``), ``shuffle_dataset=False``, ``per_device_train_batch_size = B x G`` (TRL counts
     completions; its sampler repeats each prompt G times) and ``gradient_accumulation_steps=1``, so step ``k`` of
     both sides trains on the same ``B`` prompts. Checked: the item ids each side trained on per step
     (``same_prompts``; TRL's are recorded inside its reward function), and the token ids and pixels of the first
     batch as each side encodes them (``same_inputs``: TRL's ``_tokenize_prompts`` versus
     ``ftmods.datamodules.encode_prompts``).
   - **Same reward:** ``ftmods.cls_rl.rewards`` wrapped to TRL's signature (``accuracy`` + ``format`` for think,
     ``equality`` for no_think), the same as the module's defaults.
   - **Same GRPO settings:** G, max_completion_length, temperature 1.0, ``top_k=0``, ``top_p=1.0``, beta 0.04 (TRL
     loads its own reference copy), ``loss_type="grpo"``, ``scale_rewards="group"``, ``num_iterations=1``, AdamW
     (``optim="adamw_torch"``, wd 0, constant lr), gradient clipping at 1.0 on both sides, fp32 (TRL's default is
     bf16), no activation (gradient) checkpointing on either side (TRL's ``GRPOConfig`` turns it on by default;
     ``--trl-checkpointing`` keeps it on), CPU, ``report_to=[]``, ``save_strategy="no"``, ``logging_steps=1`` (TRL's
     per-step metrics feed the completion lengths below; its printer callback is removed). Lightning:
     ``logger=False``, no checkpointing, no validation, ``log_completions=0`` (TRL's ``log_completions`` is off too).
   - **Timing:** TRL: a ``TrainerCallback``, ``on_step_begin`` to ``on_step_end`` (generation, scoring, reference,
     loss, backward, clipping, optimizer step; not data loading nor TRL's logging after ``on_step_end``); Lightning:
     a ``Callback``, ``on_train_batch_start`` to ``on_train_batch_end`` (the same work inside ``training_step`` plus
     the optimizer step). The first ``--trl-warmup`` steps are dropped, the next ``--trl-steps`` are timed. Each
     side runs ``--rounds`` times per mode from fresh weights, alternating which side runs first. Reported per side:
     ``s_per_step`` (median over all timed steps of all rounds), each round's median, the mean completion length
     of the timed steps (each side samples its own completions, so lengths differ a little), and the figure per
     completion token. ``ratio_vs_trl`` = ours / TRL seconds per step (goal <= 1.0); ``ratio_per_step`` is the
     median over step indices of (ours / TRL) of the same step's median over rounds, robust to other processes
     taking the CPU for a while.
   - Structural differences that remain: TRL generates from ``B x G`` prompt rows (each image encoded G times),
     ftmods from ``B`` rows with ``num_return_sequences=G``; TRL also computes per-token entropies and more metrics.

One JSON object goes to stdout; progress lines go to stderr (TRL's prints are sent there too).

Example::

    python benchmarks/cls_rl.py                    # both parts, both modes; ~100 s on 2 cores
    python benchmarks/cls_rl.py --quick            # 3 steps x 1 round per part; ~15 s
    python benchmarks/cls_rl.py --skip-trl --steps 24 --repeats 5 --max-completion-length 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))
if str(Path(__file__).resolve().parent) not in sys.path:  # also importable by path (importlib), not only as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cls_rl_fidelity import (  # noqa: E402
    MODEL,
    MODES,
    adamw,
    device_name,
    make_trainer,
    model_fingerprint,
    quiet,
    shapes_data,
    shapes_module,
    versions,
)
from lightning.pytorch import Callback, seed_everything  # noqa: E402

from ftmods.cls_rl.rewards import accuracy_rewards, equality_rewards, format_rewards  # noqa: E402
from ftmods.datamodules import encode_prompts  # noqa: E402
from ftmods.models.tiny import resolve_pretrained  # noqa: E402

PARTS = ("generate", "score", "rollout_other", "policy_fwd_bwd", "optimizer", "total")
ACCURACY = {"think": "accuracy", "no_think": "equality"}
"""Name of each mode's exact-match reward in ``Rollout.reward_parts``."""


def train_batches(mode: str, batch_size: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``count`` training batches of the shapes DataModule in training order (epochs reshuffled as in fit)."""
    data = shapes_data(mode, batch_size, seed=seed)
    data.setup("fit")
    batches: list[dict[str, Any]] = []
    epoch = 0
    while len(batches) < count:
        loader = data.train_dataloader()
        sampler: Any = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches += list(loader)
        epoch += 1
    return batches[:count]


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


# ------------------------------------------------------------------------------------------------- 1. step split


def timed_step(module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any], seed: int) -> dict[str, float]:
    """One hand-driven GRPO step, timed per part, with the rollout's length and reward figures."""
    params = [p for p in module.model.parameters() if p.requires_grad]
    start = time.perf_counter()
    rollout = module.rollout(batch, seed=seed)
    rolled = time.perf_counter()
    module.compute_loss(rollout).loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    generate, score = rollout.timings["generate"], rollout.timings["score"]
    eos = module.processor.tokenizer.eos_token_id
    has_eos = torch.isin(rollout.completion_ids, torch.tensor([eos] if isinstance(eos, int) else list(eos))).any(1)
    return {
        "generate": generate,
        "score": score,
        "rollout_other": rolled - start - generate - score,
        "policy_fwd_bwd": backward - rolled,
        "optimizer": end - backward,
        "total": end - start,
        "completion_length": float(rollout.mask.sum(1).float().mean()),
        "padded_length": float(rollout.completion_ids.shape[1]),
        "truncated": float((~has_eos).float().mean()),
        "accuracy": float(rollout.reward_parts[ACCURACY[module.mode]].mean()),
    }


def step_split(args: argparse.Namespace) -> dict[str, Any]:
    """Median time per part of a GRPO step in each mode, interleaved rounds, and the think / no_think ratios."""
    started = time.perf_counter()
    modules, optimizers, batches = {}, {}, {}
    for mode in args.modes:
        seed_everything(0, verbose=False)
        module = shapes_module(
            mode,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            beta=args.beta,
            loss_type="grpo",
        )
        module.configure_model()
        modules[mode] = module
        optimizers[mode] = adamw(args.lr)([p for p in module.model.parameters() if p.requires_grad])
        batches[mode] = train_batches(mode, args.batch_size, args.steps)
        for step in range(args.warmup):  # untimed
            timed_step(module, optimizers[mode], batches[mode][step % args.steps], seed=10_000 + step)
    records: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        shift = repeat % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            for step in range(args.steps):
                records[mode].append(timed_step(modules[mode], optimizers[mode], batches[mode][step], seed=step))
        print(f"step split: round {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    out: dict[str, Any] = {}
    for mode, rows in records.items():
        medians = {part: median_ms([r[part] for r in rows]) for part in PARTS}
        summed = sum(medians[part] for part in PARTS if part != "total")
        out[mode] = {
            "median_ms": medians,
            "share": {part: round(medians[part] / summed, 3) for part in PARTS if part != "total"},
            "completion_length": round(statistics.fmean(r["completion_length"] for r in rows), 2),
            "padded_length": round(statistics.fmean(r["padded_length"] for r in rows), 2),
            "truncated": round(statistics.fmean(r["truncated"] for r in rows), 4),
            "accuracy_reward": round(statistics.fmean(r["accuracy"] for r in rows), 4),
            "timed_steps": len(rows),
            "total_ms_all": [round(1000 * r["total"], 1) for r in rows],
        }
        print(f"step split {mode}: {json.dumps({k: v for k, v in out[mode].items() if k != 'total_ms_all'})}",
              file=sys.stderr, flush=True)  # fmt: skip
    if set(args.modes) == set(MODES):
        think, direct = out["think"], out["no_think"]
        ratio = {part: round(think["median_ms"][part] / direct["median_ms"][part], 2) for part in PARTS}
        for key in ("completion_length", "padded_length"):
            ratio[key] = round(think[key] / direct[key], 2)
        out["ratio_think_over_no_think"] = ratio
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


# ------------------------------------------------------------------------------------------------------ 2. vs TRL


def _texts(completions: list[Any]) -> list[str]:
    """TRL's completions (conversational: ``[{"role": "assistant", "content": text}]``) as plain texts."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


class TRLRewards:
    """The module's rewards in TRL's signature; records the item ids of every call (one per optimizer step here)."""

    def __init__(self, mode: str, group: int) -> None:
        self.group = group
        self.ids: list[list[str]] = []

        def accuracy(completions: list[Any], label: list[str], **kwargs: Any) -> list[float]:
            self.ids.append(list(kwargs["id"][:: self.group]))
            return accuracy_rewards(_texts(completions), label)

        def format(completions: list[Any], **kwargs: Any) -> list[float]:  # noqa: A001
            return format_rewards(_texts(completions))

        def equality(completions: list[Any], label: list[str], **kwargs: Any) -> list[float]:
            self.ids.append(list(kwargs["id"][:: self.group]))
            return equality_rewards(_texts(completions), label)

        self.functions: list[Any] = [accuracy, format] if mode == "think" else [equality]


class StepTimer:
    """Seconds per optimizer step, from a TRL ``TrainerCallback`` (``trl``) or a Lightning ``Callback``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.lengths: list[float] = []
        self.ids: list[list[str]] = []
        self._start = 0.0

    def trl(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer._start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer.times.append(time.perf_counter() - timer._start)

        return Timer()

    def lightning(self) -> Callback:
        timer = self

        class Timer(Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                timer._start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                timer.times.append(time.perf_counter() - timer._start)
                timer.lengths.append(float(trainer.callback_metrics["train/completion_length"]))
                timer.ids.append(list(batch["ids"]))

        return Timer()


def trl_dataset(batches: list[dict[str, Any]]) -> Any:
    """The batches' prompts, images, labels and ids as rows of a ``datasets.Dataset``, in training order."""
    from datasets import Dataset

    rows = [
        {"prompt": prompt, "image": image, "label": label, "id": item}
        for batch in batches
        for prompt, image, label, item in zip(
            batch["prompts"], batch["images"], batch["labels"], batch["ids"], strict=True
        )
    ]
    return Dataset.from_list(rows)


def same_inputs(trainer: Any, processor: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Whether TRL tokenizes the first batch's prompts to the same ids and pixels as ``encode_prompts``."""
    from trl.data_utils import prepare_multimodal_messages

    try:
        ours = encode_prompts(processor, batch)
        messages = [
            prepare_multimodal_messages(prompt, images=[image])
            for prompt, image in zip(batch["prompts"], batch["images"], strict=True)
        ]
        prompt_ids, _, fields = trainer._tokenize_prompts(messages)
        ids = [row[mask.bool()].tolist() for row, mask in zip(ours["input_ids"], ours["attention_mask"], strict=True)]
        theirs = [list(map(int, row)) for row in prompt_ids]
        return {
            "prompt_ids_equal": ids == theirs,
            "prompt_tokens": [len(row) for row in ids],
            "pixel_values_max_abs_diff": float((ours["pixel_values"] - fields["pixel_values"]).abs().max()),
        }
    except Exception as error:  # a private TRL helper: report, do not fail the benchmark
        return {"error": f"{type(error).__name__}: {error}"}


def run_trl(mode: str, batches: list[dict[str, Any]], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One ``GRPOTrainer`` run over ``batches``: per-step seconds, completion lengths, item ids, input check."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    path = resolve_pretrained(MODEL)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    config = GRPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=args.batch_size * args.num_generations,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=args.beta,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        use_vllm=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=len(batches),
        shuffle_dataset=False,
        use_cpu=True,
        bf16=False,  # TRL's default is True
        fp16=False,
        activation_checkpointing=args.trl_checkpointing,  # TRL's default is True (as gradient_checkpointing)
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=0,
    )
    rewards, timer = TRLRewards(mode, args.num_generations), StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards.functions,
        args=config,
        train_dataset=trl_dataset(batches),
        processing_class=processor,
        callbacks=[timer.trl()],
    )
    trainer.remove_callback(PrinterCallback)
    check = same_inputs(trainer, processor, batches[0])
    trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    return {"times": timer.times, "lengths": lengths, "ids": rewards.ids, "same_inputs": check}


def run_ours(mode: str, batches: list[dict[str, Any]], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One Lightning fit of ``CLSRLModule`` for ``len(batches)`` steps: per-step seconds, lengths, item ids."""
    seed_everything(0, verbose=False)
    module = shapes_module(
        mode,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        beta=args.beta,
        loss_type="grpo",
        temperature=1.0,
        optimizer=adamw(args.lr),
    )
    timer = StepTimer()
    make_trainer(root, len(batches), [timer.lightning()]).fit(module, datamodule=shapes_data(mode, args.batch_size))
    return {"times": timer.times, "lengths": timer.lengths, "ids": timer.ids}


def side_summary(runs: list[dict[str, Any]], warmup: int, completions: int) -> dict[str, Any]:
    """Median seconds per timed step (all rounds), per round, warm-up seconds, mean completion length."""
    times = [t for run in runs for t in run["times"][warmup:]]
    lengths = [v for run in runs for v in run["lengths"][warmup:]]
    seconds = statistics.median(times)
    length = statistics.fmean(lengths) if lengths else float("nan")
    return {
        "s_per_step": round(seconds, 4),
        "s_per_step_rounds": [round(statistics.median(run["times"][warmup:]), 4) for run in runs],
        "warmup_s": [round(sum(run["times"][:warmup]), 2) for run in runs],
        "completion_length": round(length, 2),
        "ms_per_completion_token": round(1000 * seconds / (length * completions), 3) if lengths else None,
        "timed_steps": len(times),
    }


def versus_trl(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Seconds per optimizer step, ours under Lightning versus TRL's GRPOTrainer, per mode (or why TRL fails)."""
    import trl

    started = time.perf_counter()
    total = args.trl_warmup + args.trl_steps
    out: dict[str, Any] = {"trl": trl.__version__, "steps_per_run": total, "warmup_steps": args.trl_warmup}
    for mode in args.trl_modes:
        batches = train_batches(mode, args.batch_size, total)
        runs: dict[str, list[dict[str, Any]]] = {"ftmods": [], "trl": []}
        error = None
        for round_ in range(args.rounds):
            order = ["ftmods", "trl"] if round_ % 2 == 0 else ["trl", "ftmods"]
            for side in order:
                if side == "trl" and error is not None:
                    continue
                try:
                    run = (run_ours if side == "ftmods" else run_trl)(mode, batches, args, root / f"{mode}-{side}")
                except Exception as exc:
                    if side == "ftmods":
                        raise
                    error = f"{type(exc).__name__}: {exc}"
                    print(f"TRL failed ({mode}):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                    continue
                runs[side].append(run)
                median = statistics.median(run["times"][args.trl_warmup :])
                print(f"vs trl {mode} round {round_} {side}: {median:.4f} s/step", file=sys.stderr, flush=True)
        completions = args.batch_size * args.num_generations
        result: dict[str, Any] = {"ftmods": side_summary(runs["ftmods"], args.trl_warmup, completions)}
        expected = [list(batch["ids"]) for batch in batches]
        result["ftmods"]["same_prompts"] = all(run["ids"] == expected for run in runs["ftmods"])
        if error is not None or not runs["trl"]:
            result["trl"] = {"error": error or "no TRL run"}
            result["ratio_vs_trl"] = None
        else:
            result["trl"] = side_summary(runs["trl"], args.trl_warmup, completions)
            result["trl"]["same_prompts"] = all(run["ids"] == expected for run in runs["trl"])
            result["trl"]["same_inputs"] = runs["trl"][0]["same_inputs"]
            result["ratio_vs_trl"] = round(result["ftmods"]["s_per_step"] / result["trl"]["s_per_step"], 3)
            per_step = []
            for step in range(args.trl_warmup, total):
                ours = statistics.median(run["times"][step] for run in runs["ftmods"])
                theirs = statistics.median(run["times"][step] for run in runs["trl"])
                per_step.append(ours / theirs)
            result["ratio_per_step"] = round(statistics.median(per_step), 3)
            length_ratio = result["ftmods"]["completion_length"] / result["trl"]["completion_length"]
            result["completion_length_ratio"] = round(length_ratio, 3)
        out[mode] = result
        print(f"vs trl {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes of the step split")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per optimizer step (both parts)")
    parser.add_argument("--num-generations", type=int, default=4, help="G, completions per prompt (both parts)")
    parser.add_argument("--max-completion-length", type=int, default=128, help="new-token limit (both parts)")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference model is scored)")
    parser.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode and round (step split)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (step split)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (step split)")
    parser.add_argument("--trl-modes", nargs="+", choices=MODES, default=list(MODES), help="modes of the TRL part")
    parser.add_argument("--trl-steps", type=int, default=10, help="timed steps per run (TRL part)")
    parser.add_argument("--trl-warmup", type=int, default=2, help="first steps of each run left out (TRL part)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per side and mode, alternating order (TRL part)")
    parser.add_argument("--trl-checkpointing", action="store_true", help="TRL's default activation checkpointing on")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--skip-split", action="store_true", help="no step split")
    parser.add_argument("--skip-trl", action="store_true", help="no TRL comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 round / repeat, warm-up 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 3, 1, 1
        args.trl_steps, args.trl_warmup, args.rounds = 3, 1, 1
    if min(args.steps, args.repeats, args.trl_steps, args.rounds, args.batch_size) < 1 or args.num_generations < 2:
        parser.error("--steps, --repeats, --trl-steps, --rounds, --batch-size must be >= 1, --num-generations >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    settings = {
        k: getattr(args, k)
        for k in (
            "batch_size",
            "num_generations",
            "max_completion_length",
            "beta",
            "lr",
            "threads",
            "trl_checkpointing",
        )
    }
    result: dict[str, Any] = {
        "benchmark": "cls_rl_efficiency",
        "device": device_name(),
        "model": {"name": MODEL, **model_fingerprint()},  # builds the toy once (about 20 s) if needed
        "settings": settings,
    }
    with tempfile.TemporaryDirectory(prefix="cls-rl-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        if not args.skip_split:
            result["step_split"] = step_split(args)
        if not args.skip_trl:
            result["vs_trl"] = versus_trl(args, Path(tmp))
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
