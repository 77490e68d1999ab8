import math

import torch
from torch.testing import assert_close

from ftmods.locft.loss import locft_sample_mean_loss, locft_token_mean_loss, prompt_last_loss

LN2, LN3 = math.log(2.0), math.log(3.0)
U, S = [0.0, 0.0], [LN3, 0.0]  # over V=2: uniform p=(1/2, 1/2); skewed p=(3/4, 1/4)


def _batch():
    """Two left-padded edits over V=2 (token ids 0/1), labels aligned with inputs:

    edit 0: positions 0..3, prompt at 0-1, targets at 2 and 3 (ids 1, 0): logits at 1 and 2 predict them.
    edit 1: padding at 0-1, prompt at 2, target at 3 (id 0): logits at 2 predict it.
    """
    logits = torch.tensor([[U, S, S, U], [U, U, S, U]])  # (2, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0], [-100, -100, -100, 0]])
    return logits, labels


def test_sample_mean_by_hand():
    """edit 0: -ln(1/4) = 2 ln2 at pos 1 and -ln(3/4) = 2 ln2 - ln3 at pos 2: mean = 2 ln2 - ln3 / 2.
    edit 1: -ln(3/4) at pos 2 = 2 ln2 - ln3. Sample mean = (4 ln2 - 1.5 ln3) / 2 = 0.56240."""
    out = locft_sample_mean_loss(*_batch())
    assert_close(out.per_sample, torch.tensor([2 * LN2 - LN3 / 2, 2 * LN2 - LN3]))
    assert_close(out.loss, torch.tensor((4 * LN2 - 1.5 * LN3) / 2))
    assert out.num_tokens.item() == 3


def test_token_mean_by_hand():
    """All three target tokens: (2 ln2 + (2 ln2 - ln3) + (2 ln2 - ln3)) / 3 = (6 ln2 - 2 ln3) / 3 = 0.65432."""
    assert_close(locft_token_mean_loss(*_batch()).loss, torch.tensor((6 * LN2 - 2 * LN3) / 3))


def test_prompt_last_by_hand():
    """FT-L: edit 0's last prompt position is 1 (p = 3/4, 1/4): targets 1 and 0 give (2 ln2 + 2 ln2 - ln3) / 2.
    edit 1's last prompt position is 2 (p = 3/4, 1/4): target 0 gives 2 ln2 - ln3."""
    out = prompt_last_loss(*_batch())
    assert_close(out.per_sample, torch.tensor([2 * LN2 - LN3 / 2, 2 * LN2 - LN3]))
    assert_close(out.loss, torch.tensor((4 * LN2 - 1.5 * LN3) / 2))


def test_prompt_last_ignores_later_positions():
    """Changing the logits after the last prompt position changes FT-M's loss but not FT-L's."""
    logits, labels = _batch()
    moved = logits.clone()
    moved[0, 2] = torch.tensor([5.0, -5.0])
    assert_close(prompt_last_loss(moved, labels).loss, prompt_last_loss(logits, labels).loss)
    assert not torch.allclose(locft_sample_mean_loss(moved, labels).loss, locft_sample_mean_loss(logits, labels).loss)


def test_uniform_logits_give_log_vocab_and_empty_edits_are_left_out():
    logits = torch.zeros(3, 5, 7)
    labels = torch.full((3, 5), -100)
    labels[0, 3:] = torch.tensor([1, 2])
    labels[1, 4] = 3  # edit 2 has no target at all
    for fn in (locft_sample_mean_loss, locft_token_mean_loss, prompt_last_loss):
        assert_close(fn(logits, labels).loss, torch.tensor(math.log(7)))


def test_sample_mean_weighs_edits_equally_token_mean_does_not():
    """Edit 0 has 3 target tokens with nll ln2 each, edit 1 one token with nll 0 (a near-certain logit)."""
    logits = torch.zeros(2, 5, 2)
    logits[1, 3] = torch.tensor([50.0, -50.0])
    labels = torch.tensor([[-100, 0, 1, 0, 1], [-100, -100, -100, -100, 0]])
    labels[0, 1] = -100  # edit 0 targets at 2, 3, 4 -> predicted from 1, 2, 3 (uniform: ln2 each)
    assert_close(locft_sample_mean_loss(logits, labels).loss, torch.tensor(LN2 / 2), atol=1e-6, rtol=0)
    assert_close(locft_token_mean_loss(logits, labels).loss, torch.tensor(3 * LN2 / 4), atol=1e-6, rtol=0)
