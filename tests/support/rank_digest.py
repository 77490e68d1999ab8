"""A callback that writes a digest of the model's parameters per rank at the end of fit (for multi-process tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def parameter_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankDigest(Callback):
    """Writes ``<dirpath>/rank<r>.json`` with the parameter digest and step count of each rank."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        record = {
            "digest": parameter_digest(pl_module),
            "global_step": trainer.global_step,
            "world": trainer.world_size,
        }
        (Path(self.dirpath) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
