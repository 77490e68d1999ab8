"""Keyed sampling (ftmods.ops.sampling): SplitMix64 against a plain-Python reference, inverse-CDF draws by hand, the
empirical distribution, and row independence from the batch, also through ``transformers``' ``generate``."""

from __future__ import annotations

import pytest
import torch

from ftmods.models.loading import load_causal_lm, load_tokenizer
from ftmods.ops.sampling import (
    KeyedSampler,
    inverse_cdf_sample,
    keyed_uniform,
    row_keys,
    splitmix64_mix,
    stable_hash64,
)

MASK = 2**64 - 1


def _splitmix64_stream(seed: int, n: int) -> list[int]:
    """The reference generator (Vigna's splitmix64.c) on Python ints."""
    out, state = [], seed & MASK
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def test_splitmix64_matches_the_reference_generator():
    """Seed 0 gives 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (the published first outputs); for seeds with the top bit
    set the int64 tensor arithmetic (wrapping multiply, logical shifts) matches the Python-int reference bit for
    bit, and ``keyed_uniform(key, n)`` is output n + 1 of the stream, top 53 bits."""
    assert _splitmix64_stream(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEFCAFEBABE, 12345]
    for counter in range(3):
        expected = [_splitmix64_stream(s, counter + 1)[-1] for s in seeds]
        keys = torch.tensor([_as_int64(s) for s in seeds], dtype=torch.int64)
        got = keyed_uniform(keys, counter)
        want = torch.tensor([((e >> 11) + 0.5) / 2**53 for e in expected], dtype=torch.float64)
        assert torch.equal(got, want)
    state = torch.tensor([_as_int64(0x9E3779B97F4A7C15)])
    assert splitmix64_mix(state).item() & MASK == 0xE220A8397B1DCDAF


def test_keyed_uniform_refuses_other_dtypes():
    with pytest.raises(ValueError, match="int64"):
        keyed_uniform(torch.tensor([1.0]), 0)


def test_inverse_cdf_sample_by_hand():
    """p = [0.25, 0.25, 0.5] gives the cdf [0.25, 0.5, 1.0], and the draw is the first id whose cdf >= u:
    u = 0.1 -> 0, u = 0.24 -> 0, u = 0.3 -> 1, u = 0.49 -> 1, u = 0.6 -> 2 (values at the exact boundaries are left
    out: the logits are float32 logs, so cdf[0] is 0.25 only to 1e-8).
    With p = [0, 0.5, 0, 0.5] (-inf logits) the cdf is [0, 0.5, 0.5, 1]:
    u = 1e-12 -> 1 and u = 1 - 1e-16 -> 3; ids 0 and 2 are never drawn."""
    logits = torch.log(torch.tensor([0.25, 0.25, 0.5])).expand(5, 3)
    u = torch.tensor([0.1, 0.24, 0.3, 0.49, 0.6], dtype=torch.float64)
    assert inverse_cdf_sample(logits, u).tolist() == [0, 0, 1, 1, 2]
    inf = float("-inf")
    sparse = torch.tensor([[inf, 0.0, inf, 0.0]]).expand(3, 4)
    u = torch.tensor([1e-12, 0.5000001, 1 - 1e-16], dtype=torch.float64)
    assert inverse_cdf_sample(sparse, u).tolist() == [1, 3, 3]
    trailing = torch.tensor([[0.0, 0.0, inf, inf]])
    assert inverse_cdf_sample(trailing, torch.tensor([1.0], dtype=torch.float64)).tolist() == [1]


