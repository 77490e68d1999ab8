"""``LocFTModule``: localized fine-tuning for model editing, breadth-first (LocFT-BF) or depth-first (FT-M / FT-L).

"Fine-tuning Done Right in Model Editing", arXiv:2509.22072.

Implemented:
- Only the selected tensors train: exact names or anchored regexes (:mod:`ftmods.ops.params`), paper presets
  (Llama-3-8B layer 22 ``mlp.down_proj``, Qwen2.5-7B layer 6, Mistral-7B all of layer 23, Qwen1.5-MoE), or
  ``mlp.down_proj`` at 70 % depth. Everything else is frozen and bit-identical after training.
- ``breadth_first``: epochs over the whole edit set in shuffled mini-batches, one Adam, per-sample mean of the
  target-token CE, no step when the batch loss (averaged over ranks) is below ``loss_tol``, early stop when an epoch's
  mean loss is below it.
- ``depth_first``: the editing-library baseline (EasyEdit FT-M, or FT-L with ``df_objective="prompt_last"``): requests
  in stream order, up to ``df_max_steps`` steps each until the loss is below ``loss_tol``, a fresh optimizer per
  request (``fresh_optimizer``), optional ℓ∞ clamp around the original weights, never revisited.
- Evaluation on the final model (``test``), every figure named by its protocol (:mod:`ftmods.locft.evaluator`); the
  pre-edit reference for locality uses the original tensors swapped back in.
- Export: :meth:`save_pretrained` (a normal HF checkpoint) and :meth:`save_delta` (the tuned tensors' deltas alone).

Lifelong editing (``cumulative`` / ``buffered``) is :class:`ftmods.locft.stream.EditStream` around this module.

Not implemented yet: fp32 master copies of the tuned block for bf16 models (load in fp32 instead, as the official
code does); FSDP2 sharding inside ``configure_model``. DDP needs nothing more (one tensor is all-reduced); DeepSpeed
ZeRO-3 for the 72B config is untested (no GPU was available).

Batch keys (:class:`ftmods.datamodules.edits.EditBatch`): ``input_ids``, ``attention_mask``, ``position_ids``,
``labels`` (target + EOS), ``edit_index``; evaluation batches are lists of ``EditRequest``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ftmods.datamodules.edits import EditRequest
from ftmods.locft.evaluator import EditEvaluator, protocol_keys
from ftmods.locft.evaluator import Protocol as EvalProtocol
from ftmods.locft.loss import LocFTLossOutput, locft_sample_mean_loss, locft_token_mean_loss, prompt_last_loss
from ftmods.locft.metrics import ProtocolScores
from ftmods.models.loading import LoadOptions, coerce_spec, load_causal_lm, load_tokenizer, spec_to_hparam
from ftmods.ops.params import LOCFT_PRESETS, default_locft_patterns, freeze_all_but

Preset = Literal["llama3-8b", "qwen2.5-7b", "mistral-7b-v0.1", "qwen1.5-moe"]


class LocFTModule(LightningModule):
    """Edit facts into a causal LM by fine-tuning one localized block.

    Args:
        pretrained: Hub id, local folder or ``tiny/<name>`` of a causal LM.
        target_modules: Exact parameter names or anchored regexes of the tensors to tune.
        preset: A paper location (used when ``target_modules`` is not given; also sets the default Adam LR).
        pipeline: ``breadth_first`` (LocFT-BF) or ``depth_first`` (the editing-library FT baseline).
        load: Loading options (dtype, attention kernel, ``trust_remote_code``); dicts from checkpoints accepted.
        optimizer: Optimizer factory over the tuned tensors; default ``Adam(lr, weight_decay=0)`` with the preset's LR
            or 5e-4.
        loss_tol: No step below this batch loss; stop when an epoch's mean loss (BF) or a request's loss (DF) is below.
        loss_reduction: ``sample_mean`` (official: per edit, then over edits) or ``token_mean`` (LlamaFactory port).
        df_max_steps: Depth-first: most optimizer steps per request.
        df_objective: Depth-first: ``target_new`` (FT-M) or ``prompt_last`` (FT-L).
        fresh_optimizer: Depth-first: a new optimizer per request (EasyEdit); ``False`` keeps one (DFp).
        norm_constraint: Depth-first: clamp tuned weights to ``original ± norm_constraint`` after every step.
        eval_protocols: Protocols of the test-time evaluator (e.g. ``wild_em``, ``teacher_forced_token``).
        eval_max_new_tokens: Generation length for ``wild_em``.
        evaluate_after_fit: Score the final model on the DataModule's edit requests at the end of ``fit`` (the
            paper's protocol: one evaluation of the final model); written to the logger and
            ``<log_dir>/edit_eval.json``.

    Example::

        module = LocFTModule("meta-llama/Meta-Llama-3-8B-Instruct", preset="llama3-8b")
        trainer = Trainer(max_epochs=25)
        trainer.fit(module, datamodule=EditDataModule("zsre_3k.json", batch_size=100))
        trainer.test(module, datamodule=dm)
    """

    def __init__(
        self,
        pretrained: str,
        *,
        target_modules: list[str] | None = None,
        preset: Preset | None = None,
        pipeline: Literal["breadth_first", "depth_first"] = "breadth_first",
        load: LoadOptions | None = None,
        optimizer: OptimizerCallable | None = None,
        loss_tol: float = 1e-2,
        loss_reduction: Literal["sample_mean", "token_mean"] = "sample_mean",
        df_max_steps: int = 25,
        df_objective: Literal["target_new", "prompt_last"] = "target_new",
        fresh_optimizer: bool = True,
        norm_constraint: float | None = None,
        eval_protocols: list[EvalProtocol] | None = None,
        eval_max_new_tokens: int = 32,
        evaluate_after_fit: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams["load"] = spec_to_hparam(load)  # plain dict: checkpoints load with weights_only=True
        self.automatic_optimization = False  # exact skip rule, and per-request optimizers in depth-first mode
        self.load_options = coerce_spec(LoadOptions, load) or LoadOptions()
        self.optimizer_factory = optimizer
        self.depth_first = pipeline == "depth_first"
        if self.depth_first and df_objective == "prompt_last":
            self.loss_fn = prompt_last_loss
        else:
            self.loss_fn = locft_sample_mean_loss if loss_reduction == "sample_mean" else locft_token_mean_loss
        self.model: Any = None  # built in configure_model()
        self.tuned_names: list[str] = []  # parameter names of the tuned block (relative to self.model)
        self.original: dict[str, Tensor] = {}  # pre-edit copies of the tuned tensors (CPU), for reference and delta
        self.stats: dict[str, Any] = {
            "epoch": -1,
            "opt_steps": 0,
            "skipped_steps": 0,
            "epoch_loss_sum": 0.0,
            "epoch_batches": 0,
        }
        self._fit_start = 0.0
        self.seconds_per_edit: float | None = None  # wall time of the last fit / number of edits
        self.eval_protocols: list[EvalProtocol] = list(eval_protocols or ["wild_em", "teacher_forced_token"])
        self.test_scores = ProtocolScores(protocol_keys(self.eval_protocols))  # exact over batches and ranks
        self._evaluator: EditEvaluator | None = None  # built on first use (needs the tokenizer)

    # ------------------------------------------------------------------------------------------------- model

    def patterns(self, num_layers: int) -> list[str]:
        """The selection patterns: explicit, from the preset, or ``mlp.down_proj`` at 70 % depth."""
        if self.hparams["target_modules"]:
            return list(self.hparams["target_modules"])
        if self.hparams["preset"]:
            return list(LOCFT_PRESETS[self.hparams["preset"]]["patterns"])  # type: ignore[call-overload]
        return default_locft_patterns(num_layers)

    def configure_model(self) -> None:
        """Load the model, freeze all but the tuned tensors and keep their originals (once)."""
        if self.model is not None:
            return
        self.model = load_causal_lm(self.hparams["pretrained"], self.load_options).train()
        self.tuned_names = freeze_all_but(self.model, self.patterns(self.model.config.num_hidden_layers))
        params = dict(self.model.named_parameters())
        self.original = {name: params[name].detach().to("cpu", copy=True) for name in self.tuned_names}
        count = sum(params[n].numel() for n in self.tuned_names)
        rank_zero_info(f"LocFT tunes {len(self.tuned_names)} tensor(s), {count:,} parameters: {self.tuned_names}")

    def tuned_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters being edited."""
        params = dict(self.model.named_parameters())
        return [params[name] for name in self.tuned_names]

    def _default_lr(self) -> float:
        return float(LOCFT_PRESETS[self.hparams["preset"]]["lr"]) if self.hparams["preset"] else 5e-4  # type: ignore[arg-type]

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = self.tuned_parameters()
        if self.optimizer_factory is None:
            return torch.optim.Adam(params, lr=self._default_lr(), weight_decay=0.0)
        return self.optimizer_factory(params)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer over the tuned tensors (breadth-first, and depth-first with ``fresh_optimizer=False``)."""
        return self._new_optimizer()

    def batch_loss(self, batch: dict[str, Tensor]) -> LocFTLossOutput:
        """The editing loss of a batch (override to change the objective)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        logits = self.model(**inputs, use_cache=False).logits  # (B, T, V)
        return self.loss_fn(logits, batch["labels"])

    # ------------------------------------------------------------------------------------------------- steps

    def on_fit_start(self) -> None:
        """Start the per-edit timer."""
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        """Reset the epoch's loss; a mid-epoch resume restores ``stats`` of this epoch and keeps its partial sums."""
        if self.stats.get("epoch") != self.current_epoch:
            self.stats.update(epoch=self.current_epoch, epoch_loss_sum=0.0, epoch_batches=0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One breadth-first mini-batch, or the whole depth-first edit loop of one request."""
        if self.depth_first:
            self._depth_first_step(batch)
            return
        out = self.batch_loss(batch)
        loss = self.trainer.strategy.reduce(out.loss.detach(), reduce_op="mean")  # same decision on every rank
        self.stats["epoch_loss_sum"] += float(loss)
        self.stats["epoch_batches"] += 1
        if loss >= self.hparams["loss_tol"]:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(out.loss)
            optimizer.step()  # type: ignore[union-attr]
            self.stats["opt_steps"] += 1
        else:
            self.stats["skipped_steps"] += 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def _depth_first_step(self, batch: dict[str, Tensor]) -> None:
        optimizer = self._new_optimizer() if self.hparams["fresh_optimizer"] else self.optimizers()
        loss = torch.zeros(())
        for _ in range(self.hparams["df_max_steps"]):
            out = self.batch_loss(batch)
            loss = out.loss.detach()
            if loss < self.hparams["loss_tol"]:
                break
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(out.loss)
            optimizer.step()  # type: ignore[union-attr]
            self.stats["opt_steps"] += 1
            self._clamp_to_original()
        self.stats["epoch_loss_sum"] += float(loss)
        self.stats["epoch_batches"] += 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    @torch.no_grad()
    def _clamp_to_original(self) -> None:
        eps = self.hparams["norm_constraint"]
        if eps is None:
            return
        for name, param in zip(self.tuned_names, self.tuned_parameters(), strict=True):
            original = self.original[name].to(param.device, param.dtype)
            param.copy_(torch.clamp(param, original - eps, original + eps))

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean loss; breadth-first stops once it is below ``loss_tol``."""
        mean = self.stats["epoch_loss_sum"] / max(1, self.stats["epoch_batches"])
        self.log_dict(
            {
                "train/epoch_loss": mean,
                "train/opt_steps": float(self.stats["opt_steps"]),
                "train/skipped_steps": float(self.stats["skipped_steps"]),
            }
        )
        if not self.depth_first and mean < self.hparams["loss_tol"]:
            rank_zero_info(f"LocFT: epoch {self.current_epoch} mean loss {mean:.2e} < {self.hparams['loss_tol']}: stop")
            self.trainer.should_stop = True

    def on_fit_end(self) -> None:
        """Seconds per edit (wall time of fit / number of edits, the paper's figure); then the final evaluation."""
        datamodule = getattr(self.trainer, "datamodule", None)
        requests = getattr(datamodule, "requests", None)
        if requests:
            self.seconds_per_edit = (time.perf_counter() - self._fit_start) / len(requests)
            rank_zero_info(f"LocFT: {len(requests)} edits, {self.seconds_per_edit:.4f} s per edit, {self.stats}")
        if self.hparams["evaluate_after_fit"] and requests:
            self.evaluate_requests(list(requests))

    def evaluate_requests(self, requests: list[EditRequest], batch_size: int = 32) -> dict[str, float]:
        """Score the current (edited) model on ``requests``; every rank takes its share, results are global.

        Returns and logs ``eval/<protocol>/<metric>`` means, and writes them with the timing to
        ``<log_dir>/edit_eval.json`` when the Trainer has a logger. Without a Trainer (a bare module) it only returns
        them.
        """
        attached = self._trainer is not None
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if attached else (0, 1)
        mine = requests[rank::world]
        for start in range(0, len(mine), batch_size):
            self.test_step(mine[start : start + batch_size], start // batch_size)
        scores = {f"eval/{k}": float(v) for k, v in self.test_scores.compute().items() if not torch.isnan(v)}
        self.test_scores.reset()
        scores["eval/seconds_per_edit"] = float(self.seconds_per_edit or float("nan"))
        if not attached:
            return scores
        log_dir = self.trainer.log_dir  # a collective: every rank evaluates it
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(scores, step=self.trainer.global_step)
            if log_dir and self.trainer.loggers:  # no logger: no stray file in the working directory
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                (Path(log_dir) / "edit_eval.json").write_text(json.dumps({**scores, "stats": self.stats}, indent=2))
            rank_zero_info("LocFT final-model evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        return scores

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Counters and the running epoch loss survive a resume."""
        checkpoint["locft_stats"] = dict(self.stats)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the counters saved by :meth:`on_save_checkpoint`."""
        self.stats.update(checkpoint.get("locft_stats", {}))

    # -------------------------------------------------------------------------------------------- evaluation

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved with ``pretrained`` (loaded on first use)."""
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.hparams["pretrained"], self.load_options)
        return self._tokenizer

    @property
    def evaluator(self) -> EditEvaluator:
        """The test-time evaluator (``eval_protocols``, raw prompts, greedy with natural stopping)."""
        if self._evaluator is None:
            self._evaluator = EditEvaluator(
                self.tokenizer, self.eval_protocols, max_new_tokens=self.hparams["eval_max_new_tokens"]
            )
        return self._evaluator

    def test_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        """Score a batch of requests on the edited model; locality against the pre-edit model (originals swapped in)."""
        self.swap_original()
        try:
            reference = self.evaluator.reference(self.model, batch)
        finally:
            self.swap_original()
        self.test_scores.update(self.evaluator.evaluate(self.model, batch, reference=reference))

    def on_test_epoch_end(self) -> None:
        """Log every protocol-tagged mean (e.g. ``test/wild_em/reliability``) and reset."""
        scores = {f"test/{k}": v for k, v in self.test_scores.compute().items() if not torch.isnan(v)}
        self.log_dict(scores)
        self.test_scores.reset()

    @torch.no_grad()
    def swap_original(self) -> None:
        """Exchange the tuned tensors with their pre-edit originals (call twice to swap back)."""
        for name, param in zip(self.tuned_names, self.tuned_parameters(), strict=True):
            edited = param.detach().to("cpu", copy=True)
            param.copy_(self.original[name].to(param.device, param.dtype))
            self.original[name] = edited

    # ------------------------------------------------------------------------------------------------ export

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The edited model as a normal Hugging Face checkpoint (safetensors) with its tokenizer."""
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path

    def save_delta(self, path: str | Path) -> Path:
        """The tuned tensors' changes alone (``edited - original``, safetensors) plus ``delta.json`` metadata.

        Apply with ``param += delta`` on the same base model: a few MB instead of the whole model.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = dict(self.model.named_parameters())
        delta = {n: (params[n].detach().cpu() - self.original[n]).contiguous() for n in self.tuned_names}
        save_file(delta, path / "delta.safetensors", metadata={"format": "pt"})
        meta = {"pretrained": self.hparams["pretrained"], "tensors": self.tuned_names, "stats": self.stats}
        (path / "delta.json").write_text(json.dumps(meta, indent=2))
        return path
