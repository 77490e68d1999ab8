"""ThroughputMeter: which micro-batches it counts (after the warm-up, with gradient accumulation, packed rows), the
FLOPs it attributes to them, MFU against a given peak, what it logs and writes, and modules without a decoder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from ftmods.callbacks import ThroughputMeter
from ftmods.datamodules import ChatDataModule
from ftmods.ops.flops import DecoderShape, sequence_lengths_of, train_flops
from ftmods.sft import SFTModule

DATA = Path(__file__).resolve().parents[3] / "configs" / "data"


class _Recorder(Callback):
    """The sequence lengths of every training micro-batch, in order."""

    def __init__(self) -> None:
        self.lengths: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lengths.append(sequence_lengths_of(batch))


def _fit(root: Path, *, packing: bool) -> tuple[_Recorder, ThroughputMeter, SFTModule, Trainer]:
    recorder, meter = _Recorder(), ThroughputMeter(warmup_steps=2, log_every_n_steps=1, peak_flops=1e12)
    module = SFTModule("tiny/causal-lm")
    data = ChatDataModule(str(DATA / "sft_tiny_chat.jsonl"), tokenizer="tiny/causal-lm", max_length=256,
                          batch_size=3, packing=packing)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=5, accumulate_grad_batches=2, callbacks=[recorder, meter],
                      logger=CSVLogger(root), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return recorder, meter, module, trainer


def test_counts_the_micro_batches_of_the_steps_after_warmup(tmp_path):
    """5 optimizer steps of 2 micro-batches of 3 examples, warm-up 2: micro-batches 4..9 (steps 3, 4, 5) are counted.
    tokens / flops / sequences are exact sums over them, so the logged rates keep their exact ratios whatever the
    time: flops/s / tokens/s = flops / tokens, and mfu = flops/s / peak. Padded and packed batches of the same
    examples count the same sequences (padding excluded; packed rows cut where position_ids restart)."""
    recorder, meter, module, trainer = _fit(tmp_path / "padded", packing=False)
    assert len(recorder.lengths) == 10
    counted = torch.cat(recorder.lengths[4:])
    assert len(counted) == 3 * 6
    assert len(set(counted.tolist())) > 1  # rows of different lengths: the padding is left out
    shape = DecoderShape.from_config(module.model.config)
    tokens, flops = int(counted.sum()), train_flops(shape, counted)
    summary = meter.summary
    assert (summary["steps"], summary["tokens"], summary["flops"]) == (3, tokens, flops)
    assert (summary["devices"], summary["device_name"]) == (1, "cpu")
    assert summary["tokens_per_sec"] == pytest.approx(tokens / summary["seconds"], rel=1e-12)
    assert summary["samples_per_sec"] / summary["tokens_per_sec"] == pytest.approx(len(counted) / tokens, rel=1e-12)
    assert summary["tflops_per_device"] * 1e12 / summary["tokens_per_sec"] == pytest.approx(flops / tokens, rel=1e-9)
    assert summary["mfu"] == pytest.approx(summary["tflops_per_device"] * 1e12 / 1e12, rel=1e-12)
    assert summary["peak_rss_gib"] > 0.1
    assert json.loads((Path(trainer.log_dir) / "throughput.json").read_text()) == summary
    with open(next((tmp_path / "padded").rglob("metrics.csv"))) as f:
        logged = [row for row in csv.DictReader(f) if row.get("perf/tokens_per_sec")]
    assert len(logged) == 3  # one window per optimizer step after the warm-up
    assert all(float(row["perf/mfu"]) > 0 for row in logged)

    packed_recorder, packed, _, _ = _fit(tmp_path / "packed", packing=True)
    assert all(len(lengths) == 3 for lengths in packed_recorder.lengths)  # one row, 3 sequences
    assert torch.equal(torch.cat(packed_recorder.lengths[4:]), counted)
    assert (packed.summary["tokens"], packed.summary["flops"]) == (tokens, flops)


class _EmbeddingModule(LightningModule):
    """No transformers model inside: tokens/s only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def training_step(self, batch, batch_idx):
        return self.embed(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_modules_without_a_decoder_get_tokens_but_no_flops(tmp_path):
    batches = [{"input_ids": torch.randint(0, 10, (2, 5))} for _ in range(4)]
    meter = ThroughputMeter(warmup_steps=1, summary_file=None)
    trainer = Trainer(accelerator="cpu", max_steps=4, callbacks=[meter], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match="no decoder-only transformer"):
        trainer.fit(_EmbeddingModule(), train_dataloaders=DataLoader(batches, batch_size=None))
    assert meter.summary["tokens"] == 3 * 2 * 5  # steps 2..4, every position of (2, 5) rows (no mask)
    assert [meter.summary[k] for k in ("flops", "mfu", "tflops_per_device")] == [None, None, None]
    assert not list(tmp_path.rglob("throughput.json"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"peak_flops": 0.0}, "peak_flops"),
    ],  # fmt: skip
)
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThroughputMeter(**kwargs)


def test_a_resumed_run_warms_up_again(tmp_path):
    """Fit 3 steps and save; resume to 6 with warm-up 2: only step 6 is measured (not steps 4-6, as it would be if the
    warm-up counted from step 0 of the first run)."""
    batches = [{"input_ids": torch.randint(0, 10, (2, 5))} for _ in range(8)]
    first = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    first.fit(_EmbeddingModule(), train_dataloaders=DataLoader(batches, batch_size=None))
    first.save_checkpoint(tmp_path / "step3.ckpt")
    meter = ThroughputMeter(warmup_steps=2, summary_file=None)
    resumed = Trainer(accelerator="cpu", max_steps=6, callbacks=[meter], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match="no decoder-only transformer"):
        resumed.fit(_EmbeddingModule(), train_dataloaders=DataLoader(batches, batch_size=None),
                    ckpt_path=tmp_path / "step3.ckpt")  # fmt: skip
    assert (meter.summary["steps"], meter.summary["tokens"]) == (1, 2 * 5)
