"""SFTModule on the tiny offline causal LM: training changes weights, export/reload, kill-and-resume, loss checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support.callbacks import KillAt
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from ftmods.callbacks import PretrainedExport
from ftmods.datamodules import ChatCollator, ChatDataModule
from ftmods.models.loading import LoRASpec, load_tokenizer
from ftmods.models.tiny import resolve_pretrained
from ftmods.sft import SFTModule

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
TINY = "tiny/causal-lm"


def _datamodule(**kwargs) -> ChatDataModule:
    kwargs.setdefault("batch_size", 4)
    return ChatDataModule(
        [str(DATA / "sft_tiny_qa.jsonl"), str(DATA / "sft_tiny_chat.jsonl")],
        str(DATA / "sft_tiny_val.jsonl"),
        tokenizer=TINY,
        max_length=96,
        **kwargs,
    )


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def _adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _batch(n: int = 3) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(TINY)
    dm = _datamodule()
    dm.connect(tok)
    dm.setup("fit")
    examples = [dm.datasets["train"][i] for i in range(n)]
    return examples, ChatCollator(tok.pad_token_id)(examples), ChatCollator(tok.pad_token_id, packing=True)(examples)


def test_full_finetuning_changes_every_weight_and_lowers_loss(tmp_path):
    module = SFTModule(TINY, optimizer=_adamw(1e-3))
    module.configure_model()
    before = _params(module)
    _, padded, _ = _batch(4)
    with torch.no_grad():
        loss_before = module.compute_loss(padded).loss
    _trainer(tmp_path, max_steps=4).fit(module, datamodule=_datamodule())
    after = _params(module)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []
    with torch.no_grad():
        assert module.compute_loss(padded).loss < loss_before


def test_lora_trains_adapter_only(tmp_path):
    module = SFTModule(TINY, lora=LoRASpec(r=4, alpha=8), optimizer=_adamw(1e-2))
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n for n in trainable)
    before = _params(module)
    _trainer(tmp_path, max_steps=3).fit(module, datamodule=_datamodule())
    after = _params(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in trainable if "lora_B" in n} <= changed  # B starts at 0 and must move
    assert changed <= trainable  # base weights frozen


def test_configure_model_is_idempotent():
    module = SFTModule(TINY)
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model


def test_loss_matches_transformers_own_loss():
    """P8: our shifted, masked token mean equals the HF causal-LM loss with -100 labels (padded batch)."""
    module = SFTModule(TINY)
    module.configure_model()
    _, padded, _ = _batch(3)
    with torch.no_grad():
        ours = module.compute_loss(padded).loss
        theirs = module.model(**padded, use_cache=False).loss
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_packed_batch_gives_the_padded_loss(reduction):
    """Padding-free packing with use_cache=False keeps examples apart: same loss as the padded batch."""
    module = SFTModule(TINY, loss_reduction=reduction)
    module.configure_model()
    _, padded, packed = _batch(3)
    assert "attention_mask" not in packed
    with torch.no_grad():
        assert_close(module.compute_loss(packed).loss, module.compute_loss(padded).loss, rtol=1e-4, atol=1e-5)


def test_logits_only_at_supervised_positions_do_not_change_the_loss():
    module = SFTModule(TINY)
    module.configure_model()
    assert module._logits_to_keep
    _, padded, _ = _batch(3)
    with torch.no_grad():
        kept = module.compute_loss(padded).loss
        module._logits_to_keep = False
        full = module.compute_loss(padded).loss
    assert_close(kept, full)


@pytest.mark.parametrize("lora", [None, LoRASpec(r=4, alpha=8)], ids=["full", "lora"])
def test_export_reloads_with_identical_outputs(tmp_path, lora):
    module = SFTModule(TINY, lora=lora, optimizer=_adamw(1e-2))
    export = PretrainedExport(str(tmp_path / "export"))
    _trainer(tmp_path, max_steps=2, callbacks=[export]).fit(module, datamodule=_datamodule())
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert "tokenizer.json" in files
    if lora is None:
        assert "model.safetensors" in files
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    else:
        from peft import AutoPeftModelForCausalLM

        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not any(f.endswith(".bin") or f.endswith(".pt") for f in files)
        reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    _, padded, _ = _batch(2)
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(module(padded), reloaded(**padded, use_cache=False).logits)


def test_checkpoint_reloads_with_weights_only_and_identical_outputs(tmp_path):
    module = SFTModule(TINY, lora=LoRASpec(r=4, alpha=8), optimizer=_adamw(1e-2))
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(module, datamodule=_datamodule())
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["lora"]["r"] == 4
    restored = SFTModule.load_from_checkpoint(path, weights_only=True)
    assert restored.lora == LoRASpec(r=4, alpha=8)
    _, padded, _ = _batch(2)
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(module(padded), restored(padded))


def _fit_resumable(tmp_path: Path, max_steps: int, kill_at: int | None = None, ckpt: str | None = None) -> SFTModule:
    module = SFTModule(TINY, optimizer=_adamw(3e-3), lr_scheduler=_cosine)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=_datamodule(batch_size=8), ckpt_path=ckpt)
    return module


def _cosine(optimizer):
    from ftmods.optim import WarmupCosineLR

    return WarmupCosineLR(optimizer, warmup_steps=2, total_steps=30)


@pytest.mark.parametrize("kill_at", [17, 13])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, kill_at):
    """30 steps over 96 examples in batches of 8 = 12 batches per epoch: the crash at step 17 is mid-epoch 1, so the
    resumed run must continue epoch 1's shuffled order (not replay epoch 0's) and then epoch 2's, with the same
    optimizer and scheduler state. The crash at step 13 resumes from the checkpoint of epoch 0's last batch: the run
    must start epoch 1 with epoch 1's order (a plain StatefulDataLoader replayed epoch 0's there)."""
    straight = _fit_resumable(tmp_path / "a", max_steps=30)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_resumable(tmp_path / "b", max_steps=30, kill_at=kill_at)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    # Lightning runs ModelCheckpoint after the other callbacks, so the crash at step k comes before that step's
    # checkpoint: the run resumes from step k - 1.
    assert torch.load(last, weights_only=True)["global_step"] == kill_at - 1
    resumed = _fit_resumable(tmp_path / "b", max_steps=30, ckpt=str(last))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_specs_are_validated_and_accept_checkpoint_dicts():
    from ftmods.models.loading import LoadOptions

    with pytest.raises(ValueError, match="r must be"):
        SFTModule(TINY, lora=LoRASpec(r=0))
    assert SFTModule(TINY, load={"dtype": "bfloat16"}).load_options == LoadOptions(dtype="bfloat16")


def test_resolve_is_the_same_path_as_a_local_folder(tmp_path):
    """The tiny id is only a shortcut for a folder loaded through from_pretrained."""
    folder = resolve_pretrained(TINY)
    a, b = SFTModule(TINY), SFTModule(folder)
    a.configure_model()
    b.configure_model()
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def _batch8_and_accumulated_4x2(tmp_path: Path, **module_kwargs) -> tuple[SFTModule, SFTModule]:
    """3 SGD steps with batches of 8, and with 2 accumulated micro-batches of 4 over the same examples."""
    runs = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        module = SFTModule(TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **module_kwargs)
        trainer = _trainer(tmp_path / f"{batch_size}", max_steps=3, accumulate_grad_batches=accumulate)
        trainer.fit(module, datamodule=_datamodule(batch_size=batch_size))
        runs.append(module)
    return runs[0], runs[1]


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, reduction):
    """P6: 2 micro-batches of 4 accumulated == 1 batch of 8 holding the same examples (the shuffled order does not
    depend on the batch size), although the micro-batches hold different numbers of supervised tokens. SGD makes the
    update linear in the gradient, so any normalisation error shows up directly in the weights."""
    large, accumulated = _batch8_and_accumulated_4x2(tmp_path, loss_reduction=reduction)
    for (name, a), b in zip(large.named_parameters(), accumulated.parameters(), strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_per_micro_batch_normalisation_differs_from_one_large_batch(tmp_path):
    """The contrast that shows the test above can fail: averaging per-micro-batch means is not the global mean."""
    large, accumulated = _batch8_and_accumulated_4x2(tmp_path, global_normalization=False)
    pairs = zip(large.parameters(), accumulated.parameters(), strict=True)
    assert max(float((a - b).abs().max()) for a, b in pairs) > 1e-4
