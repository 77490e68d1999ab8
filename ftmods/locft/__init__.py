"""LocFT-BF: localized, breadth-first fine-tuning for model editing.

"Fine-tuning Done Right in Model Editing", arXiv:2509.22072.
"""

from ftmods.locft.evaluator import EditEvaluator
from ftmods.locft.loss import LocFTLossOutput, locft_sample_mean_loss, locft_token_mean_loss, prompt_last_loss
from ftmods.locft.module import LocFTModule
from ftmods.locft.stream import EditStream

__all__ = [
    "EditEvaluator",
    "EditStream",
    "LocFTLossOutput",
    "LocFTModule",
    "locft_sample_mean_loss",
    "locft_token_mean_loss",
    "prompt_last_loss",
]
