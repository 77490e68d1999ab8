"""LocFT-BF versus depth-first fine-tuning on a tiny LM pre-trained on synthetic facts (spec ``locft_bf.md`` §6).

The toy experiment of the spec at a smaller scale, run through ``LocFTModule`` under the Lightning ``Trainer``:

1. **World and model.** ``make_world(400, 48, 16, n_probe=50)``: 350 train subjects (templates A "the capital of {s}
   is", B "{s} has its capital city at" and C "the currency used in {s} is" pre-trained) and 50 probe subjects (A and
   C only). ``pretrain_toy_lm`` teaches a 4-layer Llama (hidden 96, intermediate 384, 0.68 M parameters, word-level
   vocabulary of 483) every trained fact (100 % greedy accuracy, or it raises; at most 5,000 steps, 40-70 s). The
   result is saved with ``save_pretrained`` under ``$FTMODS_CACHE/locft-bench/toy-<hash of settings and seed>``
   (``$FTMODS_CACHE`` defaults to ``$TMPDIR/ftmods-bench-cache``) and reused by later runs and by ``locft.py``.
2. **Edits.** ``edit_requests(world, --edits, seed)``: counterfactual capitals of distinct train subjects (template A;
   paraphrase = template B; locality prompt = template A of an unedited train subject), written as LocFT JSONL and
   read by ``EditDataModule``. Only ``model.layers.{--layer}.mlp.down_proj.weight`` trains.
3. **Pipelines**, each from the same pre-trained weights:
   - ``BF``: LocFT-BF: one Adam (lr 1e-2), shuffled mini-batches of 20, skip / early stop below loss 1e-2,
     at most 400 epochs (4,000 steps; the spec's "to convergence" setting; 150 epochs reach only ~86 %);
   - ``DF``: the editing-library baseline (EasyEdit FT-M): stream order, batch 1, one pass, at most 25 steps per
     request until its loss is below 1e-2, a fresh Adam (lr 1e-3, spec §6.2) per request;
   - ``DFp``: the same with one persistent Adam.
4. **Metrics**, all on the final model after all edits:
   - ``wild_em`` / ``teacher_forced_token`` from ``LocFTModule.evaluate_requests``: reliability (edit prompt),
     generalization (paraphrase B), locality (template A of an unedited subject: same greedy output / argmax as
     before editing); ``teacher_forced_token`` is EasyEdit's mean token accuracy (target + EOS, partial credit);
   - ``teacher_forced_exact``: teacher-forced reliability counted per edit (all target tokens and EOS right: the
     spec's RelTF) and the share of edits where it agrees with WILD EM, from per-request ``EditEvaluator.evaluate``;
   - ``recency``: WILD reliability of the first and the last ``--window`` (40) edits of the DF order (= file order),
     from per-request scores of ``EditEvaluator.evaluate`` on the two slices;
   - ``locality_probes``: the share of greedy answers unchanged against the pre-edit model for template A and B of
     every unedited train subject (same relation), template C of every unedited train subject (other relation) and
     template C of the edited subjects (same subject); ``flipped_to_new_target``: unedited subjects whose template-A
     answer is now one of the edit targets;
   - ``summary``: WILD reliability per pipeline, ``bf_at_least_0.9`` / ``df_at_most_0.2`` (the spec's expected
     shape; reported, not asserted) and DFp's recency.

One JSON object goes to stdout; Lightning's messages go to stderr.

Example::

    python benchmarks/locft_fidelity.py                 # 200 edits, seed 0; ~2.5 min (+35 s pre-training once)
    python benchmarks/locft_fidelity.py --quick         # 60 edits, a smoke run
    python benchmarks/locft_fidelity.py --seed 1 --layer 3
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
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))

import lightning  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from ftmods.datamodules.edits import EditDataModule, EditRequest  # noqa: E402
from ftmods.locft import LocFTModule  # noqa: E402
from ftmods.models.tiny import tiny_cache_dir  # noqa: E402
from ftmods.models.toy_world import (  # noqa: E402
    DEFAULT_PRETRAIN,
    TEMPLATE_EDIT,
    TEMPLATE_OTHER,
    TEMPLATE_PARAPHRASE,
    WORLD_FILE,
    ToyWorld,
    build_word_tokenizer,
    edit_requests,
    make_world,
    pretrain_toy_lm,
)

WORLD: dict[str, int] = {"n_subjects": 400, "n_cities": 48, "n_currencies": 16, "n_probe": 50}
"""``make_world`` sizes (the seed comes from ``--seed``): between ``tiny/locft-toy`` (96) and the spec (700)."""
PRETRAIN: dict[str, Any] = {**DEFAULT_PRETRAIN, "hidden_size": 96, "intermediate_size": 384, "max_steps": 5000}
"""``pretrain_toy_lm`` settings (the seed comes from ``--seed``)."""
PRETRAIN_INFO = "pretrain_info.json"

# -------------------------------------------------------------------------------------------------- toy world


def pretrained_world(seed: int, *, rebuild: bool = False) -> tuple[Path, ToyWorld, dict[str, Any]]:
    """The pre-trained toy of this benchmark: built once per seed, then loaded from the cache.

    Returns:
        (folder with model + tokenizer + ``world.json``, the world, pre-training info incl. whether it was cached).
    """
    config = {"world": {**WORLD, "seed": seed}, "pretrain": {**PRETRAIN, "seed": seed}}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    folder = tiny_cache_dir() / "locft-bench" / f"toy-{digest}"
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    if (folder / PRETRAIN_INFO).exists():
        info = json.loads((folder / PRETRAIN_INFO).read_text())
        return folder, ToyWorld.load(folder / WORLD_FILE), {**info, "cached": True}
    world = make_world(**config["world"])
    tokenizer = build_word_tokenizer(world)
    model, report = pretrain_toy_lm(world, tokenizer, **config["pretrain"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    world.save(staging / WORLD_FILE)
    info = {
        **config,
        "train_subjects": len(world.train_subjects),
        "vocab": len(tokenizer),
        "report": {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(report).items()},
    }
    (staging / PRETRAIN_INFO).write_text(json.dumps(info, indent=1) + "\n")
    try:
        staging.rename(folder)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return folder, world, {**info, "cached": False}


def write_edits(world: ToyWorld, n_edits: int, seed: int, path: Path) -> Path:
    """``edit_requests(world, n_edits, seed)`` as LocFT JSONL."""
    path.write_text("".join(json.dumps(record) + "\n" for record in edit_requests(world, n_edits, seed)))
    return path


# ------------------------------------------------------------------------------------------------ pipelines


def pipeline_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Module, DataModule and Trainer settings of BF, DF and DFp."""
    df = {
        "module": {"pipeline": "depth_first", "lr": args.df_lr, "df_max_steps": 25, "fresh_optimizer": True},
        "data": {"order": "stream", "batch_size": 1},
        "max_epochs": 1,
    }
    return {
        "BF": {
            "module": {"pipeline": "breadth_first", "lr": args.bf_lr},
            "data": {"order": "shuffle", "batch_size": args.bf_batch_size},
            "max_epochs": args.bf_epochs,
        },
        "DF": df,
        "DFp": {**df, "module": {**df["module"], "fresh_optimizer": False}},
    }


