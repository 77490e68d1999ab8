"""Callbacks shared by the tests."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAt(Callback):
    """Simulates a crash right after optimizer step ``at`` (before that step's checkpoint: Lightning runs
    ``ModelCheckpoint`` after the other callbacks), so a resumed run restarts from step ``at - 1``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")
