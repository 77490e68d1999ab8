import math

import pytest
import torch
from torch.testing import assert_close

from ftmods.locft.metrics import (
    ProtocolScores,
    argmax_agreement,
    counterfact_scores,
    exact_match,
    generation_agreement,
    normalize_answer,
    sequence_logprob,
    summarize,
    token_accuracy,
    token_agreement,
    truncate_at_stop,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------------------
# Strings
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),  # lower, punctuation, article, whitespace
        ("U.S.A.", "usa"),  # punctuation removed before anything else
        ("an apple and the pear", "apple and pear"),
        ("theater Anna", "theater anna"),  # articles only as whole words
        ("A", ""),
        ("  Paris\n\tFrance ", "paris france"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("a\nb.c", (".", "\n"), "a"),  # the earliest stop wins, whichever string it is
        ("a.b\nc", (".", "\n"), "a"),
        (" Paris", (".", "\n"), " Paris"),  # no stop: unchanged
        (".x", (".", "\n"), ""),  # stop at position 0: empty answer
        ("yes</s>no", ("</s>",), "yes"),  # multi-character stop strings
        ("abc", ("", "."), "abc"),  # an empty stop string is ignored
    ],
)
def test_truncate_at_stop(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


def test_exact_match_squad_rules_and_several_golds():
    assert exact_match(" The Eiffel Tower.", "eiffel tower")
    assert exact_match("lyon", ["Paris", "Lyon!"])
    assert not exact_match("Paris, France", ["Paris", "Lyon"])  # EM is not containment
    assert not exact_match("", "Paris")
    assert exact_match("the", "")  # both normalise to "" (SQuAD behaviour)


@pytest.mark.parametrize("text", ["Paris", " Robert C", "42", "??"])
def test_exact_match_of_itself_is_true(text):
    """Invariant: a model that outputs exactly the target scores EM 1."""
    assert exact_match(text, text)
    assert exact_match(truncate_at_stop(text + ". More text"), text)


def test_generation_agreement():
    assert_close(generation_agreement([" a", " b", ""], [" a", " c", ""]), torch.tensor([1.0, 0.0, 1.0]))
    assert_close(generation_agreement([[1, 2], torch.tensor([3])], [(1, 2), [4]]), torch.tensor([1.0, 0.0]))
    assert generation_agreement([], []).shape == (0,)
    with pytest.raises(ValueError, match="1 post-edit vs 2 pre-edit"):
        generation_agreement(["a"], ["a", "b"])


def test_generation_agreement_post_equals_pre_is_one():
    """Invariant: an unchanged model reproduces its generations, so WILD locality is 1."""
    texts = [" Paris", "", " 42 is the answer"]
    assert_close(generation_agreement(texts, list(texts)), torch.ones(3))


# ----------------------------------------------------------------------------------------------------------------------
# Teacher forcing
# ----------------------------------------------------------------------------------------------------------------------


def _three_class_logits() -> torch.Tensor:
    """Two rows of four positions over V=3; one-hot-ish logits so the argmax is known.

    row 0 argmax: 2, 0, 1, 1      row 1 argmax: 0, 0, 2, 1
    """
    e = torch.eye(3)
    return torch.stack([torch.stack([e[2], e[0], e[1], e[1]]), torch.stack([e[0], e[0], e[2], e[1]])])  # (2, 4, 3)


def test_token_accuracy_by_hand():
    """labels in the input-id layout; position t predicts labels[t + 1].

    row 0: labels (-100, 0, 2, 1): position 0 predicts 0 (argmax 2, wrong), 1 predicts 2 (argmax 0, wrong),
           2 predicts 1 (argmax 1, right) -> 1/3.
    row 1: labels (-100, -100, 0, 2): position 1 predicts 0 (argmax 0, right), 2 predicts 2 (argmax 2, right) -> 1.
    """
    labels = torch.tensor([[-100, 0, 2, 1], [-100, -100, 0, 2]])
    assert_close(token_accuracy(_three_class_logits(), labels), torch.tensor([1 / 3, 1.0]))


def test_token_accuracy_uses_next_token_alignment():
    """The same argmax read at the label's own position (no shift) would give row 0 = (0, 1, 1) vs labels
    (0, 2, 1) -> 2/3; the shifted convention gives 1/3 (previous test). Guard against an off-by-one."""
    labels = torch.tensor([[-100, 0, 2, 1]])
    acc = token_accuracy(_three_class_logits()[:1], labels)
    assert_close(acc, torch.tensor([1 / 3]))
    assert not torch.allclose(acc, torch.tensor([2 / 3]))


def test_token_accuracy_row_without_targets_is_zero():
    labels = torch.tensor([[-100, -100, -100, -100], [-100, -100, 0, 2]])
    assert_close(token_accuracy(_three_class_logits(), labels), torch.tensor([0.0, 1.0]))


def test_token_accuracy_of_the_argmax_itself_is_one():
    """Invariant: labels equal to the model's own (shifted) argmax give accuracy 1 on every row."""
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), -100)
    labels[:, 1:] = logits.argmax(-1)[:, :-1]
    labels[0, :3] = -100  # a longer prompt on row 0
    assert_close(token_accuracy(logits, labels), torch.ones(3))


