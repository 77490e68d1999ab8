"""PSO objectives and few-step sampler transitions as pure tensor functions (spec pso §2, §3, §5).

Conventions:

- ``x⁺`` is the target ("win") sample, ``x⁻`` the reference ("lose") sample: a sample of the distilled model itself
  (offline PSO) or the losing trajectory of an on-policy pair (online PSO).
- A denoising error ``e`` is a per-sample ``(B,)`` mean over all latent elements of the squared error between the
  model output and its target (ε, or the velocity for v-prediction), in fp32 (:func:`denoising_error`).
- ``neg_weight`` is λ (``neg_defactor`` in the official code): the weight of the reference sample's error inside the
  margin, ``Δ = e(x⁺) − λ·e(x⁻)``.
- ``logit = Δ_ref − Δ_θ`` is positive when the policy improved on ``x⁺`` relative to ``x⁻`` more than the frozen
  reference did; ``implicit_accuracy = mean(logit > 0)``.
- **β convention**: ftmods puts ``β·logit`` inside the sigmoid, *without* Diffusion-DPO's factor 0.5 (as the official
  PSO code and diffusers' ``train_diffusion_dpo.py`` do). Diffusion-DPO's inside term is
  ``−0.5·β_dpo·(Δ_θ − Δ_ref) = 0.5·β_dpo·logit``, so its ``β_dpo`` corresponds to ``beta = β_dpo / 2`` here
  (SDXL's β_dpo = 5000 is ``beta=2500``).

Online PSO scores stochastic transitions ``x → x'`` of the distilled sampler, each Gaussian ``N(μ_θ(x), s²·I)``:
:func:`euler_ancestral_step` (SDXL-Turbo) and :func:`renoise_step` (DMD2, LCM) give ``(μ, s)``,
:func:`gaussian_logprob` the per-sample log-density, :func:`online_pso_loss` the clipped pairwise loss.

References: Miao et al., "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization" (arXiv
2410.03190); Diffusion-DPO (Wallace et al., arXiv 2311.12908); D3PO (Yang et al., arXiv 2311.13231).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------- offline losses


def noised_and_target(
    latents: Tensor, noise: Tensor, alpha_bar: Tensor, prediction_type: PredictionType = "epsilon"
) -> tuple[Tensor, Tensor]:
    """The VP forward process and the UNet's regression target at the same timestep.

    ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` (which is also the Euler schedulers' scaled input ``x / sqrt(s^2 + 1)``),
    and the target ``eps`` (epsilon-prediction) or ``v = sqrt(a) eps - sqrt(1 - a) x_0`` (v-prediction).

    Args:
        latents: ``(B, C, h, w)`` clean latents ``x_0``.
        noise: ``(B, C, h, w)`` ``eps``.
        alpha_bar: ``(B,)`` cumulative alpha of each sample's timestep.
        prediction_type: What the UNet predicts.

    Returns:
        ``(x_t, target)``, both ``(B, C, h, w)`` in the latents' dtype.

    Example:
        >>> x, target = noised_and_target(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0.64]),
        ...                               "v_prediction")
        >>> round(float(x), 4), round(float(target), 4)  # 0.8 * 1 + 0.6 * 0, 0.8 * 0 - 0.6 * 1
        (0.8, -0.6)
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    a = alpha_bar.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))  # (B, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if prediction_type == "v_prediction" else noise
    return noisy, target


def denoising_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch elements, in fp32.

    Args:
        pred: ``(B, ...)`` model output (ε̂, or v̂ for v-prediction), any float dtype.
        target: ``(B, ...)`` its target (the noise ε, or the velocity), the same shape.

    Returns:
        ``(B,)`` fp32; differentiable through ``pred``.

    Raises:
        ValueError: If the shapes differ (no silent broadcasting).

    Example:
        >>> denoising_error(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]]))
        tensor([2.5000, 5.0000])
    """
    if pred.shape != target.shape or pred.dim() < 1:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same (B, ...) shape")
    squared = (pred.float() - target.float()).square()  # (B, ...)
    return squared.reshape(pred.shape[0], -1).mean(1)  # (B,)


class PSOLossOutput(NamedTuple):
    """Loss and detached diagnostics of :func:`pso_sigmoid_loss` and :func:`pso_hinge_loss`."""

    loss: Tensor
    """() preference loss plus ``prior_weight * policy_lose_err``; differentiable."""
    preference_loss: Tensor
    """() the preference (sigmoid or hinge) part alone; detached."""
    logit: Tensor
    """(B,) ``Δ_ref − Δ_θ`` (``−Δ_θ`` without a reference); detached."""
    implicit_accuracy: Tensor
    """() ``mean(logit > 0)``; detached."""
    mean_logit: Tensor
    """() ``mean(logit)``; detached."""
    policy_win_err: Tensor
    """() batch mean of ``e_θ(x⁺)``; detached."""
    policy_lose_err: Tensor
    """() batch mean of ``e_θ(x⁻)``; detached."""
    ref_win_err: Tensor | None
    """() batch mean of ``e_ref(x⁺)``; detached; None for the reference-free hinge."""
    ref_lose_err: Tensor | None
    """() batch mean of ``e_ref(x⁻)``; detached; None for the reference-free hinge."""


def _check_errors(first: Tensor, *others: Tensor | None) -> None:
    if first.dim() != 1 or any(e is not None and e.shape != first.shape for e in others):
        shapes = [tuple(first.shape)] + [None if e is None else tuple(e.shape) for e in others]
        raise ValueError(f"denoising errors must all be (B,) of the same size, got {shapes}")


def _output(
    preference: Tensor,
    logit: Tensor,
    policy_win: Tensor,
    policy_lose: Tensor,
    ref_win: Tensor | None,
    ref_lose: Tensor | None,
    prior_weight: float,
) -> PSOLossOutput:
    loss = preference + prior_weight * policy_lose.mean() if prior_weight else preference  # ()
    logit = logit.detach()  # (B,)
    return PSOLossOutput(
        loss=loss,
        preference_loss=preference.detach(),
        logit=logit,
        implicit_accuracy=(logit > 0).float().mean(),
        mean_logit=logit.mean(),
        policy_win_err=policy_win.detach().mean(),
        policy_lose_err=policy_lose.detach().mean(),
        ref_win_err=None if ref_win is None else ref_win.detach().mean(),
        ref_lose_err=None if ref_lose is None else ref_lose.detach().mean(),
    )


def pso_sigmoid_loss(
    policy_win_err: Tensor,
    policy_lose_err: Tensor,
    ref_win_err: Tensor,
    ref_lose_err: Tensor,
    *,
    beta: float,
    neg_weight: float = 1.0,
    prior_weight: float = 0.0,
) -> PSOLossOutput:
    """Offline PSO (spec §3.2): Diffusion-DPO's sigmoid loss on the distilled timesteps, with a λ-weighted loser.

    With all four errors taken at the same ``(t, ε)`` per pair::

        Δ_θ   = e_θ(x⁺) − λ·e_θ(x⁻)
        Δ_ref = e_ref(x⁺) − λ·e_ref(x⁻)
        logit = Δ_ref − Δ_θ
        loss  = −mean_B log σ(β·logit) + prior_weight·mean_B e_θ(x⁻)

    β multiplies the logit directly: Diffusion-DPO's ``β_dpo`` (inside term ``0.5·β_dpo·logit``) is
    ``beta = β_dpo / 2`` here (module docstring). ``neg_weight=1`` is Diffusion-DPO with the loser replaced by the
    model's own sample. ``prior_weight`` adds the self-sample prior term of the official DreamBooth scripts (0.5 there),
    which keeps the model able to denoise its own outputs. With ``policy == reference`` (LoRA B zero at init) the
    logit is exactly 0 and the preference loss exactly ``ln 2``.

    Args:
        policy_win_err: ``(B,)`` ``e_θ(x⁺)``, differentiable.
        policy_lose_err: ``(B,)`` ``e_θ(x⁻)``, differentiable.
        ref_win_err: ``(B,)`` ``e_ref(x⁺)`` of the frozen initial model (no grad needed).
        ref_lose_err: ``(B,)`` ``e_ref(x⁻)``.
        beta: β > 0; scale of the logit (see above).
        neg_weight: λ, the weight of the ``x⁻`` error inside each margin.
        prior_weight: Weight of the prior term ``mean e_θ(x⁻)``; 0 disables it.

    Returns:
        The fp32 loss and detached diagnostics.

    Raises:
        ValueError: If the errors are not four ``(B,)`` tensors of the same size.

    Example:
        >>> out = pso_sigmoid_loss(torch.tensor([0.25]), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.25]),
        ...                        beta=2.0)
        >>> out.logit, out.loss  # Δ_θ = -0.25, Δ_ref = 0.25: logit 0.5, loss = -log σ(1) = log(1 + e^-1)
        (tensor([0.5000]), tensor(0.3133))
    """
    _check_errors(policy_win_err, policy_lose_err, ref_win_err, ref_lose_err)
    win, lose = policy_win_err.float(), policy_lose_err.float()  # (B,), (B,)
    ref_win, ref_lose = ref_win_err.float().detach(), ref_lose_err.float().detach()  # (B,), (B,)
    logit = (ref_win - neg_weight * ref_lose) - (win - neg_weight * lose)  # (B,)
    preference = -F.logsigmoid(beta * logit).mean()  # ()
    return _output(preference, logit, win, lose, ref_win, ref_lose, prior_weight)


def pso_hinge_loss(
    policy_win_err: Tensor,
    policy_lose_err: Tensor,
    *,
    beta: float,
    neg_weight: float = 0.1,
    ref_win_err: Tensor | None = None,
    ref_lose_err: Tensor | None = None,
    prior_weight: float = 0.0,
) -> PSOLossOutput:
    """Hinge PSO; without reference errors it is the reference-free ``pso_db`` loss of the DreamBooth scripts.

    ::

        logit = Δ_ref − Δ_θ              (Δ_ref = 0 when no reference errors are given)
        loss  = mean_B max(0, 1 − β·logit) + prior_weight·mean_B e_θ(x⁻)

    Without a reference this is ``mean max(0, 1 + β·(e_θ(x⁺) − λ·e_θ(x⁻)))`` (spec §3.2; the released scripts use
    β = 5, λ = 0.1, ``prior_weight`` 0.5) and needs no reference forward pass. With reference errors it is the hinge on
    the reference-relative margin, diffusers' ``train_diffusion_dpo.py --loss_type hinge``. A pair with
    ``β·logit ≥ 1`` contributes 0 and no gradient. ``implicit_accuracy`` without a reference is the fraction of pairs
    with ``e_θ(x⁺) < λ·e_θ(x⁻)``.

    Args:
        policy_win_err: ``(B,)`` ``e_θ(x⁺)``, differentiable.
        policy_lose_err: ``(B,)`` ``e_θ(x⁻)``, differentiable.
        beta: β > 0.
        neg_weight: λ (the DreamBooth scripts' ``neg_defactor`` 0.1 by default).
        ref_win_err: ``(B,)`` ``e_ref(x⁺)``, or None (then ``ref_lose_err`` must be None too).
        ref_lose_err: ``(B,)`` ``e_ref(x⁻)``, or None.
        prior_weight: Weight of the prior term ``mean e_θ(x⁻)``; 0 disables it.

    Returns:
        The fp32 loss and detached diagnostics (``ref_*_err`` None without a reference).

    Raises:
        ValueError: On mismatched shapes or only one of the two reference errors.

    Example:
        >>> out = pso_hinge_loss(torch.tensor([0.1, 0.0]), torch.tensor([0.5, 4.0]), beta=5.0, neg_weight=0.1)
        >>> out.loss  # Δ_θ = 0.05 -> 1 + 0.25 = 1.25; Δ_θ = -0.4 -> max(0, 1 - 2) = 0; mean 0.625
        tensor(0.6250)
    """
    if (ref_win_err is None) != (ref_lose_err is None):
        raise ValueError("pass both ref_win_err and ref_lose_err, or neither")
    _check_errors(policy_win_err, policy_lose_err, ref_win_err, ref_lose_err)
    win, lose = policy_win_err.float(), policy_lose_err.float()  # (B,), (B,)
    logit = -(win - neg_weight * lose)  # (B,)
    ref_win = ref_lose = None
    if ref_win_err is not None and ref_lose_err is not None:
        ref_win, ref_lose = ref_win_err.float().detach(), ref_lose_err.float().detach()  # (B,), (B,)
        logit = logit + (ref_win - neg_weight * ref_lose)  # (B,)
    preference = F.relu(1 - beta * logit).mean()  # ()
    return _output(preference, logit, win, lose, ref_win, ref_lose, prior_weight)


# ----------------------------------------------------------------------------------------- sampler transitions


def _per_sample(value: float | Tensor, sample: Tensor) -> Tensor:
    """A float, ``()``, ``(B,)`` or broadcastable value as fp32 next to ``sample``; ``(B,)`` -> ``(B, 1, ..)``."""
    out = torch.as_tensor(value, dtype=torch.float32, device=sample.device)
    if out.dim() == 1 and sample.dim() > 1:
        if out.shape[0] != sample.shape[0]:
            raise ValueError(f"a 1-D value must be per sample ({sample.shape[0]},), got {tuple(out.shape)}")
        out = out.view(-1, *([1] * (sample.dim() - 1)))  # (B, 1, ..., 1)
    return out


def gaussian_logprob(sample: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """Per-sample log-density of ``sample`` under ``N(mean, std²·I)``, averaged (not summed) over elements, in fp32.

    ``mean_elements[−(x − μ)²/(2s²) − log s − ½ log 2π]``, as D3PO and the official PSO code compute it. The mean
    (rather than the sum) over elements keeps the log-ratios of a 128×128×4 latent in the range where PSO's β = 50
    and ratio clip 0.1 were tuned.

    Args:
        sample: ``(B, ...)`` the drawn next state ``x'``.
        mean: ``(B, ...)`` the transition mean μ (differentiable for the policy).
        std: s > 0: a float, a ``()`` or per-sample ``(B,)`` tensor, or a tensor broadcastable against ``sample``
            (e.g. the ``(B, 1, 1, 1)`` std returned by :func:`euler_ancestral_step`). A deterministic transition
            (s = 0, e.g. the last sampler step) has no density.

    Returns:
        ``(B,)`` fp32.

    Raises:
        ValueError: If ``std`` is a number ≤ 0, or a 1-D ``std`` does not have ``B`` entries.

    Example:
        >>> gaussian_logprob(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 0.0]]), 2.0)  # -(0 + 1/2)/2 - ln 2 - 0.919
        tensor([-1.8621])
    """
    if isinstance(std, (int, float)) and std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    x = sample.float()  # (B, ...)
    s = _per_sample(std, x)  # () | (B, 1, ..., 1) | broadcastable
    logp = -(x - mean.float()).square() / (2 * s.square()) - torch.log(s) - _HALF_LOG_2PI  # (B, ...)
    return logp.reshape(x.shape[0], -1).mean(1)  # (B,)


def euler_ancestral_step(
    sample: Tensor, eps: Tensor, sigma_from: float | Tensor, sigma_to: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and std of one Euler-ancestral transition (SDXL-Turbo's sampler, Karras σ, ε-prediction; spec §3.3b).

    As diffusers' ``EulerAncestralDiscreteScheduler.step`` with ``eta = 1``::

        σ_up   = sqrt(σ_n²·(σ_f² − σ_n²) / σ_f²)
        σ_down = sqrt(σ_n² − σ_up²) = σ_n² / σ_f
        μ      = x + ε̂·(σ_down − σ_f)         (x̂_0 = x − σ_f·ε̂, then an Euler step to σ_down)
        x'     ~ N(μ, σ_up²·I)

    ``x`` is the *unscaled* latent (the UNet sees ``x / sqrt(σ_f² + 1)``, the caller's business). The last step
    (σ_n = 0) gives σ_up = 0 and ``μ = x̂_0``: deterministic, with no transition density to train on.

    Args:
        sample: ``(B, ...)`` the current latent ``x`` at σ_f.
        eps: ``(B, ...)`` the model's ε prediction (differentiable for the policy).
        sigma_from: σ_f > 0: a float, a ``()`` or ``(B,)`` tensor (e.g. ``scheduler.sigmas[i]``).
        sigma_to: σ_n with 0 ≤ σ_n ≤ σ_f, same forms.

    Returns:
        ``mean`` ``(B, ...)`` fp32 and ``std`` fp32, ``()`` or ``(B, 1, ..., 1)`` (broadcastable against ``sample``).

    Example:
        >>> mean, std = euler_ancestral_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 2.0, 1.0)
        >>> mean, std  # σ_up = sqrt(1 * 3 / 4) = 0.866, σ_down = 1/2: μ = 1 + 0.5 * (0.5 - 2) = 0.25
        (tensor([[0.2500]]), tensor(0.8660))
    """
    x = sample.float()  # (B, ...)
    sigma_f, sigma_n = _per_sample(sigma_from, x), _per_sample(sigma_to, x)  # () | (B, 1, ..., 1)
    sigma_down = sigma_n.square() / sigma_f  # () | (B, 1, ..., 1)
    sigma_up = (sigma_n.square() - sigma_down.square()).clamp(min=0).sqrt()  # () | (B, 1, ..., 1)
    mean = x + eps.float() * (sigma_down - sigma_f)  # (B, ...)
    return mean, sigma_up


def renoise_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_bar_from: float | Tensor,
    alpha_bar_to: float | Tensor,
    *,
    prediction_type: PredictionType = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Mean and std of one re-noising ("consistency") transition of DMD2 / LCM sampling (spec §3.3a).

    In the VP parameterization ``x = sqrt(ᾱ)·x_0 + sqrt(1 − ᾱ)·ε``::

        x̂_0 = (x − sqrt(1 − ᾱ_f)·ε̂) / sqrt(ᾱ_f)
        μ   = sqrt(ᾱ_t)·x̂_0,  std = sqrt(1 − ᾱ_t)
        x'  ~ N(μ, std²·I)

    For ``prediction_type="v_prediction"`` the output is a velocity ``v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0``; it is the
    same as passing ``ε̂ = sqrt(ᾱ_f)·v̂ + sqrt(1 − ᾱ_f)·x``, and equivalently ``x̂_0 = sqrt(ᾱ_f)·x − sqrt(1 − ᾱ_f)·v̂``
    (the form used here, exact in fp32 even where ``ᾱ_f`` is small). This is LCMScheduler's step without its boundary
    scalings (``c_skip`` < 1e-8 at the distilled timesteps). The last step outputs ``x̂_0`` deterministically and has
    no transition density.

    Args:
        sample: ``(B, ...)`` the current latent ``x`` at timestep ``τ_k``.
        model_output: ``(B, ...)`` ε̂ (or v̂), differentiable for the policy.
        alpha_bar_from: ``ᾱ`` at ``τ_k`` (``scheduler.alphas_cumprod[τ_k]``): a float, ``()`` or ``(B,)`` tensor.
        alpha_bar_to: ``ᾱ`` at ``τ_{k+1}``, same forms; < 1 for a stochastic step.
        prediction_type: What the model predicts.

    Returns:
        ``mean`` ``(B, ...)`` fp32 and ``std`` fp32, ``()`` or ``(B, 1, ..., 1)``.

    Raises:
        ValueError: On an unknown ``prediction_type``.

    Example:
        >>> mean, std = renoise_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.64, 0.36)
        >>> mean, std  # x̂_0 = (1 - 0.6 * 0.5) / 0.8 = 0.875; μ = 0.6 * 0.875 = 0.525; std = 0.8
        (tensor([[0.5250]]), tensor(0.8000))
    """
    x = sample.float()  # (B, ...)
    output = model_output.float()  # (B, ...)
    a_from, a_to = _per_sample(alpha_bar_from, x), _per_sample(alpha_bar_to, x)  # () | (B, 1, ..., 1)
    if prediction_type == "epsilon":
        x0 = (x - (1 - a_from).sqrt() * output) / a_from.sqrt()  # (B, ...)
    elif prediction_type == "v_prediction":
        x0 = a_from.sqrt() * x - (1 - a_from).sqrt() * output  # (B, ...)
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return a_to.sqrt() * x0, (1 - a_to).sqrt()  # (B, ...), () | (B, 1, ..., 1)


# -------------------------------------------------------------------------------------------------- online loss


class OnlinePSOLossOutput(NamedTuple):
    """Loss and detached diagnostics of :func:`online_pso_loss`."""

    loss: Tensor
    """() ``−mean log σ(β·(s_0 log r_0 + s_1 log r_1))``; differentiable."""
    margin: Tensor
    """(B,) unclipped ``s_0·d_0 + s_1·d_1`` (preferred minus other log-ratio; 0 for ties); detached."""
    ratio: Tensor
    """(B, 2) unclipped ``exp(logp_policy − logp_ref)``; detached."""
    clip_fraction: Tensor
    """() fraction of the ratios of non-tied pairs outside ``[1 − ratio_clip, 1 + ratio_clip]`` (gradient stopped)."""
    accuracy: Tensor
    """() fraction of non-tied pairs whose preferred sample has the larger log-ratio (0 if all tie); detached."""


def _preference_signs(preferred: Tensor, batch: int) -> Tensor:
    if preferred.is_floating_point():
        if preferred.shape != (batch, 2):
            raise ValueError(f"float preferred must be (B, 2) = ({batch}, 2) signs, got {tuple(preferred.shape)}")
        return preferred.float()  # (B, 2)
    if preferred.shape != (batch,):
        raise ValueError(f"integer preferred must be (B,) = ({batch},), got {tuple(preferred.shape)}")
    index = preferred.long()  # (B,)
    if ((index != 0) & (index != 1)).any():
        raise ValueError("integer preferred must hold 0 (sample 0 wins) or 1 (sample 1 wins)")
    first = 1.0 - 2.0 * index.float()  # (B,) +1 if sample 0 wins, -1 otherwise
    return torch.stack([first, -first], dim=1)  # (B, 2)


def online_pso_loss(
    logp_policy: Tensor, logp_ref: Tensor, preferred: Tensor, *, beta: float = 50.0, ratio_clip: float = 0.1
) -> OnlinePSOLossOutput:
    """Online PSO (spec §3.3): D3PO's clipped pairwise loss on one transition of each of ``B`` on-policy pairs.

    With ``d_i = logp_policy_i − logp_ref_i`` for the two samples ``i ∈ {0, 1}`` of a pair and signs ``(s_0, s_1)``
    of ``(+1, −1)`` when sample 0 is preferred, ``(−1, +1)`` when sample 1 is, ``(0, 0)`` for a tie::

        r_i  = clamp(exp(d_i), 1 − ε, 1 + ε)
        loss = −mean_B log σ(β·(s_0·log r_0 + s_1·log r_1))

    ``log r`` is computed as ``clamp(d, log(1 − ε), log(1 + ε))``, the same value and gradient without overflow.
    The clamp stops the gradient of a sample once its ratio leaves the trust region. A tie contributes the constant
    ``ln 2`` with zero gradient (the DMD2 script's strict Pareto labels); so does every pair when ``policy ==
    reference``. Gradients of all trained transitions are accumulated by the caller.

    Args:
        logp_policy: ``(B, 2)`` :func:`gaussian_logprob` of the two samples' transitions under the policy
            (differentiable).
        logp_ref: ``(B, 2)`` the same under the frozen reference (no grad needed).
        preferred: ``(B,)`` integer (or bool) index of the preferred sample, or ``(B, 2)`` float signs
            (``(+1, −1)``, ``(−1, +1)``, ``(0, 0)`` for a tie).
        beta: β (50 in the released online scripts).
        ratio_clip: ε of the ratio clamp (0.1 in the released scripts).

    Returns:
        The fp32 loss and detached diagnostics.

    Raises:
        ValueError: On mismatched shapes or integer labels outside {0, 1}.

    Example:
        >>> logp = torch.tensor([[-1.00, -1.02]])
        >>> out = online_pso_loss(logp, torch.tensor([[-1.05, -1.00]]), torch.tensor([0]), beta=10.0)
        >>> out.loss  # d = (0.05, -0.02), s = (+1, -1): -log σ(10 * 0.07) = log(1 + e^-0.7)
        tensor(0.4032)
    """
    if logp_policy.dim() != 2 or logp_policy.shape[1] != 2 or logp_ref.shape != logp_policy.shape:
        raise ValueError(f"logp_policy {tuple(logp_policy.shape)} and logp_ref {tuple(logp_ref.shape)} must be (B, 2)")
    signs = _preference_signs(preferred.to(logp_policy.device), logp_policy.shape[0])  # (B, 2)
    log_ratio = logp_policy.float() - logp_ref.float().detach()  # (B, 2)
    clipped = log_ratio.clamp(math.log1p(-ratio_clip), math.log1p(ratio_clip))  # (B, 2) log r
    loss = -F.logsigmoid(beta * (signs * clipped).sum(1)).mean()  # ()
    log_ratio = log_ratio.detach()  # (B, 2)
    margin = (signs * log_ratio).sum(1)  # (B,)
    decided = signs.ne(0).any(1)  # (B,)
    outside = (log_ratio != clipped.detach()) & signs.ne(0)  # (B, 2)
    return OnlinePSOLossOutput(
        loss=loss,
        margin=margin,
        ratio=log_ratio.exp(),
        clip_fraction=outside.sum() / signs.ne(0).sum().clamp(min=1),
        accuracy=((margin > 0) & decided).sum() / decided.sum().clamp(min=1),
    )


# ---------------------------------------------------------------------------------------- distilled timesteps


def distilled_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, *, spacing: Literal["trailing"] = "trailing"
) -> list[int]:
    """The ``K`` timesteps a few-step sampler visits, descending, as diffusers' ``timestep_spacing="trailing"``.

    ``round(N − k·N/K) − 1`` for ``k = 0..K−1``: always starts at ``N − 1`` (999), as SDXL-Turbo, SDXL-Lightning and
    DMD2 sample. Offline PSO draws its training ``t`` uniformly from this set. (The official DreamBooth code indexes
    an uninitialised scheduler and trains at {750, 500, 250, 0} instead, spec §8.1.) LCM's own schedule differs: use
    ``TIMESTEP_PRESETS["lcm"]``.

    Args:
        num_steps: ``K``, 1 ≤ K ≤ ``num_train_timesteps``.
        num_train_timesteps: ``N``, the length of the training schedule.
        spacing: Only ``"trailing"`` (the few-step models' spacing).

    Returns:
        ``K`` distinct integer timesteps in ``[0, N − 1]``, descending.

    Raises:
        ValueError: On an out-of-range ``num_steps`` or another ``spacing``.

    Example:
        >>> distilled_timesteps(4), distilled_timesteps(1), distilled_timesteps(3)
        ([999, 749, 499, 249], [999], [999, 666, 332])
    """
    if spacing != "trailing":
        raise ValueError(f"spacing must be 'trailing', got {spacing!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return [round(num_train_timesteps - k * ratio) - 1 for k in range(num_steps)]


TIMESTEP_PRESETS: dict[str, list[int]] = {
    "sdxl-turbo": distilled_timesteps(4),
    "sd-turbo": distilled_timesteps(4),
    "sdxl-turbo-1step": distilled_timesteps(1),
    "dmd2": distilled_timesteps(4),
    "dmd2-8step": distilled_timesteps(8),
    "lcm": [999, 759, 499, 259],
    "sdxl-lightning": distilled_timesteps(4),
}
"""Distilled timestep sets per base model (spec §5), descending: Euler(-ancestral) trailing for Turbo / Lightning,
the explicit ``[999, 749, 499, 249]`` of DMD2 (8-step rollouts: ``999, 874, ..., 124``), LCMScheduler's 4-step schedule
(``original_inference_steps=50``) for LCM."""
