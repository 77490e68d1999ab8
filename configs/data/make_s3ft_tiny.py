"""Regenerate the tiny S3FT task files next to this script (deterministic): ``python configs/data/make_s3ft_tiny.py``.

The items come from ``ftmods.models.s3ft_toy``, the two-skill toy LM that ``tiny/s3ft-toy`` builds; no model is
needed to write them. Every record is GSM8K-like, ``{"id", "question", "answer"}`` with the gold number after
``####``, so one numeric judge scores all three files.

- ``s3ft_tiny_train.jsonl``: 96 skill-A items (``"what is a plus b ?"``), the S3FT training set. The toy's base model
  answers 38 of them right (S3FT keeps its answer), restates the reference correctly on 29 more (paraphrase) and
  gets the last 29 wrong both ways (gold).
- ``s3ft_tiny_eval.jsonl``: 100 held-out skill-A items with the same three-way design (40 / 30 / 30).
- ``s3ft_tiny_skill_b.jsonl``: 67 skill-B probes (``"what comes after n ?"``), which the base model answers
  perfectly; fine-tuning on skill A and re-scoring these measures forgetting.

A test checks that the committed files equal :func:`render`'s output.
"""

import json
from pathlib import Path

from ftmods.models.s3ft_toy import skill_a_items, skill_b_items

HERE = Path(__file__).parent
FILES = {
    "s3ft_tiny_train.jsonl": lambda: skill_a_items("train"),
    "s3ft_tiny_eval.jsonl": lambda: skill_a_items("eval"),
    "s3ft_tiny_skill_b.jsonl": lambda: skill_b_items("probe"),
}


def render() -> dict[str, str]:
    """File name -> content (one JSON record per line) of every file this script writes."""
    return {name: "".join(json.dumps(record) + "\n" for record in records()) for name, records in FILES.items()}


def main() -> None:
    """Write the files next to this script."""
    for name, text in render().items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
