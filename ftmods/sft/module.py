"""``SFTModule``: completion-only supervised fine-tuning of a causal LM (full or LoRA).

The baseline of CLS-RL (arXiv:2503.16188), S3FT (arXiv:2502.08130) and ManyICL (arXiv:2506.11103).

Implemented: token-mean and sequence-mean completion NLL (:mod:`ftmods.sft.loss`), normalised over all data-parallel
ranks and gradient-accumulation micro-batches; padded or padding-free packed batches (``use_cache=False`` keeps packed
examples apart); logits only at supervised positions (``logits_to_keep``); LoRA via peft; FSDP2 sharding per
transformer block under ``ModelParallelStrategy`` / :class:`ftmods.strategies.FSDP2Strategy`; export with
:meth:`SFTModule.save_pretrained` (peft adapter or full safetensors weights). Not implemented: exact
cross-micro-batch normalisation under DeepSpeed (which owns gradient accumulation); there each micro-batch is
normalised by its token count summed over ranks.

Batch keys (:class:`ftmods.datamodules.ChatBatch`): ``input_ids`` (B, T), ``labels`` (B, T) with -100 where not
supervised, and either ``attention_mask`` (B, T) or ``position_ids`` (1, ΣT) for packed rows.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from ftmods.models.generation import generate_texts
from ftmods.models.loading import LoadOptions, LoRASpec, coerce_spec, load_causal_lm, load_tokenizer, spec_to_hparam
from ftmods.models.sharding import fully_shard_model
from ftmods.ops.tokens import (
    IGNORE_INDEX,
    next_token_targets,
    segment_ids_from_position_ids,
    split_prompt_and_target,
    supervised_positions,
)
from ftmods.optim import build_optimizers
from ftmods.reporting import log_table
from ftmods.sft.loss import SFTLossOutput, sequence_mean_nll, token_mean_nll


class SFTModule(LightningModule):
    """Supervised fine-tuning with a completion-only loss.

    Args:
        pretrained: Hub id, local folder or ``tiny/<name>`` of a causal LM.
        load: How to load it (dtype, attention kernel, gradient checkpointing, ``trust_remote_code``); the dict form
            stored in checkpoints is accepted too.
        lora: Train a LoRA adapter instead of all weights (dataclass or its dict form).
        loss_reduction: ``token_mean`` (every supervised token weighs the same) or ``sequence_mean`` (every example
            weighs the same, whatever its length).
        global_normalization: Make every optimizer step the mean over *all* supervised tokens (or sequences) of the
            step, on every data-parallel rank and in every gradient-accumulation micro-batch: micro-batches return
            their NLL sum and the gradients are divided by the global count before the optimizer step (and before
            clipping). ``False``: each micro-batch is normalised by its own count and Lightning averages them.
        optimizer: Optimizer factory; default AdamW(lr=2e-5, weight_decay=0).
        lr_scheduler: Scheduler factory, stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``step`` or ``epoch``.
        sample_completions: At each validation, generate (greedy) for this many prompts of the first validation batch
            and log prompt / reference / completion as a table (JSONL next to the logs, and TensorBoard or W&B).
        max_new_tokens: Length limit of those samples.

    Example::

        model = SFTModule("Qwen/Qwen2.5-0.5B-Instruct", lora=LoRASpec(r=16))
        trainer.fit(model, datamodule=ChatDataModule("train.jsonl", tokenizer="Qwen/Qwen2.5-0.5B-Instruct"))
        model.save_pretrained("out/adapter")
    """

    def __init__(
        self,
        pretrained: str,
        *,
        load: LoadOptions | None = None,
        lora: LoRASpec | None = None,
        loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean",
        global_normalization: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        sample_completions: int = 0,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # plain dicts in checkpoints, so they load with torch.load(weights_only=True)
        self.hparams["load"], self.hparams["lora"] = spec_to_hparam(load), spec_to_hparam(lora)
        self.load_options = coerce_spec(LoadOptions, load) or LoadOptions()
        self.lora = coerce_spec(LoRASpec, lora)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.sequence_mean = loss_reduction == "sequence_mean"
        self.model: Any = None  # built in configure_model()
        self._logits_to_keep = False  # whether the model's forward takes logits_to_keep
        self._sum_then_rescale = False  # set in setup(): global normalisation by gradient rescaling
        self._step_count = torch.zeros(())  # supervised tokens (or sequences) since the last optimizer step
        self._tokenizer: Any = None  # loaded on first use (samples, export)
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    # ------------------------------------------------------------------------------------------------- model

    def configure_model(self) -> None:
        """Load the pretrained weights (once: later calls do nothing)."""
        if self.model is not None:
            return
        self.model = load_causal_lm(self.hparams["pretrained"], self.load_options, self.lora).train()
        forward = getattr(self.model, "get_base_model", lambda: self.model)().forward
        self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        if self._device_mesh is not None:  # FSDP2 (ModelParallelStrategy / FSDP2Strategy): shard per block
            fully_shard_model(self.model, self._device_mesh["data_parallel"])

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Next-token logits ``(B, T, V)`` of a batch (no cache, so packed examples stay apart)."""
        return self.model(**self._model_inputs(batch), use_cache=False).logits

    @staticmethod
    def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    # -------------------------------------------------------------------------------------------------- loss

    def compute_loss(self, batch: dict[str, Tensor], *, denominator: float | Tensor | None = None) -> SFTLossOutput:
        """The completion NLL of a batch; override to change what is supervised or how it is reduced.

        Args:
            batch: A :class:`ftmods.datamodules.ChatBatch`.
            denominator: Divide the summed NLL (of tokens, or of per-sequence means) by this instead of the batch's
                own count; training passes 1.0 and normalises the gradient globally (``global_normalization``).
        """
        logits, targets, keep = self.supervised_logits(batch)  # (B, K, V), (B, K), (K,)
        return self.reduce_nll(batch, logits, targets, keep, denominator=denominator)

    def reduce_nll(
        self,
        batch: dict[str, Tensor],
        logits: Tensor,
        targets: Tensor,
        keep: Tensor,
        *,
        denominator: float | Tensor | None = None,
    ) -> SFTLossOutput:
        """Token- or sequence-mean NLL of the logits from :meth:`supervised_logits`."""
        if not self.sequence_mean:
            return token_mean_nll(logits, targets, num_tokens=denominator)
        if "position_ids" in batch and "attention_mask" not in batch:
            sequence_ids = segment_ids_from_position_ids(batch["position_ids"])[:, keep]  # (B, K)
        else:
            rows = torch.arange(targets.shape[0], device=targets.device)  # (B,)
            sequence_ids = rows[:, None].expand_as(targets)  # (B, K)
        return sequence_mean_nll(logits, targets, sequence_ids, num_sequences=denominator)

    def supervised_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Logits ``(B, K, V)``, aligned targets ``(B, K)`` and positions ``(K,)`` where anything is supervised.

        Uses ``logits_to_keep`` when the model takes it, so the LM head never runs on prompt positions.
        """
        targets = next_token_targets(batch["labels"])  # (B, T)
        keep = batch["logit_positions"] if "logit_positions" in batch else supervised_positions(batch["labels"])  # (K,)
        inputs = self._model_inputs(batch)
        if self._logits_to_keep:
            logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
        else:
            logits = self.model(**inputs, use_cache=False).logits[:, keep]  # (B, K, V)
        return logits, targets[:, keep], keep

    def on_before_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """Find the supervised positions while the labels are still on the CPU (no device sync in the step)."""
        if "labels" in batch:
            batch["logit_positions"] = supervised_positions(batch["labels"])
        return batch

    def setup(self, stage: str) -> None:
        """Decide how training normalises (DeepSpeed accumulates gradients itself, so it gets the per-batch form)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        self._sum_then_rescale = self.hparams["global_normalization"] and not deepspeed
        self._step_count = torch.zeros((), device=self.device)  # supervised tokens / sequences since the last step

    # ------------------------------------------------------------------------------------------------- steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch's loss; logs ``train/loss`` (the micro-batch's token- or sequence-mean, over all ranks)."""
        size = batch["input_ids"].shape[0]
        if self._sum_then_rescale:
            out = self.compute_loss(batch, denominator=1.0)  # a sum: the gradient is normalised before the step
            count = (out.num_sequences if self.sequence_mean else out.num_tokens).float()
            self._step_count = self._step_count.to(count.device) + count
            mean = out.loss.detach() / count.clamp(min=1)
        else:
            out = self.compute_loss(batch, denominator=self._rank_mean_count(batch))
            mean = out.loss.detach()
        self.log("train/loss", mean, prog_bar=True, sync_dist=True, batch_size=size)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated NLL-sum gradients into the gradient of the mean over every supervised unit of the step.

        Lightning divided each micro-batch loss by ``accumulate_grad_batches`` (N) and data parallelism averaged over
        the world (W), so the gradient holds ``sum / (N * W)``; multiplying by ``N * W / global_count`` gives
        ``sum / global_count``.
        """
        if not self._sum_then_rescale:
            return
        total = self.trainer.strategy.reduce(self._step_count, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp(min=1.0)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))  # one fused launch instead of one per tensor
        self._step_count = torch.zeros_like(self._step_count)

    def _rank_mean_count(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Per-micro-batch form (DeepSpeed, or ``global_normalization=False``): count over ranks / world size."""
        if self.trainer.world_size == 1 or not self.hparams["global_normalization"]:
            return None
        targets = next_token_targets(batch["labels"])  # (B, T)
        if self.sequence_mean:
            rows = targets != IGNORE_INDEX
            local = (
                float(rows.any(-1).sum())
                if "attention_mask" in batch
                else float(torch.unique(segment_ids_from_position_ids(batch["position_ids"])[rows]).numel())
            )
        else:
            local = float((targets != IGNORE_INDEX).sum())
        total = self.trainer.strategy.reduce(torch.tensor(local, device=self.device), reduce_op="sum")
        return (total / self.trainer.world_size).clamp(min=1.0 / self.trainer.world_size)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Token-weighted NLL over the whole validation set (exact across batches and ranks); samples on batch 0."""
        self._eval_step(batch, self.val_nll, "val")
        if batch_idx == 0 and self.hparams["sample_completions"] > 0 and not self.trainer.sanity_checking:
            self._log_samples(batch)

    def _log_samples(self, batch: dict[str, Tensor]) -> None:
        pairs = split_prompt_and_target(batch["input_ids"], batch["labels"], batch.get("position_ids"))
        pairs = pairs[: self.hparams["sample_completions"]]
        if not pairs:
            return
        tokenizer = self.tokenizer
        texts = generate_texts(
            self.model, tokenizer, [p for p, _ in pairs], max_new_tokens=self.hparams["max_new_tokens"]
        )
        rows = [
            {
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "reference": tokenizer.decode(target, skip_special_tokens=True),
                "completion": text,
            }
            for (prompt, target), text in zip(pairs, texts, strict=True)
        ]
        log_table(self.trainer, "val/completions", rows)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved with ``pretrained`` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams["pretrained"], self.load_options)
        return self._tokenizer

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Token-weighted NLL over the whole test set."""
        self._eval_step(batch, self.test_nll, "test")

    def _eval_step(self, batch: dict[str, Tensor], metric: MeanMetric, stage: str) -> None:
        out = self.compute_loss(batch)
        if out.num_tokens > 0:
            metric.update(out.nll_sum / out.num_tokens, weight=out.num_tokens)
        self.log(f"{stage}/loss", metric, prog_bar=True, on_step=False, on_epoch=True)

    # -------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """The injected optimizer over trainable parameters only, plus the scheduler if one is set."""
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimizers(params, self.optimizer_factory, self.scheduler_factory, default_lr=2e-5,
                                default_weight_decay=0.0, interval=self.hparams["lr_scheduler_interval"])  # fmt: skip

    # ------------------------------------------------------------------------------------------------ export

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the model in Hugging Face format with its tokenizer: a peft adapter with LoRA, else full weights.

        Args:
            path: Output folder.
            state_dict: A full (gathered) state dict to write instead of the live parameters, for sharded runs.
        """
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path
