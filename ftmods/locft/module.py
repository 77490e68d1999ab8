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
- Evaluation timing is explicit: ``final`` (default, the paper's protocol: one evaluation of the final model, at the
  end of ``fit`` with ``evaluate_after_fit`` or by ``test``) or ``after_each`` (depth-first: every request scored right
  after its own edit, before later ones, as EasyEdit HEAD does). Every figure is named by its protocol
  (:mod:`ftmods.locft.evaluator`) and its timing (``eval/...`` vs ``eval_after_each/...``); the pre-edit reference for
  locality uses the original tensors swapped back in. A validation loop logs the teacher-forced reliability of the
  edit set per epoch (``val_protocols``).
- Precision: with a model loaded in bf16 / fp16 the tuned tensors are kept in fp32 (``fp32_tuned``; their modules
  compute in fp32 and hand back the model's dtype), because late Adam updates fall below bf16 resolution; they are
  cast back when saved. This survives Lightning's ``bf16-true`` module conversion.
- Scaling: DDP all-reduces the tuned tensor only; under ``ModelParallelStrategy`` /
  :class:`ftmods.strategies.FSDP2Strategy` the model is sharded per transformer block in ``configure_model`` (the
  tuned modules as their own FSDP2 units, so they may stay fp32), export gathers full tensors, and the final evaluation
  runs every request on every rank in lock step (sharded forwards are collectives).
- Export: :meth:`save_pretrained` (a normal HF checkpoint) and :meth:`save_delta` (the tuned tensors' deltas alone).

Lifelong editing (``cumulative`` / ``buffered``) is :class:`ftmods.locft.stream.EditStream` around this module.

Not verified here: DeepSpeed ZeRO-3 for the 72B config and every GPU-scale run (no GPU was available); ``trainer.test``
under FSDP2 assumes every rank's batches have the same numbers of rephrase / locality prompts (true for ZsRE,
CounterFact and WikiBigEdit); ``evaluate_after_fit`` has no such assumption.

Batch keys (:class:`ftmods.datamodules.edits.EditBatch`): ``input_ids``, ``attention_mask``, ``position_ids``,
``labels`` (target + EOS), ``edit_index``; evaluation batches are lists of ``EditRequest``.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Literal, cast

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
from ftmods.models.sharding import fully_shard_model
from ftmods.ops.params import LOCFT_PRESETS, clean_name, default_locft_patterns, freeze_all_but

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
        eval_timing: ``final`` (default) or ``after_each``: depth-first only, every request is also scored with
            ``eval_protocols`` right after its own edit (logged as ``eval_after_each/<protocol>/<metric>``).
        val_protocols: Protocols of the per-epoch validation on the edit set (no locality: that needs the pre-edit
            model); empty to skip validation.
        fp32_tuned: Keep the tuned tensors in fp32 when the model is loaded in a lower precision.

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
        eval_timing: Literal["final", "after_each"] = "final",
        val_protocols: list[EvalProtocol] | None = None,
        fp32_tuned: bool = True,
    ) -> None:
        super().__init__()
        if eval_timing not in ("final", "after_each"):
            raise ValueError(f"eval_timing must be 'final' or 'after_each', got {eval_timing!r}")
        if eval_timing == "after_each" and pipeline != "depth_first":
            raise ValueError(
                "eval_timing='after_each' scores each request right after its own edit, which only exists in the "
                "depth_first pipeline; breadth_first trains the edit set jointly (use 'final')"
            )
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
        self.after_each_scores = ProtocolScores(protocol_keys(self.eval_protocols))
        default_val: list[EvalProtocol] = ["teacher_forced_token"]
        self.val_protocols: list[EvalProtocol] = list(default_val if val_protocols is None else val_protocols)
        self.val_scores = ProtocolScores(protocol_keys(self.val_protocols)) if self.val_protocols else None
        self._evaluator: EditEvaluator | None = None  # built on first use (needs the tokenizer)
        self._val_evaluator: EditEvaluator | None = None
        self._fp32_hooks: list[Any] = []  # dtype-cast hooks of the modules owning fp32 tuned tensors
        self._compute_dtype = torch.float32  # the loaded model's dtype (what fp32 tuned modules hand back)

    # ------------------------------------------------------------------------------------------------- model

    def patterns(self, num_layers: int) -> list[str]:
        """The selection patterns: explicit, from the preset, or ``mlp.down_proj`` at 70 % depth."""
        if self.hparams["target_modules"]:
            return list(self.hparams["target_modules"])
        if self.hparams["preset"]:
            return list(LOCFT_PRESETS[self.hparams["preset"]]["patterns"])  # type: ignore[call-overload]
        return default_locft_patterns(num_layers)

    def configure_model(self) -> None:
        """Load the model, freeze all but the tuned tensors, keep them in fp32, shard (FSDP2), keep originals (once)."""
        if self.model is not None:
            return
        self.model = load_causal_lm(self.hparams["pretrained"], self.load_options).train()
        self.tuned_names = freeze_all_but(self.model, self.patterns(self.model.config.num_hidden_layers))
        params = dict(self.model.named_parameters())
        count = sum(params[n].numel() for n in self.tuned_names)
        self._compute_dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        if self.hparams["fp32_tuned"] and self._compute_dtype != torch.float32 and not self._under_deepspeed():
            self._keep_tuned_in_fp32()  # (DeepSpeed keeps fp32 master weights of its own)
        if self._device_mesh is not None:  # FSDP2: tuned modules are their own units (their dtype may differ)
            from torch.distributed.fsdp import fully_shard

            mesh = self._device_mesh["data_parallel"]
            for owner in dict.fromkeys(self._owner(name) for name in self.tuned_names):
                fully_shard(owner, mesh=mesh)
            fully_shard_model(self.model, mesh)
        # Pre-edit values as this rank holds them (a local shard under FSDP2), on the CPU: exact, since the fp32 copy of
        # a bf16 tensor is exact.
        self.original = {n: _local(p).detach().to("cpu", copy=True) for n, p in self._named_tuned()}
        rank_zero_info(f"LocFT tunes {len(self.tuned_names)} tensor(s), {count:,} parameters: {self.tuned_names}")

    def _under_deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def _owner(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name.rpartition(".")[0])

    def _named_tuned(self) -> list[tuple[str, torch.nn.Parameter]]:
        params = {clean_name(n): p for n, p in self.model.named_parameters()}  # FSDP1 inserts wrapper names
        return [(name, params[name]) for name in self.tuned_names]

    def tuned_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters being edited."""
        return [p for _, p in self._named_tuned()]

    def _keep_tuned_in_fp32(self) -> None:
        """Upcast the tuned tensors; their modules take fp32 inputs and return the model's dtype (hooks, once)."""
        with torch.no_grad():
            for _, param in self._named_tuned():
                if param.is_floating_point() and param.dtype != torch.float32:
                    param.data = param.data.float()
        if self._fp32_hooks:
            return
        dtype = self._compute_dtype
        for owner in dict.fromkeys(self._owner(name) for name in self.tuned_names):
            self._fp32_hooks.append(owner.register_forward_pre_hook(_cast_inputs_fp32, with_kwargs=True))
            self._fp32_hooks.append(owner.register_forward_hook(functools.partial(_cast_output, dtype=dtype)))

    def to(self, *args: Any, **kwargs: Any) -> LocFTModule:
        """``nn.Module.to`` that leaves fp32 tuned tensors in fp32 (Lightning's ``bf16-true`` casts the whole module).

        The fp32 values are kept as they were (not re-derived from a bf16 cast), so a checkpoint restored before the
        conversion keeps its full precision.
        """
        if not self._fp32_hooks:
            return super().to(*args, **kwargs)
        kept = {n: p.data for n, p in self._named_tuned()}
        out = super().to(*args, **kwargs)
        with torch.no_grad():
            for name, param in self._named_tuned():
                if param.dtype != torch.float32:
                    param.data = kept[name].to(param.device)
        return out

    def _default_lr(self) -> float:
        return float(LOCFT_PRESETS[self.hparams["preset"]]["lr"]) if self.hparams["preset"] else 5e-4  # type: ignore[arg-type]

    def _optimizer_step(self, optimizer: Any, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.stats["opt_steps"] += 1

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

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The editing loss of a batch with no optimizer step (``training_step`` steps manually), e.g. for grafting."""
        return self.batch_loss(batch).loss

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
            self._optimizer_step(self.optimizers(), out.loss)
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
            self._optimizer_step(optimizer, out.loss)
            self._clamp_to_original()
        self.stats["epoch_loss_sum"] += float(loss)
        self.stats["epoch_batches"] += 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if self.hparams["eval_timing"] == "after_each":
            requests = getattr(getattr(self.trainer, "datamodule", None), "requests", None)
            if requests is None:
                raise RuntimeError("eval_timing='after_each' needs a DataModule with `requests` (EditDataModule)")
            self._score(self.after_each_scores, [requests[int(i)] for i in batch["edit_index"].tolist()])

    @torch.no_grad()
    def _clamp_to_original(self) -> None:
        eps = self.hparams["norm_constraint"]
        if eps is None:
            return
        for name, param in self._named_tuned():
            local = _local(param)
            original = self.original[name].to(local.device, local.dtype)
            local.copy_(torch.clamp(local, original - eps, original + eps))

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
        if self.hparams["eval_timing"] == "after_each":
            scores = {f"eval_after_each/{k}": float(v) for k, v in self.after_each_scores.compute().items()}
            self.after_each_scores.reset()
            self._publish({k: v for k, v in scores.items() if v == v}, "after_each")  # NaN: no such prompts
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
        # Sharded (FSDP2) forwards are collectives: every rank runs every request in lock step (same greedy outputs).
        mine = requests if self._sharded() else requests[rank::world]
        for start in range(0, len(mine), batch_size):
            self._score(self.test_scores, mine[start : start + batch_size])
        scores = {f"eval/{k}": float(v) for k, v in self.test_scores.compute().items() if not torch.isnan(v)}
        self.test_scores.reset()
        scores["eval/seconds_per_edit"] = float(self.seconds_per_edit or float("nan"))
        if attached:
            self._publish(scores, "final")
        return scores

    def _publish(self, scores: dict[str, float], timing: str) -> None:
        """Log ``scores`` and merge them into ``<log_dir>/edit_eval.json`` (rank 0, only with a logger)."""
        log_dir = self.trainer.log_dir  # a collective: every rank evaluates it
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(scores, step=self.trainer.global_step)
        if log_dir and self.trainer.loggers:  # no logger: no stray file in the working directory
            path = Path(log_dir) / "edit_eval.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            report = json.loads(path.read_text()) if path.is_file() else {}
            report.update(scores)
            report.setdefault("timing", {})[timing] = sorted(scores)
            report["stats"] = self.stats
            path.write_text(json.dumps(report, indent=2))
        rank_zero_info(f"LocFT evaluation ({timing}): " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))

    def _sharded(self) -> bool:
        return any(_is_dtensor(p) for p in self.tuned_parameters())

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

    def _score(self, metric: ProtocolScores, requests: list[EditRequest]) -> None:
        """Score requests on the edited model; locality against the pre-edit model (originals swapped in)."""
        self.swap_original()
        try:
            reference = self.evaluator.reference(self.model, requests)
        finally:
            self.swap_original()
        metric.update(self.evaluator.evaluate(self.model, requests, reference=reference))

    def test_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        """Score a batch of requests on the edited model with ``eval_protocols``."""
        self._score(self.test_scores, batch)

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        """Edit-set scores with ``val_protocols`` (reliability / generalization, no locality), for progress."""
        if self.val_scores is None:
            return
        if self._val_evaluator is None:
            self._val_evaluator = EditEvaluator(
                self.tokenizer, self.val_protocols, max_new_tokens=self.hparams["eval_max_new_tokens"]
            )
        self.val_scores.update(self._val_evaluator.evaluate(self.model, batch))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<protocol>/<metric>`` and reset."""
        if self.val_scores is None:
            return
        scores = {f"val/{k}": v for k, v in self.val_scores.compute().items() if not torch.isnan(v)}
        self.log_dict(scores, prog_bar=True)
        self.val_scores.reset()

    def on_test_epoch_end(self) -> None:
        """Log every protocol-tagged mean (e.g. ``test/wild_em/reliability``) and reset."""
        scores = {f"test/{k}": v for k, v in self.test_scores.compute().items() if not torch.isnan(v)}
        self.log_dict(scores)
        self.test_scores.reset()

    @torch.no_grad()
    def swap_original(self) -> None:
        """Exchange the tuned tensors with their pre-edit originals (call twice to swap back)."""
        for name, param in self._named_tuned():
            local = _local(param)
            edited = local.detach().to("cpu", copy=True)
            local.copy_(self.original[name].to(local.device, local.dtype))
            self.original[name] = edited

    @torch.no_grad()
    def restore_original(self) -> None:
        """Undo every edit: write the pre-edit values back into the tuned tensors (bit-exact)."""
        for name, param in self._named_tuned():
            local = _local(param)
            local.copy_(self.original[name].to(local.device, local.dtype))

    # ------------------------------------------------------------------------------------------------ export

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The edited model as a normal Hugging Face checkpoint (safetensors) with its tokenizer.

        Tuned tensors kept in fp32 are cast back to the model's dtype. ``state_dict``: a gathered full state dict
        for sharded runs (:class:`ftmods.callbacks.PretrainedExport` passes one).
        """
        path = Path(path)
        if self._fp32_hooks:
            state_dict = dict(self.model.state_dict() if state_dict is None else state_dict)
            for name in self.tuned_names:
                state_dict[name] = state_dict[name].to(self._compute_dtype)
        self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path

    def save_delta(self, path: str | Path) -> Path:
        """The tuned tensors' changes alone (``edited - original``, safetensors) plus ``delta.json`` metadata.

        Apply with ``param += delta`` on the same base model: a few MB instead of the whole model.
        """
        from safetensors.torch import save_file

        path = Path(path)
        delta = {}
        for name, param in self._named_tuned():  # under FSDP2 a collective: every rank must call save_delta
            local = (_local(param).detach().cpu() - self.original[name]).contiguous()
            delta[name] = _gather_like(param, local)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return path
        path.mkdir(parents=True, exist_ok=True)
        save_file(delta, path / "delta.safetensors", metadata={"format": "pt"})
        meta = {"pretrained": self.hparams["pretrained"], "tensors": self.tuned_names, "stats": self.stats}
        (path / "delta.json").write_text(json.dumps(meta, indent=2))
        return path


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _gather_like(param: Tensor, local: Tensor) -> Tensor:
    """The full CPU tensor whose shards, laid out like ``param``'s, are the ranks' ``local`` tensors."""
    if not _is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    dt = cast(Any, param)
    full = DTensor.from_local(
        local.to(dt.to_local().device), dt.device_mesh, dt.placements, shape=dt.shape, stride=dt.stride()
    )
    return full.full_tensor().cpu()


def _cast_inputs_fp32(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: floating-point tensor arguments to the dtype of the module's own weights (fp32 tuned ones)."""
    dtype = next(module.parameters(recurse=False)).dtype

    def up(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def _cast_output(module: torch.nn.Module, args: Any, output: Any, *, dtype: torch.dtype) -> Any:
    """Forward hook: floating-point tensor outputs back to the model's dtype."""
    if isinstance(output, Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(o.to(dtype) if isinstance(o, Tensor) and o.is_floating_point() else o for o in output)
    return output
