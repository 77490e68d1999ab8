"""Extending a finished run equals one uninterrupted run: ``fit --trainer.max_steps N`` then ``fit --trainer.max_steps
M --ckpt_path <run>/checkpoints/last.ckpt`` (M > N) trains on the same batches and ends with the same weights.

A run that stops at ``max_steps`` writes ``last.ckpt`` in ``ModelCheckpoint.on_train_end``, after Lightning (2.6) has
closed the stopped epoch (``epoch_progress`` all 1, so ``current_epoch`` is e + 1) while the loader state says "k
batches of epoch e yielded". The resumed run is in epoch e + 1 with its batch counter at k: before the fix it skipped
the rest of epoch e and the first k batches of epoch e + 1 (an epoch-end stop trained epoch e + 2 in place of e + 1).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from support.callbacks import KillAt

from ftmods.datamodules import ChatDataModule
from ftmods.datamodules.samplers import epoch_loader
from ftmods.optim import WarmupCosineLR
from ftmods.sft import SFTModule

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
TINY = "tiny/causal-lm"


class BatchLog(Callback):
    """A digest of every training batch, by the global step it is trained at (a later run overwrites a step that an
    earlier, killed run trained without checkpointing)."""

    def __init__(self, log: dict[int, str]) -> None:
        self.digests = log

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        tensor = batch["input_ids"] if isinstance(batch, dict) else batch
        self.digests[trainer.global_step] = hashlib.sha1(tensor.detach().cpu().numpy().tobytes()).hexdigest()[:12]


def _trainer(root: Path, max_steps: int, log: dict[int, str], *extra: Callback) -> Trainer:
    # every_n_train_steps beyond max_steps: last.ckpt is the one ModelCheckpoint.on_train_end writes at the stop
    last = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1000)
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[last, BatchLog(log), *extra],
    )


# ------------------------------------------------------------------------------------------ SFT on the tiny LM

SFT_STEPS = 9  # 96 examples in batches of 16: 6 batches per epoch


def _fit_sft(root: Path, max_steps: int, log: dict[int, str], ckpt: str | None = None) -> SFTModule:
    seed_everything(0, verbose=False)
    module = SFTModule(
        TINY,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=2, total_steps=SFT_STEPS),
    )
    data = ChatDataModule(
        [str(DATA / "sft_tiny_chat.jsonl"), str(DATA / "sft_tiny_qa.jsonl")],
        str(DATA / "sft_tiny_val.jsonl"),
        tokenizer=TINY,
        max_length=96,
        batch_size=16,
    )
    _trainer(root, max_steps, log).fit(module, datamodule=data, ckpt_path=ckpt)
    return module


@pytest.fixture(scope="module")
def sft_straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[SFTModule, dict[int, str]]:
    log: dict[int, str] = {}
    return _fit_sft(tmp_path_factory.mktemp("straight"), SFT_STEPS, log), log


@pytest.mark.parametrize("stop", [3, 6], ids=["mid-epoch", "epoch-end"])
def test_sft_extension_equals_uninterrupted_run(tmp_path, sft_straight, stop):
    straight, straight_log = sft_straight
    log: dict[int, str] = {}
    _fit_sft(tmp_path, stop, log)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == stop
    assert ckpt["epoch"] == 1  # Lightning counts the stopped epoch 0 as finished
    extended = _fit_sft(tmp_path, SFT_STEPS, log, ckpt=str(last))
    assert log == straight_log
    for (name, a), b in zip(straight.named_parameters(), extended.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------- a chain of extensions, and a crash inside one


class _Numbers(LightningDataModule):
    """10 numbers in shuffled batches of 2 (5 batches per epoch), through ftmods' epoch loader."""

    def __init__(self, shuffle: bool) -> None:
        super().__init__()
        self.shuffle = shuffle

    def train_dataloader(self) -> Any:
        data = torch.arange(10, dtype=torch.float32).unsqueeze(1)
        return epoch_loader(
            data, trainer=self.trainer, seed=3, shuffle=self.shuffle, batch_size=2, collate_fn=torch.stack
        )


class _Line(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.layer(batch) - 2 * batch).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_line(
    root: Path, max_steps: int, log: dict[int, str], ckpt: str | None = None, *extra: Callback, shuffle: bool = True
) -> _Line:
    seed_everything(0, verbose=False)
    module = _Line()
    _trainer(root, max_steps, log, *extra).fit(module, datamodule=_Numbers(shuffle), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "file-order"])
def test_chained_extensions_and_a_crash_inside_one_equal_uninterrupted_run(tmp_path, shuffle):
    """Stops mid-epoch 0 (3), at the end of epoch 1 (10) and mid-epoch 3 (17): after each the data epoch lags
    Lightning's by one more; then a crash at step 21 (checkpoints every step) resumes inside the shifted run. In file
    order, the epoch-end stop must not train the first batch twice."""
    straight_log: dict[int, str] = {}
    straight = _fit_line(tmp_path / "straight", 25, straight_log, shuffle=shuffle)
    root, log = tmp_path / "chain", {}
    last = root / "checkpoints" / "last.ckpt"
    module = _fit_line(root, 3, log, shuffle=shuffle)
    for stop in (10, 17):
        module = _fit_line(root, stop, log, str(last), shuffle=shuffle)
        assert torch.load(last, weights_only=False)["global_step"] == stop
    every_step = ModelCheckpoint(dirpath=root / "every", save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_line(root, 25, log, str(last), every_step, KillAt(21), shuffle=shuffle)
    every_step = ModelCheckpoint(dirpath=root / "every", save_last=True, every_n_train_steps=1, save_top_k=0)
    module = _fit_line(root, 25, log, str(root / "every" / "last.ckpt"), every_step, shuffle=shuffle)
    assert log == straight_log
    torch.testing.assert_close(dict(module.named_parameters()), dict(straight.named_parameters()))
