"""PSO: pairwise sample optimization for timestep-distilled diffusion models.

"Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization", arXiv:2410.03190
(https://arxiv.org/abs/2410.03190), ICLR 2025.
"""

from ftmods.pso.loss import (
    TIMESTEP_PRESETS,
    OnlinePSOLossOutput,
    PSOLossOutput,
    denoising_error,
    distilled_timesteps,
    euler_ancestral_step,
    gaussian_logprob,
    noised_and_target,
    online_pso_loss,
    pso_hinge_loss,
    pso_sigmoid_loss,
    renoise_step,
)
from ftmods.pso.module import PSOModule, generate_references, log_image_grid
from ftmods.pso.rewards import CLIPScoreReward, ImageTextReward, PickScoreReward

__all__ = [
    "TIMESTEP_PRESETS",
    "CLIPScoreReward",
    "ImageTextReward",
    "OnlinePSOLossOutput",
    "PSOLossOutput",
    "PSOModule",
    "PickScoreReward",
    "denoising_error",
    "distilled_timesteps",
    "euler_ancestral_step",
    "gaussian_logprob",
    "generate_references",
    "log_image_grid",
    "noised_and_target",
    "online_pso_loss",
    "pso_hinge_loss",
    "pso_sigmoid_loss",
    "renoise_step",
]
