"""PSOModule on the tiny random SD / SDXL pipelines (CPU, no download): offline and online training, the reference,
LoRA export into a diffusers pipeline, checkpoints and kill-and-resume, validation images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support.callbacks import KillAt
from torch.utils.data import Dataset

from ftmods.datamodules.samplers import EpochShuffleSampler, resumable_loader
from ftmods.models.loading import LoRASpec
from ftmods.models.tiny import resolve_pretrained
from ftmods.pso import PSOModule
from ftmods.pso.rewards import PickScoreReward

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
LORA = LoRASpec(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")


class _Pairs(Dataset):
    """8 fixed (caption, target image, reference image) pairs, 64x64 in [-1, 1]."""

    def __init__(self, count: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.targets = torch.rand(count, 3, 64, 64, generator=generator) * 2 - 1
        self.references = torch.rand(count, 3, 64, 64, generator=generator) * 2 - 1

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": str(i), "captions": CAPTIONS[i % 4], "target": self.targets[i], "reference": self.references[i],
                "original_sizes": torch.tensor([64, 64]), "crop_top_lefts": torch.tensor([0, 0])}  # fmt: skip


class _Prompts(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": str(i), "captions": CAPTIONS[i % 4]}


def _loader(dataset: Dataset, batch_size: int = 2, epoch: int = 0) -> Any:
    sampler = EpochShuffleSampler(dataset, seed=0, epoch=epoch)
    return resumable_loader(dataset, batch_size=batch_size, sampler=sampler)


class _Data(LightningDataModule):
    """Builds the loader with the trainer's epoch, as ftmods' DataModules do (needed to extend a finished run)."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> Any:
        return _loader(self.dataset, epoch=self.trainer.current_epoch if self.trainer else 0)


def _module(pretrained: str = "tiny/sd", **kwargs: Any) -> PSOModule:
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    kwargs.setdefault("resolution", 64)
    kwargs.setdefault("timesteps", "sdxl-turbo")
    kwargs.setdefault("beta", 50.0)
    return PSOModule(pretrained, **kwargs)


def _online(pretrained: str = "tiny/sd", **kwargs: Any) -> PSOModule:
    return _module(pretrained, mode="online", reward=PickScoreReward("tiny/clip", None), lora=LORA, **kwargs)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def _batch(count: int = 2) -> dict[str, Any]:
    data = _Pairs()
    items = [data[i] for i in range(count)]
    return {k: [it[k] for it in items] if isinstance(items[0][k], str) else torch.stack([it[k] for it in items])
            for k in items[0]}  # fmt: skip


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------------- offline


@pytest.mark.parametrize(("pretrained", "lora"), [("tiny/sd", LORA), ("tiny/sdxl", None)])
def test_offline_loss_is_ln2_at_init_and_one_step_raises_implicit_accuracy(pretrained, lora):
    """LoRA B starts at zero and the full-fine-tuning reference is a copy: policy == reference, every logit is 0,
    the loss is ln 2 and the implicit accuracy 0; one AdamW step on the same pairs makes every logit positive."""
    module = _module(pretrained, lora=lora)
    module.configure_model()
    loss, logs = module.offline_loss(module.pair_errors(_batch(), module._generator(0)))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(logs["implicit_accuracy"]) == 0.0
    optimizer = torch.optim.AdamW([p for p in module.unet.parameters() if p.requires_grad], lr=1e-3)
    loss.backward()
    optimizer.step()
    loss_after, logs_after = module.offline_loss(module.pair_errors(_batch(), module._generator(0)))
    assert float(loss_after) < math.log(2)
    assert float(logs_after["implicit_accuracy"]) == 1.0


def test_swapping_target_and_reference_negates_the_logit():
    module = _module(lora=LORA)
    module.configure_model()
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # policy != reference
    batch = _batch()
    swapped = dict(batch, target=batch["reference"], reference=batch["target"])
    errors, errors_swapped = (module.pair_errors(b, module._generator(0)) for b in (batch, swapped))
    assert torch.allclose(errors["policy_win"], errors_swapped["policy_lose"], atol=1e-6)
    out = module.offline_loss(errors)[1]["logit"]
    out_swapped = module.offline_loss(errors_swapped)[1]["logit"]
    assert float(out) == pytest.approx(-float(out_swapped), abs=1e-6)
    assert abs(float(out)) > 0


