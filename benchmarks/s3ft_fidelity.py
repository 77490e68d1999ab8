"""S3FT versus SFT on the gold answers: in-domain accuracy and forgetting on the two-skill toy (spec ``s3ft.md`` §4).

The paper's claim (arXiv 2502.08130): fine-tuning on S3FT's selection (the model's own judged answer, else its judged
paraphrase of the gold, else the gold) drops general benchmarks about half as much as SFT on the gold answers (2.5
vs 4.4 points), and also trains better in-domain. Here the same comparison on ``tiny/s3ft-toy``
(``ftmods.models.s3ft_toy``: a 2-layer word-level Llama, 0.16 M parameters, pre-trained on skill A, addition word
problems, and skill B, "what comes after n ?"), fully through the library under the Lightning ``Trainer`` (CPU):

1. **Selection** (once; greedy, so it does not depend on the seed): ``Trainer.predict`` of
   ``S3FTModule("tiny/s3ft-toy", judge="numeric", template="plain", max_new_tokens=12)`` with the toy's
   ``PREDICT_PROMPT`` / ``PARAPHRASE_PROMPT`` over ``configs/data/s3ft_tiny_train.jsonl`` (96 skill-A items, never
   pre-trained) with ``S3FTDataModule`` (predict batch 32) and ``SelectionWriter``. By design of the toy the base
   model is right for sums < 50 (``model``), only its paraphrase is right for 50-74 (``paraphrase``) and neither is
   for sums >= 75 (``gold``): 38 / 29 / 29.
2. **Arms**, each a fresh ``S3FTModule`` from the same base weights fitted with ``S3FTDataModule`` on a selection file
   (``template="plain"``: ``<s> prompt target </s>``, completion-only loss, batch 8, AdamW with weight decay 0, no
   scheduler), with the same prompts, steps, learning rate and seed:
   - ``gold``: a copy of the selection with every target replaced by the gold answer (``"a plus b is s #### s"``)
     and every source set to ``gold``: plain SFT on the gold answers through the same code path;
   - ``s3ft``: the real selection (own answers ``"a plus b is s"`` for small sums, paraphrases for middle sums, gold
     for large sums).
   Cross-check (first setting, first seed): the gold arm once more as plain ``SFTModule`` + ``ChatDataModule``
   (prompt/completion JSONL, ``template="plain"``); ``sft_crosscheck`` gives the largest weight difference.
   The seed (``seed_everything`` and the DataModule's shuffling seed) only changes the order of the batches: the
   weights start from the same checkpoint and the toy has no dropout.
3. **Metrics** (greedy, one generation pass per item set with ``s3ft_toy.generate``), for the base model and after
   each fit:
   - ``skill_a``: the 100 held-out items of ``configs/data/s3ft_tiny_eval.jsonl`` scored exactly as
     ``s3ft_toy.accuracy`` (the *last* number of the completion equals the gold number); also per designed band
     (``sum<50`` / ``50-74`` / ``sum>=75``, 40 / 30 / 30 items) and on the 96 training items (``skill_a_train``);
   - ``skill_b``: the 67 probes of ``configs/data/s3ft_tiny_skill_b.jsonl`` (100 % before fine-tuning), same rule:
     forgetting;
   - diagnostics: ``*_stated`` (the answer as first stated, the number after "is" for A and the first number for B,
     equals the gold: forgives trailing junk such as ``"7 #### 10"``) and ``*_hash_rate`` (share of completions with
     ``####``, the gold-only format: how far the gold style leaks);
   - ``base_nll`` (once per arm): the base model's token-mean NLL of the arm's training targets (the paper's Fig. 2
     argument: own answers and paraphrases are closer to the model's distribution than the gold).
4. **Summary** per setting (``--settings``, ``lr:epochs``; default ``1e-4:3 3e-4:3 1e-3:3 3e-3:5``), mean ± sample
   std over ``--seeds`` (default 0-9): each arm's scores, the paired differences ``s3ft - gold`` and
   ``skill_b_drop_ratio`` = (base - s3ft) / (base - gold) of the mean skill-B drops (the paper: 2.5 / 4.4 = 0.57;
   also ``skill_b_stated_drop_ratio``).

One JSON object goes to stdout; progress lines go to stderr.

Example::

    python benchmarks/s3ft_fidelity.py                          # 4 settings x 10 seeds x 2 arms; ~50 s on 2 cores
    python benchmarks/s3ft_fidelity.py --quick                  # 1e-3:3 and 3e-3:5 x 3 seeds; ~15 s
    python benchmarks/s3ft_fidelity.py --settings 1e-3:3 1e-3:10 --seeds 0 1 2
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
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))

import lightning  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from ftmods.datamodules import ChatDataModule, S3FTDataModule, mixture_report, read_selection  # noqa: E402
from ftmods.models.s3ft_toy import (  # noqa: E402
    PARAPHRASE_PROMPT,
    PREDICT_PROMPT,
    designed_source,
    final_number,
    generate,
    gold_number,
)
from ftmods.models.tiny import resolve_pretrained  # noqa: E402
from ftmods.ops.tokens import IGNORE_INDEX  # noqa: E402
from ftmods.s3ft import S3FTModule, SelectionWriter  # noqa: E402
from ftmods.sft import SFTModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data"
TRAIN_FILE = DATA / "s3ft_tiny_train.jsonl"
EVAL_FILE = DATA / "s3ft_tiny_eval.jsonl"
SKILL_B_FILE = DATA / "s3ft_tiny_skill_b.jsonl"
TOY = "tiny/s3ft-toy"
BANDS = {"model": "sum<50", "paraphrase": "50-74", "gold": "sum>=75"}
"""Designed source of an item -> the name of its band of sums."""
ARMS = ("gold", "s3ft")
METRICS = (
    "skill_a",
    "skill_b",
    "skill_a_train",
    *(f"skill_a_{band}" for band in BANDS.values()),
    "skill_a_stated",
    "skill_b_stated",
    "skill_a_hash_rate",
    "skill_b_hash_rate",
)

# ------------------------------------------------------------------------------------------------- shared helpers


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions() -> dict[str, str]:
    return {
        "s3ft_module_sha256": hashlib.sha256(Path(inspect.getfile(S3FTModule)).read_bytes()).hexdigest()[:12],
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
    transformers.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def toy_module(pretrained: str = TOY, **kwargs: Any) -> S3FTModule:
    """``S3FTModule`` with the settings of ``configs/s3ft/tiny.yaml`` (numeric judge, plain template, toy prompts)."""
    return S3FTModule(
        pretrained,
        judge="numeric",
        template="plain",
        max_new_tokens=12,
        predict_prompt=PREDICT_PROMPT,
        paraphrase_prompt=PARAPHRASE_PROMPT,
        **kwargs,
    )


def make_trainer(root: Path, max_epochs: int = 1, callbacks: list[Any] | None = None) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4)}


# ------------------------------------------------------------------------------------------------------- selection


def build_selection(root: Path) -> Path:
    """The S3FT selection of the training items by the base toy, written by ``SelectionWriter``."""
    path = root / "selection.jsonl"
    data = S3FTDataModule(
        str(TRAIN_FILE), str(path), tokenizer=TOY, template="plain", max_length=64, predict_batch_size=32
    )
    trainer = make_trainer(root, callbacks=[SelectionWriter()])
    trainer.predict(toy_module(), datamodule=data, return_predictions=False)
    return path


def gold_copy(selection: Path, path: Path) -> Path:
    """The selection with every target replaced by the gold answer (source ``gold``): plain SFT on the gold."""
    records = [{**r, "target": r["gold"], "source": "gold"} for r in read_selection(str(selection))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------------- metrics


def _band(item: dict[str, str]) -> str:
    a, b = map(int, re.findall(r"\d+", item["question"])[:2])
    return BANDS[designed_source(a, b)]


def _stated(text: str, kind: str) -> str | None:
    """The answer as first stated: the number after ``is`` (skill A) or the first number (skill B)."""
    match = re.search(r"\bis (-?\d+)" if kind == "a" else r"-?\d+", text)
    return None if match is None else match.group(match.re.groups)


def score(model: Any, tokenizer: Any, items: list[dict[str, str]], kind: str) -> dict[str, Any]:
    """One greedy pass over ``items``: the toy's accuracy (last number), the first-stated accuracy, the ``####`` rate.

    ``strict`` is exactly ``s3ft_toy.accuracy(model, tokenizer, items, PREDICT_PROMPT)`` (same generation, same
    last-number rule); ``per_item`` is the strict verdict of each item.
    """
    outputs = generate(model, tokenizer, items, PREDICT_PROMPT)
    golds = [gold_number(item) for item in items]
    strict = [final_number(out) == gold for out, gold in zip(outputs, golds, strict=True)]
    stated = [_stated(out, kind) == gold for out, gold in zip(outputs, golds, strict=True)]
    return {
        "strict": sum(strict) / len(items),
        "stated": sum(stated) / len(items),
        "hash_rate": sum("####" in out for out in outputs) / len(items),
        "per_item": strict,
    }


def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
    """Greedy accuracies of skill A (held out, per band, training items) and skill B (see the module docstring)."""
    model.eval()
    eval_items = read_jsonl(EVAL_FILE)
    a = score(model, tokenizer, eval_items, "a")
    b = score(model, tokenizer, read_jsonl(SKILL_B_FILE), "b")
    out = {
        "skill_a": a["strict"],
        "skill_b": b["strict"],
        "skill_a_train": score(model, tokenizer, read_jsonl(TRAIN_FILE), "a")["strict"],
        "skill_a_stated": a["stated"],
        "skill_b_stated": b["stated"],
        "skill_a_hash_rate": a["hash_rate"],
        "skill_b_hash_rate": b["hash_rate"],
    }
    for band in BANDS.values():
        hits = [ok for item, ok in zip(eval_items, a["per_item"], strict=True) if _band(item) == band]
        out[f"skill_a_{band}"] = sum(hits) / len(hits)
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def target_nll(module: S3FTModule, selection: Path) -> dict[str, Any]:
    """Token-mean NLL of the selection's targets (+ ``</s>``) under ``module``'s weights, overall and per source.

    Uses the fit batches of ``S3FTDataModule`` itself (same tokenization and completion-only labels).
    """
    data = S3FTDataModule(str(TRAIN_FILE), str(selection), tokenizer=TOY, template="plain", max_length=64)
    data.setup("fit")
    module.configure_model()
    module.model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in data.train_dataloader():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:].long()  # (B, T-1) next-token targets
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = labels != IGNORE_INDEX  # (B, T-1)
        for row, source_id in enumerate(batch["source_ids"].tolist()):
            name = ("model", "paraphrase", "gold")[source_id]
            for key in ("all", name):
                sums[key] = sums.get(key, 0.0) + float(nll[row][mask[row]].sum())
                counts[key] = counts.get(key, 0) + int(mask[row].sum())
    return {key: round(sums[key] / counts[key], 4) for key in sums} | {"tokens": counts["all"]}


# ----------------------------------------------------------------------------------------------------------- fits


def fit(module: Any, data: Any, epochs: int, seed: int, root: Path) -> tuple[Trainer, float]:
    """``Trainer.fit`` after ``seed_everything(seed)``; returns the trainer and the fit's wall time."""
    seed_everything(seed, verbose=False)
    trainer = make_trainer(root, max_epochs=epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return trainer, time.perf_counter() - start


def adamw(lr: float) -> Any:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def fit_and_evaluate(selection: Path, lr: float, epochs: int, seed: int, root: Path) -> tuple[dict[str, Any], Any]:
    """Fine-tune the base toy on ``selection`` and evaluate it; returns the scores and the fitted module."""
    module = toy_module(optimizer=adamw(lr))
    data = S3FTDataModule(
        str(TRAIN_FILE), str(selection), tokenizer=TOY, template="plain", max_length=64, batch_size=8, seed=seed
    )
    trainer, fit_s = fit(module, data, epochs, seed, root)
    scores = evaluate(module.model, module.tokenizer)
    loss = trainer.callback_metrics.get("train/loss")
    run = {
        **scores,
        "final_batch_loss": None if loss is None else round(float(loss), 4),
        "steps": trainer.global_step,
        "fit_s": round(fit_s, 2),
    }
    return run, module


def sft_crosscheck(gold_module: Any, lr: float, epochs: int, seed: int, root: Path) -> dict[str, Any]:
    """The gold arm again as plain SFT: ``SFTModule`` + ``ChatDataModule`` (prompt = the filled prediction prompt,
    completion = the gold answer, plain template), same order, steps, lr and seed; compared weight by weight."""
    records = [
        {"prompt": PREDICT_PROMPT.format(question=item["question"]), "completion": item["answer"]}
        for item in read_jsonl(TRAIN_FILE)
    ]
    path = root / "sft_gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    module = SFTModule(TOY, optimizer=adamw(lr))
    data = ChatDataModule(str(path), tokenizer=TOY, template="plain", max_length=64, batch_size=8, seed=seed)
    fit(module, data, epochs, seed, root)
    ours, theirs = gold_module.model.state_dict(), module.model.state_dict()
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    return {
        "lr": lr,
        "epochs": epochs,
        "seed": seed,
        "max_abs_weight_diff": diff,
        "same_weights": diff == 0.0,
        "scores": {k: v for k, v in evaluate(module.model, module.tokenizer).items() if k in ("skill_a", "skill_b")},
    }


def summarize(base: dict[str, float], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std per arm and metric, paired differences s3ft - gold and the skill-B drop ratio."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        out[arm] = {m: mean_std([r[m] for r in runs[arm]]) for m in METRICS}
    out["s3ft_minus_gold"] = {
        m: mean_std([s[m] - g[m] for s, g in zip(runs["s3ft"], runs["gold"], strict=True)]) for m in METRICS
    }
    for metric in ("skill_b", "skill_b_stated"):
        drops = {arm: base[metric] - out[arm][metric]["mean"] for arm in ARMS}
        out[f"{metric}_drop"] = {arm: round(v, 4) for arm, v in drops.items()}
        out[f"{metric}_drop_ratio"] = round(drops["s3ft"] / drops["gold"], 3) if drops["gold"] > 0 else None
    out["s3ft_keeps_more_skill_b"] = out["s3ft_minus_gold"]["skill_b"]["mean"] > 0
    out["s3ft_better_skill_a"] = out["s3ft_minus_gold"]["skill_a"]["mean"] > 0
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_setting(text: str) -> tuple[float, int]:
    lr, _, epochs = text.partition(":")
    try:
        return float(lr), int(epochs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lr:epochs such as 1e-3:3, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        default=[(1e-4, 3), (3e-4, 3), (1e-3, 3), (3e-3, 5)],
        help="lr:epochs pairs (batch 8, AdamW, 12 steps per epoch)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="data-order seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--quick", action="store_true", help="smoke run: settings 1e-3:3 3e-3:5, seeds 0 1 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.settings, args.seeds = [(1e-3, 3), (3e-3, 5)], args.seeds[:3]
    if any(lr <= 0 or epochs < 1 for lr, epochs in args.settings):
        parser.error("--settings need lr > 0 and epochs >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    resolve_pretrained(TOY)  # built once (~45 s) into $FTMODS_CACHE
    result: dict[str, Any] = {
        "benchmark": "s3ft_fidelity",
        "device": device_name(),
        "model": TOY,
        "seeds": args.seeds,
        "batch_size": 8,
    }
    with tempfile.TemporaryDirectory(prefix="s3ft-fidelity-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        selection = build_selection(root)
        result["selection"] = {**mixture_report(read_selection(str(selection))), "build_s": 0.0}
        result["selection"]["build_s"] = round(time.perf_counter() - start, 2)
        result["selection"].pop("by_task")
        files = {"gold": gold_copy(selection, root / "gold.jsonl"), "s3ft": selection}
        base = toy_module()
        base.configure_model()
        result["base"] = evaluate(base.model, base.tokenizer)
        result["base_nll"] = {arm: target_nll(base, path) for arm, path in files.items()}
        del base
        print(f"base: {json.dumps(result['base'])} nll {json.dumps(result['base_nll'])}", file=sys.stderr, flush=True)
        result["settings"] = {}
        for lr, epochs in args.settings:
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
            for seed in args.seeds:
                for arm in ARMS:
                    run, module = fit_and_evaluate(files[arm], lr, epochs, seed, root)
                    runs[arm].append(run)
                    if arm == "gold" and "sft_crosscheck" not in result:
                        result["sft_crosscheck"] = sft_crosscheck(module, lr, epochs, seed, root)
                        result["sft_crosscheck"]["gold_arm_scores"] = {k: run[k] for k in ("skill_a", "skill_b")}
                        print(f"SFT cross-check: {json.dumps(result['sft_crosscheck'])}", file=sys.stderr, flush=True)
                    print(f"lr {lr:g} x {epochs} seed {seed} {arm}: {json.dumps(run)}", file=sys.stderr, flush=True)
            name = f"lr{lr:g}_ep{epochs}"
            result["settings"][name] = {
                "lr": lr,
                "epochs": epochs,
                "steps": runs["gold"][0]["steps"],
                "summary": summarize(result["base"], runs),
                "per_seed": {arm: [{m: r[m] for m in ("skill_a", "skill_b")} for r in runs[arm]] for arm in ARMS},
            }
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
