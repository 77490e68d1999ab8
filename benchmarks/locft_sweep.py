r"""LocFT-BF location sweep: which weight block to fine-tune (paper §3 "location study", spec ``locft_bf.md`` §1.4).

For every (layer, kind) with kind in ``layer`` (all tensors of the layer: attention, MLP and both norms), ``attn``
(``self_attn``), ``mlp``, ``mlp.up`` (``mlp.up_proj.weight``) and ``mlp.down`` (``mlp.down_proj.weight``), a fresh
:class:`ftmods.locft.LocFTModule` is fine-tuned breadth-first on the same sample of edits (one Adam, shuffled
mini-batches, ``Trainer`` on CPU without logger or checkpoints) and the final model is scored:

- ``reliability`` / ``generalization``: WILD exact match (the paper's protocol, ``eval/wild_em/*``), with the EasyEdit
  teacher-forced token accuracy alongside (``tf_reliability`` / ``tf_generalization``); ``locality`` (WILD) too.
- **Capability proxy**, before and after the edit. The paper uses a cheap lm-evaluation-harness probe (GSM8K, MMLU,
  WMT16). That is *not* run here; for a real model run it separately on the saved edited checkpoints. For the toy
  (``tiny/locft-toy``, whose facts are saved as ``world.json`` next to the model) the proxy is the greedy exact-match
  accuracy on facts that were **not** edited: the currency of every subject (``"the currency used in {s} is"``) and
  the capital of every unedited subject (edit template, plus the paraphrase for subjects trained on it). Without a
  ``world.json`` the capability fields are ``null``.

Patterns are anchored regexes (``re.fullmatch`` through :func:`ftmods.ops.params.match_parameters`), so layer 1
never selects layers 10-19; every location is checked against the model's parameter names before any training, and a
pattern that matches nothing (or a kind with an unexpected number of tensors) fails loudly.

The "best" location follows the paper's rule (§1.4: "prioritise capability", then reliability, then
generalization), lexicographic with a tolerance ``--tie-tol`` per stage, among the locations whose WILD reliability
reaches ``--min-reliability`` (a location that does not learn the edits trivially keeps capability; all locations
are candidates if none reaches it).

One JSON object goes to stdout (``records``: one per location; ``best``; the settings); a table and Lightning's
messages go to stderr.

Example::

    python benchmarks/locft_sweep.py                          # tiny/locft-toy, 4 layers x 5 kinds, 40 edits (~1-2 min)
    python benchmarks/locft_sweep.py --layers 1 2 --kinds mlp.down layer --epochs 20
    python benchmarks/locft_sweep.py --pretrained meta-llama/Meta-Llama-3-8B-Instruct --edits zsre_1k.json \
        --layers 20 21 22 --kinds mlp.down --lr 5e-4 --batch-size 100 --epochs 25 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from ftmods.datamodules.edits import EditDataModule, EditRequest, load_edits  # noqa: E402
from ftmods.locft.module import LocFTModule  # noqa: E402
from ftmods.models.tiny import resolve_pretrained  # noqa: E402
from ftmods.models.toy_world import (  # noqa: E402
    TEMPLATE_EDIT,
    TEMPLATE_OTHER,
    TEMPLATE_PARAPHRASE,
    WORLD_FILE,
    ToyWorld,
    encode_facts,
    fact_accuracy,
)
from ftmods.ops.params import match_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS: tuple[str, ...] = ("layer", "attn", "mlp", "mlp.up", "mlp.down")
"""The paper's five candidates per layer."""
LAYOUT_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral")
"""``config.model_type`` values with the ``model.layers.<L>.{self_attn,mlp.{up,down}_proj}`` parameter layout."""
_SUFFIX: dict[str, str] = {
    "layer": r"\..+",
    "attn": r"\.self_attn\..+",
    "mlp": r"\.mlp\..+",
    "mlp.up": r"\.mlp\.up_proj\.weight",
    "mlp.down": r"\.mlp\.down_proj\.weight",
}
_EXACTLY_ONE = ("mlp.up", "mlp.down")  # kinds that must select exactly one tensor
CAPABILITY_NOTE = (
    "toy proxy: greedy exact match on unedited facts of world.json (currency of every subject, capital of every "
    "unedited subject); for a real model the paper's proxy is lm-evaluation-harness (GSM8K, MMLU, WMT16), not run here"
)


# ----------------------------------------------------------------------------------------------------------- locations


