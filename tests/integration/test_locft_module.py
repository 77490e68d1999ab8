"""LocFTModule on the tiny offline causal LM: only the selected tensor changes, BF and DF from one flag, the skip /
early-stop rule, export, kill-and-resume, protocol-tagged evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftmods.datamodules.edits import EditDataModule
from ftmods.locft.module import LocFTModule

TINY = "tiny/causal-lm"
TARGET = r"model\.layers\.1\.mlp\.down_proj\.weight"
EDITS = [
    ("The capital of Tepiva is", "Lorsk"),
    ("The river of Maldo is", "Venn"),
    ("The king of Ostra is", "Bram"),
    ("The color of Quill is", "teal"),
    ("The sport of Yarrow is", "polo"),
    ("The author of Zent is", "Mira"),
]


@pytest.fixture
def edit_file(tmp_path) -> Path:
    path = tmp_path / "edits.jsonl"
    rows = [
        {
            "prompt": p,
            "target_new": t,
            "rephrase_prompt": p.replace("The", "Name the"),
            "locality_prompt": "What is 2 + 3?",
            "locality_ground_truth": "5",
        }
        for p, t in EDITS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _dm(edit_file, **kwargs) -> EditDataModule:
    kwargs.setdefault("batch_size", 3)
    return EditDataModule(str(edit_file), tokenizer=TINY, max_length=48, **kwargs)


def _trainer(tmp_path, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, **kwargs)  # fmt: skip


def _adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_breadth_first_changes_only_the_selected_tensor_and_learns_the_edits(tmp_path, edit_file):
    module = LocFTModule(TINY, target_modules=[TARGET], optimizer=_adam(1e-2), evaluate_after_fit=True)
    module.configure_model()
    assert module.tuned_names == ["model.layers.1.mlp.down_proj.weight"]
    before = _snapshot(module)
    _trainer(tmp_path, max_epochs=40).fit(module, datamodule=_dm(edit_file))
    after = _snapshot(module)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]  # every other tensor bit-identical
    assert module.stats["opt_steps"] > 0
    assert module.seconds_per_edit is not None
    assert module.seconds_per_edit > 0


def test_early_stop_and_skip_rule(tmp_path, edit_file):
    """A tolerance above any loss: every batch is skipped, the first epoch's mean is below it, training stops."""
    module = LocFTModule(TINY, target_modules=[TARGET], loss_tol=1e6)
    module.configure_model()
    before = _snapshot(module)
    trainer = _trainer(tmp_path, max_epochs=10)
    trainer.fit(module, datamodule=_dm(edit_file))
    assert trainer.current_epoch == 1  # stopped after epoch 0
    assert module.stats["opt_steps"] == 0
    assert module.stats["skipped_steps"] == 2  # 6 edits / batches of 3
    assert all(torch.equal(before[n], p) for n, p in module.model.named_parameters())


def test_depth_first_from_the_same_module_with_a_clamp(tmp_path, edit_file):
    """DF: one request at a time in stream order, fresh Adam per request, at most df_max_steps each, never revisited;
    the ℓ∞ clamp keeps the tuned tensor within eps of the original."""
    module = LocFTModule(TINY, target_modules=[TARGET], pipeline="depth_first", df_max_steps=3,
                         optimizer=_adam(1e-2), norm_constraint=1e-3)  # fmt: skip
    module.configure_model()
    before = _snapshot(module)
    _trainer(tmp_path, max_epochs=1).fit(module, datamodule=_dm(edit_file, batch_size=1, order="stream"))
    after = _snapshot(module)
    assert [n for n in before if not torch.equal(before[n], after[n])] == ["model.layers.1.mlp.down_proj.weight"]
    assert 0 < module.stats["opt_steps"] <= 3 * len(EDITS)
    delta = (after["model.layers.1.mlp.down_proj.weight"] - before["model.layers.1.mlp.down_proj.weight"]).abs()
    assert delta.max() <= 1e-3 + 1e-7


def test_prompt_last_objective_is_selectable():
    from ftmods.locft.loss import prompt_last_loss

    module = LocFTModule(TINY, pipeline="depth_first", df_objective="prompt_last")
    assert module.loss_fn is prompt_last_loss


def test_default_location_without_preset_is_seventy_percent_depth():
    module = LocFTModule(TINY)
    module.configure_model()
    assert module.tuned_names == ["model.layers.0.mlp.down_proj.weight"]  # 2 layers: round(1.4) - 1 = 0


def test_export_full_checkpoint_and_delta(tmp_path, edit_file):
    module = LocFTModule(TINY, target_modules=[TARGET], optimizer=_adam(1e-2))
    _trainer(tmp_path, max_epochs=3).fit(module, datamodule=_dm(edit_file))
    module.save_pretrained(tmp_path / "edited")
    module.save_delta(tmp_path / "delta")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", local_files_only=True).eval()
    module.model.eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)
    delta = load_file(tmp_path / "delta" / "delta.safetensors")
    assert list(delta) == ["model.layers.1.mlp.down_proj.weight"]
    name = "model.layers.1.mlp.down_proj.weight"
    restored = module.original[name] + delta[name]
    assert torch.allclose(restored, dict(module.model.named_parameters())[name].detach(), atol=1e-7)


def test_evaluation_names_protocols_and_locality_is_one_without_edits(tmp_path, edit_file):
    module = LocFTModule(TINY, target_modules=[TARGET], loss_tol=1e6)  # nothing is edited
    dm = _dm(edit_file)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert results["test/wild_em/locality"] == 1.0
    assert results["test/teacher_forced_token/locality"] == 1.0
    assert {"test/wild_em/reliability", "test/teacher_forced_token/generalization"} <= set(results)


class _Crash(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == 4:
            raise RuntimeError("simulated crash")


def _bf_run(folder, edit_file, ckpt=None, crash=False) -> LocFTModule:
    module = LocFTModule(TINY, target_modules=[TARGET], optimizer=_adam(3e-3))
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [checkpoint, _Crash()] if crash else [checkpoint]
    trainer = _trainer(folder, max_epochs=4, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=_dm(edit_file, batch_size=2), ckpt_path=ckpt)
    return module


def test_breadth_first_kill_and_resume_matches_uninterrupted(tmp_path, edit_file):
    """3 batches per epoch; the crash comes mid-epoch 1. Manual optimisation: Lightning's step counter counts
    optimizer steps only, so checkpoints are taken per optimizer step; the resumed run must reproduce data order,
    Adam state and the skip / early-stop statistics."""
    straight = _bf_run(tmp_path / "a", edit_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _bf_run(tmp_path / "b", edit_file, crash=True)
    resumed = _bf_run(tmp_path / "b", edit_file, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed.stats["opt_steps"] == straight.stats["opt_steps"]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_bare_module_can_be_scored_without_a_trainer(edit_file):
    from ftmods.datamodules.edits import load_edits

    module = LocFTModule(TINY, target_modules=[TARGET])
    module.configure_model()
    scores = module.evaluate_requests(list(load_edits(str(edit_file))))
    assert scores["eval/wild_em/locality"] == 1.0  # nothing edited: the swapped-in originals equal the weights
    assert "eval/teacher_forced_token/reliability" in scores
