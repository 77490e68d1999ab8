"""Supervised fine-tuning baseline: completion-only next-token loss on prompt/completion or chat data.

The plain SFT that CLS-RL (arXiv:2503.16188), S3FT (arXiv:2502.08130) and ManyICL (arXiv:2506.11103) compare
against, and the FT baseline of LocFT-BF.
"""

from ftmods.sft.loss import SFTLossOutput, sequence_mean_nll, token_mean_nll
from ftmods.sft.module import SFTModule

__all__ = ["SFTLossOutput", "SFTModule", "sequence_mean_nll", "token_mean_nll"]
