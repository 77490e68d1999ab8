"""CLSRLModule on the tiny Qwen2-VL (random, and warm-started on coloured shapes), on the CPU.

Covers the issue's "done when": training log-probs equal ``generate``'s for 2 prompts x 4 samples with different
images (and R1-V's ``.repeat`` expansion does not), kill-and-resume equals an uninterrupted run (mu = 1 and mu = 2),
plus smoke training in both modes with frozen parts unchanged, LoRA with the adapter-disabled reference, export,
checkpoints without the reference copy, evaluation with base / new / harmonic mean, and clear errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support.callbacks import KillAt
from transformers import AutoModelForImageTextToText, GenerationConfig

from ftmods.cls_rl import CLSRLModule
from ftmods.cls_rl.module import REFERENCE_PREFIX, harmonic_mean
from ftmods.datamodules import FewShotImageDataModule
from ftmods.datamodules.fewshot_images import TRAIN_PROMPTS
from ftmods.models.loading import LoRASpec
from ftmods.models.sharding import vision_tower
from ftmods.ops.grpo import completion_mask

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "configs" / "data" / "shapes"
TOY = "tiny/qwen2-vl-shapes"


def _module(pretrained: str = TOY, **kwargs: Any) -> CLSRLModule:
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    kwargs.setdefault("max_completion_length", 24)
    kwargs.setdefault("log_completions_every_n_steps", 1)
    return CLSRLModule(pretrained, **kwargs)


def _data(mode: str = "think", **kwargs: Any) -> FewShotImageDataModule:
    kwargs.setdefault("batch_size", 2)
    return FewShotImageDataModule(str(SHAPES / "train"), test_root_or_file=str(SHAPES / "test"),
                                  class_names=str(SHAPES / "classnames.txt"), shots=2, image_size=56, mode=mode,
                                  eval_batch_size=12, **kwargs)  # fmt: skip


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def _batch(dm: FewShotImageDataModule) -> dict[str, Any]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("pretrained", ["tiny/qwen2-vl", "tiny/qwen2.5-vl"])
def test_training_logprobs_equal_generate_logprobs_for_2_prompts_x_4_samples(pretrained):
    """The scoring forward (prompt + completion, each image's patches repeated per sample, ``mm_token_type_ids``
    extended with zeros) gives the log-probs of ``generate``'s own logits, to float32 rounding (spec §7: 4.8e-7).
    R1-V's ``pixel_values.repeat(G, 1)`` puts prompt 1's image under prompt 0's samples and misses by far more."""
    module = _module(pretrained, num_generations=4)
    module.configure_model()
    batch = _batch(_data())
    assert batch["labels"][0] != batch["labels"][1] or batch["ids"][0] != batch["ids"][1]  # two different images
    inputs = module.encode(batch)
    module.model.eval()
    config = GenerationConfig(**module.generation_config(sample=True).to_dict())
    config.output_logits, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    out = module.model.generate(**inputs, generation_config=config)
    prompt_len = inputs["input_ids"].shape[1]
    completion_ids = out.sequences[:, prompt_len:]  # (8, T)
    assert completion_ids.shape[0] == 8
    mask = completion_mask(completion_ids, module.processor.tokenizer.eos_token_id)
    generated = torch.stack(out.logits, 1).float().log_softmax(-1)  # (8, T, V) raw logits of each step
    expected = generated.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (8, T)
    with torch.no_grad():
        scoring = module.scoring_inputs(inputs, completion_ids, mask)
        ours = module.completion_logprobs(module.model, scoring, completion_ids)
        naive = dict(scoring, pixel_values=inputs["pixel_values"].repeat(4, 1))
        wrong = module.completion_logprobs(module.model, naive, completion_ids)
    assert ((ours - expected).abs() * mask).max() < 1e-5
    assert ((wrong - expected).abs() * mask).max() > 1e-3


