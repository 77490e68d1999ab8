"""``PSOModule``: pairwise sample optimization for timestep-distilled diffusion models (arXiv:2410.03190).

Implemented (spec pso §3, §5, §12):

- **Offline** (automatic optimization): each pair is a target image ``x+`` and a reference sample ``x-`` of the
  frozen distilled model for the same caption (pre-generated once into the DataModule's latent cache at the start of
  ``fit``, seeded per row) or the dataset's loser. One timestep ``t`` from the distilled set ``T_K`` and one noise are
  shared by the pair and by policy and reference; the loss is :func:`ftmods.pso.loss.pso_sigmoid_loss` (DPO form on
  the denoising errors, lambda-weighted reference error) or the reference-free ``hinge`` (``pso_db``), plus an optional
  prior term on the reference sample.
- **Online** (manual optimization): pairs of trajectories of the current model for each prompt, sampled with the
  distilled stochastic sampler (Euler-ancestral for Turbo, re-noising for LCM / DMD2) under ``no_grad``, per-sample
  noise; a reward model picks the winner (ties skipped or given to the second sample); every stochastic transition is
  trained with :func:`ftmods.pso.loss.online_pso_loss` (clipped transition-likelihood ratio against the reference).
- SD 1.x / 2.x and SDXL UNets (SDXL micro-conditioning from the batch), epsilon- and v-prediction from the scheduler
  config, the timestep presets of :data:`ftmods.pso.loss.TIMESTEP_PRESETS`, LoRA (reference = adapters disabled) or
  full fine-tuning (reference = a frozen copy, left out of checkpoints).
- Validation: few-step images with the model-native scheduler at cfg 0 and fixed seeds, written as a PNG grid and sent
  to TensorBoard / W&B, with the reward's mean as ``val/reward`` when a reward model is set.
- Export (:meth:`PSOModule.save_pretrained`): diffusers-format LoRA (``pytorch_lora_weights.safetensors``, loads with
  ``pipe.load_lora_weights``) or the whole pipeline after full fine-tuning.
- Scale-out: offline ``t`` and noise are drawn per (epoch, item id), so a run on N ranks with batch B takes the same
  steps as one process with batch N*B (same records per step, same draws). FSDP2 (``FSDP2Strategy`` /
  ``ModelParallelStrategy``): the UNet (and a full fine-tuning reference copy) is sharded per block, children before
  their parents (ResnetBlock2D / BasicTransformerBlock, then the up blocks, then the root); the VAE, text encoders
  and reward model are frozen and small next to the UNet and stay replicated. Sampling (references, rollouts,
  validation) runs the sharded UNet, which gathers each block's parameters in its forward: every rank makes the same
  number of UNet calls. Checkpoints leave the frozen parts out in every strategy; the export gathers the UNet.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ftmods.datamodules.samplers import data_epoch
from ftmods.models.adapters import adapters_disabled
from ftmods.models.loading import LoadOptions, LoRASpec, coerce_spec, load_diffusion_parts, spec_to_hparam
from ftmods.models.sharding import (
    drop_frozen_state,
    fill_frozen_state,
    forward_is_collective,
    fsdp1_root_gathered,
    is_sharded,
    keep_frozen_parts_out_of_checkpoints,
    transformer_layer_classes,
    uses_fsdp1,
)
from ftmods.models.tiny import resolve_pretrained
from ftmods.ops.params import clean_name
from ftmods.optim import build_optimizers
from ftmods.pso.loss import (
    TIMESTEP_PRESETS,
    OnlinePSOLossOutput,
    denoising_error,
    distilled_timesteps,
    euler_ancestral_step,
    gaussian_logprob,
    noised_and_target,
    online_pso_loss,
    pso_hinge_loss,
    pso_sigmoid_loss,
    renoise_step,
)

Reward = Callable[[Tensor, Sequence[str]], Tensor]
Generators = torch.Generator | Sequence[torch.Generator]
"""One random generator for a batch, or one per item."""
REFERENCE_PREFIX = "ref_unet."
FROZEN_PREFIXES = (REFERENCE_PREFIX, "vae.", "text_encoders.", "reward.")
"""State-dict prefixes of the parts that never train and are rebuilt from ``pretrained`` (left out of checkpoints)."""


class PSOModule(LightningModule):
    """PSO fine-tuning of a few-step (timestep-distilled) Stable Diffusion / SDXL model.

    Args:
        pretrained: Hub id, local folder or ``tiny/sd`` / ``tiny/sdxl`` of a diffusers SD / SDXL pipeline.
        mode: ``offline`` (target vs reference-sample pairs from the DataModule) or ``online`` (pairs of the current
            model's samples ranked by ``reward``).
        loss: Offline surrogate: ``sigmoid`` (the PSO / Diffusion-DPO form, needs the reference model), ``hinge``
            (``pso_db`` of the DreamBooth scripts, no reference pass), or ``mse``: the naive baseline the paper
            compares against, plain diffusion-loss fine-tuning on the targets alone (references unused).
        mse_timesteps: ``mse`` baseline: ``all`` (t uniform over the training schedule, the usual fine-tuning) or
            ``distilled`` (t from ``T_K`` like PSO).
        beta: Inverse temperature. Offline ``sigmoid``: multiplies the error margin (no 0.5 factor: Diffusion-DPO's
            ``beta_dpo`` is ``2 * beta``); ``hinge``: 5 in the DreamBooth scripts; online: 50.
        neg_weight: lambda, weight of the reference sample's error in the margin (1 = Diffusion-DPO; DreamBooth 0.1).
        prior_loss_weight: Adds ``weight * mean e_theta(x-)``, the self-sample prior term (DreamBooth scripts: 0.5).
        reference_model: ``initial_frozen`` (the model as loaded: adapters disabled, or a frozen copy after full
            fine-tuning) or ``none`` (no reference pass; only with ``loss="hinge"`` offline).
        timesteps: The distilled training set ``T_K``: a preset name of :data:`ftmods.pso.loss.TIMESTEP_PRESETS`
            (``sdxl-turbo``, ``dmd2``, ``lcm``, ...), an explicit list, or ``None`` = trailing ``num_inference_steps``.
        num_inference_steps: Steps of the model-native sampler for validation and reference samples (4).
        rollout_steps: Online: steps of the training rollouts (``None`` = ``num_inference_steps``); all but the last,
            deterministic, transition are trained.
        sampler: Online: ``euler_ancestral`` (SDXL-Turbo) or ``renoise`` (LCM / DMD2); ``None`` = from the scheduler.
        ratio_clip: Online: clip of the transition-likelihood ratio (0.1).
        reward: Online (required) and validation (optional): ``(images in [0, 1], prompts) -> (B,)``, e.g.
            :class:`ftmods.pso.rewards.PickScoreReward`.
        tie_policy: Online, equal rewards: ``skip`` (zero loss, as the DMD2 script) or ``second_wins`` (Turbo script).
        online_accumulate: Online: prompt batches per optimizer step (gradients of all trained transitions add up).
        lora: Train a LoRA adapter on the UNet (targets e.g. ``[to_q, to_k, to_v, to_out.0]``); ``None`` = full UNet.
        load: How to load the pipeline (dtype, gradient checkpointing).
        unet_weights: Replace the UNet's weights with this state dict (a local ``.safetensors`` / ``.bin`` file, or
            ``org/repo/file`` on the hub), e.g. ``tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin`` into the SDXL-base UNet.
        vae: Replace the VAE (hub id or folder), e.g. ``madebyollin/sdxl-vae-fp16-fix`` for fp16 runs.
        scheduler_class: Replace the scheduler class (diffusers name, e.g. ``LCMScheduler`` for DMD2), same config.
        inference_timesteps: Explicit timesteps for validation / reference sampling and rollouts of that many steps
            (DMD2: ``[999, 749, 499, 249]``); ``None``: trailing spacing.
        resolution: Image side of validation / reference samples (and SDXL's target size).
        guidance_scale: Classifier-free guidance of validation / reference sampling (0 for Turbo / DMD2).
        val_seed: Seed of the validation images.
        seed: Seed of training noise, timesteps and rollouts (offline: per epoch and item id, whatever the number of
            ranks or the batch size; online: per epoch, step and rank), so resumed runs repeat them.
        optimizer: Optimizer factory; default AdamW(lr=1e-5, weight_decay=1e-4).
        lr_scheduler: Scheduler factory (stepped per optimizer step).
        gradient_clip_val: Online: gradient-norm clip (manual optimization clips itself; offline uses the Trainer's).

    Example::

        module = PSOModule("stabilityai/sdxl-turbo", timesteps="sdxl-turbo",
                           lora=LoRASpec(r=32, alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        Trainer(precision="bf16-mixed").fit(module, datamodule=PSODataModule("pairs.parquet", ...))
    """

    def __init__(
        self,
        pretrained: str,
        *,
        mode: Literal["offline", "online"] = "offline",
        loss: Literal["sigmoid", "hinge", "mse"] = "sigmoid",
        mse_timesteps: Literal["all", "distilled"] = "all",
        beta: float = 2500.0,
        neg_weight: float = 1.0,
        prior_loss_weight: float = 0.0,
        reference_model: Literal["initial_frozen", "none"] = "initial_frozen",
        timesteps: str | list[int] | None = None,
        num_inference_steps: int = 4,
        rollout_steps: int | None = None,
        sampler: Literal["euler_ancestral", "renoise"] | None = None,
        ratio_clip: float = 0.1,
        reward: Any = None,
        tie_policy: Literal["skip", "second_wins"] = "skip",
        online_accumulate: int = 1,
        lora: LoRASpec | None = None,
        load: LoadOptions | None = None,
        unet_weights: str | None = None,
        vae: str | None = None,
        scheduler_class: str | None = None,
        inference_timesteps: list[int] | None = None,
        resolution: int = 512,
        guidance_scale: float = 0.0,
        val_seed: int = 0,
        seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = 1.0,
    ) -> None:
        super().__init__()
        if reference_model == "none" and (loss == "sigmoid" or mode == "online"):
            raise ValueError("reference_model='none' needs loss='hinge' in offline mode (sigmoid and online use it)")
        if mode == "online" and reward is None:
            raise ValueError("mode='online' needs a reward model (e.g. ftmods.pso.rewards.PickScoreReward)")
        if isinstance(timesteps, str) and timesteps not in TIMESTEP_PRESETS:
            raise ValueError(f"unknown timestep preset {timesteps!r}; presets: {sorted(TIMESTEP_PRESETS)}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward"])
        self.hparams["load"], self.hparams["lora"] = spec_to_hparam(load), spec_to_hparam(lora)
        self.hparams["reward"] = None if reward is None else f"{type(reward).__module__}.{type(reward).__qualname__}"
        self.load_options = coerce_spec(LoadOptions, load) or LoadOptions()
        self.lora = coerce_spec(LoRASpec, lora)
        self.reward = reward
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.automatic_optimization = mode == "offline"
        self.unet: Any = None
        self.ref_unet: Any = None
        self.vae: Any = None
        self.text_encoders: Any = None
        self.tokenizers: list[Any] = []
        self.noise_scheduler: Any = None
        self._pipeline: Any = None
        self.val_reward = MeanMetric()

    # ------------------------------------------------------------------------------------------------- model

    def configure_model(self) -> None:
        """Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler (once), add LoRA or the frozen reference copy."""
        if self.unet is not None:
            return
        with torch.random.fork_rng(devices=[]):  # LoRA's random init is a function of the seed alone
            torch.manual_seed(self.hparams["seed"])
            parts = load_diffusion_parts(self.hparams["pretrained"], self.load_options)
            self._replace_parts(parts)
            if self.lora is not None:  # after unet_weights, so those load into the plain UNet
                unet: Any = parts.unet
                unet.requires_grad_(False)
                unet.add_adapter(self.lora.to_peft())
        self.unet = parts.unet.train()
        self.vae = parts.vae.eval()
        self.text_encoders = nn.ModuleList(parts.text_encoders).eval()
        self.tokenizers = parts.tokenizers
        self.noise_scheduler = parts.scheduler
        needs_reference = self.hparams["mode"] == "online" or self.hparams["loss"] == "sigmoid"
        if self.lora is None and self.hparams["reference_model"] == "initial_frozen" and needs_reference:
            self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if self.reward is not None and hasattr(self.reward, "load"):
            self.reward.load()
        if self._device_mesh is not None:  # FSDP2 (FSDP2Strategy / ModelParallelStrategy)
            mesh = self._device_mesh["data_parallel"]
            for unet in (self.unet, self.ref_unet):
                if unet is not None:
                    shard_unet(unet, mesh)
        if self._device_mesh is not None or uses_fsdp1(self._trainer):
            # FSDP2 / FSDP1 save and load the module's own state dict: on_save_checkpoint never reaches the loader
            keep_frozen_parts_out_of_checkpoints(self, _frozen_parts_of)

    @property
    def model(self) -> Any:
        """The trained UNet (what :class:`ftmods.callbacks.PretrainedExport` gathers on sharded runs)."""
        return self.unet

    def _replace_parts(self, parts: Any) -> None:
        """Apply ``unet_weights``, ``vae`` and ``scheduler_class`` to freshly loaded parts."""
        if self.hparams["unet_weights"]:
            missing, unexpected = parts.unet.load_state_dict(
                load_state_file(self.hparams["unet_weights"]), strict=False
            )
            if missing or unexpected:
                raise ValueError(f"unet_weights {self.hparams['unet_weights']}: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")  # fmt: skip
        if self.hparams["vae"]:
            from diffusers import AutoencoderKL

            parts.vae = AutoencoderKL.from_pretrained(
                resolve_pretrained(self.hparams["vae"]), local_files_only=self.load_options.local_files_only
            ).requires_grad_(False)
        if self.hparams["scheduler_class"]:
            import diffusers

            parts.scheduler = getattr(diffusers, self.hparams["scheduler_class"]).from_config(parts.scheduler.config)

    @property
    def is_xl(self) -> bool:
        """SDXL (two text encoders, micro-conditioning)."""
        return len(self.tokenizers) == 2

    @property
    def pipeline(self) -> Any:
        """A diffusers pipeline over this module's parts (built once; shares the modules, copies nothing)."""
        if self._pipeline is None:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            if self.is_xl:
                self._pipeline = StableDiffusionXLPipeline(
                    vae=self.vae,
                    text_encoder=self.text_encoders[0],
                    text_encoder_2=self.text_encoders[1],
                    tokenizer=self.tokenizers[0],
                    tokenizer_2=self.tokenizers[1],
                    unet=self.unet,
                    scheduler=copy.deepcopy(self.noise_scheduler),
                    force_zeros_for_empty_prompt=True,
                )
            else:
                self._pipeline = StableDiffusionPipeline(
                    vae=self.vae,
                    text_encoder=self.text_encoders[0],
                    tokenizer=self.tokenizers[0],
                    unet=self.unet,
                    scheduler=copy.deepcopy(self.noise_scheduler),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def train_timesteps(self) -> list[int]:
        """The distilled training set ``T_K`` (preset, explicit list, or trailing ``num_inference_steps``)."""
        spec = self.hparams["timesteps"]
        if isinstance(spec, str):
            return list(TIMESTEP_PRESETS[spec])
        if spec is not None:
            return [int(t) for t in spec]
        train_steps = int(self.noise_scheduler.config.num_train_timesteps)
        return distilled_timesteps(self.hparams["num_inference_steps"], train_steps)

    def sampling_timesteps(self, steps: int) -> list[int]:
        """Timesteps of a ``steps``-step trajectory.

        ``inference_timesteps`` when it has that length, else trailing spacing (what Euler / Euler-ancestral trailing
        schedulers visit: 4 steps = 999, 749, 499, 249).
        """
        explicit = self.hparams["inference_timesteps"]
        if explicit and len(explicit) == steps:
            return [int(t) for t in explicit]
        return distilled_timesteps(steps, int(self.noise_scheduler.config.num_train_timesteps))

    @contextlib.contextmanager
    def reference_unet(self) -> Iterator[Any]:
        """The frozen initial UNet: the same UNet with adapters disabled (LoRA) or the frozen copy."""
        if self.ref_unet is not None:
            yield self.ref_unet
        elif self.lora is not None:
            with adapters_disabled(self.unet) as unet:
                yield unet
        else:
            raise RuntimeError("no reference model (reference_model='none')")

    # ---------------------------------------------------------------------------------------------- encoding

    def _generator(self, *keys: int | str) -> torch.Generator:
        digest = hashlib.sha256(":".join(str(k) for k in (self.hparams["seed"], *keys)).encode()).digest()
        generator = torch.Generator(device=self.device)
        return generator.manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))

    def _offline_generators(self, batch: Mapping[str, Any], batch_idx: int) -> Generators:
        """One generator per item, keyed by (epoch, item id); batches without ``ids``: one per (epoch, step, rank).

        Keyed by item, a pair's ``t`` and noise do not depend on the number of ranks, the batch size or the item's
        position in the batch: N ranks with batch B train like one process with batch N*B.
        """
        ids = batch.get("ids")
        if ids is None:
            return self._generator(data_epoch(self), batch_idx, self.global_rank)
        return [self._generator(data_epoch(self), "item", str(key)) for key in ids]

    def _draw(self, shape: Sequence[int], generator: Generators, high: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Indices ``(B,)`` below ``high`` and noise of ``shape`` ``(B, C, h, w)``.

        From one generator for the batch (indices first, then noise), or item ``i``'s from ``generator[i]``.
        """
        device = self.device
        if isinstance(generator, torch.Generator):
            index = torch.randint(high, (shape[0],), generator=generator, device=device)
            return index, torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        index = torch.cat([torch.randint(high, (1,), generator=g, device=device) for g in generator])
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
        return index, noise

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """VAE latents (scaled by the VAE's ``scaling_factor``) of ``(B, 3, H, W)`` images in ``[-1, 1]``.

        The posterior mean (deterministic, so a pair's latents do not depend on its position in the batch); with a
        ``generator``, a posterior sample instead.
        """
        vae = self.vae
        posterior = vae.encode(images.to(device=self.device, dtype=vae.dtype)).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator=generator)  # (B, C, h, w)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str], batch: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """UNet conditioning: ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs`` (pooled text, time ids)."""
        pipe, captions = self.pipeline, list(captions)
        if not self.is_xl:
            embeds = pipe.encode_prompt(captions, self.device, 1, False)[0]
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = self.hparams["resolution"]
        count = len(captions)
        original = batch.get("original_sizes") if batch is not None else None
        crops = batch.get("crop_top_lefts") if batch is not None else None
        original_t = torch.as_tensor(original if original is not None else [[size, size]] * count)
        crops_t = torch.as_tensor(crops if crops is not None else [[0, 0]] * count)
        target = torch.tensor([[size, size]] * count)
        time_ids = torch.cat([original_t, crops_t, target], 1).to(self.device, embeds.dtype)  # (B, 6)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def _unet(self, unet: Any, latents: Tensor, timesteps: Tensor, cond: Mapping[str, Any]) -> Tensor:
        return unet(latents, timesteps, **cond).sample

    @staticmethod
    def _repeat_cond(cond: Mapping[str, Any], times: int) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"].repeat(times, 1, 1)}
        if "added_cond_kwargs" in cond:
            out["added_cond_kwargs"] = {k: v.repeat(times, 1) for k, v in cond["added_cond_kwargs"].items()}
        return out

    # ----------------------------------------------------------------------------------------------- offline

    def pair_errors(self, batch: Mapping[str, Any], generator: Generators) -> dict[str, Tensor]:
        """Per-pair denoising errors of policy (and reference) on target and reference latents, shared ``t`` and noise.

        ``generator``: one for the batch, or one per pair (training: :meth:`_offline_generators`).

        Returns ``policy_win`` / ``policy_lose`` ``(B,)`` (differentiable) and ``ref_win`` / ``ref_lose`` (no grad,
        absent without a reference model), plus ``timesteps`` ``(B,)``.
        """
        win = self.encode_images(batch["target"])  # (B, C, h, w)
        if "reference_latents" in batch:
            lose = batch["reference_latents"].to(device=self.device, dtype=win.dtype)
        elif "reference" in batch:
            lose = self.encode_images(batch["reference"])
        else:
            raise ValueError("offline PSO batches need 'reference_latents' or 'reference' (see PSODataModule)")
        count = win.shape[0]
        choices = torch.tensor(self.train_timesteps(), device=self.device)
        index, noise = self._draw(win.shape, generator, len(choices), win.dtype)  # (B,), (B, C, h, w)
        timesteps = choices[index]  # (B,)
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[timesteps]  # (B,)
        t2 = timesteps.repeat(2)  # (2B,) the pair shares t and noise
        noisy, target = noised_and_target(
            torch.cat([win, lose]), noise.repeat(2, 1, 1, 1), alphas.repeat(2), self._prediction_type()
        )  # (2B, C, h, w) each
        cond = self._repeat_cond(self.encode_prompts(batch["captions"], batch), 2)
        unet_dtype = next(self.unet.parameters()).dtype
        pred = self._unet(self.unet, noisy.to(unet_dtype), t2, cond)
        errors = denoising_error(pred, target)  # (2B,)
        out = {"policy_win": errors[:count], "policy_lose": errors[count:], "timesteps": timesteps}
        if self.hparams["reference_model"] != "none" and self.hparams["loss"] == "sigmoid":
            with torch.no_grad(), self.reference_unet() as ref:
                ref_errors = denoising_error(self._unet(ref, noisy.to(unet_dtype), t2, cond), target)  # (2B,)
            out["ref_win"], out["ref_lose"] = ref_errors[:count], ref_errors[count:]
        return out

    def mse_loss(self, batch: Mapping[str, Any], generator: Generators) -> tuple[Tensor, dict[str, Tensor]]:
        """The naive baseline: mean epsilon- (or v-) MSE on the targets, ``t`` uniform over all or distilled steps."""
        latents = self.encode_images(batch["target"])  # (B, C, h, w)
        if self.hparams["mse_timesteps"] == "all":
            total = int(self.noise_scheduler.config.num_train_timesteps)
            timesteps, noise = self._draw(latents.shape, generator, total, latents.dtype)
        else:
            choices = torch.tensor(self.train_timesteps(), device=self.device)
            index, noise = self._draw(latents.shape, generator, len(choices), latents.dtype)
            timesteps = choices[index]
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[timesteps]  # (B,)
        noisy, target = noised_and_target(latents, noise, alphas, self._prediction_type())
        cond = self.encode_prompts(batch["captions"], batch)
        pred = self._unet(self.unet, noisy.to(next(self.unet.parameters()).dtype), timesteps, cond)
        errors = denoising_error(pred, target)  # (B,)
        loss = errors.mean()
        return loss, {"loss": loss.detach(), "policy_err_win": errors.detach().mean()}

    def offline_loss(self, errors: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured offline loss and its logs."""
        hp = self.hparams
        if hp["loss"] == "sigmoid":
            out = pso_sigmoid_loss(
                errors["policy_win"],
                errors["policy_lose"],
                errors["ref_win"],
                errors["ref_lose"],
                beta=hp["beta"],
                neg_weight=hp["neg_weight"],
                prior_weight=hp["prior_loss_weight"],
            )
        else:
            out = pso_hinge_loss(
                errors["policy_win"],
                errors["policy_lose"],
                beta=hp["beta"],
                neg_weight=hp["neg_weight"],
                ref_win_err=errors.get("ref_win"),
                ref_lose_err=errors.get("ref_lose"),
                prior_weight=hp["prior_loss_weight"],
            )
        loss = out.loss
        logs = {
            "loss": loss.detach(),
            "preference_loss": out.preference_loss,
            "implicit_accuracy": out.implicit_accuracy,
            "logit": out.mean_logit,
            "policy_err_win": errors["policy_win"].detach().mean(),
            "policy_err_lose": errors["policy_lose"].detach().mean(),
        }
        if "ref_win" in errors:
            logs["ref_err_win"], logs["ref_err_lose"] = errors["ref_win"].mean(), errors["ref_lose"].mean()
        return loss, logs

    # ------------------------------------------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        """Offline: one pair batch, automatic optimization. Online: rollouts, ranking, per-transition updates."""
        if self.hparams["mode"] == "online":
            self._online_step(batch, batch_idx, self._generator(data_epoch(self), batch_idx, self.global_rank))
            return None
        generator = self._offline_generators(batch, batch_idx)
        if self.hparams["loss"] == "mse":
            loss, logs = self.mse_loss(batch, generator)
        else:
            loss, logs = self.offline_loss(self.pair_errors(batch, generator))
        size = len(batch["captions"])
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "implicit_accuracy"), batch_size=size,
                     sync_dist=True)  # fmt: skip
        return loss

    # ------------------------------------------------------------------------------------------------ online

    def _sampler(self) -> str:
        if self.hparams["sampler"] is not None:
            return str(self.hparams["sampler"])
        name = type(self.noise_scheduler).__name__
        return "renoise" if "LCM" in name else "euler_ancestral"

    def _prediction_type(self) -> Literal["epsilon", "v_prediction"]:
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"PSO supports epsilon and v_prediction UNets, not {kind!r}")
        return kind  # type: ignore[no-any-return]

    def _as_eps(self, output: Tensor, x_vp: Tensor, alpha_bar: Tensor) -> Tensor:
        """The UNet output as epsilon: ``eps = sqrt(a) v + sqrt(1 - a) x`` for v-prediction (VP-form input ``x``)."""
        if self._prediction_type() == "epsilon":
            return output
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_vp

    @torch.no_grad()
    def rollout(self, captions: Sequence[str], generator: torch.Generator) -> dict[str, Any]:
        """Two trajectories per prompt with the current policy, under ``no_grad``.

        Returns latents ``(K+1, 2B, C, h, w)``, timesteps, final images in ``[0, 1]`` and the prompts. Rows
        ``0..B-1`` are sample 0 of each prompt, ``B..2B-1`` sample 1.
        """
        steps = self.hparams["rollout_steps"] or self.hparams["num_inference_steps"]
        timesteps = torch.tensor(self.sampling_timesteps(steps), device=self.device)  # (K,)
        prompts = list(captions) * 2
        cond = self.encode_prompts(prompts)
        size = self.hparams["resolution"] // (2 ** (len(self.vae.config.block_out_channels) - 1))
        shape = (len(prompts), self.unet.config.in_channels, size, size)
        unet_dtype = next(self.unet.parameters()).dtype
        x = torch.randn(shape, generator=generator, device=self.device)  # (2B, C, h, w)
        euler = self._sampler() == "euler_ancestral"
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)
        sigmas = ((1 - alphas) / alphas).sqrt()
        if euler:
            x = x * (sigmas[timesteps[0]] ** 2 + 1).sqrt()  # Euler space x = x0 + sigma * eps
        states = [x]
        was_training = self.unet.training
        self.unet.eval()
        try:
            for k, t in enumerate(timesteps):
                scale = (sigmas[t] ** 2 + 1).sqrt() if euler else torch.ones((), device=self.device)
                out = self._unet(self.unet, (x / scale).to(unet_dtype), t.expand(len(prompts)), cond).float()
                last = k == steps - 1
                if euler:
                    sigma_to = torch.zeros((), device=self.device) if last else sigmas[timesteps[k + 1]]
                    mean, std = euler_ancestral_step(x, self._as_eps(out, x / scale, alphas[t]), sigmas[t], sigma_to)
                else:
                    alpha_to = torch.ones((), device=self.device) if last else alphas[timesteps[k + 1]]
                    mean, std = renoise_step(x, out, alphas[t], alpha_to, prediction_type=self._prediction_type())
                noise = torch.randn(shape, generator=generator, device=self.device)
                x = mean if last else mean + std * noise
                states.append(x)
        finally:
            self.unet.train(was_training)
        images = self.decode(x)
        return {"states": torch.stack(states), "timesteps": timesteps, "images": images, "prompts": prompts}

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` from scaled latents."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def score_images(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The reward model's ``(B,)`` fp32 scores, checked.

        A user reward of the wrong shape or with NaN fails here, naming the reward, not deep inside the ranking.
        """
        scores = torch.as_tensor(self.reward(images, list(prompts)), device=self.device).float().reshape(-1)
        finite = bool(torch.isfinite(scores).all())
        if scores.numel() != images.shape[0] or not finite:
            raise ValueError(
                f"reward {type(self.reward).__name__} must return {images.shape[0]} finite scores for "
                f"{images.shape[0]} images, got shape {tuple(scores.shape)} (finite: {finite})"
            )
        return scores

    def preferences(self, rewards: Tensor) -> Tensor:
        """``(B, 2)`` signs (+1 preferred, -1 not, 0 0 for a skipped tie) from rewards ``(2B,)`` (samples 0, then 1)."""
        first, second = rewards.view(2, -1)  # (B,), (B,)
        signs = torch.stack([torch.sign(first - second), torch.sign(second - first)], 1)  # (B, 2)
        if self.hparams["tie_policy"] == "second_wins":
            tie = first == second
            signs[tie] = torch.tensor([-1.0, 1.0], device=signs.device)
        return signs

    def transition_logprobs(self, unet: Any, rollout: Mapping[str, Any], k: int, cond: Mapping[str, Any]) -> Tensor:
        """``(2B,)`` log-probabilities of the stored transition ``k`` under ``unet``."""
        states, timesteps = rollout["states"], rollout["timesteps"]
        x, x_next, t = states[k], states[k + 1], timesteps[k]
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)
        sigmas = ((1 - alphas) / alphas).sqrt()
        unet_dtype = next(self.unet.parameters()).dtype
        count = x.shape[0]
        if self._sampler() == "euler_ancestral":
            scale = (sigmas[t] ** 2 + 1).sqrt()
            out = self._unet(unet, (x / scale).to(unet_dtype), t.expand(count), cond).float()
            eps = self._as_eps(out, x / scale, alphas[t])
            mean, std = euler_ancestral_step(x, eps, sigmas[t], sigmas[timesteps[k + 1]])
        else:
            out = self._unet(unet, x.to(unet_dtype), t.expand(count), cond).float()
            mean, std = renoise_step(
                x, out, alphas[t], alphas[timesteps[k + 1]], prediction_type=self._prediction_type()
            )
        return gaussian_logprob(x_next, mean, std)  # (2B,)

    def _online_step(self, batch: Mapping[str, Any], batch_idx: int, generator: torch.Generator) -> None:
        hp = self.hparams
        optimizer: Any = self.optimizers()
        rollout = self.rollout(batch["captions"], generator)
        assert self.reward is not None
        rewards = self.score_images(rollout["images"], rollout["prompts"])  # (2B,)
        signs = self.preferences(rewards)  # (B, 2)
        cond = self.encode_prompts(rollout["prompts"])
        trained = list(range(len(rollout["timesteps"]) - 1))  # the last transition is deterministic
        order = torch.randperm(len(trained), generator=torch.Generator().manual_seed(batch_idx + hp["seed"])).tolist()
        count = signs.shape[0]
        totals: dict[str, list[Tensor]] = {"loss": [], "clip_fraction": [], "accuracy": []}
        for index in order:
            out = self.transition_loss(rollout, trained[index], cond, signs)
            self.manual_backward(out.loss / (len(trained) * hp["online_accumulate"]))
            totals["loss"].append(out.loss.detach())
            totals["clip_fraction"].append(torch.as_tensor(out.clip_fraction, dtype=torch.float32))
            totals["accuracy"].append(torch.as_tensor(out.accuracy, dtype=torch.float32))
        if (batch_idx + 1) % hp["online_accumulate"] == 0:
            if hp["gradient_clip_val"]:
                self.clip_gradients(
                    optimizer, gradient_clip_val=hp["gradient_clip_val"], gradient_clip_algorithm="norm"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler: Any = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        size = count
        self.log("train/loss", torch.stack(totals["loss"]).mean() if totals["loss"] else 0.0, prog_bar=True,
                 batch_size=size, sync_dist=True)  # fmt: skip
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/reward_margin", (rewards.view(2, -1)[0] - rewards.view(2, -1)[1]).abs().mean(),
                 batch_size=size, sync_dist=True)  # fmt: skip
        self.log("train/frac_ties", (signs.abs().sum(1) == 0).float().mean(), batch_size=size, sync_dist=True)
        for name in ("clip_fraction", "accuracy"):
            if totals[name]:
                self.log(f"train/{name}", torch.stack(totals[name]).mean(), batch_size=size, sync_dist=True)

    def transition_loss(self, rollout: Mapping[str, Any], k: int, cond: Any, signs: Tensor) -> OnlinePSOLossOutput:
        """The online PSO loss of transition ``k`` of a rollout (both samples of every prompt, ``signs`` (B, 2))."""
        count = signs.shape[0]
        logp = self.transition_logprobs(self.unet, rollout, k, cond).view(2, count).T  # (B, 2)
        with torch.no_grad(), self.reference_unet() as ref:
            ref_logp = self.transition_logprobs(ref, rollout, k, cond).view(2, count).T  # (B, 2)
        return online_pso_loss(logp, ref_logp, signs, beta=self.hparams["beta"], ratio_clip=self.hparams["ratio_clip"])

    def training_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The loss a training step minimises, with no optimizer step (e.g. for ``WeightGrafting``).

        Offline: the pair (or MSE) loss of the batch. Online: a fresh rollout, ranked by the reward, and the mean PSO
        loss over its stochastic transitions; the graphs of all transitions are kept until backward, so memory grows
        with the number of sampling steps (training itself backpropagates one transition at a time).
        """
        if self.hparams["mode"] == "offline":
            generator = self._offline_generators(batch, 0)
            if self.hparams["loss"] == "mse":
                return self.mse_loss(batch, generator)[0]
            return self.offline_loss(self.pair_errors(batch, generator))[0]
        rollout = self.rollout(batch["captions"], self._generator(data_epoch(self), 0, self.global_rank))
        assert self.reward is not None
        signs = self.preferences(self.score_images(rollout["images"], rollout["prompts"]))  # (B, 2)
        cond = self.encode_prompts(rollout["prompts"])
        losses = [self.transition_loss(rollout, k, cond, signs).loss for k in range(len(rollout["timesteps"]) - 1)]
        return torch.stack(losses).mean()

    # --------------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def sample(self, captions: Sequence[str], *, seed: int | None = None, steps: int | None = None) -> Tensor:
        """Few-step images ``(B, 3, H, W)`` in ``[0, 1]`` with the model-native scheduler (cfg ``guidance_scale``)."""
        seed = self.hparams["val_seed"] if seed is None else seed
        generators = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(len(captions))]
        size = self.hparams["resolution"]
        steps = steps or self.hparams["num_inference_steps"]
        out = self.pipeline(
            prompt=list(captions),
            **self._steps_kwargs(steps),
            guidance_scale=self.hparams["guidance_scale"],
            height=size,
            width=size,
            generator=generators,
            output_type="pt",
        ).images
        return out.float().clamp(0, 1)

    def _steps_kwargs(self, steps: int) -> dict[str, Any]:
        explicit = self.hparams["inference_timesteps"]
        if explicit and len(explicit) == steps:
            return {"timesteps": [int(t) for t in explicit]}
        return {"num_inference_steps": steps}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Sample the validation prompts; log the image grid (first batch) and the reward."""
        images = self.sample(batch["captions"], seed=self.hparams["val_seed"] + batch_idx * 1000)
        if not torch.isfinite(images).all():
            raise FloatingPointError("validation images contain NaN / inf (try an fp32 or fp16-fix VAE)")
        if self.reward is not None:
            self.val_reward.update(self.score_images(images, list(batch["captions"])).mean(), weight=len(images))
            self.log("val/reward", self.val_reward, on_epoch=True, prog_bar=True)
        if batch_idx == 0:
            log_image_grid(self.trainer, "val/images", images, list(batch["captions"]))

    # -------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """The injected optimizer over trainable UNet parameters (default AdamW lr 1e-5, wd 1e-4), plus scheduler."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return build_optimizers(params, self.optimizer_factory, self.scheduler_factory, default_lr=1e-5,
                                default_weight_decay=1e-4, interval="step")  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def fsdp_ignored_modules(self) -> list[nn.Module]:
        """Frozen parts kept replicated under FSDP1 (``BlockFSDPStrategy``).

        VAE, text encoders and reward model (replicated under FSDP2 too) and the frozen reference of full fine-tuning.
        """
        return [part for _, part in self._frozen_parts() if isinstance(part, nn.Module)]

    def _frozen_parts(self) -> list[tuple[str, Any]]:
        parts = [(REFERENCE_PREFIX, self.ref_unet), ("vae.", self.vae), ("text_encoders.", self.text_encoders)]
        if isinstance(self.reward, nn.Module):
            parts.append(("reward.", self.reward))
        return parts

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out the frozen parts: the reference copy (the pretrained UNet), VAE, text encoders, reward model."""
        drop_frozen_state(checkpoint.get("state_dict", {}), FROZEN_PREFIXES)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the frozen parts (rebuilt from ``pretrained`` in ``configure_model``) back before loading."""
        if "state_dict" in checkpoint:
            fill_frozen_state(checkpoint["state_dict"], self._frozen_parts())

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Export in diffusers format.

        LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(path)``); full fine-tuning: the whole
        pipeline (``DiffusionPipeline.from_pretrained(path)``).

        Args:
            path: Output folder (created).
            state_dict: A full (gathered) state dict of the UNet to write instead of its live parameters: needed on
                sharded (FSDP2) runs, where :class:`ftmods.callbacks.PretrainedExport` gathers it on every rank and
                calls this on rank 0 (see :attr:`model`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None and is_sharded(self.unet):
            raise ValueError("the UNet is sharded (FSDP2): pass its gathered state_dict (PretrainedExport does)")
        if self.lora is not None:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            if state_dict is not None and any(clean_name(n) != n for n, _ in self.unet.named_modules()):
                # FSDP1 renamed the UNet's blocks (`_fsdp_wrapped_module`), so peft would miss the LoRA layers by
                # module name: take the adapter's weights from the gathered (clean) state dict as peft names them
                adapter = ".default."  # the adapter add_adapter() made
                lora = {k.replace(adapter, "."): v for k, v in state_dict.items() if "lora_" in k and adapter in k}
            else:
                lora = get_peft_model_state_dict(self.unet, state_dict=state_dict)
            layers = convert_state_dict_to_diffusers(lora)
            type(self.pipeline).save_lora_weights(path, unet_lora_layers=layers, safe_serialization=True)
        elif state_dict is None:
            self.pipeline.save_pretrained(path, safe_serialization=True)
        else:  # a plain UNet holding the gathered weights stands in for the sharded one while the pipeline is written
            pipe, sharded = self.pipeline, self.unet
            unet = _plain_class(sharded).from_config(sharded.config)
            dtype = next(iter(state_dict.values())).dtype
            unet.load_state_dict(state_dict)
            pipe.unet = unet if unet.dtype == dtype else unet.to(dtype=dtype)
            try:
                pipe.save_pretrained(path, safe_serialization=True)
            finally:
                pipe.unet = sharded
        return path

    def on_fit_start(self) -> None:
        """Offline with model samples as references: generate the missing ones into the DataModule's cache."""
        data = getattr(self.trainer, "datamodule", None)
        if self.hparams["mode"] != "offline" or data is None or not hasattr(data, "reference_requests"):
            return
        if data.hparams.get("reference_source", "model_samples") != "model_samples":
            return
        with fsdp1_root_gathered(self.trainer):  # outside a step: FSDP1's root keeps the UNet's stem sharded
            generate_references(self, data)


def shard_unet(unet: nn.Module, mesh: Any) -> int:
    """FSDP2-shard a diffusers UNet per block, children before their parents, then the root.

    The blocks are the UNet's ``_no_split_modules`` (``ResnetBlock2D``, ``BasicTransformerBlock``,
    ``CrossAttnUpBlock2D``, ``UpBlock2D`` for SD / SDXL): the up blocks *contain* ResNet and transformer blocks, and
    ``fully_shard`` must see a child before its parent (a parent takes every parameter not yet sharded). LoRA weights
    shard with the block that holds them (FSDP2 allows frozen and trainable parameters in one unit).

    Returns:
        The number of blocks sharded (besides the root).
    """
    from torch.distributed.fsdp import fully_shard

    classes = transformer_layer_classes(unet)
    blocks = [m for m in reversed(list(unet.modules())) if type(m).__name__ in classes and m is not unet]
    for block in blocks:  # reversed pre-order: every module after all of its descendants
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return len(blocks)


def _plain_class(model: nn.Module) -> type[Any]:
    """The model's own class under FSDP2's dynamic ``FSDP<Class>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _frozen_parts_of(module: nn.Module) -> list[tuple[str, Any]]:
    """The parts a PSOModule keeps out of checkpoints (for :func:`keep_frozen_parts_out_of_checkpoints`)."""
    assert isinstance(module, PSOModule)
    return module._frozen_parts()


def generate_references(module: PSOModule, data: Any, batch_size: int = 8) -> int:
    """Sample the frozen initial model for every missing reference of ``data`` and write the latents to its cache.

    Each rank takes every ``world``-th request; each request is sampled with its own seed (model-native scheduler,
    ``num_inference_steps``, ``guidance_scale``), so the cache does not depend on the number of ranks. All ranks list
    the missing requests before any rank writes (a barrier), so they split the same list. With a sharded (FSDP2) UNet
    every pipeline call is collective: a rank with fewer requests runs as many (discarded) calls as the busiest one.

    Returns:
        The number of references this rank generated.
    """
    from tqdm.auto import tqdm

    from ftmods.datamodules.pso import save_reference_latents

    trainer = module.trainer
    cache = data.hparams["reference_cache"]
    expected = reference_metadata(module)
    check_reference_cache(cache, expected)
    everything = list(data.reference_requests())
    trainer.strategy.barrier("pso_reference_list")  # nobody writes before every rank has listed what is missing
    requests = everything[trainer.global_rank :: trainer.world_size]
    if requests:
        rank_zero_info(f"PSO: generating {len(requests)} reference samples per rank into {cache}")
    pipe, size = module.pipeline, module.hparams["resolution"]
    steps = module.hparams["num_inference_steps"]
    busiest = math.ceil(len(everything) / trainer.world_size)  # rank 0's share
    # A sharded UNet's calls are collective: every rank makes as many as the busiest one.
    calls = math.ceil((busiest if forward_is_collective(trainer, module.unet) else len(requests)) / batch_size)
    with module.reference_unet() as unet:
        original = pipe.unet
        pipe.unet = unet
        try:
            for call in tqdm(range(calls), disable=not trainer.is_global_zero or not requests,
                             desc="reference samples"):  # fmt: skip
                chunk = requests[call * batch_size : (call + 1) * batch_size]
                padding = not chunk
                if padding:  # sharded UNet: join the other ranks' collectives, keep nothing
                    chunk = everything[:1]
                generators = [torch.Generator(device=module.device).manual_seed(r.seed) for r in chunk]
                with torch.no_grad():
                    latents = pipe(prompt=[r.prompt for r in chunk], **module._steps_kwargs(steps),
                                   guidance_scale=module.hparams["guidance_scale"], height=size, width=size,
                                   generator=generators, output_type="latent").images  # fmt: skip
                if padding:
                    continue
                for request, latent in zip(chunk, latents, strict=True):
                    metadata = {"prompt": request.prompt, "seed": str(request.seed), **expected}
                    save_reference_latents(cache, request.key, latent.float().cpu(), metadata)
        finally:
            pipe.unet = original
    trainer.strategy.barrier("pso_references")
    return len(requests)


def reference_metadata(module: PSOModule) -> dict[str, str]:
    """What made a reference sample, besides its prompt and seed: model, UNet weights, steps, cfg, resolution."""
    hp = module.hparams
    timesteps = module._steps_kwargs(hp["num_inference_steps"])
    return {
        "model": str(hp["pretrained"]),
        "unet_weights": str(hp["unet_weights"] or ""),
        "scheduler": str(hp["scheduler_class"] or ""),
        "steps": str(timesteps.get("timesteps", timesteps.get("num_inference_steps"))),
        "guidance_scale": str(hp["guidance_scale"]),
        "resolution": str(hp["resolution"]),
    }


def check_reference_cache(cache: str | Path, expected: Mapping[str, str], *, probe: int = 8) -> None:
    """Fail if cached references were made differently (another model, steps, cfg or resolution).

    Reads the metadata of up to ``probe`` entries (cheap on caches of any size). Entries without these fields (written
    by other code) are not judged. Start a new ``reference_cache`` folder, or delete this one, to regenerate.
    """
    from safetensors import safe_open

    for path in sorted(Path(cache).glob("*.safetensors"))[:probe]:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        for field, value in expected.items():
            if field in metadata and metadata[field] != value:
                raise ValueError(
                    f"reference_cache {cache}: {path.name} was made with {field}={metadata[field]!r}, this run "
                    f"uses {value!r}; use a new reference_cache folder (or delete this one) to regenerate"
                )


def load_state_file(spec: str) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` / ``.bin`` / ``.pt`` file or ``org/repo/path/in/repo`` on the hub.

    ``.bin`` / ``.pt`` files load with ``torch.load(weights_only=True)`` (no pickled code runs).
    """
    path = Path(spec)
    if not path.is_file():
        parts = spec.split("/")
        if len(parts) < 3:
            raise FileNotFoundError(f"{spec}: not a file, and not 'org/repo/file' on the hub")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def log_image_grid(trainer: Any, key: str, images: Tensor, captions: Sequence[str]) -> Path | None:
    """Write ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` as one PNG grid and send it to the loggers.

    The grid goes to ``<log_dir>/<key>/step=N.png`` with the captions in a ``.txt`` beside it, and to TensorBoard
    (``add_image``) / W&B (``log_image``). Call on every rank; rank 0 writes.
    """
    from PIL import Image

    log_dir = trainer.log_dir
    if not trainer.is_global_zero:
        return None
    count = images.shape[0]
    columns = min(count, 8)
    rows = -(-count // columns)
    height, width = images.shape[-2:]
    grid = torch.zeros(3, rows * height, columns * width)
    for i, image in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    folder = Path(log_dir or trainer.default_root_dir) / key.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step={trainer.global_step}.png"
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
    for logger in trainer.loggers:
        experiment: Any = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=list(images.detach().float().cpu()), caption=list(captions))
        elif hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(key, grid, global_step=trainer.global_step)
    return path
