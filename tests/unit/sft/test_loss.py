import math

import pytest
import torch
from torch.testing import assert_close

from ftmods.sft.loss import sequence_mean_nll, token_mean_nll

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits() -> torch.Tensor:
    """Two rows of three positions over V=2.

    A row [0, 0] gives p = (1/2, 1/2); a row [ln 3, 0] gives p = (3/4, 1/4).
    """
    uniform, skewed = [0.0, 0.0], [LN3, 0.0]
    return torch.tensor([[uniform, skewed, skewed], [skewed, uniform, uniform]])  # (2, 3, 2)


def test_token_mean_by_hand():
    """Row 0 targets (0, 1, ignore): nll = ln 2 and -ln(1/4) = 2 ln 2.
    Row 1 targets (0, ignore, ignore): nll = -ln(3/4) = 2 ln 2 - ln 3.
    Token mean = (ln2 + 2ln2 + 2ln2 - ln3) / 3 = (5 ln2 - ln3) / 3 = 0.78903.
    """
    targets = torch.tensor([[0, 1, -100], [0, -100, -100]])
    out = token_mean_nll(_logits(), targets)
    assert_close(out.loss, torch.tensor((5 * LN2 - LN3) / 3))
    assert_close(out.nll_sum, torch.tensor(5 * LN2 - LN3))
    assert out.num_tokens.item() == 3
    assert out.num_sequences.item() == 2


def test_sequence_mean_by_hand():
    """Same inputs, one sequence per row: row 0 mean = 3 ln2 / 2, row 1 mean = 2 ln2 - ln3.
    Sequence mean = (1.5 ln2 + 2 ln2 - ln3) / 2 = (3.5 ln2 - ln3) / 2 = 0.66378.
    """
    targets = torch.tensor([[0, 1, -100], [0, -100, -100]])
    rows = torch.tensor([[0, 0, 0], [1, 1, 1]])
    out = sequence_mean_nll(_logits(), targets, rows)
    assert_close(out.loss, torch.tensor((3.5 * LN2 - LN3) / 2))
    assert out.num_sequences.item() == 2


def test_sequence_mean_with_packed_segments_and_sparse_ids():
    """One packed row holding two segments (ids 7 and 3, not contiguous): positions (ln2), (2ln2) | (2ln2 - ln3).
    Segment 7 mean = 1.5 ln2, segment 3 mean = 2 ln2 - ln3; same answer as the padded layout above.
    """
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [LN3, 0.0]]])  # (1, 3, 2)
    targets = torch.tensor([[0, 1, 0]])
    segments = torch.tensor([[7, 7, 3]])
    out = sequence_mean_nll(logits, targets, segments)
    assert_close(out.loss, torch.tensor((3.5 * LN2 - LN3) / 2))


def test_uniform_logits_give_log_vocab():
    """Invariant: a uniform prediction over V classes costs ln V per token, whatever the targets."""
    logits = torch.zeros(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    assert_close(token_mean_nll(logits, targets).loss, torch.tensor(math.log(11)))
    ids = torch.arange(3)[:, None].expand(3, 5)
    assert_close(sequence_mean_nll(logits, targets, ids).loss, torch.tensor(math.log(11)))


def test_equal_lengths_make_reductions_agree():
    """Invariant: with the same number of supervised tokens per sequence, token mean == sequence mean."""
    logits = torch.randn(4, 6, 9)
    targets = torch.randint(0, 9, (4, 6))
    targets[:, :2] = -100
    ids = torch.arange(4)[:, None].expand(4, 6)
    assert_close(token_mean_nll(logits, targets).loss, sequence_mean_nll(logits, targets, ids).loss)


def test_gradient_is_softmax_minus_onehot_over_count():
    """d loss / d logits = (softmax - onehot) / N at supervised positions and 0 elsewhere (N = 2 here)."""
    logits = torch.randn(1, 3, 4, requires_grad=True)
    targets = torch.tensor([[2, -100, 0]])
    token_mean_nll(logits, targets).loss.backward()
    expected = torch.softmax(logits.detach(), -1)
    expected[0, 0, 2] -= 1
    expected[0, 2, 0] -= 1
    expected[0, 1] = 0
    assert_close(logits.grad, expected / 2)


def test_nothing_supervised_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.full((2, 3), -100)
    for out in (token_mean_nll(logits, targets), sequence_mean_nll(logits, targets, torch.zeros(2, 3))):
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert torch.count_nonzero(logits.grad) == 0
        assert out.num_tokens.item() == 0


@pytest.mark.parametrize("world", [2, 4])
def test_denominator_override_gives_global_mean(world):
    """Data-parallel normalisation: each rank divides its NLL sum by (global count / world); the average over ranks of
    those losses equals the mean over all tokens of all ranks, although the ranks hold different token counts."""
    torch.manual_seed(world)
    shards = [(torch.randn(1, 5, 7), torch.randint(0, 7, (1, 5))) for _ in range(world)]
    for r, (_, t) in enumerate(shards):
        t[0, : r + 1] = -100  # unequal counts per rank
    total = sum(int((t != -100).sum()) for _, t in shards)
    per_rank = [token_mean_nll(x, t, num_tokens=total / world).loss for x, t in shards]
    everything = token_mean_nll(torch.cat([x for x, _ in shards]), torch.cat([t for _, t in shards])).loss
    assert_close(torch.stack(per_rank).mean(), everything)


def test_flat_and_batched_inputs_agree():
    logits = torch.randn(2, 4, 6)
    targets = torch.randint(0, 6, (2, 4))
    targets[0, 0] = -100
    assert_close(token_mean_nll(logits, targets).loss, token_mean_nll(logits.view(8, 6), targets.view(8)).loss)


def test_grouped_token_nll_sums_and_counts_per_group():
    """Uniform logits over V = 4: every supervised token costs ln 4 = 1.3863. Positions: group 0 has 2 supervised
    tokens (sum 2 ln 4 = 2.7726), group 1 has 1 supervised and 1 ignored (sum ln 4), group 2 none (0, count 0)."""
    import math

    from ftmods.sft.loss import grouped_token_nll

    logits = torch.zeros(1, 4, 4, requires_grad=True)
    targets = torch.tensor([[1, 2, 3, -100]])
    groups = torch.tensor([[0, 0, 1, 1]])
    sums, counts = grouped_token_nll(logits, targets, groups, 3)
    torch.testing.assert_close(sums, torch.tensor([2 * math.log(4), math.log(4), 0.0]))
    assert counts.tolist() == [2.0, 1.0, 0.0]
    sums[1].backward()
    assert logits.grad is not None
    assert logits.grad[0, 3].abs().sum() == 0  # the ignored position gets no gradient
    assert logits.grad[0, :2].abs().sum() == 0  # other groups' positions neither
    assert logits.grad[0, 2].abs().sum() > 0
