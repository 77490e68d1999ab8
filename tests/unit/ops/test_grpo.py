import math

import pytest
import torch
from torch.testing import assert_close

from ftmods.ops.grpo import (
    completion_logprobs,
    completion_mask,
    expand_pixels_per_image,
    group_advantages,
    group_reward_std,
    grpo_loss,
    k3_kl,
    pooled_std,
)

LN2 = math.log(2.0)
EPS = 1e-4

# ---------------------------------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std_by_hand():
    """Group 0 = (2, 0, 1, 1): mean 1, deviations (1, -1, 0, 0), unbiased var = (1 + 1) / (4 - 1) = 2/3,
    std = sqrt(2/3) = 0.81650, so A = +-1 / (0.81650 + 1e-4) = +-1.22460 and 0 for the two ones.
    (The biased std sqrt(1/2) would give 1.41401, so this pins the N - 1 correction.)
    Group 1 = (1, 1, 1, 1): constant, A = 0.
    """
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 1 / (math.sqrt(2 / 3) + EPS)
    assert_close(group_advantages(rewards, 4), torch.tensor([a, -a, 0, 0, 0, 0, 0, 0]))
    assert_close(group_reward_std(rewards, 4), torch.tensor([math.sqrt(2 / 3), 0.0]))


def test_group_advantages_batch_std_by_hand():
    """Same rewards, scale="batch": the baseline is still the group mean (deviations (1, -1, 0, ..., 0)), but the std is
    that of all 8 rewards: mean 1, squared deviations sum to 2, unbiased var = 2/7, std = 0.53452.
    A = +-1 / (0.53452 + 1e-4) = +-1.87047.
    """
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 1 / (math.sqrt(2 / 7) + EPS)
    assert_close(group_advantages(rewards, 4, scale="batch"), torch.tensor([a, -a, 0, 0, 0, 0, 0, 0]))