def test_keyed_draws_follow_the_softmax():
    """20 000 rows with their own keys on logits log [0.1, 0.2, 0.3, 0.4]: the frequencies are within 0.015 of p
    (4 standard errors: sqrt(0.25 / 20 000) = 0.0035), and each row's token is the same at any batch position."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    keys = row_keys(7, 0, range(5000), 4)  # (20000,)
    tokens = inverse_cdf_sample(p.log().expand(len(keys), 4), keyed_uniform(keys, 3))
    freq = torch.bincount(tokens, minlength=4).double() / len(keys)
    assert torch.allclose(freq, p.double(), atol=0.015)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))
    shuffled = inverse_cdf_sample(p.log().expand(len(keys), 4), keyed_uniform(keys[perm], 3))
    assert torch.equal(shuffled, tokens[perm])


def test_row_keys_depend_on_seed_epoch_item_and_sample_only():
    """Item-major order; the same item gets the same keys in any batch; a different seed, epoch, item or sample
    index gives a different key; ids hash the same in every process (``str`` based, not Python's salted hash)."""
    both, alone = row_keys(0, 0, ["a", "b"], 3), row_keys(0, 0, ["b"], 3)
    assert torch.equal(both[3:], alone)
    variants = [row_keys(1, 0, ["b"], 3), row_keys(0, 1, ["b"], 3), row_keys(0, 0, ["c"], 3)]
    keys = torch.cat([both, *variants]).tolist()
    assert len(set(keys)) == len(keys) == 15
    assert stable_hash64("b") == int.from_bytes(
        __import__("hashlib").blake2b(b"b", digest_size=8).digest(), "little", signed=True
    )


def test_keyed_sampler_warps_like_transformers():
    """top_k = 1 is greedy whatever the uniform; temperature 1e-3 is near greedy too; top_p = 0.5 on
    p = [0.1, 0.2, 0.3, 0.4] keeps {0.3, 0.4} (transformers keeps the smallest set whose mass exceeds 1 - top_p
    from the bottom), so ids 0 and 1 never come; the output is 0 at the drawn id and -inf elsewhere."""
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(400, 4)
    keys, prompt = row_keys(0, 0, range(100), 4), torch.zeros(400, 5, dtype=torch.long)
    for sampler in (KeyedSampler(keys, 5, top_k=1), KeyedSampler(keys, 5, temperature=1e-3)):
        out = sampler(prompt, scores)
        assert (out.argmax(1) == 3).all()
        assert torch.isinf(out).sum() == 400 * 3
        assert (out.max(1).values == 0).all()
    drawn = KeyedSampler(keys, 5, top_p=0.5)(prompt, scores).argmax(1)
    assert set(drawn.tolist()) == {2, 3}
    with pytest.raises(ValueError, match="row keys"):
        KeyedSampler(keys[:3], 5)(prompt, scores)
    with pytest.raises(ValueError, match="temperature"):
        KeyedSampler(keys, 5, temperature=0.0)


def test_generate_gives_an_item_the_same_completions_in_any_batch():
    """Through ``generate``: prompts A and B sampled together (B left-padded) and B alone give B the same 6 sampled
    continuations of 12 tokens; another seed gives other ones. The step counter is tokens generated so far, so the
    padding does not shift B's stream."""
    torch.manual_seed(0)
    model, tok = load_causal_lm("tiny/causal-lm").eval(), load_tokenizer("tiny/causal-lm")
    tok.padding_side = "left"
    prompts = {"A": "a much longer prompt with several words", "B": "short"}

    def sample(ids: list[str], seed: int) -> torch.Tensor:
        enc = tok([prompts[i] for i in ids], return_tensors="pt", padding=True)
        keys = row_keys(seed, 0, ids, 3)
        sampler = KeyedSampler(keys, enc["input_ids"].shape[1], temperature=1.5)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=3,
            max_new_tokens=12,
            min_new_tokens=12,
            logits_processor=[sampler],
            pad_token_id=tok.pad_token_id,
        )
        return out[:, enc["input_ids"].shape[1] :]  # (3 * len(ids), 12)

    together, alone = sample(["A", "B"], 0), sample(["B"], 0)
    assert torch.equal(together[3:], alone)
    assert not torch.equal(sample(["B"], 1), alone)
    assert len({tuple(row) for row in alone.tolist()}) > 1  # the 3 samples of one item differ
