"""Prompt templates of S3FT (config strings; fields ``{question}``, ``{context}``, ``{tests}``, ``{reference}``).

The paper's figures (as transcribed, see ``specs/s3ft.md`` §2) are paraphrased here: GSM8K asks for step-by-step
reasoning and a final "The answer is N"; MBPP casts the model as an expert Python programmer, gives the three tests
and wants the code between ``[[BEGIN]]`` and ``[[DONE]]``; the paraphrase prompts add the gold answer as a *reference*
and ask for the model's own response. SDFT's banned-phrase filter rejects paraphrases that leak the prompt framing.
"""

from __future__ import annotations

PREDICT_PROMPTS: dict[str, str] = {
    "gsm8k": (
        "Solve the following math problem step by step. Finish with a final line of the form "
        '"The answer is N", where N is an integer.\n\nQuestion: {question}'
    ),
    "mbpp": (
        "You are an expert Python programmer, and here is your task: {question}\n"
        "Your code should pass these tests:\n\n{tests}\n\n"
        "Write only the code, between [[BEGIN]] and [[DONE]], with no explanation."
    ),
    "qa": "Answer the question using the passage.\n\nPassage: {context}\n\nQuestion: {question}",
    "default": "{question}",
}
"""Prediction prompts per task (``default`` for any other task)."""

PARAPHRASE_PROMPTS: dict[str, str] = {
    "gsm8k": (
        "Solve the following math problem step by step. Finish with a final line of the form "
        '"The answer is N", where N is an integer.\n\nQuestion: {question}\n\n'
        "Here is a reference solution to guide you:\n{reference}\n\n"
        "Now write the solution in your own words."
    ),
    "mbpp": (
        "You are an expert Python programmer, and here is your task: {question}\n"
        "Your code should pass these tests:\n\n{tests}\n\n"
        "Here is a reference solution to guide you:\n[[BEGIN]]\n{reference}\n[[DONE]]\n\n"
        "Write your own code, between [[BEGIN]] and [[DONE]], with no explanation."
    ),
    "qa": (
        "Answer the question using the passage.\n\nPassage: {context}\n\nQuestion: {question}\n\n"
        "Here is a reference answer to guide you: {reference}\n\nNow answer in your own words."
    ),
    "default": "{question}\n\nHere is a reference answer to guide you: {reference}\n\nNow answer in your own words.",
}
"""Paraphrase prompts per task: the gold answer is the ``{reference}``."""

BANNED_PHRASES: tuple[str, ...] = (
    "reference answer",
    "reference solution",
    "your response",
    "my response",
    "now it's your turn",
    "in your own words",
)
"""SDFT's filter (``sail-sg/sdft`` ``gen_distilled_data.py``) plus the framing of these prompts: a paraphrase that
contains one of them (case-insensitive), or starts with "Your turn", restates the prompt instead of answering."""


def render(template: str, *, question: str, context: str | None, tests: list[str], reference: str) -> str:
    """Fill a template; unknown fields raise ``KeyError`` naming the field.

    Example:
        >>> render("Q: {question} ({tests})", question="2+2?", context=None, tests=["assert f()"], reference="4")
        'Q: 2+2? (assert f())'
    """
    return template.format(question=question, context=context or "", tests="\n".join(tests), reference=reference)


def banned_phrase(text: str, phrases: tuple[str, ...] | list[str] = BANNED_PHRASES) -> str | None:
    """The first banned phrase in ``text`` (or ``"starts with 'Your turn'"``), else ``None``.

    Example:
        >>> banned_phrase("Following the reference answer, 4."), banned_phrase("The answer is 4")
        ('reference answer', None)
    """
    lowered = text.lower()
    if lowered.lstrip().startswith("your turn"):
        return "starts with 'Your turn'"
    return next((p for p in phrases if p.lower() in lowered), None)