def test_rollout_groups_rewards_and_advantages():
    module = _module(num_generations=4, rewards=["support.rewards.length_parity", "accuracy"], reward_weights=[1, 2])
    module.configure_model()
    batch = _batch(_data())
    rollout = module.rollout(batch, seed=3)
    assert rollout.completion_ids.shape[0] == 8
    assert rollout.labels == [label for label in batch["labels"] for _ in range(4)]
    expected = rollout.reward_parts["support.rewards.length_parity"] + 2 * rollout.reward_parts["accuracy"]
    assert torch.equal(rollout.rewards, expected)
    assert torch.allclose(rollout.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)
    assert rollout.ref_logp is not None
    assert rollout.old_logp is None  # mu = 1
    assert all(t >= 0 for t in rollout.timings.values())
    # keyed (default): a function of (hparams seed, epoch, item ids), whatever the torch seed
    assert torch.equal(module.rollout(batch, seed=4).completion_ids, rollout.completion_ids)
    module.hparams["seed"] = 1
    assert not torch.equal(module.rollout(batch, seed=3).completion_ids, rollout.completion_ids)
    # torch: generate's sampler, a function of the per-micro-batch seed
    module.hparams["rollout_sampling"] = "torch"
    seeded = module.rollout(batch, seed=3).completion_ids
    assert torch.equal(module.rollout(batch, seed=3).completion_ids, seeded)
    assert not torch.equal(module.rollout(batch, seed=4).completion_ids, seeded)


def test_never_samples_image_placeholder_tokens():
    module = _module("tiny/qwen2-vl", max_completion_length=64)
    module.configure_model()
    image_ids = module._vision_token_ids()
    assert module.model.config.image_token_id in image_ids
    rollout = module.rollout(_batch(_data()), seed=0)
    assert not torch.isin(rollout.completion_ids, torch.tensor(image_ids)).any()


# ----------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("thinking", [True, False])
def test_fit_updates_language_model_and_keeps_frozen_vision_and_reference(tmp_path, thinking):
    module = _module(thinking=thinking, rewards=["support.rewards.length_parity"], freeze_vision=True)
    module.configure_model()
    before, reference = _snapshot(module.model), _snapshot(module.ref_model)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_data("think" if thinking else "no_think"))
    vision = {f"{name}." for name, m in module.model.named_modules() if m is vision_tower(module.model)}
    frozen = [n for n in before if any(n.startswith(v) for v in vision)]
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert frozen
    assert trained
    assert all(torch.equal(before[n], dict(module.model.named_parameters())[n]) for n in frozen)
    assert any(not torch.equal(before[n], dict(module.model.named_parameters())[n]) for n in trained)
    assert all(torch.equal(reference[n], p) for n, p in module.ref_model.named_parameters())
    metrics = trainer.callback_metrics
    for key in ("train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/kl",
                "train/completion_length", "train/rewards/support.rewards.length_parity"):  # fmt: skip
        assert key in metrics, key
    assert metrics["train/kl"] > 0  # the policy moved away from the reference


def test_constant_reward_gives_no_update_without_kl(tmp_path):
    """Every group has zero reward std, so every advantage is exactly 0: with beta = 0 nothing moves."""
    module = _module(rewards=["support.rewards.constant"], beta=0.0)
    module.configure_model()
    assert module.ref_model is None
    before = _snapshot(module.model)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=_data())
    assert all(torch.equal(before[n], p) for n, p in module.model.named_parameters())
    assert trainer.callback_metrics["train/frac_reward_zero_std"] == 1.0


