import math

import pytest
import torch
from torch.testing import assert_close

from ftmods.many_icl import (
    SHOT_BUCKETS,
    bucket_names,
    many_icl_nll,
    select_answers,
    shift_token_field,
    shot_weights,
)
from ftmods.ops import next_token_targets

LN2, LN3 = math.log(2.0), math.log(3.0)
REDUCTIONS = ["token_mean", "answer_mean", "weighted"]

# Position kinds over V=2 (logits, target) with a known NLL:
#   "a": logits [0, 0],    target 0 -> p = 1/2, nll = ln 2
#   "b": logits [ln 3, 0], target 1 -> p = 1/4, nll = 2 ln 2
#   "c": logits [ln 3, 0], target 0 -> p = 3/4, nll = 2 ln 2 - ln 3
KINDS = {"a": ([0.0, 0.0], 0), "b": ([LN3, 0.0], 1), "c": ([LN3, 0.0], 0)}
A, B, C = LN2, 2 * LN2, 2 * LN2 - LN3

# Two episodes (one per row), None = not supervised; (kind, shot index) otherwise.
ROWS = [
    [None, ("a", 0), None, ("b", 1), ("c", 1), None, ("b", 2), None],
    [None, ("c", 0), ("c", 0), None, ("a", 1), None, None, None],
]


def _batch(rows=ROWS):
    """Aligned (logits, targets, shot_index, episode_ids) for ``rows``; unsupervised positions get random logits."""
    logits = torch.randn(len(rows), len(rows[0]), 2) * 3
    targets = torch.full((len(rows), len(rows[0])), -100)
    shots = torch.full_like(targets, -1)
    for r, row in enumerate(rows):
        for t, spec in enumerate(row):
            if spec is not None:
                (row_logits, target), shot = KINDS[spec[0]], spec[1]
                logits[r, t], targets[r, t], shots[r, t] = torch.tensor(row_logits), target, shot
    episodes = torch.arange(len(rows))[:, None].expand_as(targets)
    return logits, targets, shots, episodes


def _random_episode(shot_lengths, vocab=7, gap=2):
    """One episode of ``gap`` unsupervised positions before each answer; answer k has ``shot_lengths[k]`` tokens."""
    shots = []
    for k, length in enumerate(shot_lengths):
        shots += [-1] * gap + [k] * length
    shots = torch.tensor(shots + [-1])  # (T,)
    targets = torch.randint(0, vocab, shots.shape).where(shots >= 0, -100)  # (T,)
    return torch.randn(len(shots), vocab), targets, shots


# ---------------------------------------------------------------- hand-worked values


def test_token_mean_by_hand():
    """All answers: tokens a, b, c, b | c, c, a -> sum = 2a + 2b + 3c = 2ln2 + 4ln2 + 6ln2 - 3ln3 = 12 ln2 - 3 ln3.
    Token mean = (12 ln2 - 3 ln3) / 7 = 0.71778. Answers: (0,0), (0,1), (0,2), (1,0), (1,1) -> 5.
    """
    out = many_icl_nll(*_batch())
    assert_close(out.loss, torch.tensor((12 * LN2 - 3 * LN3) / 7))
    assert_close(out.nll_sum, torch.tensor(12 * LN2 - 3 * LN3))
    assert out.num_tokens.item() == 7
    assert out.num_answers.item() == 5
    assert out.units.item() == 7


def test_answer_mean_by_hand():
    """Answer means: (0,0) a = ln2; (0,1) (b + c)/2 = 2ln2 - ln3/2; (0,2) b = 2ln2; (1,0) (c + c)/2 = 2ln2 - ln3;
    (1,1) a = ln2. Sum = 8 ln2 - 1.5 ln3; mean over 5 answers = (8 ln2 - 1.5 ln3) / 5 = 0.77942.
    """
    out = many_icl_nll(*_batch(), reduction="answer_mean")
    assert_close(out.loss, torch.tensor((8 * LN2 - 1.5 * LN3) / 5))
    assert out.units.item() == 5


