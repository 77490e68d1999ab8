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
    kwargs.setdefault("logger", False)
    return Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
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


def test_after_each_scores_every_request_right_after_its_own_edit(tmp_path, edit_file):
    """Depth-first with ``eval_timing='after_each'``: each request is scored before later edits overwrite it, so its
    reliability is higher than on the final model (observed teacher-forced 0.97 vs 0.77, WILD 0.83 vs 0.33: DF
    forgets). Both timings land in edit_eval.json, each under its own key prefix."""
    from lightning.pytorch.loggers import CSVLogger

    module = LocFTModule(TINY, target_modules=[TARGET], pipeline="depth_first", df_max_steps=40,
                         optimizer=_adam(1e-2), eval_timing="after_each", evaluate_after_fit=True)  # fmt: skip
    trainer = _trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(module, datamodule=_dm(edit_file, batch_size=1, order="stream"))
    report = json.loads(next((tmp_path / "logs").rglob("edit_eval.json")).read_text())
    after_each = report["eval_after_each/teacher_forced_token/reliability"]
    assert after_each >= 0.9
    assert after_each > report["eval/teacher_forced_token/reliability"]
    assert report["eval_after_each/wild_em/reliability"] > report["eval/wild_em/reliability"]
    assert report["eval_after_each/wild_em/locality"] == 1.0  # scored against the cached pre-edit reference
    assert set(report["timing"]) == {"after_each", "final"}
    assert all(k.startswith("eval_after_each/") for k in report["timing"]["after_each"])


def test_after_each_is_refused_for_breadth_first():
    with pytest.raises(ValueError, match="only exists in the depth_first pipeline"):
        LocFTModule(TINY, eval_timing="after_each")


def test_validation_logs_edit_set_reliability_per_epoch(tmp_path, edit_file):
    module = LocFTModule(TINY, target_modules=[TARGET], optimizer=_adam(1e-2))
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_dm(edit_file))
    assert 0.0 <= float(trainer.callback_metrics["val/teacher_forced_token/reliability"]) <= 1.0
    assert "val/teacher_forced_token/generalization" in trainer.callback_metrics


def _changed_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float()).float().mean())


@pytest.mark.parametrize("fp32_tuned", [True, False])
def test_bf16_model_keeps_the_tuned_tensor_in_fp32(tmp_path, edit_file, fp32_tuned):
    """A bf16 model under ``bf16-true``: Adam steps of 1e-6 are below half a bf16 ulp for every weight with
    |w| > 2**8 * 1e-6 = 2.6e-4 (about 99 % of an N(0, 0.02) init), so a bf16 tuned tensor barely moves, while the
    fp32 one moves everywhere. The rest of the model stays bf16 and bit-identical; the export is bf16 again. The
    validation loop runs under bf16 default dtype too (the evaluator makes its own fp32 buffers)."""
    module = LocFTModule(TINY, target_modules=[TARGET], optimizer=_adam(1e-6), loss_tol=0.0,
                         fp32_tuned=fp32_tuned)  # fmt: skip
    trainer = _trainer(tmp_path, max_epochs=3, precision="bf16-true")
    trainer.fit(module, datamodule=_dm(edit_file))
    name = "model.layers.1.mlp.down_proj.weight"
    params = dict(module.model.named_parameters())
    assert params[name].dtype == (torch.float32 if fp32_tuned else torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n != name)
    moved = _changed_fraction(params[name].detach(), module.original[name])
    if fp32_tuned:
        assert moved > 0.95
        module.save_pretrained(tmp_path / "edited")
        saved = load_file(tmp_path / "edited" / "model.safetensors")
        assert saved[name].dtype == torch.bfloat16
        assert torch.equal(saved[name], params[name].detach().to(torch.bfloat16))
    else:
        assert moved < 0.05


def test_module_to_keeps_fp32_tuned_values_exactly():
    """Lightning's bf16-true conversion calls ``module.to(dtype=bfloat16)`` after a checkpoint may have been restored:
    the fp32 tuned values must come through with all their bits."""
    module = LocFTModule(TINY, target_modules=[TARGET], load={"dtype": "bfloat16"})
    module.configure_model()
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(module.model.named_parameters())[name]
    with torch.no_grad():
        param.add_(1e-6)  # below bf16 resolution
    exact = param.detach().clone()
    module.to(dtype=torch.bfloat16)
    param = dict(module.model.named_parameters())[name]
    assert param.dtype == torch.float32
    assert torch.equal(param.detach(), exact)
    out = module.model(torch.randint(3, 300, (1, 5))).logits
    assert out.dtype == torch.bfloat16