def test_offline_fit_trains_lora_only(tmp_path):
    module = _module(lora=LORA, prior_loss_weight=0.5)
    module.configure_model()
    before = _snapshot(module)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=_loader(_Pairs()))
    after = dict(module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed
    assert all("lora" in n for n in changed)
    for key in ("train/loss", "train/implicit_accuracy", "train/logit", "train/policy_err_win", "train/ref_err_lose"):
        assert key in trainer.callback_metrics, key


def test_hinge_without_reference_makes_no_reference_pass(tmp_path):
    module = _module(loss="hinge", reference_model="none", beta=5.0, neg_weight=0.1, prior_loss_weight=0.5)
    module.configure_model()
    assert module.ref_unet is None
    errors = module.pair_errors(_batch(), module._generator(0))
    assert "ref_win" not in errors
    before = _snapshot(module.unet)
    _trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=_loader(_Pairs()))
    assert any(not torch.equal(before[n], p) for n, p in module.unet.named_parameters())


def test_argument_errors():
    with pytest.raises(ValueError, match="needs loss='hinge'"):
        PSOModule("tiny/sd", reference_model="none")
    with pytest.raises(ValueError, match="needs a reward model"):
        PSOModule("tiny/sd", mode="online")
    with pytest.raises(ValueError, match="unknown timestep preset 'turbo'"):
        PSOModule("tiny/sd", timesteps="turbo")


# ----------------------------------------------------------------------------------------------------- online


def test_online_logratio_is_zero_at_init_and_fit_updates_lora(tmp_path):
    module = _online()
    module.configure_model()
    rollout = module.rollout(CAPTIONS[:2], module._generator(0))
    assert rollout["states"].shape[:2] == (5, 4)  # 4 steps + start, 2 prompts x 2 samples
    assert torch.isfinite(rollout["images"]).all()
    cond = module.encode_prompts(rollout["prompts"])
    with torch.no_grad():
        policy = module.transition_logprobs(module.unet, rollout, 0, cond)
        with module.reference_unet() as ref:
            reference = module.transition_logprobs(ref, rollout, 0, cond)
    assert torch.equal(policy, reference)
    before = _snapshot(module.unet)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(_Prompts()))
    assert trainer.global_step == 2
    changed = {n for n, p in module.unet.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    assert all("lora" in n for n in changed)
    for key in ("train/loss", "train/reward", "train/reward_margin", "train/frac_ties", "train/clip_fraction"):
        assert key in trainer.callback_metrics, key


def test_preferences_and_ties():
    module = _online(tie_policy="skip")
    signs = module.preferences(torch.tensor([0.3, 0.5, 0.2, 0.1, 0.5, 0.4]))  # sample 0 rewards, then sample 1
    assert signs.tolist() == [[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]
    module = _online(tie_policy="second_wins")
    assert module.preferences(torch.tensor([0.5, 0.5])).tolist() == [[-1.0, 1.0]]


# ------------------------------------------------------------------------------------------ export, resume


def test_lora_from_a_checkpoint_loads_into_a_diffusers_pipeline_with_identical_outputs(tmp_path):
    module = _module(lora=LORA)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=_loader(_Pairs()))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("vae.", "text_encoders.")) for k in state)  # frozen parts are not stored
    restored = PSOModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    restored.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny/sd"), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    ours = module.sample(["a red circle"], seed=0)
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=0.0, height=64, width=64,
                  generator=generator, output_type="pt").images  # fmt: skip
    torch.testing.assert_close(ours, theirs.float().clamp(0, 1), atol=1e-5, rtol=1e-5)
    base = module.sample(["a red circle"], seed=0)
    with module.reference_unet():
        untuned = module.sample(["a red circle"], seed=0)
    assert not torch.allclose(base, untuned)  # the adapter changes the images


def test_full_fine_tuning_exports_a_pipeline(tmp_path):
    module = _module()
    _trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=_loader(_Pairs()))
    module.save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    for (name, a), b in zip(module.unet.named_parameters(), pipe.unet.parameters(), strict=True):
        assert torch.equal(a, b), name