@pytest.mark.parametrize(
    ("power", "expected"),
    [
        # w = k+1 = 1, 2, 3, 1, 2: ln2 + 2(2ln2 - ln3/2) + 3(2ln2) + (2ln2 - ln3) + 2ln2 = 15 ln2 - 2 ln3; sum w = 9.
        (1.0, ((15 * LN2 - 2 * LN3) / 9, 9.0)),
        # w = (k+1)^2 = 1, 4, 9, 1, 4: ln2 + 4(2ln2 - ln3/2) + 9(2ln2) + (2ln2 - ln3) + 4ln2 = 33 ln2 - 3 ln3; sum = 19.
        (2.0, ((33 * LN2 - 3 * LN3) / 19, 19.0)),
    ],
)
def test_weighted_by_hand(power, expected):
    loss, units = expected
    out = many_icl_nll(*_batch(), reduction="weighted", weight_power=power)
    assert_close(out.loss, torch.tensor(loss))
    assert_close(out.units, torch.tensor(units))


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        ("token_mean", 1.5 * LN2),  # last answers (0,2) = b and (1,1) = a, one token each: (2ln2 + ln2) / 2
        ("answer_mean", 1.5 * LN2),  # the same, each answer has one token
        ("weighted", 1.6 * LN2),  # w = 3 and 2: (3 * 2ln2 + 2 * ln2) / 5 = 8 ln2 / 5
    ],
)
def test_last_only_by_hand(reduction, expected):
    out = many_icl_nll(*_batch(), reduction=reduction, supervise="last")
    assert_close(out.loss, torch.tensor(expected))
    assert out.num_answers.item() == 2
    assert out.num_tokens.item() == 2


@pytest.mark.parametrize(
    ("reduction", "expected", "units"),
    [
        ("token_mean", (7 * LN2 - LN3) / 4, 4),  # b, c, b, a = 7 ln2 - ln3 over 4 tokens
        ("answer_mean", (5 * LN2 - 0.5 * LN3) / 3, 3),  # (2ln2 - ln3/2) + 2ln2 + ln2 over 3 answers
        ("weighted", (12 * LN2 - LN3) / 7, 7),  # 2(2ln2 - ln3/2) + 3(2ln2) + 2(ln2) over 2 + 3 + 2
    ],
)
def test_after_m_by_hand(reduction, expected, units):
    """min_context_shots=1 drops the two shot-0 answers (the instruction-only, zero-shot predictions)."""
    out = many_icl_nll(*_batch(), reduction=reduction, supervise="after_m", min_context_shots=1)
    assert_close(out.loss, torch.tensor(expected))
    assert_close(out.units, torch.tensor(float(units)))
    assert out.num_tokens.item() == 4


def test_buckets_by_hand():
    """Shot 0: a, c, c = ln2 + 2(2ln2 - ln3) = 5 ln2 - 2 ln3 (3 tokens); shots 1-4: b, c, b, a = 7 ln2 - ln3 (4)."""
    out = many_icl_nll(*_batch())
    assert_close(out.bucket_nll_sum, torch.tensor([5 * LN2 - 2 * LN3, 7 * LN2 - LN3, 0.0, 0.0]))
    assert out.bucket_tokens.tolist() == [3, 4, 0, 0]


def test_bucket_boundaries():
    """One episode with shots 0..20, one uniform token (V=4, nll = ln 4) each: buckets 0 | 1-4 | 5-16 | 17-20."""
    shots = torch.arange(21)
    logits, targets = torch.zeros(21, 4), torch.zeros(21, dtype=torch.long)
    out = many_icl_nll(logits, targets, shots, torch.zeros(21, dtype=torch.long))
    assert out.bucket_tokens.tolist() == [1, 4, 12, 4]
    assert_close(out.bucket_nll_sum, math.log(4) * torch.tensor([1.0, 4.0, 12.0, 4.0]))
    custom = many_icl_nll(logits, targets, shots, torch.zeros(21, dtype=torch.long), buckets=(0, 3))
    assert custom.bucket_tokens.tolist() == [3, 18]
    assert bucket_names((0, 3)) == ["0-2", "3+"]
    assert bucket_names(SHOT_BUCKETS) == ["0", "1-4", "5-16", "17+"]


def test_shot_weights():
    shots = torch.tensor([[-1, 0, 1], [3, -1, 8]])
    assert_close(shot_weights(shots), torch.tensor([[0.0, 1.0, 2.0], [4.0, 0.0, 9.0]]))
    assert_close(shot_weights(shots, power=0.5), torch.tensor([[0.0, 1.0, math.sqrt(2)], [2.0, 0.0, 3.0]]))
    assert_close(shot_weights(shots, power=0.0), (shots >= 0).float())