def test_argmax_agreement_by_hand():
    """post = the three-class logits; pre = the same with row 0 position 1 flipped to class 1 and row 1
    position 3 flipped to class 0. mask: row 0 positions 0-2, row 1 positions 1-3.
    row 0: agree at 0 and 2, disagree at 1 -> 2/3; row 1: agree at 1 and 2, disagree at 3 -> 2/3.
    """
    post = _three_class_logits()
    pre = post.clone()
    pre[0, 1] = torch.tensor([0.0, 1.0, 0.0])
    pre[1, 3] = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert_close(argmax_agreement(post, pre, mask), torch.tensor([2 / 3, 2 / 3]))
    only_disagreement = torch.tensor([[False, True, False, False], [False, False, False, True]])
    assert_close(argmax_agreement(post, pre, only_disagreement), torch.tensor([0.0, 0.0]))


def test_argmax_agreement_post_equals_pre_is_one():
    """Invariant: the unedited model agrees with itself: EasyEdit locality 1."""
    logits = torch.randn(4, 5, 7)
    mask = torch.rand(4, 5) > 0.3
    mask[:, 0] = True
    assert_close(argmax_agreement(logits, logits.clone(), mask), torch.ones(4))
    ids = logits.argmax(-1)
    assert_close(token_agreement(ids, ids.clone(), mask), torch.ones(4))


# ----------------------------------------------------------------------------------------------------------------------
# CounterFact
# ----------------------------------------------------------------------------------------------------------------------


def _two_class_rows() -> torch.Tensor:
    """Three rows of three positions over V=2. [ln3, 0] -> p = (3/4, 1/4); [0, 0] -> p = (1/2, 1/2)."""
    s, u = [LN3, 0.0], [0.0, 0.0]
    return torch.tensor([[s, s, u], [u, s, u], [u, u, u]])  # (3, 3, 2)


def test_sequence_logprob_by_hand():
    """row 0: labels (-100, 0, 1): log 3/4 (pos 0 -> id 0) + log 1/4 (pos 1 -> id 1) = ln3 - 4 ln2.
    row 1: labels (-100, -100, 0): log 3/4 (pos 1 -> id 0) = ln3 - 2 ln2.
    row 2: labels (-100, 1, 1): 2 log 1/2 = -2 ln2.
    Means: (ln3 - 4 ln2) / 2, ln3 - 2 ln2, -ln2.
    """
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 0], [-100, 1, 1]])
    assert_close(sequence_logprob(_two_class_rows(), labels), torch.tensor([LN3 - 4 * LN2, LN3 - 2 * LN2, -2 * LN2]))
    assert_close(
        sequence_logprob(_two_class_rows(), labels, reduction="mean"),
        torch.tensor([(LN3 - 4 * LN2) / 2, LN3 - 2 * LN2, -LN2]),
    )


def test_sequence_logprob_uniform_is_minus_length_log_vocab():
    """Invariant: a uniform prediction over V classes gives -L ln V for L supervised tokens."""
    labels = torch.randint(0, 9, (3, 7))
    labels[:, :4] = -100  # labels 4..6 are supervised, predicted by positions 3..5
    assert_close(sequence_logprob(torch.zeros(3, 7, 9), labels), torch.full((3,), -3 * math.log(9)))