def location_patterns(model_config: Any, layer: int, kind: str) -> list[str]:
    r"""Anchored regexes (for ``re.fullmatch``) of one candidate location of a Llama / Qwen2 / Mistral model.

    Args:
        model_config: The model's config (``model_type`` and ``num_hidden_layers`` are read; a dict works too).
        layer: 0-based decoder layer.
        kind: One of :data:`KINDS`.

    Returns:
        One pattern, e.g. ``[r"model\.layers\.3\.mlp\.down_proj\.weight"]``.

    Raises:
        ValueError: For an unknown kind, a layer out of range or a model type with another layout.

    Example:
        >>> location_patterns({"model_type": "llama", "num_hidden_layers": 4}, 1, "layer")
        ['model\\.layers\\.1\\..+']
    """
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    model_type, depth = get("model_type"), get("num_hidden_layers")
    if model_type not in LAYOUT_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not supported; parameter layout known for {LAYOUT_MODEL_TYPES}")
    if kind not in _SUFFIX:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(layer, int) or not 0 <= layer < int(depth):
        raise ValueError(f"layer must be in [0, {depth}), got {layer!r}")
    return [rf"model\.layers\.{layer}{_SUFFIX[kind]}"]


def resolve_location(names: Sequence[str], model_config: Any, layer: int, kind: str) -> list[str]:
    """The parameter names a location selects, checked: at least one (else ``match_parameters`` raises), exactly one
    for ``mlp.up`` / ``mlp.down``, and every name inside ``model.layers.<layer>.``."""
    selected = match_parameters(names, location_patterns(model_config, layer, kind))
    prefix = f"model.layers.{layer}."
    if kind in _EXACTLY_ONE and len(selected) != 1:
        raise ValueError(f"location {layer}/{kind} should select one tensor, selected {selected}")
    if any(not n.startswith(prefix) for n in selected):
        raise ValueError(f"location {layer}/{kind} selected tensors outside {prefix}: {selected}")
    return selected


def parameter_names(path: str) -> tuple[Any, list[str]]:
    """The config and parameter names of a model, built on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, [n for n, _ in model.named_parameters()]


# ---------------------------------------------------------------------------------------------------------- capability


def capability_facts(world: ToyWorld, edited: set[str]) -> dict[str, list[tuple[str, str]]]:
    """Unedited facts of the toy world by group: ``currency`` (all subjects), ``capital`` (edit template, unedited
    subjects), ``capital_paraphrase`` (paraphrase template, unedited train subjects: the only ones trained on it)."""
    unedited = [s for s in world.subjects if s not in edited]
    groups = {
        "currency": [(TEMPLATE_OTHER, s) for s in world.subjects],
        "capital": [(TEMPLATE_EDIT, s) for s in unedited],
        "capital_paraphrase": [(TEMPLATE_PARAPHRASE, s) for s in world.train_subjects if s not in edited],
    }
    return {g: [(world.prompt(t, s), world.answer(t, s)) for t, s in pairs] for g, pairs in groups.items()}


@torch.no_grad()
def capability(model: torch.nn.Module, tokenizer: Any, facts: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Greedy exact-match accuracy (``fact_accuracy``: every answer token and EOS is the argmax) per group and
    overall (``all``, weighted by the number of facts)."""
    was_training = model.training
    model.eval()
    try:
        scores, total, n = {}, 0.0, 0
        for group, pairs in facts.items():
            if pairs:
                scores[group] = fact_accuracy(model, *encode_facts(tokenizer, pairs))
                total, n = total + scores[group] * len(pairs), n + len(pairs)
        scores["all"] = total / n if n else float("nan")
        return scores
    finally:
        model.train(was_training)


def edited_subjects(requests: Sequence[EditRequest], world: ToyWorld) -> set[str]:
    """The subjects the edits touch: ``request.subject``, else every world subject named in the prompt."""
    out: set[str] = set()
    for r in requests:
        if r.subject:
            out.add(r.subject)
        else:
            out |= {s for s in world.subjects if re.search(rf"\b{re.escape(s)}\b", r.prompt)}
    return out


# ------------------------------------------------------------------------------------------------------------- one run


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or x != x else round(float(x), digits)


