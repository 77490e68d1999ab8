"""Keyed sampling: each generated row draws from its own counter-based random stream, whatever batch it is in.

``generate(do_sample=True)`` draws every row of a batch from one torch generator, so the tokens a prompt gets depend
on which other prompts share its batch, on the rank and on the batch size. For GRPO that makes a run on 2 ranks x 1
prompt differ from 1 rank x 2 prompts with the same global batch. Here row ``r`` at generation step ``t`` uses one
uniform ``u = splitmix64(key_r, t)``, and takes the token where the row's cumulative distribution first reaches
``u`` (inverse-CDF sampling). The key is derived from ``(seed, epoch, item id, sample index)`` (:func:`row_keys`), so a
prompt's completions are the same on any number of ranks, in any batch, after a resume, and on CPU and GPU alike
(the stream is integer arithmetic; only the logits can differ by float rounding).

SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) is computed with wrapping ``int64`` tensor arithmetic and logical
shifts; the ``n``-th output of a generator seeded with ``s`` is ``mix(s + n * 0x9E3779B97F4A7C15)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the ``int64`` with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of ``int64`` bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_mix(x: Tensor) -> Tensor:
    """SplitMix64's output function on ``int64`` bit patterns (any shape).

    Example:
        >>> hex(splitmix64_mix(torch.tensor([_signed(0x9E3779B97F4A7C15)])).item() & (2**64 - 1))
        '0xe220a8397b1dcdaf'
    """
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    return x ^ _shr(x, 31)


def keyed_uniform(keys: Tensor, counter: int) -> Tensor:
    """``(N,)`` float64 uniforms in (0, 1): the ``counter + 1``-th SplitMix64 output of each key's stream.

    The top 53 bits make the float: ``(bits + 0.5) / 2**53``, never 0 or 1 (key 0, counter 0: SplitMix64's first
    output for seed 0, 0xE220A8397B1DCDAF, so 0.883311).

    Example:
        >>> u = keyed_uniform(torch.tensor([0, 1]), 0)
        >>> round(u[0].item(), 6), bool(((u > 0) & (u < 1)).all())
        (0.883311, True)
    """
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64, got {keys.dtype}")
    bits = splitmix64_mix(keys + _signed((counter + 1) * _GOLDEN))  # (N,)
    return (_shr(bits, 11).double() + 0.5) / float(2**53)


def stable_hash64(value: object) -> int:
    """A 64-bit ``int64`` hash of ``str(value)`` that is the same in every process (Python's ``hash`` is salted).

    Example:
        >>> stable_hash64("img_0001.png") == stable_hash64("img_0001.png"), stable_hash64(3) == stable_hash64("3")
        (True, True)
    """
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little", signed=True)


def row_keys(
    seed: int, epoch: int, item_ids: Sequence[object], samples: int, device: torch.device | None = None
) -> Tensor:
    """``(len(item_ids) * samples,)`` stream keys, item-major (``repeat_interleave`` order, as GRPO groups are).

    Each key mixes ``(seed, epoch, item id, sample index)``; nothing about the batch, the rank or the world size.

    Example:
        >>> a = row_keys(0, 1, ["x", "y"], 2)
        >>> b = row_keys(0, 1, ["y"], 2)
        >>> a.shape, torch.equal(a[2:], b), len(set(a.tolist()))
        (torch.Size([4]), True, 4)
    """
    base = _signed((seed * 1_000_003 + epoch) * _GOLDEN)
    rows = [_signed(stable_hash64(item) ^ base) for item in item_ids for _ in range(samples)]  # one per (item, sample)
    index = torch.arange(samples, dtype=torch.int64).repeat(len(item_ids))  # (N,)
    keys = splitmix64_mix(torch.tensor(rows, dtype=torch.int64)) + index * _signed(_GOLDEN)  # (N,)
    return splitmix64_mix(keys).to(device) if device is not None else splitmix64_mix(keys)


def inverse_cdf_sample(logits: Tensor, uniforms: Tensor) -> Tensor:
    """``(N,)`` token ids: for each row, the first id whose cumulative softmax probability reaches ``u * total``.

    ``logits`` is ``(N, V)`` (``-inf`` for excluded tokens); the softmax and the cumulative sum are taken in float64,
    so a row's token depends only on that row's logits and uniform. Tokens of probability 0 are never drawn.

    Example:
        >>> logits = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
        >>> inverse_cdf_sample(logits, torch.tensor([0.3, 0.6], dtype=torch.float64)).tolist()
        [1, 2]
    """
    probs = torch.softmax(logits.double(), dim=-1)  # (N, V)
    cdf = probs.cumsum(-1)  # (N, V)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)  # (N, 1)
    index = torch.searchsorted(cdf, target, right=False).squeeze(1)  # (N,) first cdf >= target
    index = index.clamp(max=logits.shape[-1] - 1)
    # float ties can land on a zero-probability id right after the last possible one: step back to a possible one
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1).amax(-1)  # (N,)
    return torch.minimum(index, last)


class KeyedSampler:
    """A ``transformers`` logits processor that samples each row from its own keyed stream (module docstring).

    It applies ``temperature`` / ``top_k`` / ``top_p`` itself, draws the token, and returns scores that are ``0`` for
    that token and ``-inf`` elsewhere, so whatever ``generate`` does next can only take it: with ``do_sample=True,
    num_return_sequences=G, temperature=1.0, top_k=0, top_p=1.0`` (what ``CLSRLModule`` does, so that ``generate``
    expands the prompts and encodes each image once) its softmax and multinomial are redundant; with the prompts
    repeated ``G`` times by the caller and ``do_sample=False`` it is an argmax (``benchmarks/keyed_sampling.py``
    measures both). The step counter is the number of tokens
    generated so far (``input_ids`` width minus ``prompt_width``), so left padding does not shift the stream.

    Args:
        keys: ``(N,)`` int64 row keys in the order of the generated rows (:func:`row_keys`).
        prompt_width: width of the (padded) prompt ``input_ids`` passed to ``generate``.
    """

    def __init__(
        self, keys: Tensor, prompt_width: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.keys, self.prompt_width = keys, prompt_width
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def warp(self, scores: Tensor) -> Tensor:
        """Temperature, then top-k, then top-p (``transformers``' order and rules, ``min_tokens_to_keep=1``)."""
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        scores = scores.float() / self.temperature
        if self.top_k > 0:
            scores = TopKLogitsWarper(self.top_k)(None, scores)  # type: ignore[arg-type]
        if self.top_p < 1:
            scores = TopPLogitsWarper(self.top_p)(None, scores)  # type: ignore[arg-type]
        return scores

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """One step: ``(N, V)`` scores in, ``(N, V)`` one-hot log scores (``0`` / ``-inf``) out."""
        if scores.shape[0] != self.keys.shape[0]:
            raise ValueError(f"KeyedSampler has {self.keys.shape[0]} row keys for {scores.shape[0]} rows")
        step = input_ids.shape[1] - self.prompt_width
        tokens = inverse_cdf_sample(self.warp(scores), keyed_uniform(self.keys.to(scores.device), step))  # (N,)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)