def test_counterfact_scores_by_hand():
    """P(new) = 1/2, P(true) = 1/4 -> new wins, margin 1/4; reversed inputs -> true wins; a tie -> neither."""
    out = counterfact_scores(torch.tensor([-LN2, -2 * LN2, -LN2]), torch.tensor([-2 * LN2, -LN2, -LN2]))
    assert_close(out.new_beats_true, torch.tensor([1.0, 0.0, 0.0]))
    assert_close(out.true_beats_new, torch.tensor([0.0, 1.0, 0.0]))
    assert_close(out.new_margin, torch.tensor([0.25, -0.25, 0.0]))
    assert_close(out.true_margin, torch.tensor([-0.25, 0.25, 0.0]))


def test_counterfact_sum_and_mean_can_disagree():
    """new = two tokens with p = 3/4 each: joint 9/16 = 0.5625, per-token geometric mean 3/4.
    true = one token with p = 0.7 (logits [ln(7/3), 0]).
    Summed (joint): 0.7 > 0.5625, true wins, margin 0.5625 - 0.7 = -0.1375.
    Mean (ROME): 0.75 > 0.7, new wins, margin 0.05.
    """
    s, t = [LN3, 0.0], [math.log(7 / 3), 0.0]
    logits = torch.tensor([[s, s, s], [t, t, t]])  # (2, 3, 2)
    labels = torch.tensor([[-100, 0, 0], [-100, -100, 0]])
    joint = sequence_logprob(logits, labels)
    out = counterfact_scores(joint[:1], joint[1:])
    assert_close(out.new_beats_true, torch.tensor([0.0]))
    assert_close(out.new_margin, torch.tensor([9 / 16 - 0.7]))
    mean = sequence_logprob(logits, labels, reduction="mean")
    out = counterfact_scores(mean[:1], mean[1:])
    assert_close(out.new_beats_true, torch.tensor([1.0]))
    assert_close(out.new_margin, torch.tensor([0.75 - 0.7]))


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------


def test_summarize_skips_nan():
    out = summarize({"a/x": torch.tensor([1.0, 0.0, 0.5]), "a/y": torch.tensor([NAN, 1.0]), "a/z": torch.tensor([NAN])})
    assert out["a/x"] == pytest.approx(0.5)
    assert out["a/y"] == pytest.approx(1.0)
    assert math.isnan(out["a/z"])


def test_protocol_scores_is_the_exact_mean_over_batches_and_ranks():
    """Two batches on "rank 0", one on "rank 1".

    reliability: 1, 0, 1 (rank 0) and 0.5 (rank 1) -> 2.5 / 4 = 0.625.
    generalization: NaN (skipped) and 1 (rank 0), 0 (rank 1) -> 1 / 2 = 0.5. locality never seen -> NaN.
    ``merge_state`` reduces the states as DDP sync does (sum of totals and counts).
    """
    keys = ["p/reliability", "p/generalization", "p/locality"]
    rank0, rank1 = ProtocolScores(keys), ProtocolScores(keys)
    rank0.update({"p/reliability": torch.tensor([1.0, 0.0]), "p/generalization": torch.tensor([NAN, 1.0])})
    rank0.update({"p/reliability": torch.tensor([1.0])})
    rank1.update({"p/reliability": torch.tensor([0.5]), "p/generalization": torch.tensor([0.0])})
    rank0.merge_state(rank1)
    out = rank0.compute()
    assert out["p/reliability"].item() == pytest.approx(0.625)
    assert out["p/generalization"].item() == pytest.approx(0.5)
    assert math.isnan(out["p/locality"].item())
    rank0.reset()
    rank0.update({"p/locality": torch.tensor([1.0])})
    assert rank0.compute()["p/locality"].item() == 1.0


def test_protocol_scores_matches_summarize():
    scores = {"p/a": torch.rand(7), "p/b": torch.tensor([NAN, 0.25, 1.0, NAN, 0.0, 1.0, 0.5])}
    metric = ProtocolScores(scores)
    metric.update({k: v[:3] for k, v in scores.items()})
    metric.update({k: v[3:] for k, v in scores.items()})
    expected = summarize(scores)
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(expected[key])


def test_protocol_scores_rejects_unknown_and_duplicate_keys():
    with pytest.raises(ValueError, match="duplicate"):
        ProtocolScores(["p/a", "p/a"])
    metric = ProtocolScores(["p/a"])
    with pytest.raises(KeyError, match="p/typo"):
        metric.update({"p/typo": torch.tensor([1.0])})
