"""S3FT efficiency: selection throughput with batched versus one-at-a-time generation, and the cost of each judge.

Two parts, both on the CPU with the library's own code (no Trainer: the calls that ``predict_step`` makes):

1. **Selection** (``selection``): items per second of ``S3FTModule.select`` (answer every item with one batched,
   left-padded greedy ``generate``, judge the answers, paraphrase the rejected ones in a second batched ``generate``,
   judge those; the same as one ``predict_step``), over the same items cut into batches of 1 (one item at a time,
   the baseline) and of ``--batch-sizes`` (default 16 32 64).
   - Items: the 96 skill-A training items of ``configs/data/s3ft_tiny_train.jsonl`` (``load_s3ft_items``), repeated
     ``--copies`` times (default 2: 192 items) under new ids.
   - Models, both ``S3FTModule(..., judge="numeric", template="plain", max_new_tokens=12)`` with the toy prompts:
     ``toy``: ``tiny/s3ft-toy`` (2 layers, hidden 64, 0.16 M parameters; right on 38 % of the items, so 60 % need a
     paraphrase; answers stop at ``</s>`` after about 6 tokens); ``wide``: a randomly initialised Llama with the
     toy's tokenizer, 4 layers, hidden 256, intermediate 1024 (4.3 M parameters), saved to a temporary folder.
     Its output is noise, so every item is rejected and paraphrased and every generation runs the full 12 tokens:
     the throughput of a model about 27x the toy's size (correctness irrelevant).
   - Timing: one untimed ``select`` per batch size first, then ``--repeats`` passes over all items with the batch
     sizes interleaved (order rotated each repeat); the median pass is reported. ``ratio_vs_batch1`` is items/s at
     that batch size divided by items/s one at a time. ``agreement_with_batch1`` is the share of items whose selected
     source and target are identical to the one-at-a-time selection (left padding may change the numerics).
2. **Judges** (``judges``): milliseconds per item of ``judge.batch(items, candidates)``, median of ``--repeats``
   timed calls after an untimed one (one timed call in ``--quick``), and ``ratio_vs_numeric`` (the numeric judge's
   cost per item as the unit):
   - ``numeric`` (``NumericAnswerJudge``), ``exact_match`` (``ExactMatchJudge``), ``similarity``
     (``SimilarityJudge``, SQuAD token F1, threshold 0.6): the toy items (gold answer ``["s"]``) repeated to
     ``--text-items`` (960); candidates are the toy's designed own answers plus an answer line, ``"a plus b is
     s'."`` then ``"The answer is s'."`` (``s' = s`` for sums < 50, so every judge accepts 40 %);
   - ``unit_test_w1`` / ``unit_test_w2`` (``UnitTestJudge``, ``max_workers`` 1 and 2): ``--code-items`` (24) items
     with three asserts on a correct ``add(a, b)`` in ``[[BEGIN]] ... [[DONE]]``, each run in its own sandbox
     process (``ftmods.s3ft.sandbox.run_python``); ``sandbox_empty_ms`` is one sandbox running ``pass`` (median of 3):
     the process start that dominates the cost;
   - ``llm_b8`` / ``llm_b32`` (``LLMJudge(model="tiny/causal-lm")``, ``batch_size`` 8 and 32, greedy, 8 new tokens,
     the default judge prompt through the chat template, about 340 prompt tokens): ``--llm-items`` (64) toy items.
     The model's weights are random, so every verdict is "unparseable" (cost only). Loading happens in the untimed
     call.
   ``accepted`` is each judge's share of accepted candidates (a sanity check).

One JSON object goes to stdout; progress lines go to stderr.

Example::

    python benchmarks/s3ft.py                       # ~80 s on 2 cores (+45 s to build tiny/s3ft-toy once)
    python benchmarks/s3ft.py --quick               # 96 items, batch 1 and 32, 1 repeat, fewer judge items; ~15 s
    python benchmarks/s3ft.py --skip-judges --batch-sizes 8 32 128 --copies 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTMODS_CACHE", str(Path(tempfile.gettempdir()) / "ftmods-bench-cache"))
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["FTMODS_CACHE"]) / "datasets"))
if str(Path(__file__).resolve().parent) not in sys.path:  # also importable by path (importlib), not only as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from s3ft_fidelity import TOY, TRAIN_FILE, device_name, quiet, toy_module, versions  # noqa: E402

from ftmods.datamodules import S3FTItem, load_s3ft_items, mixture_report  # noqa: E402
from ftmods.models.s3ft_toy import build_s3ft_tokenizer, model_answer  # noqa: E402
from ftmods.models.tiny import resolve_pretrained  # noqa: E402
from ftmods.models.toy_world import toy_config  # noqa: E402
from ftmods.s3ft import (  # noqa: E402
    ExactMatchJudge,
    LLMJudge,
    NumericAnswerJudge,
    SimilarityJudge,
    UnitTestJudge,
    run_python,
)

WIDE: dict[str, int] = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}

# ------------------------------------------------------------------------------------------------------ selection


def build_wide_model(folder: Path, seed: int) -> dict[str, Any]:
    """A randomly initialised Llama (:data:`WIDE`) over the toy tokenizer, saved to ``folder``; its description."""
    from transformers import LlamaForCausalLM

    tokenizer = build_s3ft_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy_config(tokenizer, WIDE))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {**WIDE, "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


def training_items(copies: int) -> list[S3FTItem]:
    """The toy's training items, ``copies`` times under distinct ids."""
    items = load_s3ft_items(str(TRAIN_FILE))
    return [replace(item, id=f"{item.id}#{c}") for c in range(copies) for item in items]