def run_location(
    pretrained: str,
    edits: str,
    layer: int,
    kind: str,
    *,
    patterns: list[str],
    max_edits: int | None,
    epochs: int,
    lr: float,
    batch_size: int,
    loss_tol: float,
    seed: int,
    max_new_tokens: int,
    max_length: int,
    facts: dict[str, list[tuple[str, str]]] | None,
    root_dir: str,
) -> dict[str, Any]:
    """Fine-tune one location breadth-first on the edits and score it (one record of the sweep)."""
    seed_everything(seed, verbose=False)
    module = LocFTModule(
        pretrained,
        target_modules=patterns,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr, weight_decay=0.0),
        loss_tol=loss_tol,
        eval_protocols=["wild_em", "teacher_forced_token"],
        eval_max_new_tokens=max_new_tokens,
    )
    module.configure_model()
    params = dict(module.model.named_parameters())
    before = capability(module.model, module.tokenizer, facts) if facts else None
    dm = EditDataModule(
        edits, tokenizer=pretrained, batch_size=batch_size, max_edits=max_edits, max_length=max_length, seed=seed
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    scores = module.evaluate_requests(list(dm.requests))
    after = capability(module.model, module.tokenizer, facts) if facts else None
    seconds = time.perf_counter() - start
    cap_b, cap_a = (before or {}).get("all"), (after or {}).get("all")
    return {
        "layer": layer,
        "kind": kind,
        "patterns": patterns,
        "tensors": list(module.tuned_names),
        "trainable_params": sum(params[n].numel() for n in module.tuned_names),
        "epochs_run": trainer.current_epoch,
        "opt_steps": module.stats["opt_steps"],
        "final_epoch_loss": _r(module.stats["epoch_loss_sum"] / max(1, module.stats["epoch_batches"]), 5),
        "train_seconds": _r(train_s, 2),
        "seconds": _r(seconds, 2),
        "reliability": _r(scores.get("eval/wild_em/reliability")),
        "generalization": _r(scores.get("eval/wild_em/generalization")),
        "locality": _r(scores.get("eval/wild_em/locality")),
        "tf_reliability": _r(scores.get("eval/teacher_forced_token/reliability")),
        "tf_generalization": _r(scores.get("eval/teacher_forced_token/generalization")),
        "capability_before": _r(cap_b),
        "capability_after": _r(cap_a),
        "capability_delta": _r(None if cap_a is None or cap_b is None else cap_a - cap_b),
        "capability_groups_after": {k: _r(v) for k, v in after.items()} if after else None,
    }


# ----------------------------------------------------------------------------------------------------------- selection


def best_location(
    records: Sequence[dict[str, Any]], *, min_reliability: float = 0.9, tol: float = 0.01
) -> dict[str, Any] | None:
    """The paper's rule: highest capability (delta), then reliability, then generalization; each stage keeps every
    candidate within ``tol`` of that stage's best. Candidates: WILD reliability >= ``min_reliability`` (all records
    if none reaches it). A missing capability counts as 0 (no capability ranking). Ties: the first record."""
    if not records:
        return None
    pool = [r for r in records if (r["reliability"] or 0.0) >= min_reliability] or list(records)
    for key in ("capability_delta", "reliability", "generalization"):
        top = max((r[key] or 0.0) for r in pool)
        pool = [r for r in pool if (r[key] or 0.0) >= top - tol]
    return {k: pool[0][k] for k in ("layer", "kind", "patterns", "reliability", "generalization", "capability_delta")}


# --------------------------------------------------------------------------------------------------------------- sweep


def run_sweep(
    pretrained: str = "tiny/locft-toy",
    edits: str | None = None,
    *,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] = KINDS,
    max_edits: int | None = None,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 20,
    loss_tol: float = 1e-2,
    seed: int = 0,
    max_new_tokens: int = 8,
    max_length: int = 64,
    min_reliability: float = 0.9,
    tie_tol: float = 0.01,
    root_dir: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """The whole sweep: check every location, then fine-tune and score each; returns the JSON-ready result.

    ``verbose`` prints a table row per location to stderr as it finishes.
    """
    edits = edits or str(REPO / "configs" / "data" / "locft_tiny_edits.jsonl")
    started = time.perf_counter()
    path = resolve_pretrained(pretrained)  # builds tiny/... once
    config, names = parameter_names(path)
    layers = list(range(config.num_hidden_layers)) if layers is None else list(layers)
    locations = [(layer, kind) for layer in layers for kind in kinds]
    patterns = {loc: location_patterns(config, *loc) for loc in locations}
    for loc in locations:  # fail before any training
        resolve_location(names, config, *loc)
    requests = load_edits(edits, max_edits=max_edits)
    world_file = Path(path) / WORLD_FILE
    facts = None
    if world_file.is_file():
        world = ToyWorld.load(world_file)
        facts = capability_facts(world, edited_subjects(requests, world))
    records = []
    if verbose:
        print(_HEADER, file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        root = root_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="locft_sweep_"))
        for layer, kind in locations:
            record = run_location(
                pretrained, edits, layer, kind, patterns=patterns[(layer, kind)], max_edits=max_edits,
                epochs=epochs, lr=lr, batch_size=batch_size, loss_tol=loss_tol, seed=seed,
                max_new_tokens=max_new_tokens, max_length=max_length, facts=facts, root_dir=root,
            )  # fmt: skip
            records.append(record)
            if verbose:
                print(_row(record), file=sys.stderr, flush=True)
    return {
        "pretrained": pretrained,
        "edits": edits,
        "num_edits": len(requests),
        "settings": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "loss_tol": loss_tol,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "metrics": {
            "reliability": "eval/wild_em/reliability",
            "generalization": "eval/wild_em/generalization",
            "capability": CAPABILITY_NOTE if facts else "none (no world.json); use lm-evaluation-harness offline",
            "capability_facts": {k: len(v) for k, v in facts.items()} if facts else None,
        },
        "rule": f"WILD reliability >= {min_reliability}, then max capability_delta, reliability, generalization "
        f"(each within {tie_tol} of the best)",
        "records": records,
        "best": best_location(records, min_reliability=min_reliability, tol=tie_tol),
        "wall_s": round(time.perf_counter() - started, 1),
    }


