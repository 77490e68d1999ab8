"""ManyICLModule on the tiny offline causal LM: the supervised tokens are the answers, HF's loss equals the module's,
packed equals padded, global normalisation under accumulation, evaluation by option scoring, export, kill-and-resume,
the forgetting probe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from support.callbacks import KillAt
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from ftmods.datamodules import ManyShotCollator, ManyShotDataModule
from ftmods.many_icl import ManyICLModule
from ftmods.models.loading import LoRASpec, load_tokenizer
from ftmods.ops.tokens import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
TINY = "tiny/causal-lm"


def _datamodule(**kwargs) -> ManyShotDataModule:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("max_length", 160)
    kwargs.setdefault("eval_per_task", 2)
    kwargs.setdefault("k_test", 4)
    return ManyShotDataModule(
        str(DATA / "many_icl_tiny_train.jsonl"),
        str(DATA / "many_icl_tiny_eval.jsonl"),
        str(DATA / "many_icl_tiny_heldout.jsonl"),
        tokenizer=TINY,
        **kwargs,
    )


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("limit_val_batches", 0)
    return Trainer(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def _adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def _episodes(n: int = 3) -> tuple[list, dict, dict]:
    dm = _datamodule()
    dm.setup("fit")
    episodes = [dm.episodes[i] for i in range(n)]
    pad = dm.tokenizer.pad_token_id
    return episodes, ManyShotCollator(pad)(episodes), ManyShotCollator(pad, packing=True)(episodes)


def _module(**kwargs) -> ManyICLModule:
    module = ManyICLModule(TINY, **kwargs)
    module.configure_model()
    module.eval()
    return module


def _transfer(module: ManyICLModule, batch: dict) -> dict:
    return module.on_before_batch_transfer(dict(batch), 0)


def test_supervised_tokens_decode_to_exactly_the_answers():
    episodes, padded, _ = _episodes(2)
    tok = load_tokenizer(TINY)
    for row in range(2):
        labels, shots = padded["labels"][row], padded["shot_index"][row]
        assert torch.equal(labels != IGNORE_INDEX, shots >= 0)
        spans = [tok.decode(labels[shots == k]) for k in range(int(shots.max()) + 1)]
        assert all(span.startswith(" ") and span.endswith("\n\n") for span in spans)
        text = tok.decode(padded["input_ids"][row][padded["attention_mask"][row].bool()])
        answers = [line.split("Output:", 1)[1] + "\n\n" for line in text.split("\n\n") if "Output:" in line]
        assert spans == answers  # every answer, in order, and nothing else


def test_loss_equals_transformers_own_loss_on_the_masked_labels():
    """All answers, token mean: HF's shifted cross-entropy over labels != -100 is the same number."""
    _, padded, _ = _episodes(3)
    module = _module()
    with torch.no_grad():
        ours = module.compute_loss(_transfer(module, padded)).loss
        theirs = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              labels=padded["labels"], use_cache=False).loss  # fmt: skip
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["token_mean", "answer_mean", "weighted"])
def test_packed_batch_gives_the_padded_loss(reduction):
    """Packed episodes (position ids restart, no mask, use_cache=False) are as separate as padded rows."""
    _, padded, packed = _episodes(3)
    module = _module(reduction=reduction)
    with torch.no_grad():
        a = module.compute_loss(_transfer(module, padded))
        b = module.compute_loss(_transfer(module, packed))
    assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert int(a.num_answers) == int(b.num_answers)
    assert_close(a.bucket_nll_sum, b.bucket_nll_sum, rtol=1e-5, atol=1e-5)


def test_last_answer_baseline_computes_and_supervises_the_last_answers_only():
    _, padded, _ = _episodes(2)
    module = _module(supervise="last")
    batch = _transfer(module, padded)
    with torch.no_grad():
        out = module.compute_loss(batch)
        logits = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert int(out.num_answers) == 2  # one per episode
    last = padded["shot_index"] == padded["shot_index"].max(-1, keepdim=True).values  # (B, T) tokens of answer K
    labels = padded["labels"].where(last, IGNORE_INDEX)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert len(batch["logit_positions"]) == int((labels[:, 1:] != IGNORE_INDEX).any(0).sum())  # no wasted logits


def test_training_changes_weights_and_lora_leaves_the_base_frozen(tmp_path):
    full = ManyICLModule(TINY, optimizer=_adamw(1e-2), forgetting=False)
    full.configure_model()
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    _trainer(tmp_path / "full", max_steps=3).fit(full, datamodule=_datamodule())
    assert all(not torch.equal(before[n], p) for n, p in full.named_parameters())

    lora = ManyICLModule(TINY, lora=LoRASpec(r=4, alpha=8), optimizer=_adamw(1e-2), forgetting=False)
    lora.configure_model()
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    _trainer(tmp_path / "lora", max_steps=3).fit(lora, datamodule=_datamodule())
    for name, param in lora.named_parameters():
        assert torch.equal(before[name], param) != ("lora_" in name), name  # adapters train, the base is frozen


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """P6: episodes of 1 to 12 shots hold very different numbers of answers; 2 accumulated micro-batches of 2 must give
    the update of 1 batch of 4 (SGD: any normalisation error shows in the weights), and per-micro-batch normalisation
    must not."""
    runs = {}
    for name, (batch_size, accumulate, global_norm) in {
        "large": (4, 1, True), "accumulated": (2, 2, True), "local": (2, 2, False)
    }.items():  # fmt: skip
        module = ManyICLModule(TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), reduction="answer_mean",
                               global_normalization=global_norm, forgetting=False)  # fmt: skip
        _trainer(tmp_path / name, max_steps=2, accumulate_grad_batches=accumulate).fit(
            module, datamodule=_datamodule(batch_size=batch_size, shots=(1, 12))
        )
        runs[name] = dict(module.named_parameters())
    for name, param in runs["large"].items():
        assert_close(runs["accumulated"][name], param, rtol=1e-5, atol=1e-6, msg=name)
    assert max(float((runs["local"][n] - p).abs().max()) for n, p in runs["large"].items()) > 1e-4