def select_all(module: Any, items: list[S3FTItem], batch_size: int) -> tuple[float, list[dict[str, Any]]]:
    """Wall time of ``module.select`` over ``items`` in consecutive batches, and the records."""
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for first in range(0, len(items), batch_size):
        records += module.select(items[first : first + batch_size])
    return time.perf_counter() - start, records


def time_selection(pretrained: str, items: list[S3FTItem], args: argparse.Namespace) -> dict[str, Any]:
    """Items/s of ``select`` per batch size (median pass), ratio to batch 1 and agreement with batch 1."""
    module = toy_module(pretrained)
    module.configure_model()
    module.model.eval()
    sizes = [1, *(b for b in args.batch_sizes if b != 1)]
    for size in sizes:  # untimed warm-up
        select_all(module, items[:size], size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    records: dict[int, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(sizes)
        for size in sizes[shift:] + sizes[:shift]:
            seconds, records[size] = select_all(module, items, size)
            times[size].append(seconds)
    single = records[1]
    per_size: dict[str, Any] = {}
    for size in sizes:
        median = statistics.median(times[size])
        same = [
            (a["source"], a["target"]) == (b["source"], b["target"]) for a, b in zip(records[size], single, strict=True)
        ]
        per_size[str(size)] = {
            "items_per_s": round(len(items) / median, 2),
            "ms_per_item": round(1000 * median / len(items), 3),
            "pass_s_all": [round(t, 3) for t in times[size]],
            "agreement_with_batch1": round(sum(same) / len(same), 4),
        }
    for size in sizes:
        per_size[str(size)]["ratio_vs_batch1"] = round(
            per_size[str(size)]["items_per_s"] / per_size["1"]["items_per_s"], 2
        )
    mixture = mixture_report(single)
    return {"items": len(items), "mixture": mixture["counts"], "batch_sizes": per_size}


def selection(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    items = training_items(args.copies)
    out: dict[str, Any] = {"max_new_tokens": 12, "judge": "numeric"}
    started = time.perf_counter()
    out["toy"] = {"model": TOY, **time_selection(resolve_pretrained(TOY), items, args)}
    print(f"selection toy: {json.dumps(out['toy'])}", file=sys.stderr, flush=True)
    if not args.skip_wide:
        folder = root / "wide"
        description = build_wide_model(folder, args.seed)
        wide_items = items[: args.wide_items] if args.wide_items else items
        out["wide"] = {"model": description, **time_selection(str(folder), wide_items, args)}
        print(f"selection wide: {json.dumps(out['wide'])}", file=sys.stderr, flush=True)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


# --------------------------------------------------------------------------------------------------------- judges

CODE = "[[BEGIN]]\ndef add(a, b):\n    return a + b\n[[DONE]]"
TESTS = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(10, 32) == 42"]


def text_case(n: int) -> tuple[list[S3FTItem], list[str]]:
    """``n`` toy items (repeated) and the toy's designed own answer to each, with an "answer is" line."""
    base = load_s3ft_items(str(TRAIN_FILE))
    items = [replace(base[i % len(base)], id=f"t{i}") for i in range(n)]
    answers = [model_answer(*map(int, re.findall(r"\d+", item.prompt)[:2])) for item in items]
    return items, [f"{answer}.\nThe answer is {answer.split()[-1]}." for answer in answers]


def code_case(n: int) -> tuple[list[S3FTItem], list[str]]:
    """``n`` MBPP-like items with three asserts and a correct candidate each."""
    items = [S3FTItem(id=f"c{i}", task="mbpp", prompt="Add two numbers.", gold=CODE, tests=TESTS) for i in range(n)]
    return items, [CODE] * n


def time_judge(judge: Any, items: list[S3FTItem], candidates: list[str], repeats: int) -> dict[str, Any]:
    """ms per item of ``judge.batch`` (median of ``repeats`` calls after an untimed one) and the acceptance rate."""
    verdicts = judge.batch(items, candidates)  # untimed: imports, model loading, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        verdicts = judge.batch(items, candidates)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "items": len(items),
        "ms_per_item": round(1000 * median / len(items), 5),
        "calls_s_all": [round(t, 4) for t in times],
        "accepted": round(sum(v.correct for v in verdicts) / len(verdicts), 4),
        "example_detail": verdicts[0].detail,
    }


def judges(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    text = text_case(args.text_items)
    code = code_case(args.code_items)
    llm = text_case(args.llm_items)
    cases: dict[str, tuple[Callable[[], Any], tuple[list[S3FTItem], list[str]]]] = {
        "numeric": (NumericAnswerJudge, text),
        "exact_match": (ExactMatchJudge, text),
        "similarity": (lambda: SimilarityJudge(threshold=0.6), text),
        "unit_test_w1": (lambda: UnitTestJudge(max_workers=1), code),
        "unit_test_w2": (lambda: UnitTestJudge(max_workers=2), code),
        "llm_b8": (lambda: LLMJudge(model="tiny/causal-lm", batch_size=8, device="cpu"), llm),
        "llm_b32": (lambda: LLMJudge(model="tiny/causal-lm", batch_size=32, device="cpu"), llm),
    }
    out: dict[str, Any] = {}
    for name, (make, (items, candidates)) in cases.items():
        out[name] = time_judge(make(), items, candidates, args.repeats)
        print(f"judge {name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    unit = out["numeric"]["ms_per_item"]
    for name in cases:
        out[name]["ratio_vs_numeric"] = round(out[name]["ms_per_item"] / unit, 1)
    empty = []
    for _ in range(3):
        start = time.perf_counter()
        run_python("pass", timeout_s=10)
        empty.append(time.perf_counter() - start)
    out["sandbox_empty_ms"] = round(1000 * statistics.median(empty), 2)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64], help="compared with batch 1")
    parser.add_argument("--copies", type=int, default=2, help="passes over the 96 training items per timed pass")
    parser.add_argument("--wide-items", type=int, default=0, help="items for the wide model (0: as many as toy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size / timed judge calls")
    parser.add_argument("--text-items", type=int, default=960, help="items for the numeric / exact / F1 judges")
    parser.add_argument("--code-items", type=int, default=24, help="items for the unit-test judge")
    parser.add_argument("--llm-items", type=int, default=64, help="items for the LLM judge")
    parser.add_argument("--seed", type=int, default=0, help="initialisation of the wide model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    parser.add_argument("--skip-wide", action="store_true", help="no wide random model")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--skip-judges", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 96 items, batch 1 vs 32, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.copies, args.repeats = [32], 1, 1
        args.wide_items, args.text_items, args.code_items, args.llm_items = 32, 192, 6, 32
    if min(args.batch_sizes) < 1 or args.copies < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --copies and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "s3ft_efficiency", "device": device_name()}
    with tempfile.TemporaryDirectory(prefix="s3ft-bench-") as tmp:
        if not args.skip_selection:
            result["selection"] = selection(args, Path(tmp))
        if not args.skip_judges:
            result["judges"] = judges(args)
    result |= versions()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