def adam(lr: float) -> Any:
    """The optimizer factory: ``Adam(lr, weight_decay=0)`` as in the paper and EasyEdit."""
    return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=0.0)


def make_trainer(root: Path, max_epochs: int) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,  # evaluate_requests writes edit_eval.json to trainer.log_dir = this folder
    )


def run_pipeline(
    folder: Path, edit_file: Path, layer: int, setting: dict[str, Any], root: Path, *, protocols: list[str]
) -> tuple[LocFTModule, Trainer, dict[str, Any]]:
    """Edit with one pipeline; returns the fitted module (still attached to its trainer) and timing / counters."""
    options = dict(setting["module"])
    lr = options.pop("lr")
    module = LocFTModule(
        str(folder),
        target_modules=[rf"model\.layers\.{layer}\.mlp\.down_proj\.weight"],
        optimizer=adam(lr),
        loss_tol=1e-2,
        eval_protocols=protocols,  # type: ignore[arg-type]
        eval_max_new_tokens=8,
        **options,
    )
    data = EditDataModule(str(edit_file), tokenizer=str(folder), max_length=32, **setting["data"])
    trainer = make_trainer(root, setting["max_epochs"])
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    timing = {
        "settings": {**setting["module"], **setting["data"], "max_epochs": setting["max_epochs"]},
        "fit_wall_s": round(wall, 2),
        "seconds_per_edit": round(float(module.seconds_per_edit or float("nan")), 5),
        "opt_steps": module.stats["opt_steps"],
        "skipped_steps": module.stats["skipped_steps"],
        "epochs_run": trainer.current_epoch,
    }
    return module, trainer, timing