# ----------------------------------------------------------------------------------------------------------------- CLI

_HEADER = (
    f"{'layer':>5} {'kind':<8} {'params':>8} {'ep':>3} {'sec':>6} {'rel':>6} {'gen':>6} {'tf_rel':>6} "
    f"{'tf_gen':>6} {'loc':>6} {'cap_b':>6} {'cap_a':>6} {'dcap':>7}"
)


def _fmt(x: float | None, width: int = 6, sign: str = "") -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{sign}{width}.3f}"


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['layer']:>5} {r['kind']:<8} {r['trainable_params']:>8} {r['epochs_run']:>3} {r['seconds']:>6.1f} "
        f"{_fmt(r['reliability'])} {_fmt(r['generalization'])} {_fmt(r['tf_reliability'])} "
        f"{_fmt(r['tf_generalization'])} {_fmt(r['locality'])} {_fmt(r['capability_before'])} "
        f"{_fmt(r['capability_after'])} {_fmt(r['capability_delta'], 7, '+')}"
    )


def table(result: dict[str, Any]) -> str:
    """The records as a fixed-width table, plus the best location."""
    return "\n".join([_HEADER, *(_row(r) for r in result["records"]), _best_line(result)])


def _best_line(result: dict[str, Any]) -> str:
    best = result["best"]
    where = f"layer {best['layer']} {best['kind']}" if best else "none"
    return f"best: {where} ({result['rule']}); {result['wall_s']} s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pretrained", default="tiny/locft-toy", help="hub id, folder or tiny/<name>")
    p.add_argument("--edits", default=str(REPO / "configs" / "data" / "locft_tiny_edits.jsonl"), help="edit file")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="0-based layers (default: all)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="locations per layer")
    p.add_argument("--max-edits", type=int, default=None, help="first N edits of the file (default: all)")
    p.add_argument("--epochs", type=int, default=100, help="most epochs (early stop below --loss-tol)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (paper: 5e-4 for 7-8B models)")
    p.add_argument("--batch-size", type=int, default=20, help="edits per mini-batch (paper: 100)")
    p.add_argument("--loss-tol", type=float, default=1e-2, help="skip / early-stop threshold (paper: 1e-2)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="WILD generation budget")
    p.add_argument("--max-length", type=int, default=64, help="longest training sequence")
    p.add_argument("--min-reliability", type=float, default=0.9, help="candidates for 'best'")
    p.add_argument("--tie-tol", type=float, default=0.01, help="tolerance per stage of the 'best' rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    return p.parse_args(argv)


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*but have no `validation_step`.*",
        ".*'set_vital' is deprecated.*",
        ".*LeafSpec.*is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _quiet()
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON goes to stdout
        result = run_sweep(
            args.pretrained, args.edits, layers=args.layers, kinds=args.kinds, max_edits=args.max_edits,
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, loss_tol=args.loss_tol, seed=args.seed,
            max_new_tokens=args.max_new_tokens, max_length=args.max_length, min_reliability=args.min_reliability,
            tie_tol=args.tie_tol, verbose=True,
        )  # fmt: skip
        print(_best_line(result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
