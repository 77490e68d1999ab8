import math

import pytest
import torch
from torch.testing import assert_close

from ftmods.pso.loss import (
    TIMESTEP_PRESETS,
    denoising_error,
    distilled_timesteps,
    euler_ancestral_step,
    gaussian_logprob,
    online_pso_loss,
    pso_hinge_loss,
    pso_sigmoid_loss,
    renoise_step,
)

LN2 = math.log(2.0)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def _sd_scheduler(cls, **kwargs):
    """A diffusers scheduler with the SD / SDXL scaled-linear betas (spec §2)."""
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kwargs)


# ------------------------------------------------------------------------------------------- denoising error


def test_denoising_error_by_hand_and_fp32():
    """Sample 0: pred - target = (1, 2, 0, -2) -> squares (1, 4, 0, 4), mean 9/4 = 2.25.
    Sample 1: (0.5, 0.5, 0.5, 0.5) -> 0.25 each, mean 0.25. Over (C, H, W) = (1, 2, 2) the mean is the same.
    """
    pred = torch.tensor([[1.0, 2.0, 0.0, -2.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 2, 2)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
    assert_close(denoising_error(pred, target), _t(2.25, 0.25))
    low = denoising_error(pred.bfloat16(), target.bfloat16())
    assert low.dtype == torch.float32
    assert_close(low, _t(2.25, 0.25))  # these values are exact in bf16
    with pytest.raises(ValueError, match="same"):
        denoising_error(pred, target[:1])


def test_denoising_error_gradient_is_2_diff_over_elements():
    """d/dpred mean((pred - target)^2) = 2 (pred - target) / numel per sample (4 elements here)."""
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4)
    denoising_error(pred, target).sum().backward()
    assert_close(pred.grad, 2 * (pred.detach() - target) / 4)


# ------------------------------------------------------------------------------------------- sigmoid loss


def test_sigmoid_loss_by_hand():
    """beta = 2, lambda = 1.
    Pair 0: policy (win 0.25, lose 0.5) -> D_theta = -0.25; reference (0.5, 0.25) -> D_ref = 0.25; logit = 0.5,
            loss = -log sigma(2 * 0.5) = log(1 + e^-1) = 0.313262.
    Pair 1: the errors swapped: logit = -0.5, loss = log(1 + e) = 1.313262 (exactly 1 more: log(1+e) - log(1+1/e) = 1).
    Mean 0.813262; implicit accuracy 1/2; mean logit 0; error means all (0.25 + 0.5) / 2 = 0.375.
    """
    out = pso_sigmoid_loss(_t(0.25, 0.5), _t(0.5, 0.25), _t(0.5, 0.25), _t(0.25, 0.5), beta=2.0)
    assert_close(out.logit, _t(0.5, -0.5))
    assert_close(out.loss, torch.tensor(math.log1p(math.exp(-1)) + 0.5))
    assert_close(out.preference_loss, out.loss)
    assert out.implicit_accuracy.item() == 0.5
    assert out.mean_logit.item() == 0.0
    for err in (out.policy_win_err, out.policy_lose_err, out.ref_win_err, out.ref_lose_err):
        assert_close(err, torch.tensor(0.375))


def test_sigmoid_loss_neg_weight_and_prior_by_hand():
    """lambda = 0.5, beta = 2. Policy (0.25, 0.5): D_theta = 0.25 - 0.25 = 0. Reference (0.5, 0.25):
    D_ref = 0.5 - 0.125 = 0.375. logit = 0.375, preference loss = log(1 + e^-0.75) = 0.386871.
    prior_weight = 0.5 adds 0.5 * e_theta(x-) = 0.25: loss 0.636871.
    """
    args = (_t(0.25), _t(0.5), _t(0.5), _t(0.25))
    out = pso_sigmoid_loss(*args, beta=2.0, neg_weight=0.5, prior_weight=0.5)
    assert_close(out.logit, _t(0.375))
    assert_close(out.preference_loss, torch.tensor(math.log1p(math.exp(-0.75))))
    assert_close(out.loss, torch.tensor(math.log1p(math.exp(-0.75)) + 0.25))


def test_sigmoid_loss_matches_diffusion_dpo_with_half_beta():
    """Diffusion-DPO: -log sigma(-0.5 * beta_dpo * (D_theta - D_ref)); ftmods' beta = beta_dpo / 2 gives the same
    loss."""
    w, lose, rw, rl = (torch.rand(5) for _ in range(4))
    beta_dpo = 5000.0
    model_diff, ref_diff = w - lose, rw - rl
    dpo = -torch.nn.functional.logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff)).mean()
    assert_close(pso_sigmoid_loss(w, lose, rw, rl, beta=beta_dpo / 2).loss, dpo)


