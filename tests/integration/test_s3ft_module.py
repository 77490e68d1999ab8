"""S3FTModule on the S3FT toy (a word-level Llama taught two synthetic skills, partly right on the training items):
the selection holds all three sources with every verdict recorded, an interrupted predict resumes without duplicates,
fit trains on the selection with per-source losses, export and kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support.callbacks import KillAt
from transformers import AutoModelForCausalLM

from ftmods.datamodules import S3FTDataModule, read_selection
from ftmods.models.s3ft_toy import PARAPHRASE_PROMPT, PREDICT_PROMPT
from ftmods.s3ft import S3FTModule, SelectionWriter

REPO = Path(__file__).resolve().parents[2]
ITEMS = REPO / "configs" / "data" / "s3ft_tiny_train.jsonl"
TOY = "tiny/s3ft-toy"


def _module(**kwargs) -> S3FTModule:
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3))
    return S3FTModule(TOY, judge="numeric", template="plain", max_new_tokens=12, predict_prompt=PREDICT_PROMPT,
                      paraphrase_prompt=PARAPHRASE_PROMPT, **kwargs)  # fmt: skip


def _datamodule(selection: Path, **kwargs) -> S3FTDataModule:
    return S3FTDataModule(str(ITEMS), str(selection), tokenizer=TOY, template="plain", predict_batch_size=16,
                          batch_size=8, max_length=64, **kwargs)  # fmt: skip


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)  # fmt: skip


class _Stop(Callback):
    """Simulates a kill after ``after`` predict batches were written."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 == self.after:
            raise KeyboardInterrupt  # what Ctrl-C raises; Lightning shuts down gracefully


@pytest.fixture(scope="module")
def selection(tmp_path_factory) -> Path:
    """One full predict run (shared by the tests that only read it)."""
    folder = tmp_path_factory.mktemp("s3ft")
    path = folder / "selection.jsonl"
    _trainer(folder, callbacks=[SelectionWriter()]).predict(_module(), datamodule=_datamodule(path),
                                                           return_predictions=False)  # fmt: skip
    return path


def test_selection_holds_all_three_sources_with_their_verdicts(selection):
    records = read_selection(str(selection))
    items = [json.loads(line) for line in ITEMS.read_text().splitlines() if line.strip()]
    assert len(records) == len(items)
    assert len({r["id"] for r in records}) == len(records)
    by_source = {s: [r for r in records if r["source"] == s] for s in ("model", "paraphrase", "gold")}
    assert all(by_source.values()), {s: len(v) for s, v in by_source.items()}
    for r in by_source["model"]:
        assert r["self_verdict"] is True
        assert r["target"] == r["self_response"]
        assert r["para_response"] is None  # no paraphrase is asked for an accepted answer
    for r in by_source["paraphrase"]:
        assert r["self_verdict"] is False
        assert r["para_verdict"] is True
        assert r["target"] == r["para_response"]
    for r in by_source["gold"]:
        assert r["self_verdict"] is False
        assert r["para_verdict"] is False
        assert r["target"] == r["gold"]
    questions = {f"s3ft_tiny_train:{i + 1}": item["question"] for i, item in enumerate(items)}
    questions.update({item["id"]: item["question"] for item in items if "id" in item})
    assert all(r["prompt"] == PREDICT_PROMPT.format(question=questions[r["id"]]) for r in records)  # training prompt
    report = json.loads(selection.with_name("selection.jsonl.mixture.json").read_text())
    assert report["counts"] == {s: len(v) for s, v in by_source.items()}


def test_interrupted_predict_resumes_without_duplicates(tmp_path, selection):
    path = tmp_path / "selection.jsonl"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _trainer(tmp_path, callbacks=[SelectionWriter(), _Stop(after=2)]).predict(
            _module(), datamodule=_datamodule(path), return_predictions=False
        )
    written = {r["id"] for r in read_selection(str(path))}
    assert len(written) == 32  # two batches of 16 made it to disk
    dm = _datamodule(path)
    _trainer(tmp_path, callbacks=[SelectionWriter()]).predict(_module(), datamodule=dm, return_predictions=False)
    assert dm.num_done == 32
    records = read_selection(str(path))
    assert len(records) == len({r["id"] for r in records}) == len(read_selection(str(selection)))
    assert not list(tmp_path.glob("*.part"))
    # greedy decoding: the resumed selection is the uninterrupted one
    assert {r["id"]: r["source"] for r in records} == {r["id"]: r["source"] for r in read_selection(str(selection))}


def test_fit_trains_on_the_selection_and_logs_loss_per_source(tmp_path, selection):
    module = _module()
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=_datamodule(selection))
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())
    logged = {k for k in trainer.callback_metrics if k.startswith("train/loss_")}
    assert logged <= {"train/loss_model", "train/loss_paraphrase", "train/loss_gold"}
    assert logged


def test_export_reloads_with_identical_outputs(tmp_path, selection):
    module = _module()
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=_datamodule(selection))
    module.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    module.model.eval()
    ids = module.tokenizer("question what is 3 plus 4 ? answer", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)


def _fit(folder: Path, selection: Path, kill_at: int | None = None, ckpt: str | None = None) -> S3FTModule:
    module = _module()
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(folder, max_steps=16, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=_datamodule(selection), ckpt_path=ckpt)
    return module


def test_fit_kill_and_resume_matches_uninterrupted_run(tmp_path, selection):
    straight = _fit(tmp_path / "a", selection)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", selection, kill_at=13)
    resumed = _fit(tmp_path / "b", selection, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_banned_phrases_send_a_paraphrase_to_gold():
    from ftmods.s3ft.prompts import banned_phrase

    assert banned_phrase("As the reference answer says, 7") == "reference answer"
    assert banned_phrase("Your turn: 7") == "starts with 'Your turn'"
    assert banned_phrase("3 plus 4 is 7") is None


def test_checkpoint_hparams_load_with_weights_only(tmp_path, selection):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(module, datamodule=_datamodule(selection))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = S3FTModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert restored.judge is not None
    assert restored.judge.name == "numeric"
