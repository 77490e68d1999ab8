"""Per-token cost of keyed sampling (``ftmods.ops.sampling.KeyedSampler``) against ``generate``'s own sampler.

One decoding step's sampling work on ``(N, V)`` float32 scores, ``V`` = 151,936 (the Qwen2 / Qwen2-VL vocabulary):

- ``torch``: what ``transformers`` does when sampling: ``softmax`` then ``torch.multinomial(probs, 1)``.
- ``keyed``: ``KeyedSampler`` (float64 softmax, cumulative sum, one SplitMix64 uniform per row, ``searchsorted``, a
  one-hot score row) **plus** the ``softmax`` + ``multinomial`` that ``generate`` still runs on the one-hot scores
  (``CLSRLModule`` keeps ``do_sample=True, num_return_sequences=G`` so that ``generate`` expands the prompts and
  encodes each image once): the whole per-step cost of ``rollout_sampling: keyed``.
- ``keyed_greedy``: ``KeyedSampler`` plus an ``argmax``: the cost when the caller repeats the prompts itself and
  calls ``generate(do_sample=False)`` (no redundant draw, but every image is encoded ``G`` times).

Reported per ``N``: median milliseconds per step of each (``--repeats`` interleaved rounds of ``--steps`` calls, the
order rotating), and the ratios to ``torch``. The model's decoding forward, which dominates a real step, is not
included: the figure is the sampler's own cost. One JSON object goes to stdout.

Example::

    python benchmarks/keyed_sampling.py                      # CPU, 1 thread, ~1 min
    python benchmarks/keyed_sampling.py --device cuda --rows 8 64 256
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ftmods.ops.sampling import KeyedSampler, row_keys


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_step(scores: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)


def _keyed_step(sampler: KeyedSampler, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(sampler(ids, scores), dim=-1), 1)


def _keyed_greedy_step(sampler: KeyedSampler, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return sampler(ids, scores).argmax(-1)


def _time(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64], help="N = prompts x G per generate call")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for rows in args.rows:
        generator = torch.Generator(device="cpu").manual_seed(0)
        scores = (torch.randn(rows, args.vocab, generator=generator) * 3).to(device)  # (N, V)
        ids = torch.zeros(rows, 40, dtype=torch.long, device=device)  # prompt 32 + 8 generated
        sampler = KeyedSampler(row_keys(0, 0, range(rows), 1).to(device), 32)
        steps = {
            "torch": functools.partial(_torch_step, scores),
            "keyed": functools.partial(_keyed_step, sampler, ids, scores),
            "keyed_greedy": functools.partial(_keyed_greedy_step, sampler, ids, scores),
        }
        for fn in steps.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for repeat in range(args.repeats):
            names = list(steps)
            for name in names[repeat % 3 :] + names[: repeat % 3]:  # rotate the order
                times[name].append(_time(steps[name], args.steps, device))
        ms = {name: statistics.median(values) for name, values in times.items()}
        row: dict[str, float] = {"rows": rows, **{f"{n}_ms": round(v, 3) for n, v in ms.items()}}
        row["ratio_keyed"] = round(ms["keyed"] / ms["torch"], 3)
        row["ratio_keyed_greedy"] = round(ms["keyed_greedy"] / ms["torch"], 3)
        results.append(row)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {"benchmark": "keyed_sampling", "device": device_name, "threads": args.threads, "vocab": args.vocab}
    print(json.dumps({**meta, "steps": args.steps, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