@pytest.mark.parametrize("neg_weight", [1.0, 0.1])
def test_policy_equal_to_reference_gives_ln2_and_known_gradient(neg_weight):
    """Invariant (LoRA B = 0 at init): logit exactly 0, loss exactly ln 2, accuracy 0.
    dL/de_w = beta * sigma(-0) / B = beta / (2B) > 0 (a larger win error costs more), dL/de_l = -lambda * beta / (2B).
    """
    win, lose = torch.rand(4), torch.rand(4)
    pw, pl = win.clone().requires_grad_(), lose.clone().requires_grad_()
    out = pso_sigmoid_loss(pw, pl, win, lose, beta=3.0, neg_weight=neg_weight)
    assert torch.equal(out.logit, torch.zeros(4))
    assert out.loss.item() == torch.tensor(LN2).item()
    assert out.implicit_accuracy.item() == 0.0
    out.loss.backward()
    assert_close(pw.grad, torch.full((4,), 3.0 / 8))
    assert_close(pl.grad, torch.full((4,), -neg_weight * 3.0 / 8))


def test_increasing_policy_win_error_increases_loss():
    win, lose, rw, rl = (torch.rand(3) for _ in range(4))
    base = pso_sigmoid_loss(win, lose, rw, rl, beta=5.0).loss
    assert pso_sigmoid_loss(win + 0.01, lose, rw, rl, beta=5.0).loss > base
    assert pso_sigmoid_loss(win, lose + 0.01, rw, rl, beta=5.0).loss < base


def test_swapping_win_and_lose_negates_logit():
    """With lambda = 1, swapping x+ and x- (policy and reference alike) negates each logit; with lambda != 1 it does
    not in general."""
    win, lose, rw, rl = (torch.rand(6) for _ in range(4))
    out = pso_sigmoid_loss(win, lose, rw, rl, beta=2.0)
    swapped = pso_sigmoid_loss(lose, win, rl, rw, beta=2.0)
    assert_close(swapped.logit, -out.logit)
    assert_close(out.implicit_accuracy + swapped.implicit_accuracy, torch.tensor(1.0))
    weighted = pso_sigmoid_loss(win, lose, rw, rl, beta=2.0, neg_weight=0.1)
    assert not torch.allclose(pso_sigmoid_loss(lose, win, rl, rw, beta=2.0, neg_weight=0.1).logit, -weighted.logit)


def test_sigmoid_loss_reference_gets_no_gradient_and_outputs_are_detached():
    win, lose = torch.rand(2, requires_grad=True), torch.rand(2, requires_grad=True)
    rw, rl = torch.rand(2, requires_grad=True), torch.rand(2, requires_grad=True)
    out = pso_sigmoid_loss(win, lose, rw, rl, beta=2.0, prior_weight=0.5)
    out.loss.backward()
    assert rw.grad is None
    assert rl.grad is None
    assert all(not t.requires_grad for t in out[1:] if t is not None)


def test_sigmoid_loss_is_stable_and_fp32_for_large_logits():
    """beta * logit = +-1e4: -log sigma stays finite (0 and 1e4), bf16 errors give an fp32 loss."""
    out = pso_sigmoid_loss(_t(0.0, 1.0), _t(0.0, 0.0), _t(1.0, 0.0), _t(0.0, 0.0), beta=1e4)
    assert_close(out.loss, torch.tensor(5e3))
    low = pso_sigmoid_loss(*(torch.rand(3).bfloat16() for _ in range(4)), beta=2.0)
    assert low.loss.dtype == torch.float32
    assert low.logit.dtype == torch.float32


