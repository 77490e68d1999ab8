"""Callbacks shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
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


class ParameterProbe(Callback):
    """Records, for a test, the parameters at ``on_train_start`` (after every callback's ``setup``: what they froze
    is frozen by then) and at ``on_train_end`` (before later callbacks swap in averages or grafts)."""

    def __init__(self) -> None:
        self.trainable: set[str] = set()
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.end = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def changed(self) -> set[str]:
        return {n for n, value in self.end.items() if not torch.equal(value, self.start[n])}