def test_pooled_std_of_two_ranks_equals_the_std_of_the_whole_batch():
    """Rank 0 holds [2, 0, 1, 1], rank 1 holds [1, 1, 1, 1]: summed, count 8, total 8, total_sq 4 + 0 + 1 + 1 + 4 = 10,
    so var = (10 - 64 / 8) / 7 = 2/7, the batch std of the test above; one value gives 0, not NaN."""
    ranks = [torch.tensor([2.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    count = torch.tensor(8.0)
    total, total_sq = sum(r.sum() for r in ranks), sum((r * r).sum() for r in ranks)
    std = pooled_std(count, total, total_sq)
    assert_close(std, torch.tensor(math.sqrt(2 / 7)))
    assert_close(std, torch.cat(ranks).std())
    assert pooled_std(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(9.0)).item() == 0.0


def test_group_advantages_batch_scale_takes_the_global_std():
    """Rank 0's half of the batch above ([2, 0, 1, 1], local std 0.8165) scaled by the global std sqrt(2/7) gives the
    advantages the whole batch gives its first group: +-1.87047; ``batch_std`` is ignored by the other scales."""
    local = torch.tensor([2.0, 0.0, 1.0, 1.0])
    global_std = torch.tensor(math.sqrt(2 / 7))
    a = 1 / (math.sqrt(2 / 7) + EPS)
    assert_close(group_advantages(local, 4, scale="batch", batch_std=global_std), torch.tensor([a, -a, 0, 0]))
    assert_close(group_advantages(local, 4, scale="group", batch_std=global_std), group_advantages(local, 4))


def test_group_advantages_no_scaling_is_mean_centred():
    """scale="none" (Dr. GRPO): rewards (3, 1 | 0, 2) minus group means 2 and 1 give (1, -1, -1, 1)."""
    out = group_advantages(torch.tensor([3.0, 1.0, 0.0, 2.0]), 2, scale="none")
    assert_close(out, torch.tensor([1.0, -1.0, -1.0, 1.0]))


def test_group_advantages_groups_are_contiguous():
    """repeat_interleave order: (0, 1 | 1, 1) gives a live first group and a dead second one, not the other layout."""
    out = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2)
    a = 0.5 / (math.sqrt(0.5) + EPS)  # deviations +-0.5, unbiased std of (0, 1) = sqrt(1/2)
    assert_close(out, torch.tensor([-a, a, 0.0, 0.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group", [4, 7, 8])
@pytest.mark.parametrize("value", [0.0, 0.1, 0.3, 1.7, 2.9])
def test_constant_group_gives_exactly_zero_advantage(scale, group, value):
    """Invariant: all-equal rewards in a group give A == 0 exactly, whatever the other group holds. In fp32, eight
    copies of 0.1 minus their mean leave a residue of 7e-9 (2.4e-7 for 2.9), which std + eps = 1e-4 would amplify."""
    rewards = torch.tensor([value] * group + [0.0, 1.0] * group)
    out = group_advantages(rewards, group, scale=scale)
    assert torch.equal(out[:group], torch.zeros(group))
    assert out[group:].abs().sum() > 0


def test_group_advantages_integer_rewards_and_group_of_one():
    """Integer rewards become fp32; G = 1 has no spread (std 0, not NaN) and so no advantage."""
    assert group_advantages(torch.tensor([0, 2]), 2).dtype == torch.float32
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))


def test_group_advantages_rejects_bad_layout():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 4, scale="std")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- k3 KL


def test_k3_kl_by_hand():
    """d = ref - logp.  logp = ln 1/2, ref = ln 1/4: d = -ln 2, k3 = 1/2 + ln 2 - 1 = ln 2 - 1/2 = 0.19315.
    logp = ln 1/2, ref = ln 1: d = ln 2, k3 = 2 - ln 2 - 1 = 1 - ln 2 = 0.30685.  Equal: 0.
    """
    logp = torch.log(torch.tensor([0.5, 0.5, 0.3]))
    ref = torch.log(torch.tensor([0.25, 1.0, 0.3]))
    assert_close(k3_kl(logp, ref), torch.tensor([LN2 - 0.5, 1 - LN2, 0.0]))


def test_k3_kl_is_non_negative():
    logp, ref = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (k3_kl(logp, ref) >= 0).all()


# --------------------------------------------------------------------------------------------- masks, log-probs


def test_completion_mask_up_to_and_including_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(ids, 2), expected)
    truncated = completion_mask(ids, 2, mask_truncated=True)
    assert torch.equal(truncated, expected & torch.tensor([[True], [False], [True]]))  # no eos: whole row dropped


def test_completion_mask_with_several_eos_ids():
    """<|im_end|> (2) and <|endoftext|> (9) both end a completion; the earlier one counts."""
    ids = torch.tensor([[5, 9, 2, 7], [5, 6, 2, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(ids, [2, 9]), expected)


def test_completion_logprobs_equals_manual_gather():
    """Position P - 1 + t predicts completion token t: compare with log_softmax over the full sequence and a loop."""
    logits = torch.randn(3, 5 + 4, 11, requires_grad=True)  # P = 5, T = 4
    ids = torch.randint(0, 11, (3, 4))
    out = completion_logprobs(logits, ids, prompt_len=5)
    full = logits.detach().log_softmax(-1)
    manual = torch.tensor([[full[n, 5 - 1 + t, ids[n, t]].item() for t in range(4)] for n in range(3)])
    assert_close(out, manual)
    out.sum().backward()  # differentiable
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[:, :4]) == 0  # prompt positions before P - 1 and the last do not matter
    assert torch.count_nonzero(logits.grad[:, -1]) == 0


def test_completion_logprobs_logits_to_keep_and_temperature():
    """With only the last T + 1 logits kept, prompt_len=1 selects the same rows; temperature divides the logits."""
    logits = torch.randn(2, 6, 7)
    ids = torch.randint(0, 7, (2, 3))
    assert_close(completion_logprobs(logits[:, -4:], ids, 1), completion_logprobs(logits, ids, 3))
    hot = completion_logprobs(logits, ids, 3, temperature=2.0)
    assert_close(hot, completion_logprobs(logits / 2, ids, 3))
    low_precision = completion_logprobs(logits.bfloat16(), ids, 3)
    assert low_precision.dtype == torch.float32
    with pytest.raises(ValueError, match="prompt_len"):
        completion_logprobs(logits, ids, 2)


def test_expand_pixels_per_image_vs_naive_repeat():
    """Two prompts, images of 2 and 3 patches (a0 a1 | b0 b1 b2), G = 2.
    Per image (what generate(num_return_sequences=2) pairs with the rows): a0 a1 a0 a1 b0 b1 b2 b0 b1 b2.
    R1-V's pixel_values.repeat(2, 1): a0 a1 b0 b1 b2 a0 a1 b0 b1 b2, i.e. row 1 would see image b's first patches.
    """
    pixels = torch.tensor([[1.0], [2.0], [10.0], [20.0], [30.0]])
    grid = torch.tensor([[1, 1, 2], [1, 1, 3]])
    out = expand_pixels_per_image(pixels, grid, 2)
    assert out.flatten().tolist() == [1, 2, 1, 2, 10, 20, 30, 10, 20, 30]
    assert not torch.equal(out, pixels.repeat(2, 1))


def test_expand_pixels_single_image_equals_naive_repeat():
    """With one prompt (R1-V's one prompt per device) the naive repeat happens to be right."""
    pixels = torch.randn(6, 4)
    assert torch.equal(expand_pixels_per_image(pixels, torch.tensor([[1, 2, 3]]), 4), pixels.repeat(4, 1))


def test_expand_pixels_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="grid_thw"):
        expand_pixels_per_image(torch.zeros(5, 2), torch.tensor([[1, 2, 2]]), 2)


# ----------------------------------------------------------------------------------------------------- the loss


def _two_rows():
    """N = 2 sequences, T = 3, lengths 2 and 1; logp = ln 1/2 on real tokens, garbage (finite and not) on padding."""
    logp = torch.tensor([[-LN2, -LN2, 50.0], [-LN2, float("nan"), float("inf")]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return logp, mask


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("grpo", {}, 1.0),  # row means -1 and 3, their mean (-1 + 3) / 2
        ("bnpo", {}, 1 / 3),  # token sum (-1 - 1 + 3) = 1 over 3 tokens
        ("dapo", {}, 1 / 3),  # same as bnpo without a global count
        ("dapo", {"num_items": 6.0}, 1 / 6),  # 1 over a global count of 6 tokens
        ("dr_grpo", {"max_completion_length": 4}, 1 / 8),  # 1 / (N * L) = 1 / (2 * 4)
        ("grpo", {"num_items": 4}, 0.5),  # sum of row means 2 over 4 sequences
    ],
)
def test_reductions_by_hand(loss_type, kwargs, expected):
    """A = (1, -3), mu = 1 (ratio 1), no KL: per-token loss = -A, i.e. row 0 = (-1, -1), row 1 = (3)."""
    logp, mask = _two_rows()
    out = grpo_loss(logp, None, None, torch.tensor([1.0, -3.0]), mask, loss_type=loss_type, **kwargs)
    assert_close(out.loss, torch.tensor(expected))
    assert_close(out.policy_loss, torch.tensor(expected))
    assert out.kl.item() == 0.0
    assert out.clip_fraction.item() == 0.0
    assert out.num_tokens.item() == 3
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()  # NaN / inf padding never reaches the gradient
    assert logp.grad[~mask].abs().sum() == 0


def test_grpo_loss_with_kl_by_hand():
    """A = (1, -3), beta = 0.1, ref = ln 1/4 on row 0 (k3 = ln2 - 1/2 per token), ln 1 on row 1 (k3 = 1 - ln2).
    Per-token loss = -A + beta * k3: row 0 = -1 + 0.1 (ln2 - 1/2) twice, row 1 = 3 + 0.1 (1 - ln2).
    grpo: (row mean 0 + row mean 1) / 2 = (2 + 0.1 (ln2 - 1/2 + 1 - ln2)) / 2 = (2 + 0.05) / 2 = 1.025.
    bnpo: (2 (-1 + 0.1 (ln2 - 1/2)) + 3 + 0.1 (1 - ln2)) / 3 = (1 + 0.1 ln2) / 3 = 0.35644.
    kl (token mean): (2 (ln2 - 1/2) + 1 - ln2) / 3 = ln2 / 3 = 0.23105; policy_loss is the beta = 0 value.
    """
    logp, mask = _two_rows()
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.9], [1.0, 0.9, 0.9]]))
    adv = torch.tensor([1.0, -3.0])
    out = grpo_loss(logp, None, ref, adv, mask, beta=0.1)
    assert_close(out.loss, torch.tensor(1.025))
    assert_close(out.policy_loss, torch.tensor(1.0))
    assert_close(out.kl, torch.tensor(LN2 / 3))
    bnpo = grpo_loss(logp, None, ref, adv, mask, beta=0.1, loss_type="bnpo")
    assert_close(bnpo.loss, torch.tensor((1 + 0.1 * LN2) / 3))
    no_kl = grpo_loss(logp, None, ref, adv, mask, beta=0.0)
    assert_close(no_kl.loss, torch.tensor(1.0))  # beta 0: no KL term in the loss ...
    assert_close(no_kl.kl, torch.tensor(LN2 / 3))  # ... but still reported