def _fit(
    folder: Path, online: bool, kill_at: int | None = None, ckpt: str | None = None, max_steps: int = 5, every: int = 1
) -> PSOModule:
    module = _online() if online else _module(lora=LORA)
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=0)
    callbacks = [checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(folder, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=_Data(_Prompts() if online else _Pairs()), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, online):
    """Killed after step 3 of 5 (mid-epoch), resumed from the step-2 checkpoint: noise, timesteps, rollouts and the
    data order are functions of (seed, epoch, batch, rank), so the weights match bit for bit."""
    straight = _fit(tmp_path / "a", online)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", online, kill_at=3)
    resumed = _fit(tmp_path / "b", online, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_extending_a_finished_run_matches_the_uninterrupted_run(tmp_path, online):
    """Stopped at max_steps 2 (mid-epoch; last.ckpt written at the end of training, after Lightning closed the epoch)
    and extended to 5: noise, timesteps and rollouts are keyed by the data epoch, not Lightning's (one ahead in the
    extension until the stopped epoch is done), so the weights match the uninterrupted run bit for bit."""
    straight = _fit(tmp_path / "a", online)
    _fit(tmp_path / "b", online, max_steps=2, every=1000)
    extended = _fit(tmp_path / "b", online, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.unet.named_parameters(), extended.unet.parameters(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------- validation


def test_checkpoints_leave_the_reward_model_out(tmp_path):
    module = _online()
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=_loader(_Prompts()))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("reward.", "vae.", "text_encoders.")) for k in state)
    assert any("lora" in k for k in state)
    resumed = _online()
    _trainer(tmp_path, max_steps=2).fit(resumed, train_dataloaders=_loader(_Prompts()), ckpt_path=tmp_path / "m.ckpt")


def test_validation_writes_an_image_grid_and_the_reward(tmp_path):
    module = _module(lora=LORA, reward=PickScoreReward("tiny/clip", None))
    trainer = _trainer(tmp_path, max_steps=1)
    prompts = resumable_loader(_Prompts(), batch_size=4)
    trainer.validate(module, dataloaders=prompts, verbose=False)
    grids = sorted((tmp_path / "val_images").glob("*.png"))
    assert len(grids) == 1
    assert "val/reward" in trainer.callback_metrics
    from PIL import Image

    assert Image.open(grids[0]).size == (4 * 64, 64)


def test_dmd2_style_setup_online(tmp_path):
    """DMD2's recipe on the tiny SDXL: UNet weights from a separate file, LCMScheduler with explicit timesteps, the
    re-noising sampler for rollouts; validation samples at those timesteps."""
    from safetensors.torch import save_file

    source = _module("tiny/sdxl")
    source.configure_model()
    with torch.no_grad():
        for p in source.unet.parameters():
            p.mul_(1.01)  # recognisably different weights
    save_file({k: v.contiguous() for k, v in source.unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    module = _online("tiny/sdxl", unet_weights=str(tmp_path / "unet.safetensors"), scheduler_class="LCMScheduler",
                     inference_timesteps=[999, 749, 499, 249])  # fmt: skip
    module.configure_model()
    assert type(module.noise_scheduler).__name__ == "LCMScheduler"
    assert module._sampler() == "renoise"
    base = {k.replace(".base_layer", ""): v for k, v in module.unet.state_dict().items() if "lora" not in k}
    assert base.keys() == source.unet.state_dict().keys()
    assert all(torch.equal(v, source.unet.state_dict()[k]) for k, v in base.items())
    rollout = module.rollout(CAPTIONS[:1], module._generator(0))
    assert rollout["timesteps"].tolist() == [999, 749, 499, 249]
    before = _snapshot(module.unet)
    _trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=_loader(_Prompts()))
    assert any(not torch.equal(before[n], p) for n, p in module.unet.named_parameters())
    assert torch.isfinite(module.sample(["a red circle"])).all()


def test_reference_samples_are_generated_once_into_the_cache(tmp_path):
    """Offline with model samples: fit starts by sampling the frozen model for every missing reference (seeded per
    row, model-native 4 steps, cfg 0) into the DataModule's cache; the cached latents are exactly what the pipeline
    gives for that seed, and a second fit generates nothing."""
    from ftmods.datamodules import PSODataModule
    from ftmods.datamodules.pso import load_reference_latents

    repo = Path(__file__).resolve().parents[2]

    def data() -> PSODataModule:
        return PSODataModule(str(repo / "configs/data/pso_tiny/pickapic.parquet"), format="pickapic",
                             reference_cache=str(tmp_path / "cache"), resolution=64, batch_size=2)  # fmt: skip

    requests = data().reference_requests()
    assert len(requests) == 14  # 16 rows, 2 ties dropped
    module = _module(lora=LORA)
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    assert data().reference_requests() == []
    first = requests[0]
    cached = load_reference_latents(tmp_path / "cache", first.key)
    with module.reference_unet():
        direct = module.pipeline(prompt=[first.prompt], num_inference_steps=4, guidance_scale=0.0, height=64,
                                 width=64, generator=[torch.Generator().manual_seed(first.seed)],
                                 output_type="latent").images[0]  # fmt: skip
    # batch of 8 in the cache vs 1 here: float32 kernels may differ in the last bits (seen: 1.1e-5 in 1 of 256)
    torch.testing.assert_close(cached, direct.float(), rtol=1e-4, atol=1e-4)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")}
    _trainer(tmp_path, max_steps=1).fit(_module(lora=LORA), datamodule=data())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")} == stamps  # nothing rewritten
    with pytest.raises(ValueError, match=r"was made with steps='4', this run uses '2'"):
        _trainer(tmp_path, max_steps=1).fit(_module(lora=LORA, num_inference_steps=2), datamodule=data())


def test_mse_baseline_trains_on_targets_only(tmp_path):
    module = _module(loss="mse")
    module.configure_model()
    assert module.ref_unet is None  # no reference copy for the baseline
    batch = _batch()
    loss, logs = module.mse_loss(batch, module._generator(0))
    no_reference = dict(batch, reference=torch.zeros_like(batch["reference"]))
    assert torch.equal(module.mse_loss(no_reference, module._generator(0))[0], loss)  # references are unused
    before = _snapshot(module.unet)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(_Pairs()))
    assert any(not torch.equal(before[n], p) for n, p in module.unet.named_parameters())
    assert "train/loss" in trainer.callback_metrics


def test_v_prediction_targets_the_velocity():
    """With a v-prediction scheduler config the pair errors are against v = sqrt(a) eps - sqrt(1 - a) x0; policy ==
    reference still gives ln 2."""
    module = _module(lora=LORA)
    module.configure_model()
    module.noise_scheduler.register_to_config(prediction_type="v_prediction")
    loss, _ = module.offline_loss(module.pair_errors(_batch(), module._generator(0)))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    eps_module = _module(lora=LORA)
    eps_module.configure_model()
    v_err = module.pair_errors(_batch(), module._generator(0))["policy_win"]
    eps_err = eps_module.pair_errors(_batch(), eps_module._generator(0))["policy_win"]
    assert not torch.allclose(v_err, eps_err)


def test_dreambooth_hinge_with_class_prompt_references(tmp_path):
    """The DreamBooth recipe: instance photos vs samples of the class prompt (generated into the cache at fit start,
    shared by all items), reference-free hinge with the prior term."""
    from ftmods.datamodules import PSODataModule

    repo = Path(__file__).resolve().parents[2]
    data = PSODataModule(str(repo / "configs/data/pso_tiny/dreambooth"), format="dreambooth",
                         instance_prompt="a photo of sks star", class_prompt="a photo of star", num_references=3,
                         reference_cache=str(tmp_path / "cache"), resolution=64, batch_size=2)  # fmt: skip
    assert [r.key for r in data.reference_requests()] == ["class:0", "class:1", "class:2"]
    module = _module(lora=LORA, loss="hinge", reference_model="none", beta=5.0, neg_weight=0.1, prior_loss_weight=0.5)
    module.configure_model()
    before = _snapshot(module)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    assert all("lora" in n for n in changed)


def test_a_broken_reward_fails_naming_it():
    """Any callable is a reward; one that returns the wrong shape or NaN fails with a message naming it."""
    images = torch.rand(2, 3, 64, 64)
    short = _module(mode="online", reward=lambda images, prompts: torch.zeros(images.shape[0] - 1), lora=LORA)
    with pytest.raises(ValueError, match=r"must return 2 finite scores for 2 images, got shape \(1,\)"):
        short.score_images(images, CAPTIONS[:2])
    nan = _module(mode="online", reward=lambda images, prompts: [float("nan")] * images.shape[0], lora=LORA)
    with pytest.raises(ValueError, match="finite: False"):
        nan.score_images(images, CAPTIONS[:2])
    good = _module(mode="online", reward=lambda images, prompts: [0.1, 0.2], lora=LORA)
    assert good.score_images(images, CAPTIONS[:2]).tolist() == pytest.approx([0.1, 0.2])