def test_lora_trains_only_the_adapter_and_uses_the_disabled_adapter_as_reference(tmp_path):
    lora = LoRASpec(r=4, target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj")
    module = _module(lora=lora, rewards=["support.rewards.length_parity"])
    module.configure_model()
    assert module.ref_model is None
    before = _snapshot(module.model)
    _trainer(tmp_path, max_steps=3).fit(module, datamodule=_data())
    after = dict(module.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed
    assert all("lora_" in n for n in changed)
    batch = _batch(_data())
    rollout = module.rollout(batch, seed=0)
    with torch.no_grad(), module.model.disable_adapter():
        base = module.completion_logprobs(module.model, rollout.inputs, rollout.completion_ids)
    assert rollout.ref_logp is not None
    assert torch.allclose(rollout.ref_logp, base)
    policy = module.completion_logprobs(module.model, rollout.inputs, rollout.completion_ids).detach()
    assert not torch.allclose(policy, base)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_other_loss_types_train(tmp_path, loss_type):
    module = _module(rewards=["support.rewards.length_parity"], loss_type=loss_type)
    module.configure_model()
    before = _snapshot(module.model)
    _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(module, datamodule=_data())
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())


def test_completion_table_is_written(tmp_path):
    module = _module(rewards=["support.rewards.length_parity"], log_completions=3)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=_data())
    files = sorted((tmp_path / "train_completions").glob("*.jsonl"))
    assert files
    rows = files[0].read_text().splitlines()
    assert len(rows) == 3
    assert '"completion"' in rows[0]
    assert '"advantage"' in rows[0]


def test_qwen2_5_vl_trains(tmp_path):
    module = _module("tiny/qwen2.5-vl", rewards=["support.rewards.length_parity"])
    module.configure_model()
    before = _snapshot(module.model)
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=_data())
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())


# ------------------------------------------------------------------------------------------------- evaluation


def test_test_reports_exact_lenient_per_subset_and_harmonic_mean(tmp_path):
    module = _module(thinking=False, eval_max_new_tokens=12)
    trainer = _trainer(tmp_path)
    dm = _data("no_think", split="base", eval_prompt_template=TRAIN_PROMPTS["no_think"])  # the toy's warm-start prompt
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]  # one dict per loader (base, new), same epoch logs
    for matcher in ("exact", "lenient"):
        base, new = metrics[f"test/acc_{matcher}/base"], metrics[f"test/acc_{matcher}/new"]
        assert 0 <= min(base, new) <= max(base, new) <= 100
        assert metrics[f"test/acc_{matcher}/hm"] == pytest.approx(float(harmonic_mean(base, new)), abs=1e-4)
        assert base <= metrics["test/acc_lenient/base"]  # lenient accepts everything exact accepts
    predictions = trainer.predict(module, datamodule=dm)  # per loader (base, new), per batch, per image
    records = [r for loader in predictions for batch in loader for r in batch]
    assert len(records) == 24  # 12 base + 12 new test images
    assert {r["subset"] for r in records} == {"base", "new"}
    assert all(set(r) == {"id", "label", "subset", "prediction", "exact", "lenient"} for r in records)
    for subset in ("base", "new"):  # the logged accuracies are the per-image verdicts' means, in percent
        for matcher in ("exact", "lenient"):
            verdicts = [r[matcher] for r in records if r["subset"] == subset]
            assert metrics[f"test/acc_{matcher}/{subset}"] == pytest.approx(100 * sum(verdicts) / len(verdicts))


def test_harmonic_mean_values():
    """H = 2BN/(B+N): 2*80*60/140 = 68.571..; H(x, x) = x; H with a 0 is 0."""
    assert float(harmonic_mean(80.0, 60.0)) == pytest.approx(9600 / 140)
    assert float(harmonic_mean(50.0, 50.0)) == pytest.approx(50.0)
    assert float(harmonic_mean(0.0, 70.0)) == 0.0
    assert float(harmonic_mean(0.0, 0.0)) == 0.0


# ---------------------------------------------------------------------------------------- export, checkpoints


def test_export_reloads_with_identical_outputs(tmp_path):
    module = _module(rewards=["support.rewards.length_parity"])
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=_data())
    module.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    assert (tmp_path / "export" / "processor_config.json").exists() or (
        tmp_path / "export" / "preprocessor_config.json"
    ).exists()
    module.model.eval()
    inputs = module.encode(_batch(_data()))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, module.model(**inputs).logits)