def test_beta_zero_drops_the_kl_term_even_when_it_overflows():
    """beta = 0 must not compute 0 * KL: a reference 100 nats above the policy gives k3 = exp(100) = inf in fp32, and
    0 * inf = NaN. The loss stays the plain surrogate (A = 1 on one token: loss -1)."""
    logp = torch.tensor([[-100.0]], requires_grad=True)
    out = grpo_loss(logp, None, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), beta=0.0)
    assert out.loss.item() == -1.0
    out.loss.backward()
    assert logp.grad.item() == -1.0


def test_clipping_by_hand():
    """eps = 0.2, old_logp given. Ratios (logp - old_logp = ln ratio):
    row 0, A = +1: 1.5 (> 1.2: clipped to 1.2, no gradient), 1.1 (inside), 0.5 (below the band, but with A > 0 the
    min keeps 0.5 * A: gradient flows).
    row 1, A = -1: 0.5 (min(-0.5, -0.8) = -0.8 clipped, no gradient), 1.5 (min(-1.5, -1.2) = -1.5, flows), 1.0.
    Surrogates: row 0 (1.2, 1.1, 0.5), mean 2.8/3; row 1 (-0.8, -1.5, -1.0), mean -3.3/3.
    grpo loss = -(2.8/3 - 3.3/3) / 2 = 0.5/6 = 0.083333.
    d loss / d logp = -A * ratio / (3 * 2) where unclipped: row 0 (0, -1.1, -0.5)/6, row 1 (0, 1.5, 1.0)/6.
    clip_fraction = 2 of 6 tokens. With epsilon_high = 0.6 the 1.5 of row 0 is inside: 1 of 6.
    """
    old = torch.log(torch.rand(2, 3) + 0.5)
    ratios = torch.tensor([[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]])
    logp = (old + ratios.log()).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)
    out = grpo_loss(logp, old, None, adv, mask, epsilon=0.2)
    assert_close(out.loss, torch.tensor(0.5 / 6))
    assert_close(out.clip_fraction, torch.tensor(2 / 6))
    out.loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, -1.1, -0.5], [0.0, 1.5, 1.0]]) / 6)
    high = grpo_loss(logp, old, None, adv, mask, epsilon=0.2, epsilon_high=0.6)
    assert_close(high.clip_fraction, torch.tensor(1 / 6))
    assert_close(high.loss, torch.tensor(-(3.1 / 3 - 3.3 / 3) / 2))  # row 0 surrogates (1.5, 1.1, 0.5): 0.2/6


