"""Put tables of generated text where people look.

A JSONL file per step next to the logs, plus the logger's own table view when it has one (W&B ``log_text``,
TensorBoard ``add_text``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer


def log_table(trainer: Trainer, key: str, rows: list[dict[str, Any]]) -> Path | None:
    """Write ``rows`` to ``<log_dir>/<key>/step=<global_step>.jsonl`` and to every logger that shows tables.

    Call on every rank; only global rank 0 writes. Returns the JSONL path (``None`` on other ranks or without rows).
    """
    log_dir = trainer.log_dir  # a collective (strategy.broadcast): every rank must evaluate it
    if not trainer.is_global_zero or not rows:
        return None
    folder = Path(log_dir or trainer.default_root_dir) / key.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step={trainer.global_step}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    columns = list(rows[0])
    for logger in trainer.loggers:
        experiment: Any = getattr(logger, "experiment", None)
        if hasattr(logger, "log_text"):  # WandbLogger
            logger.log_text(key=key, columns=columns, data=[[r[c] for c in columns] for r in rows])
        elif hasattr(experiment, "add_text"):  # TensorBoard
            experiment.add_text(key, markdown_table(rows), global_step=trainer.global_step)
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (newlines and pipes escaped).

    Example:
        >>> print(markdown_table([{"prompt": "2+3?", "completion": "5"}]))
        | prompt | completion |
        | --- | --- |
        | 2+3? | 5 |
    """
    columns = list(rows[0])

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