def test_weighted_divides_by_weight_sum_below_one():
    """A single answer (shot 3: tokens a, b) with power -2: w = 1/16, loss = w * (a + b)/2 / w = 1.5 ln2, not
    w * 1.5 ln2 (which a divisor clamped to 1 would give)."""
    logits = torch.tensor([KINDS["a"][0], KINDS["b"][0]])
    targets = torch.tensor([KINDS["a"][1], KINDS["b"][1]])
    out = many_icl_nll(
        logits, targets, torch.tensor([3, 3]), torch.zeros(2, dtype=torch.long), reduction="weighted", weight_power=-2.0
    )
    assert_close(out.loss, torch.tensor(1.5 * LN2))
    assert_close(out.units, torch.tensor(1 / 16))


# ---------------------------------------------------------------- selection


def test_select_answers_modes():
    shots = torch.tensor([[-1, 0, 0, -1, 1, 2, 2], [0, -1, 1, 1, -1, -1, -1]])
    episodes = torch.tensor([[4, 4, 4, 4, 4, 4, 4], [1, 1, 1, 1, 1, 1, 1]])
    assert select_answers(shots, episodes).long().tolist() == [[0, 1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 0, 0]]
    last = select_answers(shots, episodes, supervise="last")
    assert last.long().tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    after = select_answers(shots, episodes, supervise="after_m", min_context_shots=2)
    assert after.long().tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]]


def test_last_selects_exactly_one_answer_per_episode():
    """Random episodes, several packed per row, with sparse unordered ids: "last" keeps exactly the top shot of each."""
    lengths = torch.randint(1, 6, (12,))  # shots per episode
    shots = torch.cat([torch.cat([torch.full((3,), -1), torch.arange(int(n)).repeat_interleave(2)]) for n in lengths])
    ids = torch.randperm(100)[:12] * 3  # sparse and unordered
    episodes = torch.cat([ids[i].repeat(3 + 2 * int(n)) for i, n in enumerate(lengths)])
    mask = select_answers(shots, episodes, supervise="last")
    for i, n in enumerate(lengths):
        kept = shots[mask & (episodes == ids[i])]
        assert kept.tolist() == [int(n) - 1] * 2  # both tokens of the last answer, nothing else
    assert int(mask.sum()) == 2 * len(lengths)


def test_last_skips_an_answer_whose_targets_are_masked():
    """If the top shot's targets were all masked (e.g. cut off), the last *supervised* answer is trained on."""
    logits, targets, shots, episodes = _batch()
    targets[0, 6] = -100  # row 0's shot 2 loses its only target; (0,1) = b, c becomes the last answer
    shots[0, 6] = 2
    out = many_icl_nll(logits, targets, shots, episodes, supervise="last")
    assert out.num_tokens.item() == 3  # b, c of (0,1) and a of (1,1)
    assert_close(out.loss, torch.tensor((B + C + A) / 3))


# ---------------------------------------------------------------- invariants


def test_uniform_logits_give_log_vocab_for_every_reduction():
    logits, targets, shots = _random_episode([1, 3, 2, 5])
    for reduction in REDUCTIONS:
        out = many_icl_nll(torch.zeros_like(logits), targets, shots, torch.zeros_like(shots), reduction=reduction)
        assert_close(out.loss, torch.tensor(math.log(7)))


def test_equal_answer_lengths_make_token_and_answer_mean_agree():
    logits, targets, shots = _random_episode([3, 3, 3, 3])
    episodes = torch.zeros_like(shots)
    token = many_icl_nll(logits, targets, shots, episodes)
    answer = many_icl_nll(logits, targets, shots, episodes, reduction="answer_mean")
    assert_close(token.loss, answer.loss)
    assert answer.num_answers.item() == 4


def test_weighted_with_power_zero_is_answer_mean():
    logits, targets, shots = _random_episode([1, 4, 2, 6])  # unequal lengths: token mean differs
    episodes = torch.zeros_like(shots)
    answer = many_icl_nll(logits, targets, shots, episodes, reduction="answer_mean")
    weighted = many_icl_nll(logits, targets, shots, episodes, reduction="weighted", weight_power=0.0)
    assert_close(weighted.loss, answer.loss)
    assert_close(weighted.units, answer.units)
    assert not torch.allclose(many_icl_nll(logits, targets, shots, episodes).loss, answer.loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("supervise", "m"), [("all", 0), ("last", 0), ("after_m", 1)])