def test_constant_groups_give_zero_policy_gradient():
    """Invariant: all-equal rewards in every group => A = 0 exactly => no policy gradient, for any loss_type (TRL
    #3857's dead groups). The ratio is 1 at mu = 1, so the loss is exactly 0 as well."""
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3, 1.7, 1.7, 1.7, 1.7]), 4)
    logp = torch.randn(8, 5, requires_grad=True)
    mask = torch.rand(8, 5) > 0.3
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        logp.grad = None
        out = grpo_loss(logp, None, None, adv, mask, loss_type=loss_type, max_completion_length=5)
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert torch.count_nonzero(logp.grad) == 0


def test_policy_equal_reference_gives_zero_kl_and_zero_kl_gradient():
    """Invariant: logp == ref_logp => k3 = 0 and d k3 / d logp = -(exp(0) - 1) = 0, so with A = 0 nothing moves."""
    ref = torch.randn(4, 6)
    logp = ref.clone().requires_grad_()
    out = grpo_loss(logp, None, ref, torch.zeros(4), torch.ones(4, 6), beta=0.04)
    out.loss.backward()
    assert out.kl.item() == 0.0
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0


def test_kl_gradient_pulls_towards_reference():
    """d k3 / d logp = 1 - exp(ref - logp): positive where the policy is above the reference, so gradient descent
    lowers logp there (beta = 1, A = 0, one token per row, grpo mean over N = 2 rows)."""
    logp = torch.tensor([[0.0], [-2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0], [-1.0]])
    grpo_loss(logp, None, ref, torch.zeros(2), torch.ones(2, 1), beta=1.0).loss.backward()
    assert_close(logp.grad, (1 - torch.exp(ref - logp.detach())) / 2)
    assert logp.grad[0] > 0 > logp.grad[1]


