"""``SelectionWriter``: append S3FT selection records per batch and report the training mixture at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ftmods.datamodules.s3ft import format_mixture, merge_parts, mixture_report, read_selection


class SelectionWriter(BasePredictionWriter):
    """Write :class:`ftmods.s3ft.S3FTModule` predictions to the selection JSONL, resumably.

    Every rank appends each finished batch to ``<path>.rank<r>.part`` (flushed and fsynced, so a killed run loses at
    most the batch in flight; the DataModule skips the ids already written on the next run). At the end of
    ``predict`` rank 0 merges the parts into ``path`` (deduplicated by id: the distributed sampler may repeat items to
    even out the ranks), prints the mixture (counts and percentages per source, as the paper's Table 3), logs it
    (``s3ft/percent_<source>``) and writes it to ``<path>.mixture.json``.

    Args:
        path: The selection file; default: the DataModule's ``selection_file``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.report: dict[str, Any] | None = None  # the last mixture report (rank 0)

    def selection_path(self, trainer: Trainer) -> Path:
        """``path``, or the DataModule's ``selection_file``."""
        if self.path is not None:
            return Path(self.path)
        datamodule = getattr(trainer, "datamodule", None)
        path = getattr(datamodule, "hparams", {}).get("selection_file") if datamodule is not None else None
        if not path:
            raise ValueError("SelectionWriter needs path= or a DataModule with a selection_file (S3FTDataModule)")
        return Path(path)

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        path = self.selection_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.rank{trainer.global_rank}.part")
        with part.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in prediction))
            handle.flush()
            os.fsync(handle.fileno())

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier("s3ft_selection")
        path = self.selection_path(trainer)
        if trainer.is_global_zero:
            merge_parts(str(path))
            self.report = mixture_report(read_selection(str(path)))
            path.with_name(f"{path.name}.mixture.json").write_text(json.dumps(self.report, indent=2))
            metrics = {f"s3ft/percent_{k}": float(v) for k, v in self.report["percent"].items()}
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "s3ft/items": float(self.report["total"])}, step=0)
            rank_zero_info(f"S3FT selection {path}:\n{format_mixture(self.report)}")
        trainer.strategy.barrier("s3ft_selection_merged")