# --------------------------------------------------------------------------------------------------- metrics


def _nested(scores: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"eval/wild_em/reliability": x}`` -> ``{"wild_em": {"reliability": x}}`` (rounded)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in scores.items():
        parts = key.split("/")
        if len(parts) == 3:
            out.setdefault(parts[1], {})[parts[2]] = round(value, 4)
    return out


def recency(module: LocFTModule, requests: list[EditRequest], window: int) -> dict[str, float]:
    """WILD reliability of the first and last ``window`` edits of the stream order (per-request scores)."""
    first = module.evaluator.evaluate(module.model, requests[:window])["wild_em/reliability"]  # (window,)
    last = module.evaluator.evaluate(module.model, requests[-window:])["wild_em/reliability"]  # (window,)
    return {
        "window": window,
        "reliability_first": round(first.mean().item(), 4),
        "reliability_last": round(last.mean().item(), 4),
        "last_minus_first": round((last.mean() - first.mean()).item(), 4),
    }


def exact_teacher_forced(module: LocFTModule, requests: list[EditRequest]) -> dict[str, float]:
    """Teacher-forced reliability counted per edit (every target token and EOS right), and its agreement with WILD EM.

    ``teacher_forced_token/reliability`` is EasyEdit's mean token accuracy (partial credit: a wrong one-token city
    with a right EOS scores 0.5); the spec's RelTF counts an edit only when all its tokens are right.
    """
    scores = module.evaluator.evaluate(module.model, requests)  # per request: (N,) each
    exact = scores["teacher_forced_token/reliability"] == 1.0  # (N,) bool
    wild = scores["wild_em/reliability"] == 1.0  # (N,) bool
    return {
        "reliability_all_tokens": round(exact.float().mean().item(), 4),
        "agreement_with_wild_em": round((exact == wild).float().mean().item(), 4),
    }


def locality_probes(module: LocFTModule, world: ToyWorld, requests: list[EditRequest]) -> dict[str, Any]:
    """Share of greedy answers unchanged against the pre-edit model (the tuned tensor swapped back) per prompt set."""
    edited = {r.subject for r in requests}
    unedited = [s for s in world.train_subjects if s not in edited]
    sets = {
        "same_relation_A": [world.prompt(TEMPLATE_EDIT, s) for s in unedited],
        "same_relation_B": [world.prompt(TEMPLATE_PARAPHRASE, s) for s in unedited],
        "other_relation_C": [world.prompt(TEMPLATE_OTHER, s) for s in unedited],
        "same_subject_C": [world.prompt(TEMPLATE_OTHER, s) for s in sorted(edited)],  # type: ignore[type-var]
    }
    prompts = [p for ps in sets.values() for p in ps]
    after = module.evaluator.generate(module.model, prompts)
    module.swap_original()
    try:
        before = module.evaluator.generate(module.model, prompts)
    finally:
        module.swap_original()
    out: dict[str, Any] = {"unedited_subjects": len(unedited)}
    start = 0
    for name, ps in sets.items():
        same = [a == b for a, b in zip(after[start : start + len(ps)], before[start : start + len(ps)], strict=True)]
        out[name] = round(sum(same) / max(1, len(same)), 4)
        start += len(ps)
    targets = {r.target_new for r in requests}
    answers_a = after[: len(unedited)]  # same_relation_A comes first
    flipped = [a.strip() in targets and a.strip() != world.capital[s] for a, s in zip(answers_a, unedited, strict=True)]
    out["flipped_to_new_target"] = round(sum(flipped) / max(1, len(unedited)), 4)
    return out


def evaluate(module: LocFTModule, world: ToyWorld, requests: list[EditRequest], window: int) -> dict[str, Any]:
    """Every figure of one pipeline on the final model."""
    start = time.perf_counter()
    scores = _nested(module.evaluate_requests(requests))
    result: dict[str, Any] = {
        **scores,
        "recency": recency(module, requests, window),
        "teacher_forced_exact": exact_teacher_forced(module, requests),
        "locality_probes": locality_probes(module, world, requests),
    }
    result["eval_wall_s"] = round(time.perf_counter() - start, 2)
    return result


