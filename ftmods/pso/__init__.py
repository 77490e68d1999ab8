"""PSO: pairwise sample optimization for timestep-distilled diffusion models.

"Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization", arXiv:2410.03190
(https://arxiv.org/abs/2410.03190), ICLR 2025. In progress (#7): reward models (:mod:`ftmods.pso.rewards`) and the
pure losses (:mod:`ftmods.pso.loss`); the module follows.
"""