def test_checkpoint_leaves_out_the_reference_and_loads_with_weights_only(tmp_path):
    module = _module(rewards=["support.rewards.length_parity"])
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=_data())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(REFERENCE_PREFIX) for k in state)
    restored = CLSRLModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    for (name, a), b in zip(module.model.named_parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    fresh = _module()
    fresh.configure_model()
    for name, p in restored.ref_model.named_parameters():  # the reference is the pretrained model again
        assert torch.equal(p, dict(fresh.ref_model.named_parameters())[name]), name


def _fit(
    folder: Path, mu: int, kill_at: int | None = None, ckpt: str | None = None, max_steps: int = 6, every: int = 1
) -> CLSRLModule:
    module = _module(rewards=["support.rewards.length_parity", "accuracy"], num_iterations=mu)
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=0)
    callbacks = [checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(
        folder, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks, accumulate_grad_batches=2
    )
    trainer.fit(module, datamodule=_data(num_iterations=mu), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("mu", [1, 2])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, mu):
    """Killed after step 4, resumed from the step-3 checkpoint (mid-epoch; with mu = 2 between the two updates of one
    rollout, which comes back from the checkpoint): the same completions are drawn and reused, so the weights match
    bit for bit."""
    straight = _fit(tmp_path / "a", mu)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", mu, kill_at=4)
    resumed = _fit(tmp_path / "b", mu, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_extending_a_finished_run_draws_the_uninterrupted_rollouts(tmp_path):
    """A run stopped at max_steps 2 (micro-batch 4 of the 6 in epoch 0) writes last.ckpt at the end of training, after
    Lightning has closed epoch 0; extended to 6 steps with it, Lightning counts epoch 1 while the loader yields the
    rest of epoch 0. Rollouts are keyed by the data epoch (``ftmods.datamodules.samplers.data_epoch``), so the
    extension draws the uninterrupted run's completions and ends on its weights bit for bit (keyed by Lightning's
    epoch, they did not)."""
    straight = _fit(tmp_path / "a", 1)
    _fit(tmp_path / "b", 1, max_steps=2, every=1000)
    extended = _fit(tmp_path / "b", 1, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.model.named_parameters(), extended.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_mu_2_reuses_each_rollout_for_two_updates(tmp_path):
    module = _module(rewards=["support.rewards.length_parity"], num_iterations=2)
    calls: list[list[str]] = []
    original = module.rollout

    def counting(batch: Any, *, seed: int | None = None) -> Any:
        calls.append(list(batch["ids"]))
        return original(batch, seed=seed)

    module.rollout = counting  # type: ignore[method-assign]
    trainer = _trainer(tmp_path, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=_data(num_iterations=2))
    assert len(calls) == 4  # 4 steps x 2 micro-batches = 8 micro-batches, half of them reuse a rollout
    assert "train/clip_fraction" in trainer.callback_metrics


# ------------------------------------------------------------------------------------------------------ errors


def test_mode_mismatch_with_the_datamodule_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.init_args.mode: no_think"):
        _trainer(tmp_path, max_steps=1).fit(_module(thinking=False), datamodule=_data("think"))


def test_num_iterations_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.init_args.num_iterations: 2"):
        _trainer(tmp_path, max_steps=1).fit(_module(num_iterations=2), datamodule=_data())


def test_long_prompt_names_the_item():
    module = _module(max_prompt_length=50)
    module.configure_model()
    batch = _batch(_data())
    with pytest.raises(ValueError, match=r"exceed max_prompt_length=50: .*\.png \(\d+ tokens\)"):
        module.encode(batch)


def test_reward_errors():
    with pytest.raises(ValueError, match=r"unknown reward 'accuracyy'"):
        _module(rewards=["accuracyy"])
    with pytest.raises(ValueError, match=r"cannot import 'nope'"):
        _module(rewards=["support.rewards.nope"])
    with pytest.raises(ValueError, match=r"reward_weights has 1 values for 2 rewards"):
        _module(rewards=["accuracy", "format"], reward_weights=[1.0])
    module = _module(rewards=["support.rewards.wrong_length"])
    module.configure_model()
    with pytest.raises(ValueError, match=r"returned 7 values for 8 completions"):
        module.rollout(_batch(_data()), seed=0)
    with pytest.raises(ValueError, match=r"num_generations must be >= 2"):
        _module(num_generations=1)