def test_mu_one_gradient_is_reinforce():
    """With old_logp None (ratio exp(logp - sg(logp)) = 1) the grpo gradient is d loss / d logp_it = -A_i / (n_i N)
    on real tokens and 0 on padding; passing old_logp = logp.detach() explicitly gives the same loss and gradient."""
    torch.manual_seed(1)
    logp = torch.randn(6, 7, requires_grad=True)
    mask = completion_mask(torch.randint(0, 5, (6, 7)), 0)
    adv = group_advantages(torch.rand(6), 3)
    grpo_loss(logp, None, None, adv, mask, beta=0.0).loss.backward()
    n = mask.sum(1, keepdim=True).float()
    expected = (-adv.unsqueeze(1) / (n * 6)) * mask
    assert_close(logp.grad, expected)
    explicit = logp.detach().clone().requires_grad_()
    out = grpo_loss(explicit, explicit.detach(), None, adv, mask, beta=0.0)
    out.loss.backward()
    assert_close(explicit.grad, expected)
    assert out.clip_fraction.item() == 0.0


def test_dapo_global_normaliser_matches_one_big_batch():
    """Two ranks with different token counts: each divides its token sum by (global count / world); the mean of the
    per-rank losses (DDP's gradient average) equals the token mean of the concatenated batch."""
    shards = [(torch.randn(2, 4), torch.rand(2, 4) > 0.5, torch.randn(2)) for _ in range(2)]
    shards[0][1][0] = True  # unequal counts, none empty
    total = sum(int(m.sum()) for _, m, _ in shards)
    per_rank = [grpo_loss(lp, None, None, a, m, loss_type="dapo", num_items=total / 2).loss for lp, m, a in shards]
    whole = grpo_loss(
        torch.cat([s[0] for s in shards]),
        None,
        None,
        torch.cat([s[2] for s in shards]),
        torch.cat([s[1] for s in shards]),
        loss_type="bnpo",
    )
    assert_close(torch.stack(per_rank).mean(), whole.loss)


def test_bf16_inputs_give_fp32_loss():
    logp = torch.randn(2, 3).bfloat16().requires_grad_()
    out = grpo_loss(logp, None, logp.detach() - 0.1, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert logp.grad.dtype == torch.bfloat16


def test_empty_mask_gives_zero_loss():
    logp = torch.randn(2, 3, requires_grad=True)
    for loss_type in ("grpo", "bnpo", "dapo"):
        out = grpo_loss(logp, None, logp.detach() + 1, torch.ones(2), torch.zeros(2, 3), loss_type=loss_type)
        assert out.loss.item() == 0.0
        assert out.kl.item() == 0.0


def test_grpo_loss_rejects_bad_inputs():
    logp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, None, None, adv, mask, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, None, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(logp, None, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, None, None, torch.zeros(2, 3), mask)