def test_packed_row_equals_separate_episodes(reduction, supervise, m):
    """Two episodes packed in one row (ids 7 and 3) = (sum_1 + sum_2) / (units_1 + units_2) of separate runs.

    Both episodes hold shots 0-2 (and the second a shot 3), so answers keyed by shot alone would merge.
    """
    first, second = _random_episode([2, 1, 3]), _random_episode([1, 4, 2, 2])
    kw = {"reduction": reduction, "supervise": supervise, "min_context_shots": m}
    sums, units = [], []
    for logits, targets, shots in (first, second):
        own = torch.zeros_like(shots)
        sums.append(many_icl_nll(logits, targets, shots, own, denominator=1.0, **kw).loss)
        units.append(many_icl_nll(logits, targets, shots, own, **kw).units)
    logits, targets, shots = (torch.cat([a, b])[None] for a, b in zip(first, second, strict=True))  # (1, T1 + T2)
    episodes = torch.cat([torch.full_like(first[2], 7), torch.full_like(second[2], 3)])[None]  # (1, T1 + T2)
    packed = many_icl_nll(logits, targets, shots, episodes, **kw)
    assert_close(packed.loss, (sums[0] + sums[1]) / (units[0] + units[1]))
    assert_close(packed.units, units[0] + units[1])
    if reduction != "token_mean" or supervise == "last":  # these depend on telling the episodes apart
        merged = many_icl_nll(logits, targets, shots, torch.zeros_like(episodes), **kw)
        assert not torch.allclose(merged.loss, packed.loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_denominator_one_gives_the_sum(reduction):
    batch = _batch()
    own = many_icl_nll(*batch, reduction=reduction)
    summed = many_icl_nll(*batch, reduction=reduction, denominator=1.0)
    assert_close(summed.loss, own.loss * own.units)
    assert_close(summed.units, own.units)  # units stay this batch's own count
    as_tensor = many_icl_nll(*batch, reduction=reduction, denominator=torch.tensor(4.0))
    assert_close(as_tensor.loss, own.loss * own.units / 4)
    if reduction == "token_mean":
        assert_close(summed.loss, own.nll_sum)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_global_denominator_over_ranks(reduction):
    """Spec P6: each rank divides its sum by (global units / world); the rank average equals the loss of the union
    (episodes have distinct ids across ranks), although ranks hold very different numbers of answers and tokens."""
    shards = [_random_episode(lengths) for lengths in ([1], [2, 5, 1], [3, 3])]
    episodes = [torch.full_like(shots, r) for r, (_, _, shots) in enumerate(shards)]
    total = sum(many_icl_nll(*s, e, reduction=reduction).units for s, e in zip(shards, episodes, strict=True))
    per_rank = [
        many_icl_nll(*s, e, reduction=reduction, denominator=total / 3).loss
        for s, e in zip(shards, episodes, strict=True)
    ]
    union = many_icl_nll(
        *(torch.cat(parts) for parts in zip(*shards, strict=True)), torch.cat(episodes), reduction=reduction
    )
    assert_close(torch.stack(per_rank).mean(), union.loss)


def test_flat_and_batched_inputs_agree():
    logits, targets, shots, episodes = _batch()
    for reduction in REDUCTIONS:
        batched = many_icl_nll(logits, targets, shots, episodes, reduction=reduction)
        flat = many_icl_nll(
            logits.view(-1, 2), targets.view(-1), shots.view(-1), episodes.reshape(-1), reduction=reduction
        )
        assert_close(batched.loss, flat.loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bucket_sums_add_up(reduction):
    logits, targets, shots = _random_episode(list(range(1, 25)))
    out = many_icl_nll(logits, targets, shots, torch.zeros_like(shots), reduction=reduction)
    assert_close(out.bucket_nll_sum.sum(), out.nll_sum)
    assert out.bucket_tokens.sum() == out.num_tokens
    assert (out.bucket_tokens > 0).all()  # 24 shots reach every default bucket


# ---------------------------------------------------------------- gradients and empty selections


def test_gradient_only_at_selected_positions():
    """answer_mean, shots >= 1: d loss / d logits_t = (softmax - onehot) / (|A| * num_answers) for t in answer A, and
    exactly 0 at unsupervised positions and at the supervised but unselected shot-0 positions."""
    logits, targets, shots, episodes = _batch()
    logits.requires_grad_(True)
    many_icl_nll(
        logits, targets, shots, episodes, reduction="answer_mean", supervise="after_m", min_context_shots=1
    ).loss.backward()
    expected = torch.softmax(logits.detach(), -1)
    expected[targets >= 0] -= torch.nn.functional.one_hot(targets[targets >= 0], 2).float()
    answer_length = torch.tensor([[0, 0, 0, 2, 2, 0, 1, 0], [0, 0, 0, 0, 1, 0, 0, 0]])  # (2, 8) 0 = not selected
    expected = expected / (answer_length.clamp(min=1) * 3)[..., None]
    expected[answer_length == 0] = 0
    assert_close(logits.grad, expected)
    assert torch.count_nonzero(logits.grad.abs().sum(-1)) == 4


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["nothing_supervised", "nothing_after_m", "zero_denominator"])
def test_empty_selection_gives_zero_loss_and_zero_gradient(reduction, case):
    logits, targets, shots, episodes = _batch()
    kw = {"reduction": reduction}
    if case == "nothing_supervised":
        targets, shots = torch.full_like(targets, -100), torch.full_like(shots, -1)
    elif case == "nothing_after_m":
        kw.update(supervise="after_m", min_context_shots=10)
    else:
        targets, shots = torch.full_like(targets, -100), torch.full_like(shots, -1)
        kw.update(denominator=0.0)
    logits.requires_grad_(True)
    out = many_icl_nll(logits, targets, shots, episodes, **kw)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad) == 0
    assert out.num_tokens.item() == out.num_answers.item() == out.units.item() == 0
    assert out.bucket_tokens.tolist() == [0, 0, 0, 0]


