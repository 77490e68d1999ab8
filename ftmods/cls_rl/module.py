"""``CLSRLModule``: CLS-RL and No-Thinking CLS-RL, rule-based GRPO for image classification with a VLM.

"CLS-RL: Image Classification with Rule-Based Reinforcement Learning", arXiv:2503.16188 (later "Think or Not Think").

Implemented (spec cls_rl §1.4, §1.6, §3, §8):

- Rollouts inside ``training_step``: the batch's prompts (:class:`ftmods.datamodules.FewShotImageBatch`) are encoded by
  the model's processor (left padding), and ``G = num_generations`` completions per prompt come from *one* batched
  ``generate`` call with the KV cache (``num_return_sequences=G``, sampling at ``temperature``, no top-k / top-p by
  default). The generation config is built here, never taken from the checkpoint: Qwen2-VL-Instruct ships a near-greedy
  one that would remove all exploration. ``rollout_sampling: keyed`` (default) draws each completion from its own
  random stream keyed by ``(seed, epoch, item id, sample index)`` (:mod:`ftmods.ops.sampling`), so a prompt gets the
  same completions on any number of ranks and in any batch: 2 ranks x 1 prompt train exactly like 1 rank x 2 prompts
  (tested), and a resumed run draws what an uninterrupted one draws. ``torch`` uses ``generate``'s own sampler, seeded
  per ``(seed, epoch, batch, rank)``.
- Completion masks up to and including the first eos (optionally dropping truncated completions), rewards by name
  (CLS-RL: ``accuracy`` + ``format``; No-Thinking: ``equality``; or any ``module.function``), group-normalised
  advantages, and log-probabilities of the policy and the reference in *one* forward pass each over prompt +
  completion, with each image's patches repeated per sample (:func:`ftmods.ops.grpo.expand_pixels_per_image`; R1-V's
  ``.repeat`` is wrong for more than one prompt per device) and ``mm_token_type_ids`` extended with zeros.
- The reference policy: the model with its LoRA adapter disabled, or a frozen copy of the starting weights for full
  fine-tuning (left out of checkpoints, rebuilt from ``pretrained``), or none with ``beta=0``.
- The GRPO loss of :func:`ftmods.ops.grpo.grpo_loss`: ``grpo`` (the paper), ``bnpo``, ``dr_grpo``, ``dapo`` (token mean
  over every completion token of the optimizer step, across ranks and accumulation); ``num_iterations`` (mu) > 1 with
  the clipped ratio against the log-probs at sampling time: each generation batch is reused mu times (the DataModule's
  ``num_iterations`` repeats every group of ``accumulate_grad_batches`` batches; the rollouts are kept in checkpoints).
- Logs per step: ``train/reward``, ``train/rewards/<name>``, ``train/reward_std``, ``train/frac_reward_zero_std``,
  ``train/kl``, ``train/completion_length``, ``train/clipped_ratio`` (no eos), ``train/clip_fraction`` (mu > 1),
  ``train/time_generate`` / ``train/time_score`` (seconds), and a table of sample completions.
- ``validate`` / ``test``: greedy generation with the DataModule's evaluation prompts, accuracy (percent) with the
  exact training matcher and the paper's lenient matcher, per class subset, and the harmonic mean of base and new.
  ``predict`` returns one record per image.

Not implemented: a vLLM generation backend; ``math_verify`` in the accuracy reward (R1-V's inherited first check,
off in ftmods' reading of the spec).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ftmods.cls_rl.rewards import REWARDS, RewardFn, accuracy_reward, equality_reward, lenient_match
from ftmods.datamodules.fewshot_images import encode_prompts
from ftmods.datamodules.samplers import data_epoch
from ftmods.models.adapters import adapters_disabled
from ftmods.models.loading import LoadOptions, LoRASpec, coerce_spec, load_processor, load_vlm, spec_to_hparam
from ftmods.models.sharding import (
    drop_frozen_state,
    fill_frozen_state,
    fully_shard_model,
    gather_root,
    keep_frozen_parts_out_of_checkpoints,
    uses_fsdp1,
    vision_tower,
)
from ftmods.ops.grpo import (
    AdvantageScale,
    GRPOLossOutput,
    LossType,
    completion_logprobs,
    completion_mask,
    expand_pixels_per_image,
    group_advantages,
    group_reward_std,
    grpo_loss,
    pooled_std,
)
from ftmods.ops.sampling import KeyedSampler, row_keys
from ftmods.optim import build_optimizers
from ftmods.reporting import log_table

Mode = Literal["think", "no_think"]
REFERENCE_PREFIX = "ref_model."
"""State-dict prefix of the frozen reference copy (left out of checkpoints)."""
_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")  # per-token inputs extended over completions
_SUBSETS = ("all", "base", "new")
_MATCHERS = ("exact", "lenient")


@dataclass
class Rollout:
    """One micro-batch of ``N = B * G`` sampled completions with everything the loss needs.

    Rows are in ``repeat_interleave`` order: rows ``0..G-1`` answer prompt 0.
    """

    inputs: dict[str, Tensor]
    """Model inputs over prompt + completion for the scoring forward: ``input_ids`` / ``attention_mask`` /
    ``mm_token_type_ids`` ``(N, P + T)``, per-sample ``pixel_values`` and ``image_grid_thw``."""
    completion_ids: Tensor
    """``(N, T)`` sampled ids (pad after eos)."""
    mask: Tensor
    """``(N, T)`` bool, real completion tokens (through the first eos)."""
    completions: list[str]
    """``N`` decoded completions (special tokens skipped, nothing after eos)."""
    labels: list[str]
    """``N`` true class names."""
    rewards: Tensor
    """``(N,)`` weighted sum of the reward functions."""
    reward_parts: dict[str, Tensor]
    """Reward name -> ``(N,)`` unweighted values."""
    advantages: Tensor
    """``(N,)`` group-normalised advantages."""
    ref_logp: Tensor | None = None
    """``(N, T)`` reference log-probs (None with ``beta=0``)."""
    old_logp: Tensor | None = None
    """``(N, T)`` log-probs at sampling time (only with ``num_iterations > 1``)."""
    ids: list[str] = field(default_factory=list)
    """``B`` item ids of the prompts."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in ``generate`` and in scoring (reference / old log-probs)."""

    @property
    def prompt_len(self) -> int:
        """``P``, the left-padded prompt length."""
        return self.inputs["input_ids"].shape[1] - self.completion_ids.shape[1]

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, lists and floats (loadable with ``torch.load(weights_only=True)``), on the CPU."""
        cpu = {k: v.cpu() for k, v in self.inputs.items()}
        return {
            "inputs": cpu,
            "completion_ids": self.completion_ids.cpu(),
            "mask": self.mask.cpu(),
            "completions": list(self.completions),
            "labels": list(self.labels),
            "rewards": self.rewards.cpu(),
            "reward_parts": {k: v.cpu() for k, v in self.reward_parts.items()},
            "advantages": self.advantages.cpu(),
            "ref_logp": None if self.ref_logp is None else self.ref_logp.cpu(),
            "old_logp": None if self.old_logp is None else self.old_logp.cpu(),
            "ids": list(self.ids),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> Rollout:
        """Inverse of :meth:`to_state`, moved to ``device``."""

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return cls(**{k: move(v) for k, v in state.items()})


class CLSRLModule(LightningModule):
    """GRPO fine-tuning of a vision-language model for image classification (CLS-RL / No-Thinking CLS-RL).

    Args:
        pretrained: Hub id, local folder or ``tiny/qwen2-vl`` of an ``AutoModelForImageTextToText`` (Qwen2-VL,
            Qwen2.5-VL, ...) with its processor.
        thinking: ``True``: CLS-RL (think-then-answer prompts, ``accuracy`` + ``format`` rewards). ``False``:
            No-Thinking CLS-RL (direct-answer prompts, the ``equality`` reward). The DataModule's ``mode`` must agree.
        load: How to load the model (dtype, attention kernel, gradient checkpointing, ``trust_remote_code``).
        lora: Train a LoRA adapter; the reference is then the model with the adapter disabled.
        processor_kwargs: Extra ``AutoProcessor.from_pretrained`` arguments (e.g. ``min_pixels`` / ``max_pixels``).
        rewards: Reward names summed into the reward: keys of :data:`ftmods.cls_rl.rewards.REWARDS` or import paths
            ``package.module.function`` of ``(completions, labels) -> list[float]``. ``None``: by ``thinking``.
        reward_weights: One weight per reward (default 1 each).
        strip_completion: No-Thinking ``equality`` reward (and exact evaluation) on the stripped completion (the
            paper compares the raw string).
        num_generations: ``G``, completions per prompt (paper 4).
        temperature: Sampling temperature (paper 1.0); scoring divides the logits by it as well.
        top_p: Nucleus sampling mass (1.0 = off, as the paper).
        top_k: Top-k sampling (0 = off, as the paper's spec).
        max_completion_length: New-token limit of a rollout (paper 1024).
        max_prompt_length: Fail on a longer prompt (naming the item) instead of truncating it, which would cut image
            tokens; ``None``: no limit.
        beta: KL coefficient (paper 0.04); 0 loads no reference model.
        loss_type: ``grpo`` (paper), ``bnpo``, ``dr_grpo`` or ``dapo``.
        scale_rewards: Advantage divisor: ``group`` std (paper), ``batch`` std or ``none`` (Dr. GRPO).
        advantage_eps: Added to the std (1e-4).
        num_iterations: mu, policy updates per generation batch (paper 1). With mu > 1 set the DataModule's
            ``num_iterations`` to the same value.
        epsilon: Lower clip of the ratio (used with mu > 1).
        epsilon_high: Upper clip (DAPO: 0.28); ``None`` = ``epsilon``.
        mask_truncated_completions: Completions without eos add nothing to the loss.
        freeze_vision: Freeze the vision tower (and its merger); the paper trains everything.
        eval_max_new_tokens: Greedy evaluation length; ``None`` = ``max_completion_length``.
        log_completions: Rows of the sample-completion table (0 = none).
        log_completions_every_n_steps: Log the table every N optimizer steps (and at step 0).
        seed: Seed of the rollout sampling.
        rollout_sampling: ``keyed`` (each completion from a stream keyed by seed, epoch, item id and sample index:
            independent of the rank, world size and batch) or ``torch`` (``generate``'s sampler, one seed per
            micro-batch and rank).
        optimizer: Optimizer factory; default AdamW(lr=1e-6, weight_decay=0) as the paper.
        lr_scheduler: Scheduler factory.
        lr_scheduler_interval: ``step`` or ``epoch``.

    Example::

        module = CLSRLModule("Qwen/Qwen2-VL-2B-Instruct", thinking=False, load=LoadOptions(dtype="bfloat16"))
        dm = FewShotImageDataModule("data/dtd/train", test_root_or_file="data/dtd/test", shots=4, mode="no_think",
                                    image_size=384, batch_size=1)
        Trainer(precision="bf16-true", accumulate_grad_batches=2, max_epochs=50).fit(module, datamodule=dm)
    """

    def __init__(
        self,
        pretrained: str,
        *,
        thinking: bool = True,
        load: LoadOptions | None = None,
        lora: LoRASpec | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        rewards: list[str] | None = None,
        reward_weights: list[float] | None = None,
        strip_completion: bool = False,
        num_generations: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_completion_length: int = 1024,
        max_prompt_length: int | None = None,
        beta: float = 0.04,
        loss_type: LossType = "grpo",
        scale_rewards: AdvantageScale = "group",
        advantage_eps: float = 1e-4,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        mask_truncated_completions: bool = False,
        freeze_vision: bool = False,
        eval_max_new_tokens: int | None = None,
        log_completions: int = 8,
        log_completions_every_n_steps: int = 50,
        seed: int = 0,
        rollout_sampling: Literal["keyed", "torch"] = "keyed",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        _check_arguments(num_generations, temperature, max_completion_length, num_iterations, beta, loss_type)
        if rollout_sampling not in ("keyed", "torch"):
            raise ValueError(f"rollout_sampling must be 'keyed' or 'torch', got {rollout_sampling!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["load"], self.hparams["lora"] = spec_to_hparam(load), spec_to_hparam(lora)
        self.load_options = coerce_spec(LoadOptions, load) or LoadOptions()
        self.lora = coerce_spec(LoRASpec, lora)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        names = rewards if rewards is not None else (["accuracy", "format"] if thinking else ["equality"])
        if not names:
            raise ValueError("rewards must name at least one reward function")
        if reward_weights is not None and len(reward_weights) != len(names):
            raise ValueError(f"reward_weights has {len(reward_weights)} values for {len(names)} rewards {names}")
        self.reward_names = list(names)
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(names)
        self.reward_fns = [resolve_reward(name, strip_completion=strip_completion) for name in names]
        self.model: Any = None  # built in configure_model()
        self.ref_model: Any = None  # frozen copy for full fine-tuning with beta > 0
        self.processor: Any = None
        self._logits_to_keep = False
        self._synced_gpus = False  # sharded parameters: every rank must run the same number of forwards
        self._sum_then_rescale = False  # dapo: token mean over the whole optimizer step
        self._step_tokens = torch.zeros(())
        self._rollouts: dict[int, Rollout] = {}  # mu > 1: micro-batch slot -> rollout to reuse
        self.eval_metrics = nn.ModuleDict(
            {f"{s}_{sub}_{m}": MeanMetric() for s in ("val", "test") for sub in _SUBSETS for m in _MATCHERS}
        )

    # ------------------------------------------------------------------------------------------------- model

    @property
    def mode(self) -> Mode:
        """``think`` (CLS-RL) or ``no_think`` (No-Thinking CLS-RL)."""
        return "think" if self.hparams["thinking"] else "no_think"

    @property
    def num_generations(self) -> int:
        """``G``."""
        return int(self.hparams["num_generations"])

    def configure_model(self) -> None:
        """Load the model, processor and reference (once: later calls do nothing)."""
        if self.model is not None:
            return
        hp = self.hparams
        self.processor = load_processor(hp["pretrained"], self.load_options, **(hp["processor_kwargs"] or {}))
        model = load_vlm(hp["pretrained"], self.load_options)
        if hp["beta"] != 0 and self.lora is None:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).train()  # eval() only while scoring
        if self.lora is not None:
            from ftmods.models.loading import apply_lora

            model = apply_lora(model, self.lora)
        if hp["freeze_vision"]:
            tower = vision_tower(model)
            if tower is None:
                raise ValueError(f"freeze_vision: no vision tower found in {type(model).__name__}")
            tower.requires_grad_(False)
        self.model = model.train()
        forward = getattr(self.model, "get_base_model", lambda: self.model)().forward
        self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        if self._device_mesh is not None:  # FSDP2: shard per block, the reference too
            fully_shard_model(self.model, self._device_mesh["data_parallel"])
            if self.ref_model is not None:
                fully_shard_model(self.ref_model, self._device_mesh["data_parallel"])
        if self.ref_model is not None and (self._device_mesh is not None or uses_fsdp1(self._trainer)):
            # these strategies save and load the module's own state dict: on_save_checkpoint never reaches the loader
            keep_frozen_parts_out_of_checkpoints(self, _reference_part)

    def fsdp_ignored_modules(self) -> list[torch.nn.Module]:
        """FSDP1 (``BlockFSDPStrategy``) keeps the frozen reference copy replicated, outside its units."""
        return [self.ref_model] if self.ref_model is not None else []

    def setup(self, stage: str) -> None:
        """Check the DataModule's mode, and pick the strategy-dependent settings."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = self.trainer.strategy
        data = getattr(self.trainer, "datamodule", None)
        data_mode = getattr(data, "hparams", {}).get("mode") if data is not None else None
        if data_mode is not None and data_mode != self.mode:
            raise ValueError(
                f"CLSRLModule(thinking={self.hparams['thinking']}) trains {self.mode!r} but the DataModule builds "
                f"{data_mode!r} prompts: set data.init_args.mode: {self.mode} (or model.init_args.thinking)"
            )
        data_mu = getattr(data, "hparams", {}).get("num_iterations", 1) if data is not None else 1
        if stage == "fit" and data_mu != self.hparams["num_iterations"]:
            raise ValueError(
                f"CLSRLModule(num_iterations={self.hparams['num_iterations']}) reuses each generation batch that many "
                f"times, but the DataModule repeats batches {data_mu} times: set data.init_args.num_iterations: "
                f"{self.hparams['num_iterations']}"
            )
        deepspeed = isinstance(strategy, DeepSpeedStrategy)
        stage3 = deepspeed and getattr(strategy, "zero_stage_3", False)
        self._synced_gpus = self.trainer.world_size > 1 and (
            self._device_mesh is not None or stage3 or uses_fsdp1(self.trainer)
        )
        self._sum_then_rescale = self.hparams["loss_type"] == "dapo" and not deepspeed
        self._step_tokens = torch.zeros((), device=self.device)

    # ---------------------------------------------------------------------------------------------- rollouts

    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The batch's prompts and images through the processor (left padded), on this module's device."""
        inputs = encode_prompts(self.processor, batch)
        limit = self.hparams["max_prompt_length"]
        if limit is not None:
            lengths = inputs["attention_mask"].sum(1).tolist()
            long = [f"{i} ({n} tokens)" for i, n in zip(batch["ids"], lengths, strict=True) if n > limit]
            if long:
                raise ValueError(
                    f"{len(long)} prompts exceed max_prompt_length={limit}: {', '.join(long[:5])}; raise the limit "
                    "(truncating would cut image tokens)"
                )
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def generation_config(self, *, sample: bool) -> Any:
        """Sampling (rollouts) or greedy (evaluation) settings, independent of the checkpoint's generation config."""
        from transformers import GenerationConfig

        hp, tokenizer = self.hparams, self.processor.tokenizer
        common = {
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "use_cache": True,  # even when gradient checkpointing turned the config's cache off
            "suppress_tokens": self._vision_token_ids() or None,
        }
        if not sample:
            length = hp["eval_max_new_tokens"] or hp["max_completion_length"]
            return GenerationConfig(do_sample=False, max_new_tokens=length, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=hp["temperature"],
            top_p=hp["top_p"],
            top_k=hp["top_k"],
            max_new_tokens=hp["max_completion_length"],
            num_return_sequences=self.num_generations,
            **common,
        )

    @torch.no_grad()
    def generate(
        self, inputs: Mapping[str, Tensor], *, sample: bool, seed: int | None = None, keys: Tensor | None = None
    ) -> Tensor:
        """Completion ids ``(B * G, T)`` (sampled) or ``(B, T)`` (greedy); the model is in eval mode meanwhile.

        Sampling draws from ``generate``'s sampler under ``seed``, or, given ``keys`` (``(B * G,)``, from
        :func:`ftmods.ops.sampling.row_keys`), each row from its own keyed stream: the
        :class:`~ftmods.ops.sampling.KeyedSampler` returns one-hot scores, so ``generate``'s draw can only take the
        keyed token. ``generate`` still expands the prompts itself (``num_return_sequences=G``), which encodes each
        image once rather than G times; the price is a redundant softmax + multinomial per token
        (``benchmarks/keyed_sampling.py``).
        """
        config, processors = self.generation_config(sample=sample), []
        if keys is not None:
            hp = self.hparams
            width = inputs["input_ids"].shape[1]
            sampler = KeyedSampler(keys, width, temperature=hp["temperature"], top_k=hp["top_k"], top_p=hp["top_p"])
            processors = [sampler]
            config.update(temperature=1.0, top_k=0, top_p=1.0)  # applied by the KeyedSampler instead
        model, was_training = self.model, self.model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        sharded = gather_root(model)  # FSDP2: images are encoded before the first forward (see gather_root)
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(
                    **inputs, generation_config=config, logits_processor=processors, synced_gpus=self._synced_gpus
                )  # (N, P + T)
        finally:
            model.train(was_training)
            if sharded:
                model.reshard()
        return out[:, inputs["input_ids"].shape[1] :]  # (N, T)

    def decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        """Texts of the masked completion tokens, special tokens skipped."""
        rows = [ids[keep].tolist() for ids, keep in zip(completion_ids.cpu(), mask.cpu(), strict=True)]
        return list(self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True))

    def scoring_inputs(self, inputs: Mapping[str, Tensor], completion_ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Prompt inputs expanded to ``N = B * G`` rows and extended over the completions, for one forward pass.

        ``input_ids`` are prompt + completion; the attention mask is extended with the completion mask, other per-token
        inputs (``mm_token_type_ids``) with zeros; Qwen-style ``pixel_values`` are repeated image by image
        (:func:`ftmods.ops.grpo.expand_pixels_per_image`), batched ones (B, C, H, W) row by row.
        """
        group = completion_ids.shape[0] // inputs["input_ids"].shape[0]
        out: dict[str, Tensor] = {}
        for key, value in inputs.items():
            if not isinstance(value, Tensor):
                continue
            if key == "input_ids":
                out[key] = torch.cat([value.repeat_interleave(group, 0), completion_ids], 1)  # (N, P + T)
            elif key in _TOKEN_KEYS:
                tail = (
                    mask.to(value.dtype)
                    if key == "attention_mask"
                    else torch.zeros_like(completion_ids, dtype=value.dtype)
                )
                out[key] = torch.cat([value.repeat_interleave(group, 0), tail], 1)  # (N, P + T)
            elif key == "pixel_values" and "image_grid_thw" in inputs:
                out[key] = expand_pixels_per_image(value, inputs["image_grid_thw"], group)  # (G * sum n_i, D)
            else:
                out[key] = value.repeat_interleave(group, 0)  # image_grid_thw (N, 3), batched pixels, ...
        return out

    def completion_logprobs(self, model: Any, inputs: Mapping[str, Tensor], completion_ids: Tensor) -> Tensor:
        """``(N, T)`` fp32 log-probs of the completion tokens under ``model`` in one forward pass."""
        length = completion_ids.shape[1]
        if self._logits_to_keep:
            logits = model(**inputs, use_cache=False, logits_to_keep=length + 1).logits  # (N, T + 1, V)
            prompt_len = 1
        else:
            logits = model(**inputs, use_cache=False).logits  # (N, P + T, V)
            prompt_len = logits.shape[1] - length
        return completion_logprobs(logits, completion_ids, prompt_len, temperature=self.hparams["temperature"])

    @torch.no_grad()
    def reference_logprobs(self, inputs: Mapping[str, Tensor], completion_ids: Tensor) -> Tensor | None:
        """Log-probs under the reference: the frozen copy, the model with its adapter disabled, or None (beta = 0)."""
        if self.hparams["beta"] == 0:
            return None
        if self.ref_model is not None:
            self.ref_model.eval()  # only while scoring: Lightning warns about modules in eval mode at fit start
            try:
                return self.completion_logprobs(self.ref_model, inputs, completion_ids)
            finally:
                self.ref_model.train()
        with adapters_disabled(self.model) as reference:
            return self.completion_logprobs(reference, inputs, completion_ids)

    def score(self, completions: Sequence[str], labels: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted reward sum ``(N,)`` and each reward function's values."""
        parts = {}
        for name, fn in zip(self.reward_names, self.reward_fns, strict=True):
            values = fn(list(completions), list(labels))
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            parts[name] = torch.tensor(values, dtype=torch.float32, device=self.device)  # (N,)
        total = sum(w * v for w, v in zip(self.reward_weights, parts.values(), strict=True))
        return torch.as_tensor(total, device=self.device), parts

    def rollout(self, batch: Mapping[str, Any], *, seed: int | None = None) -> Rollout:
        """Sample ``G`` completions per prompt and compute rewards, advantages and the fixed log-probs."""
        hp, group = self.hparams, self.num_generations
        inputs = self.encode(batch)
        start = time.perf_counter()
        keys = None
        if hp["rollout_sampling"] == "keyed":
            keys = row_keys(hp["seed"], data_epoch(self), batch["ids"], group, device=self.device)  # (N,)
        completion_ids = self.generate(inputs, sample=True, seed=seed, keys=keys)  # (N, T)
        generated = time.perf_counter()
        mask = completion_mask(
            completion_ids, self.processor.tokenizer.eos_token_id, mask_truncated=hp["mask_truncated_completions"]
        )  # (N, T)
        completions = self.decode(completion_ids, mask)
        labels = [label for label in batch["labels"] for _ in range(group)]
        rewards, parts = self.score(completions, labels)
        batch_std = self._global_reward_std(rewards)  # None but for scale_rewards: batch on several ranks
        advantages = group_advantages(
            rewards, group, scale=hp["scale_rewards"], eps=hp["advantage_eps"], batch_std=batch_std
        )  # (N,)
        scoring = self.scoring_inputs(inputs, completion_ids, mask)
        with torch.no_grad():
            ref_logp = self.reference_logprobs(scoring, completion_ids)
            old_logp = None
            if hp["num_iterations"] > 1:
                old_logp = self.completion_logprobs(self.model, scoring, completion_ids)
        return Rollout(
            inputs=scoring,
            completion_ids=completion_ids,
            mask=mask,
            completions=completions,
            labels=labels,
            rewards=rewards,
            reward_parts=parts,
            advantages=advantages,
            ref_logp=ref_logp,
            old_logp=old_logp,
            ids=list(batch["ids"]),
            timings={"generate": generated - start, "score": time.perf_counter() - generated},
        )

    def _global_reward_std(self, rewards: Tensor) -> Tensor | None:
        """``scale_rewards: batch`` on several ranks: the std of the micro-batch's rewards over all ranks.

        One all-reduce of count, sum and sum of squares, so that N ranks scale like one process with N times the
        batch (TRL gathers the rewards before scaling too). None otherwise: the local batch's std applies.
        """
        trainer = self._trainer
        if self.hparams["scale_rewards"] != "batch" or trainer is None or trainer.world_size < 2:
            return None
        values = rewards.double()
        sums = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device),
                            values.sum(), (values * values).sum()])  # fmt: skip
        count, total, total_sq = trainer.strategy.reduce(sums, reduce_op="sum")
        return pooled_std(count, total, total_sq).float()

    def compute_loss(self, rollout: Rollout, *, num_items: Tensor | float | None = None) -> GRPOLossOutput:
        """The GRPO loss of a rollout under the current policy (one differentiable forward pass)."""
        hp = self.hparams
        logp = self.completion_logprobs(self.model, rollout.inputs, rollout.completion_ids)  # (N, T)
        return grpo_loss(
            logp,
            rollout.old_logp,
            rollout.ref_logp,
            rollout.advantages,
            rollout.mask,
            beta=hp["beta"],
            epsilon=hp["epsilon"],
            epsilon_high=hp["epsilon_high"],
            loss_type=hp["loss_type"],
            max_completion_length=hp["max_completion_length"],
            num_items=num_items,
        )

    # ------------------------------------------------------------------------------------------------- steps

    def rollout_seed(self, batch_idx: int) -> int:
        """The sampling seed of a micro-batch: a function of ``(seed, epoch, batch_idx, rank)`` only."""
        key = ((self.hparams["seed"] * 1_000_003 + data_epoch(self)) * 1_000_003 + batch_idx) * 4099
        return (key + self.global_rank) % (2**63 - 1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Rollout (or reuse one, mu > 1), GRPO loss, logs."""
        rollout = self._rollout_for(batch, batch_idx)
        if self._sum_then_rescale:
            out = self.compute_loss(rollout, num_items=1.0)  # a token sum; normalised in on_before_optimizer_step
            self._step_tokens = self._step_tokens.to(out.num_tokens.device) + out.num_tokens
            shown = out.loss.detach() / out.num_tokens.clamp(min=1)
        else:
            out = self.compute_loss(rollout)
            shown = out.loss.detach()
        self._log_step(rollout, out, shown, batch_idx)
        return out.loss

    def _rollout_for(self, batch: Mapping[str, Any], batch_idx: int) -> Rollout:
        mu = self.hparams["num_iterations"]
        if mu == 1:
            return self.rollout(batch, seed=self.rollout_seed(batch_idx))
        accumulate = self.trainer.accumulate_grad_batches
        slot, pass_ = batch_idx % accumulate, (batch_idx // accumulate) % mu
        if pass_ == 0 or slot not in self._rollouts:
            self._rollouts[slot] = self.rollout(batch, seed=self.rollout_seed(batch_idx - pass_ * accumulate))
        rollout = self._rollouts[slot]
        if rollout.ids != list(batch["ids"]):
            raise ValueError(
                f"num_iterations={mu}: micro-batch {batch_idx} holds items {list(batch['ids'])[:3]}... but reuses the "
                f"rollout of {rollout.ids[:3]}...; the DataModule must repeat every group of accumulate_grad_batches="
                f"{accumulate} batches {mu} times (data.init_args.num_iterations: {mu})"
            )
        return rollout

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``dapo``: turn the accumulated token-sum gradients into the mean over every completion token of the step."""
        if not self._sum_then_rescale:
            return
        total = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp(min=1.0)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        self._step_tokens = torch.zeros_like(self._step_tokens)

    def _log_step(self, rollout: Rollout, out: GRPOLossOutput, loss: Tensor, batch_idx: int) -> None:
        group = self.num_generations
        lengths = rollout.mask.sum(1).float()  # (N,)
        stds = group_reward_std(rollout.rewards, group)  # (B,)
        has_eos = torch.isin(rollout.completion_ids, torch.tensor(self._eos_ids(), device=self.device)).any(1)
        values = {
            "loss": loss,
            "reward": rollout.rewards.mean(),
            "reward_std": stds.mean(),
            "frac_reward_zero_std": (stds == 0).float().mean(),
            "kl": out.kl,
            "completion_length": lengths.mean(),
            "clipped_ratio": (~has_eos).float().mean(),
            **{f"rewards/{name}": part.mean() for name, part in rollout.reward_parts.items()},
        }
        if self.hparams["num_iterations"] > 1:
            values["clip_fraction"] = out.clip_fraction.float()
        # token means (kl, clip_fraction; the loss of dapo) are weighted by each rank's token count, the rest are
        # means over the same number of completions on every rank: one all-reduce of sums for all of them
        per_token = {"kl", "clip_fraction"} | ({"loss"} if self._sum_then_rescale else set())
        names, tokens, world = list(values), out.num_tokens.float().to(self.device), self.trainer.world_size
        weights = {n: tokens if n in per_token else torch.ones((), device=self.device) / world for n in names}
        stacked = torch.stack([torch.as_tensor(values[n], device=self.device).float() * weights[n] for n in names])
        stacked = torch.cat([stacked, tokens.reshape(1)])
        if world > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        total = stacked[-1].clamp(min=1)
        stacked = torch.stack([v / total if n in per_token else v for n, v in zip(names, stacked[:-1], strict=True)])
        size = len(rollout.ids)
        for name, value in zip(names, stacked, strict=True):
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "reward"), batch_size=size)
        for name, seconds in rollout.timings.items():
            self.log(f"train/time_{name}", seconds, batch_size=size)
        every = self.hparams["log_completions_every_n_steps"]
        first_micro = batch_idx % self.trainer.accumulate_grad_batches == 0
        if self.hparams["log_completions"] > 0 and every > 0 and self.global_step % every == 0 and first_micro:
            rows = [
                {
                    "id": rollout.ids[i // group],
                    "label": rollout.labels[i],
                    "completion": rollout.completions[i],
                    "reward": round(float(rollout.rewards[i]), 4),
                    "advantage": round(float(rollout.advantages[i]), 4),
                }
                for i in range(min(self.hparams["log_completions"], len(rollout.completions)))
            ]
            log_table(self.trainer, "train/completions", rows)

    def _vision_token_ids(self) -> list[int]:
        """Image / video placeholder and delimiter ids (``image_token_id``, ``vision_start_token_id``, ...).

        Never sampled: a generated ``<|image_pad|>`` would make the scoring forward expect image features that do not
        exist (a random tiny model draws one within a few steps; a trained one practically never).
        """
        config = getattr(self.model, "config", None)
        ids = set()
        for name, value in vars(config).items() if config is not None else ():
            is_id = isinstance(value, int) and name.endswith(("token_id", "token_index"))
            if is_id and any(word in name for word in ("image", "video", "vision", "boi", "eoi")):
                ids.add(value)
        return sorted(ids)

    def _eos_ids(self) -> list[int]:
        eos = self.processor.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    # ------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict_labels(self, batch: Mapping[str, Any]) -> list[str]:
        """Greedy answers to the batch's (evaluation) prompts."""
        completion_ids = self.generate(self.encode(batch), sample=False)  # (B, T)
        return self.decode(completion_ids, completion_mask(completion_ids, self._eos_ids()))

    def judge(self, prediction: str, label: str) -> dict[str, bool]:
        """``exact``: the mode's training accuracy reward; ``lenient``: the paper's evaluation matcher."""
        if self.mode == "think":
            exact = accuracy_reward(prediction, label) == 1.0
        else:
            exact = equality_reward(prediction, label, strip_completion=self.hparams["strip_completion"]) == 1.0
        return {"exact": exact, "lenient": lenient_match(prediction, label)}

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, stage: str) -> list[dict[str, Any]]:
        predictions = self.predict_labels(batch)
        records = []
        for item, label, subset, prediction in zip(
            batch["ids"], batch["labels"], batch["subsets"], predictions, strict=True
        ):
            verdict = self.judge(prediction, label)
            for matcher in _MATCHERS:
                self._metric(stage, subset, matcher).update(float(verdict[matcher]))
            records.append({"id": item, "label": label, "subset": subset, "prediction": prediction, **verdict})
        if batch_idx == 0 and self.hparams["log_completions"] > 0 and not self.trainer.sanity_checking:
            log_table(
                self.trainer, f"{stage}/completions_{batch['subsets'][0]}", records[: self.hparams["log_completions"]]
            )
        return records

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Greedy answers, scored exactly and leniently, per class subset."""
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """As :meth:`validation_step`."""
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per image: id, label, subset, prediction, exact, lenient."""
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        """Log accuracies (percent) per subset and matcher, and the base/new harmonic mean."""
        self._log_accuracies("val")

    def on_test_epoch_end(self) -> None:
        """As :meth:`on_validation_epoch_end`."""
        self._log_accuracies("test")

    def _metric(self, stage: str, subset: str, matcher: str) -> MeanMetric:
        metric = self.eval_metrics[f"{stage}_{subset}_{matcher}"]
        assert isinstance(metric, MeanMetric)
        return metric

    def _log_accuracies(self, stage: str) -> None:
        for matcher in _MATCHERS:
            values = {}
            for subset in _SUBSETS:
                metric = self._metric(stage, subset, matcher)
                if not metric.update_called:
                    continue
                values[subset] = metric.compute() * 100
                metric.reset()
                suffix = "" if subset == "all" else f"/{subset}"
                self.log(f"{stage}/acc_{matcher}{suffix}", values[subset], prog_bar=matcher == "lenient")
            if "base" in values and "new" in values:
                self.log(f"{stage}/acc_{matcher}/hm", harmonic_mean(values["base"], values["new"]))

    # -------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """The injected optimizer over trainable parameters (default AdamW lr 1e-6, wd 0), plus the scheduler."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimizers(params, self.optimizer_factory, self.scheduler_factory, default_lr=1e-6,
                                default_weight_decay=0.0, interval=self.hparams["lr_scheduler_interval"])  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen reference out (it is the pretrained model); keep the rollouts that mu > 1 still reuses."""
        drop_frozen_state(checkpoint.get("state_dict", {}), [REFERENCE_PREFIX])
        if self._rollouts:
            checkpoint["cls_rl_rollouts"] = {slot: r.to_state() for slot, r in self._rollouts.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the reference (rebuilt from ``pretrained`` in ``configure_model``) back, and the reused rollouts."""
        if "state_dict" in checkpoint:
            fill_frozen_state(checkpoint["state_dict"], _reference_part(self))
        saved = checkpoint.get("cls_rl_rollouts") or {}
        self._rollouts = {int(slot): Rollout.from_state(r, self.device) for slot, r in saved.items()}

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the model (a peft adapter with LoRA, else safetensors weights) and its processor.

        Args:
            path: Output folder.
            state_dict: A full (gathered) state dict of ``self.model`` to write instead of the live parameters.
        """
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.processor.save_pretrained(path)
        return path


# ------------------------------------------------------------------------------------------------------ helpers


def _reference_part(module: nn.Module) -> list[tuple[str, Any]]:
    """The frozen reference copy: rebuilt from ``pretrained`` in ``configure_model``, never in checkpoints."""
    return [(REFERENCE_PREFIX, getattr(module, "ref_model", None))]


def harmonic_mean(base: Tensor | float, new: Tensor | float) -> Tensor:
    """``2 B N / (B + N)`` (0 when both are 0): the base-to-new summary of the paper.

    Example:
        >>> round(float(harmonic_mean(80.0, 60.0)), 4)
        68.5714
    """
    base_t, new_t = torch.as_tensor(base, dtype=torch.float32), torch.as_tensor(new, dtype=torch.float32)
    total = base_t + new_t
    return torch.where(total > 0, 2 * base_t * new_t / total.clamp(min=1e-12), torch.zeros_like(total))


def resolve_reward(name: str, *, strip_completion: bool = False) -> RewardFn:
    r"""A batch reward function by registry name (:data:`ftmods.cls_rl.rewards.REWARDS`) or import path.

    Import paths are ``package.module.function`` (or ``package.module:function``) of a callable
    ``(completions, labels) -> list[float]``. ``equality`` honours ``strip_completion``.

    Example:
        >>> resolve_reward("equality", strip_completion=True)([" cat\n"], ["cat"])
        [1.0]
    """
    if name == "equality" and strip_completion:
        return lambda completions, labels: [
            equality_reward(c, label, strip_completion=True) for c, label in zip(completions, labels, strict=True)
        ]
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attr = name.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARDS)} or an import path 'pkg.module.fn'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({error})") from error
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _check_arguments(
    num_generations: int, temperature: float, max_completion_length: int, num_iterations: int, beta: float, loss: str
) -> None:
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (advantages compare samples of a group), got {num_generations}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_completion_length < 1 or num_iterations < 1:
        raise ValueError(
            f"max_completion_length ({max_completion_length}) and num_iterations ({num_iterations}) must be >= 1"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if loss not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss!r}")