def test_sigmoid_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        pso_sigmoid_loss(torch.rand(2), torch.rand(3), torch.rand(2), torch.rand(2), beta=1.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        pso_sigmoid_loss(*(torch.rand(2, 1) for _ in range(4)), beta=1.0)


# --------------------------------------------------------------------------------------------- hinge loss


def test_reference_free_hinge_by_hand():
    """pso_db: beta = 5, lambda = 0.1.
    Pair 0: e+ = 0.1, e- = 0.5: D = 0.1 - 0.05 = 0.05, hinge max(0, 1 + 0.25) = 1.25.
    Pair 1: e+ = 0.02, e- = 1.0: D = 0.02 - 0.1 = -0.08, hinge 1 - 0.4 = 0.6.
    Pair 2: e+ = 0, e- = 4: D = -0.4, hinge max(0, 1 - 2) = 0 (large margin).
    Mean (1.25 + 0.6 + 0) / 3 = 0.616667; logit = -D = (-0.05, 0.08, 0.4), accuracy 2/3.
    prior_weight 0.5: + 0.5 * mean(0.5, 1, 4) = 0.916667 -> 1.533333.
    """
    out = pso_hinge_loss(_t(0.1, 0.02, 0.0), _t(0.5, 1.0, 4.0), beta=5.0, prior_weight=0.5)
    assert_close(out.logit, _t(-0.05, 0.08, 0.4))
    assert_close(out.preference_loss, torch.tensor(1.85 / 3))
    assert_close(out.loss, torch.tensor(1.85 / 3 + 0.5 * 5.5 / 3))
    assert_close(out.implicit_accuracy, torch.tensor(2 / 3))
    assert out.ref_win_err is None
    assert out.ref_lose_err is None


def test_hinge_with_reference_by_hand():
    """beta = 2, lambda = 1. Policy (0.25, 0.5): D_theta = -0.25; reference (0.5, 0.25): D_ref = 0.25; logit 0.5,
    hinge max(0, 1 - 2 * 0.5) = 0. Second pair logit -0.5: 1 + 1 = 2. Mean 1 (diffusers' relu(1 - beta * logits))."""
    out = pso_hinge_loss(
        _t(0.25, 0.5), _t(0.5, 0.25), beta=2.0, neg_weight=1.0, ref_win_err=_t(0.5, 0.25), ref_lose_err=_t(0.25, 0.5)
    )
    assert_close(out.logit, _t(0.5, -0.5))
    assert_close(out.loss, torch.tensor(1.0))
    assert_close(out.ref_win_err, torch.tensor(0.375))


def test_hinge_large_margin_gives_zero_loss_and_gradient():
    win = torch.tensor([0.0, 0.01], requires_grad=True)
    lose = torch.tensor([10.0, 20.0], requires_grad=True)
    out = pso_hinge_loss(win, lose, beta=5.0, neg_weight=0.1)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(win.grad) == 0
    assert torch.count_nonzero(lose.grad) == 0


def test_hinge_gradient_inside_margin():
    """Active hinge: d/de+ mean(1 + beta (e+ - lambda e-)) = beta / B, d/de- = -lambda beta / B (B = 2)."""
    win = torch.tensor([0.1, 0.2], requires_grad=True)
    lose = torch.tensor([0.1, 0.2], requires_grad=True)
    pso_hinge_loss(win, lose, beta=5.0, neg_weight=0.1).loss.backward()
    assert_close(win.grad, torch.full((2,), 2.5))
    assert_close(lose.grad, torch.full((2,), -0.25))


def test_hinge_needs_both_reference_errors():
    with pytest.raises(ValueError, match="both"):
        pso_hinge_loss(torch.rand(2), torch.rand(2), beta=1.0, ref_win_err=torch.rand(2))


# ----------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("form", ["float", "scalar", "per_sample", "broadcast", "elementwise"])
def test_gaussian_logprob_matches_torch_normal(form):
    sample, mean = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    full = torch.rand(3, 1, 1, 1).add(0.2).expand(3, 4, 5, 5)
    std = {
        "float": 0.7,
        "scalar": torch.tensor(0.7),
        "per_sample": full[:, 0, 0, 0],
        "broadcast": full[:, :1, :1, :1],
        "elementwise": torch.rand(3, 4, 5, 5) + 0.2,
    }[form]
    scale = full if form in ("per_sample", "broadcast") else torch.as_tensor(std).expand(3, 4, 5, 5)
    expected = torch.distributions.Normal(mean, scale).log_prob(sample).flatten(1).mean(1)
    assert_close(gaussian_logprob(sample, mean, std), expected)


def test_gaussian_logprob_by_hand_and_dtype():
    """x - mu = (0, 2), s = 2: -(0 + 4/8)/2 - ln 2 - 0.5 ln(2 pi) = -0.25 - 0.693147 - 0.918939 = -1.862086."""
    out = gaussian_logprob(torch.tensor([[0.0, 2.0]]).bfloat16(), torch.zeros(1, 2).bfloat16(), 2.0)
    assert out.dtype == torch.float32
    assert_close(out, _t(-0.25 - LN2 - 0.5 * math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="std"):
        gaussian_logprob(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="per sample"):
        gaussian_logprob(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_drawn_sample_reproduces_its_mean_and_logprob():
    """x' = mu + s * z: x' - s * z == mu, and log p(x') = mean(-z^2 / 2) - log s - 0.5 log 2 pi per sample."""
    x, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for mean, std in (euler_ancestral_step(x, eps, 14.6, 4.1), renoise_step(x, eps, 0.05, 0.5)):
        noise = torch.randn(2, 4, 6, 6)
        drawn = mean + std * noise
        assert_close(drawn - std * noise, mean)
        expected = (-noise.square() / 2).flatten(1).mean(1) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        assert_close(gaussian_logprob(drawn, mean, std), expected)


# -------------------------------------------------------------------------------------------- transitions


def test_euler_ancestral_step_by_hand():
    """sigma_f = 2, sigma_n = 1: sigma_up = sqrt(1 * (4 - 1) / 4) = sqrt(3)/2 = 0.866025,
    sigma_down = sqrt(1 - 3/4) = 1/2 (= sigma_n^2 / sigma_f); mu = x + eps (1/2 - 2) = 1 - 1.5 * 0.5 = 0.25.
    Last step (sigma_n = 0): sigma_up = 0 and mu = x - sigma_f eps = x0_hat = 1 - 2 * 0.5 = 0.
    """
    mean, std = euler_ancestral_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 2.0, 1.0)
    assert_close(mean, torch.tensor([[0.25]]))
    assert_close(std, torch.tensor(math.sqrt(3) / 2))
    mean, std = euler_ancestral_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 2.0, 0.0)
    assert_close(mean, torch.tensor([[0.0]]))
    assert std.item() == 0.0


def test_euler_ancestral_step_matches_diffusers():
    """SDXL-Turbo scheduler, 4 trailing steps (sigmas at 999, 749, 499, 249, then 0). diffusers draws
    randn_tensor(shape, generator) = torch.randn(shape, generator) on CPU; the same seed reproduces that draw, so
    prev_sample = mu + sigma_up * noise, and prev_sample - sigma_up * noise = mu. The last step is deterministic."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = _sd_scheduler(EulerAncestralDiscreteScheduler, timestep_spacing="trailing", prediction_type="epsilon")
    scheduler.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.randn(2, 4, 8, 8)
        scheduler.scale_model_input(x, t)
        prev = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        mean, std = euler_ancestral_step(x, eps, scheduler.sigmas[i], scheduler.sigmas[i + 1])
        assert_close(prev - std * noise, mean, rtol=1e-5, atol=1e-5)
        assert_close(prev, mean + std * noise, rtol=1e-5, atol=1e-5)
        assert (std.item() == 0.0) == (i == 3)
        x = prev


def test_euler_ancestral_step_per_sample_sigmas():
    """(B,) sigmas act per sample and give a (B, 1, 1, 1) std, equal to calling each sample alone."""
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, requires_grad=True)
    mean, std = euler_ancestral_step(x, eps, _t(14.6, 4.1), _t(4.1, 1.3))
    assert std.shape == (2, 1, 1, 1)
    for b, (sf, sn) in enumerate(((14.6, 4.1), (4.1, 1.3))):
        m, s = euler_ancestral_step(x[b : b + 1], eps[b : b + 1], sf, sn)
        assert_close(mean[b : b + 1], m)
        assert_close(std[b].squeeze(), s)
    mean.sum().backward()  # differentiable through eps
    assert eps.grad is not None
    low_mean, low_std = euler_ancestral_step(x.bfloat16(), eps.detach().bfloat16(), 2.0, 1.0)
    assert low_mean.dtype == torch.float32
    assert low_std.dtype == torch.float32


def test_renoise_step_by_hand():
    """alpha_bar_f = 0.64 (sqrt 0.8, sqrt(1 - a) = 0.6), alpha_bar_t = 0.36 (sqrt 0.6, std sqrt 0.64 = 0.8).
    x = 1, eps = 0.5: x0_hat = (1 - 0.6 * 0.5) / 0.8 = 0.875, mu = 0.6 * 0.875 = 0.525, std = 0.8.
    v-prediction with v = sqrt(a) eps - sqrt(1 - a) x0 = 0.8 * 0.5 - 0.6 * 0.875 = -0.125: same transition, and
    eps = sqrt(a) v + sqrt(1 - a) x = -0.1 + 0.6 = 0.5 recovers eps.
    """
    x = torch.tensor([[1.0]])
    mean, std = renoise_step(x, torch.tensor([[0.5]]), 0.64, 0.36)
    assert_close(mean, torch.tensor([[0.525]]))
    assert_close(std, torch.tensor(0.8))
    v_mean, v_std = renoise_step(x, torch.tensor([[-0.125]]), 0.64, 0.36, prediction_type="v_prediction")
    assert_close(v_mean, mean)
    assert_close(v_std, std)
    with pytest.raises(ValueError, match="prediction_type"):
        renoise_step(x, x, 0.64, 0.36, prediction_type="sample")  # type: ignore[arg-type]


def test_renoise_v_prediction_equals_eps_conversion():
    """For any v, renoise(v, "v_prediction") == renoise(eps = sqrt(a) v + sqrt(1 - a) x, "epsilon")."""
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a_from, a_to = _t(0.3, 0.05), _t(0.6, 0.3)
    eps = a_from.sqrt().view(2, 1, 1, 1) * v + (1 - a_from).sqrt().view(2, 1, 1, 1) * x
    v_mean, v_std = renoise_step(x, v, a_from, a_to, prediction_type="v_prediction")
    e_mean, e_std = renoise_step(x, eps, a_from, a_to)
    assert_close(v_mean, e_mean, rtol=1e-5, atol=1e-5)
    assert_close(v_std, e_std)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_renoise_step_matches_diffusers_lcm(prediction_type):
    """LCMScheduler, 4 steps (999, 759, 499, 259): prev = sqrt(a_prev) * (c_out x0_hat + c_skip x) + sqrt(1 - a_prev)
    * noise, with c_skip < 3e-9 and c_out = 1 - O(1e-9) at these timesteps; the seeded draw is reproduced as above."""
    from diffusers import LCMScheduler

    scheduler = _sd_scheduler(LCMScheduler, prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(timesteps[:-1]):  # the last step is deterministic
        output = torch.randn(2, 4, 8, 8)
        prev = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        a_from, a_to = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[timesteps[i + 1]]
        mean, std = renoise_step(x, output, a_from, a_to, prediction_type=prediction_type)
        assert_close(prev - std * noise, mean, rtol=1e-5, atol=1e-5)
        x = prev


# -------------------------------------------------------------------------------------------- online loss


def test_online_loss_by_hand():
    """beta = 10, eps = 0.1: log(0.9) = -0.10536, log(1.1) = 0.09531.
    Pair 0: d = (0.05, -0.02), sample 0 preferred, s = (+1, -1): inside 10 * 0.07 = 0.7,
            loss = log(1 + e^-0.7) = 0.403186.
    Pair 1: d = (0.3, 0.0), sample 1 preferred, s = (-1, +1): log r0 clamps to log 1.1, inside = -10 log 1.1,
            loss = log(1 + 1.1^10) = 1.279194.
    Mean 0.841190. Clip fraction 1/4 (one of four ratios). Accuracy 1/2 (pair 1's preferred sample has the smaller
    log-ratio). Margins (0.07, -0.3).
    Gradients (B = 2): pair 0: dL/dd0 = -(1/2) sigma(-0.7) * 10, dL/dd1 = +(1/2) sigma(-0.7) * 10;
    pair 1: d0 clipped -> 0; dL/dd1 = -(1/2) sigma(10 log 1.1) * 10.
    """
    logp = torch.tensor([[0.05, -0.02], [0.3, 0.0]], requires_grad=True)
    out = online_pso_loss(logp, torch.zeros(2, 2), torch.tensor([0, 1]), beta=10.0, ratio_clip=0.1)
    first, second = math.log1p(math.exp(-0.7)), math.log1p(1.1**10)
    assert_close(out.loss, torch.tensor((first + second) / 2))
    assert_close(out.margin, _t(0.07, -0.3))
    assert_close(out.ratio, torch.tensor([[0.05, -0.02], [0.3, 0.0]]).exp())
    assert out.clip_fraction.item() == 0.25
    assert out.accuracy.item() == 0.5
    out.loss.backward()
    g0 = 0.5 * 10 / (1 + math.exp(0.7))  # (1/2) * beta * sigma(-0.7)
    g1 = 0.5 * 10 / (1 + math.exp(-10 * math.log(1.1)))  # (1/2) * beta * sigma(10 log 1.1)
    assert_close(logp.grad, torch.tensor([[-g0, g0], [0.0, -g1]]))


def test_online_loss_sign_labels_equal_index_labels():
    logp, ref = torch.randn(5, 2) * 0.05, torch.randn(5, 2) * 0.05
    index = torch.tensor([0, 1, 1, 0, 1])
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert_close(online_pso_loss(logp, ref, index).loss, online_pso_loss(logp, ref, signs).loss)
    assert_close(online_pso_loss(logp, ref, index.bool()).loss, online_pso_loss(logp, ref, signs).loss)


def test_online_loss_policy_equal_to_reference_is_ln2():
    """d = 0 for both samples: ratio 1, inside 0, loss exactly ln 2 whatever the labels."""
    logp = torch.randn(4, 2)
    out = online_pso_loss(logp, logp.clone(), torch.tensor([0, 1, 0, 1]))
    assert out.loss.item() == torch.tensor(LN2).item()
    assert torch.equal(out.ratio, torch.ones(4, 2))
    assert out.clip_fraction.item() == 0.0
    assert out.accuracy.item() == 0.0


def test_online_loss_tie_is_constant_ln2_with_zero_gradient():
    """Pair 1 is a tie (0, 0): its term is ln 2 and it gets no gradient; pair 0 alone decides accuracy and clipping."""
    logp = torch.tensor([[0.02, -0.01], [0.5, -0.5]], requires_grad=True)
    signs = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    out = online_pso_loss(logp, torch.zeros(2, 2), signs, beta=50.0)
    assert_close(out.loss, torch.tensor((math.log1p(math.exp(-50 * 0.03)) + LN2) / 2))
    out.loss.backward()
    assert torch.count_nonzero(logp.grad[1]) == 0
    assert torch.count_nonzero(logp.grad[0]) == 2
    assert out.accuracy.item() == 1.0
    assert out.clip_fraction.item() == 0.0
    all_tied = online_pso_loss(logp.detach(), torch.zeros(2, 2), torch.zeros(2, 2))
    assert all_tied.loss.item() == torch.tensor(LN2).item()
    assert all_tied.accuracy.item() == 0.0


@pytest.mark.parametrize("delta", [0.2, -0.2, 5.0, -5.0])
def test_online_loss_clipping_zeroes_gradient_outside_band(delta):
    """ratio = e^delta is outside [0.9, 1.1] for every delta here: no gradient to that sample, whichever the label;
    a huge delta (e^5) stays finite."""
    logp = torch.tensor([[delta, 0.01]], requires_grad=True)
    out = online_pso_loss(logp, torch.zeros(1, 2), torch.tensor([0]), beta=50.0, ratio_clip=0.1)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() != 0.0
    assert out.clip_fraction.item() == 0.5
    assert torch.isfinite(out.loss)


def test_online_loss_dtype_and_reference_gradient():
    logp = torch.randn(3, 2).bfloat16().requires_grad_()
    ref = torch.randn(3, 2, requires_grad=True)
    out = online_pso_loss(logp, ref, torch.tensor([0, 1, 0]))
    assert out.loss.dtype == torch.float32
    assert out.ratio.dtype == torch.float32
    out.loss.backward()
    assert ref.grad is None


def test_online_loss_rejects_bad_inputs():
    logp = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="0 .*or 1"):
        online_pso_loss(logp, logp, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        online_pso_loss(logp, logp, torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        online_pso_loss(logp, logp, torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        online_pso_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------ timesteps


def test_distilled_timesteps_match_diffusers_trailing():
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = _sd_scheduler(EulerAncestralDiscreteScheduler, timestep_spacing="trailing")
    for k in range(1, 9):
        scheduler.set_timesteps(k)
        assert distilled_timesteps(k) == [int(t) for t in scheduler.timesteps.tolist()], k
    assert distilled_timesteps(4, 500) == [499, 374, 249, 124]
    with pytest.raises(ValueError, match="num_steps"):
        distilled_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        distilled_timesteps(4, spacing="leading")  # type: ignore[arg-type]


def test_presets():
    """Spec §5: 4-step Turbo / DMD2 / Lightning = [999, 749, 499, 249]; 1-step Turbo = [999]; 8-step DMD2 rollouts
    999, 874, ..., 124 (stride 125); LCM's own 4-step schedule [999, 759, 499, 259]."""
    four = [999, 749, 499, 249]
    for name in ("sdxl-turbo", "sd-turbo", "dmd2", "sdxl-lightning"):
        assert TIMESTEP_PRESETS[name] == four
    assert TIMESTEP_PRESETS["sdxl-turbo-1step"] == [999]
    assert TIMESTEP_PRESETS["dmd2-8step"] == list(range(999, 0, -125))
    assert TIMESTEP_PRESETS["lcm"] == [999, 759, 499, 259]
    for steps in TIMESTEP_PRESETS.values():
        assert all(0 <= t <= 999 for t in steps)
        assert steps == sorted(set(steps), reverse=True)


def test_lcm_preset_matches_lcm_scheduler():
    from diffusers import LCMScheduler

    scheduler = _sd_scheduler(LCMScheduler)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == TIMESTEP_PRESETS["lcm"]


def test_turbo_preset_is_not_the_reference_code_bug():
    """Spec §8.1: the official DreamBooth code computes indices {249, 499, 749, 999} and looks them up in an
    uninitialised EulerDiscreteScheduler, whose timesteps run 999 -> 0, so it trains at {750, 500, 250, 0}."""
    from diffusers import EulerDiscreteScheduler

    buggy = EulerDiscreteScheduler().timesteps[[249, 499, 749, 999]].round().long().tolist()
    assert buggy == [750, 500, 250, 0]
    assert set(TIMESTEP_PRESETS["sdxl-turbo"]) != set(buggy)
    assert 999 in TIMESTEP_PRESETS["sdxl-turbo"]
    assert 0 not in TIMESTEP_PRESETS["sdxl-turbo"]


def test_noised_and_target_by_hand_and_consistent_with_diffusers():
    """a = 0.36: x_t = 0.6 x0 + 0.8 eps; v = 0.6 eps - 0.8 x0. With x0 = 2, eps = -1: x_t = 1.2 - 0.8 = 0.4 and
    v = -0.6 - 1.6 = -2.2; epsilon-prediction's target is eps itself. Both agree with DDPMScheduler's add_noise and
    get_velocity."""
    from diffusers import DDPMScheduler

    from ftmods.pso.loss import noised_and_target

    x0, eps, a = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0), torch.tensor([0.36])
    noisy, v = noised_and_target(x0, eps, a, "v_prediction")
    assert float(noisy) == pytest.approx(0.4)
    assert float(v) == pytest.approx(-2.2)
    assert torch.equal(noised_and_target(x0, eps, a)[1], eps)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([999, 249])
    noisy, v = noised_and_target(latents, noise, scheduler.alphas_cumprod[t], "v_prediction")
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(v, scheduler.get_velocity(latents, noise, t))
    with pytest.raises(ValueError, match="prediction_type"):
        noised_and_target(x0, eps, a, "sample")  # type: ignore[arg-type]