def test_infinite_nll_at_an_unselected_answer_does_not_leak():
    """An earlier answer the model finds impossible (target logit -inf, nll = inf) is left out by supervise="last":
    loss and gradient stay finite (masking by multiplication would give inf * 0 = NaN)."""
    logits, targets, shots, episodes = _batch()
    logits[0, 1] = torch.tensor([-math.inf, 0.0])  # shot 0 of row 0, target 0
    logits.requires_grad_(True)
    out = many_icl_nll(logits, targets, shots, episodes, supervise="last")
    assert_close(out.loss, torch.tensor(1.5 * LN2))
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_diagnostics_are_detached():
    logits, targets, shots, episodes = _batch()
    logits.requires_grad_(True)
    out = many_icl_nll(logits, targets, shots, episodes, reduction="weighted")
    assert out.loss.requires_grad
    assert not any(t.requires_grad for t in out[1:])


# ---------------------------------------------------------------- alignment (spec P8)


def test_shift_token_field_matches_next_token_targets():
    """A field recorded on input ids, shifted like the labels, marks exactly the positions with supervised targets."""
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]])
    answer_of = torch.tensor([[-1, -1, 0, 0, -1, 1, 1], [-1, 0, -1, -1, 1, 1, -1]])
    labels = ids.where(answer_of >= 0, -100)
    shifted = shift_token_field(answer_of)
    assert shifted.tolist() == [[-1, 0, 0, -1, 1, 1, -1], [0, -1, -1, 1, 1, -1, -1]]
    assert torch.equal(next_token_targets(labels) != -100, shifted >= 0)
    assert shift_token_field(torch.tensor([[1, 2, 3]]), fill=9).tolist() == [[2, 3, 9]]

    logits = torch.randn(2, 7, 30)
    episodes = shift_token_field(torch.arange(2)[:, None].expand(2, 7))
    out = many_icl_nll(logits, next_token_targets(labels), shifted, episodes)
    assert out.num_answers.item() == 4
    assert out.num_tokens.item() == 7
    with pytest.raises(ValueError, match="shift_token_field"):  # unshifted shot_index: off by one
        many_icl_nll(logits, next_token_targets(labels), answer_of, episodes)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reduction": "sum"}, "reduction"),
        ({"supervise": "first"}, "supervise"),
        ({"supervise": "after_m", "min_context_shots": -1}, "min_context_shots"),
        ({"supervise": "all", "min_context_shots": 2}, "after_m"),
        ({"buckets": (1, 5)}, "buckets"),
        ({"buckets": (0, 5, 5)}, "buckets"),
        ({"buckets": ()}, "buckets"),
    ],
)
def test_bad_arguments_raise(change, match):
    with pytest.raises(ValueError, match=match):
        many_icl_nll(*_batch(), **change)


def test_bad_shapes_and_dtypes_raise():
    logits, targets, shots, episodes = _batch()
    with pytest.raises(ValueError, match="logits"):
        many_icl_nll(logits[:, :-1], targets, shots, episodes)
    with pytest.raises(ValueError, match="same shape"):
        many_icl_nll(logits, targets, shots[:, :-1], episodes)
    with pytest.raises(ValueError, match="same shape"):
        many_icl_nll(logits, targets, shots, episodes[:1])
    with pytest.raises(ValueError, match="integer"):
        many_icl_nll(logits, targets, shots.float(), episodes)
    with pytest.raises(ValueError, match="differ"):
        select_answers(shots, episodes[:, :-1])
    with pytest.raises(ValueError, match="buckets"):
        bucket_names((0, 0))