def test_option_scoring_picks_the_most_likely_answer_span():
    dm = _datamodule()
    dm.setup("fit")
    query = next(q for q in dm.eval_queries if q.option_ids)
    module = _module()
    module.trainer = None  # a bare module (no Trainer) can score too
    with torch.no_grad():
        manual = []
        for ids in query.option_ids:
            full = torch.tensor([query.prompt_ids + ids])
            logp = module.model(full).logits.log_softmax(-1)[0, len(query.prompt_ids) - 1 : -1]
            manual.append(float(logp.gather(-1, torch.tensor(ids)[:, None]).sum()))
        ours = module._sequence_logprobs([(query.prompt_ids, ids) for ids in query.option_ids])
    assert_close(ours, torch.tensor(manual), rtol=1e-4, atol=1e-4)
    assert module._choose_options([query]) == [max(range(len(manual)), key=manual.__getitem__)]


def test_validation_scores_every_task_and_logs_predictions(tmp_path):
    module = ManyICLModule(TINY, forgetting=False, eval_max_new_tokens=6)
    trainer = _trainer(tmp_path, max_steps=1, logger=CSVLogger(tmp_path / "logs"), limit_val_batches=None)
    dm = _datamodule()
    trainer.validate(module, datamodule=dm)
    metrics = trainer.callback_metrics
    dm.setup("validate")
    tasks = {q.task for q in dm.eval_queries}
    assert {k.split("/")[1] for k in metrics if k.count("/") == 2 and not k.startswith("val/heldout")} == tasks
    assert 0.0 <= float(metrics["val/mean"]) <= 1.0
    assert "val/heldout_mean" in metrics
    rows = [json.loads(line) for f in (tmp_path / "logs").rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert rows
    assert {"task", "gold", "prediction", "score", "k_shots"} <= set(rows[0])


def test_forgetting_probe_reports_before_after_and_drop(tmp_path):
    module = ManyICLModule(TINY, optimizer=_adamw(1e-2), eval_max_new_tokens=6)
    trainer = _trainer(tmp_path, max_steps=4, logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(module, datamodule=_datamodule())
    report = json.loads(next((tmp_path / "logs").rglob("forgetting.json")).read_text())
    tasks = {"word_true_false", "swap_words"}
    assert {k.split("/")[1] for k in report if k != "forgetting/mean_drop"} == tasks
    for key, value in report.items():
        if key.endswith("/drop"):
            stem = key.removesuffix("/drop")
            assert math.isclose(value, report[f"{stem}/before"] - report[f"{stem}/after"])


def test_export_reloads_with_identical_outputs(tmp_path):
    module = ManyICLModule(TINY, optimizer=_adamw(1e-2), forgetting=False)
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=_datamodule())
    module.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    module.model.eval()
    _, padded, _ = _episodes(2)
    with torch.no_grad():
        inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        assert torch.equal(reloaded(**inputs).logits, module.model(**inputs).logits)


def _fit_resumable(folder: Path, kill_at: int | None = None, ckpt: str | None = None) -> ManyICLModule:
    module = ManyICLModule(TINY, optimizer=_adamw(3e-3), forgetting=False)
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(folder, max_steps=20, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=_datamodule(batch_size=8, packing=True), ckpt_path=ckpt)
    return module


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """An epoch is 99 episodes = 13 batches of 8 packed episodes here; the crash at step 17 is mid-epoch 1, so the
    resumed run must rebuild epoch 1's episodes (a function of seed and epoch) and continue where it stopped."""
    straight = _fit_resumable(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_resumable(tmp_path / "b", kill_at=17)
    assert torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 16
    resumed = _fit_resumable(tmp_path / "b", ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_loads_with_weights_only(tmp_path):
    module = ManyICLModule(TINY, reduction="weighted", weight_power=0.5, forgetting=False)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(module, datamodule=_datamodule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ManyICLModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert restored.loss_options == module.loss_options
    assert "loss_reduction" not in restored.hparams


def test_min_context_shots_needs_after_m():
    with pytest.raises(ValueError, match="after_m"):
        ManyICLModule(TINY, min_context_shots=2)


def test_validating_with_another_datamodule_uses_its_tasks(tmp_path):
    """The per-task score keys follow the DataModule: without held-out tasks first, then with them."""
    module = ManyICLModule(TINY, forgetting=False, eval_max_new_tokens=4)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=None)
    plain = ManyShotDataModule(str(DATA / "many_icl_tiny_train.jsonl"), str(DATA / "many_icl_tiny_eval.jsonl"),
                               tokenizer=TINY, max_length=160, eval_per_task=1, k_test=2)  # fmt: skip
    trainer.validate(module, datamodule=plain, verbose=False)
    assert "val/heldout_mean" not in trainer.callback_metrics
    trainer.validate(module, datamodule=_datamodule(), verbose=False)
    assert "val/heldout_mean" in trainer.callback_metrics