def pre_edit_scores(module: LocFTModule, requests: list[EditRequest]) -> dict[str, float]:
    """WILD reliability / generalization of the unedited model on the edit requests (expected 0)."""
    module.swap_original()
    try:
        scores = module.evaluator.summarize(module.evaluator.evaluate(module.model, requests))
    finally:
        module.swap_original()
    return {k: round(v, 4) for k, v in scores.items() if k.startswith("wild_em/") and v == v}  # NaN: no such prompt


# ------------------------------------------------------------------------------------------------------ main


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions() -> dict[str, str]:
    return {
        "locft_module_sha256": hashlib.sha256(Path(inspect.getfile(LocFTModule)).read_bytes()).hexdigest()[:12],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    transformers.logging.set_verbosity_error()


def summary(pipelines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline: BF vs DF reliability, DFp recency, WILD vs teacher-forced agreement."""
    rel = {name: p["wild_em"]["reliability"] for name, p in pipelines.items()}
    tf = {name: p["teacher_forced_token"]["reliability"] for name, p in pipelines.items()}
    exact = {name: p["teacher_forced_exact"]["reliability_all_tokens"] for name, p in pipelines.items()}
    out: dict[str, Any] = {
        "wild_reliability": rel,
        "teacher_forced_token_reliability": tf,
        "teacher_forced_all_tokens_reliability": exact,
    }
    if {"BF", "DF"} <= set(rel):
        out["bf_minus_df"] = round(rel["BF"] - rel["DF"], 4)
        out["bf_at_least_0.9"] = rel["BF"] >= 0.9
        out["df_at_most_0.2"] = rel["DF"] <= 0.2
    if "DFp" in pipelines:
        out["dfp_recency_last_minus_first"] = pipelines["DFp"]["recency"]["last_minus_first"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=200, help="counterfactual edits (at most 350 train subjects)")
    parser.add_argument("--seed", type=int, default=0, help="world, pre-training and edit draw")
    parser.add_argument("--layer", type=int, default=2, help="tune model.layers.<layer>.mlp.down_proj.weight (0-3)")
    parser.add_argument("--bf-lr", type=float, default=1e-2)
    parser.add_argument("--bf-batch-size", type=int, default=20)
    parser.add_argument("--bf-epochs", type=int, default=400, help="most BF epochs (early stop below loss 1e-2)")
    parser.add_argument("--df-lr", type=float, default=1e-3, help="DF / DFp Adam lr (spec §6.2: 1e-3)")
    parser.add_argument("--window", type=int, default=40, help="first / last edits for the recency figures")
    parser.add_argument("--pipelines", nargs="+", default=["BF", "DF", "DFp"], choices=["BF", "DF", "DFp"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--rebuild", action="store_true", help="pre-train the toy again instead of using the cache")
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 edits, window 15, BF <= 200 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.edits, args.window, args.bf_epochs = min(args.edits, 60), min(args.window, 15), min(args.bf_epochs, 200)
    if not 2 * args.window <= args.edits:
        parser.error(f"--window {args.window} needs at least {2 * args.window} edits")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    folder, world, info = pretrained_world(args.seed, rebuild=args.rebuild)
    result: dict[str, Any] = {
        "benchmark": "locft_fidelity",
        "device": device_name(),
        "seed": args.seed,
        "edits": args.edits,
        "target": f"model.layers.{args.layer}.mlp.down_proj.weight",
        "toy": info,
        "pipelines": {},
    }
    with tempfile.TemporaryDirectory(prefix="locft-fidelity-") as tmp:
        edit_file = write_edits(world, args.edits, args.seed, Path(tmp) / "edits.jsonl")
        for name, setting in pipeline_settings(args).items():
            if name not in args.pipelines:
                continue
            protocols = ["wild_em", "teacher_forced_token"]
            module, _, timing = run_pipeline(folder, edit_file, args.layer, setting, Path(tmp), protocols=protocols)
            requests = list(module.trainer.datamodule.requests)  # type: ignore[attr-defined]
            if "pre_edit" not in result:
                result["pre_edit"] = pre_edit_scores(module, requests)
            result["pipelines"][name] = {**timing, **evaluate(module, world, requests, args.window)}
            print(f"{name}: {json.dumps(result['pipelines'][name])}", file=sys.stderr, flush=True)
    result["summary"] = summary(result["pipelines"])
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
