"""S3FT: selective self-to-supervised fine-tuning with judges.

"Selective Self-to-Supervised Fine-Tuning for Generalization in Large Language Models", arXiv:2502.08130
(https://arxiv.org/abs/2502.08130).
"""

from ftmods.s3ft.judges import (
    JUDGES,
    BaseJudge,
    ExactMatchJudge,
    Judge,
    LLMJudge,
    NumericAnswerJudge,
    SimilarityJudge,
    UnitTestJudge,
    Verdict,
    make_judge,
)
from ftmods.s3ft.module import S3FTModule
from ftmods.s3ft.prompts import BANNED_PHRASES, PARAPHRASE_PROMPTS, PREDICT_PROMPTS
from ftmods.s3ft.sandbox import SandboxResult, run_python
from ftmods.s3ft.selection import SelectionWriter

__all__ = [
    "BANNED_PHRASES",
    "JUDGES",
    "PARAPHRASE_PROMPTS",
    "PREDICT_PROMPTS",
    "BaseJudge",
    "ExactMatchJudge",
    "Judge",
    "LLMJudge",
    "NumericAnswerJudge",
    "S3FTModule",
    "SandboxResult",
    "SelectionWriter",
    "SimilarityJudge",
    "UnitTestJudge",
    "Verdict",
    "make_judge",
    "run_python",
]
