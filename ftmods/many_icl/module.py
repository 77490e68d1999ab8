"""``ManyICLModule``: many-shot in-context fine-tuning where every in-context answer is a target.

"Many-Shot In-Context Fine-tuning for Large Language Model", arXiv:2506.11103.

Implemented:
- Training on many-shot episodes of one task each (:class:`ftmods.datamodules.ManyShotDataModule`), padded or packed
  padding-free (``use_cache=False`` always, which is what keeps packed episodes apart), full or LoRA fine-tuning, on
  any causal LM.
- The loss (:func:`ftmods.many_icl.loss.many_icl_nll`): every answer (``supervise="all"``, ManyICL), the last one only
  (``"last"``: few-shot ICFT / MetaICL), or answers after ``min_context_shots`` demonstrations (``"after_m"``); reduced
  as a token mean, a per-answer mean or shot-weighted; normalised by the global count (tokens, answers or weights) over
  data-parallel ranks and gradient-accumulation micro-batches. Logits are computed only at the selected positions.
- The loss per shot-index bucket (``train/loss_shots_0``, ``_1-4``, ``_5-16``, ``_17+``): one all-answers episode
  trains zero-, few- and many-shot behaviour at once, and this shows each.
- Evaluation with the DataModule's fixed many-shot prompts (``k_test`` demonstrations): option scoring (summed
  log-probability of each option's answer span, MetaICL "direct") for records with ``options``, greedy generation
  cut at the separator otherwise, scored by the record's metric (accuracy, exact match, F1, numeric match, ROUGE-L);
  per task and averaged (``val/<task>/<metric>``, ``val/mean``, ``val/num_queries``); predictions logged as a table.
  Under data parallelism every query is scored by exactly one rank and the means are global (DDP: each rank runs its
  share; FSDP2: every rank runs every query in lock step and counts its share).
- Forgetting: the DataModule's held-out tasks are scored before and after ``fit``; ``forgetting/<task>/drop`` and
  ``forgetting/mean_drop`` are logged and written to ``<log_dir>/forgetting.json``.

Not implemented: KV-cache reuse of the shared many-shot prefix at test time (each query is a full forward); the
general-benchmark (MMLU) half of the forgetting protocol.

Batch keys (:class:`ftmods.datamodules.ManyShotBatch`): ``input_ids`` (B, T), ``labels`` (B, T), ``shot_index``
(B, T) and either ``attention_mask`` (B, T) or ``position_ids`` (1, ΣT) for packed rows. Evaluation batches are lists
of :class:`ftmods.datamodules.ManyShotQuery`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ftmods.locft.metrics import ProtocolScores
from ftmods.many_icl.loss import (
    SHOT_BUCKETS,
    ManyICLLossOutput,
    Reduction,
    Supervise,
    bucket_names,
    many_icl_nll,
    select_answers,
    shift_token_field,
)
from ftmods.many_icl.metrics import score_answer, truncate_at
from ftmods.models.generation import generate_texts
from ftmods.models.loading import LoadOptions, LoRASpec
from ftmods.models.sharding import forward_is_collective, fsdp1_root_gathered
from ftmods.ops.tokens import IGNORE_INDEX, next_token_targets, segment_ids_from_position_ids
from ftmods.reporting import log_table
from ftmods.sft.loss import grouped_token_nll
from ftmods.sft.module import SFTModule


class ManyICLModule(SFTModule):
    """Fine-tune a causal LM on many-shot episodes with every in-context answer as a target.

    Args:
        pretrained: Hub id, local folder or ``tiny/<name>`` of a causal LM.
        load: How to load it (dtype, attention kernel, gradient checkpointing, ``trust_remote_code``).
        lora: Train a LoRA adapter instead of all weights.
        reduction: ``token_mean`` (every answer token weighs the same), ``answer_mean`` (every answer weighs the same)
            or ``weighted`` (answer ``k`` weighs ``(k + 1) ** weight_power``).
        supervise: ``all`` (ManyICL), ``last`` (few-shot ICFT / MetaICL baseline) or ``after_m``.
        min_context_shots: With ``after_m``: supervise only answers with at least this many demonstrations before.
        weight_power: Exponent of the ``weighted`` reduction.
        global_normalization: Normalise every optimizer step by the count over all ranks and accumulation
            micro-batches (``False``: per micro-batch, Lightning averages).
        optimizer: Optimizer factory; default AdamW(lr=2e-5, weight_decay=0).
        lr_scheduler: Scheduler factory.
        lr_scheduler_interval: ``step`` or ``epoch``.
        option_scoring: Score records with ``options`` by the log-probability of each option (else generate).
        eval_max_new_tokens: Generation budget of generative evaluation.
        eval_micro_batch_size: Sequences per evaluation forward (options of one query are scored together).
        forgetting: Score the DataModule's ``heldout_queries`` before and after ``fit``.
        sample_completions: Log this many evaluation predictions per validation as a table.

    Example::

        module = ManyICLModule("Qwen/Qwen2.5-1.5B-Instruct", supervise="all")
        dm = ManyShotDataModule("tasks.jsonl", tokenizer="Qwen/Qwen2.5-1.5B-Instruct", max_length=4096)
        Trainer(max_steps=2000, precision="bf16-true").fit(module, datamodule=dm)
    """

    def __init__(
        self,
        pretrained: str,
        *,
        load: LoadOptions | None = None,
        lora: LoRASpec | None = None,
        reduction: Reduction = "token_mean",
        supervise: Supervise = "all",
        min_context_shots: int = 0,
        weight_power: float = 1.0,
        global_normalization: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        option_scoring: bool = True,
        eval_max_new_tokens: int = 32,
        eval_micro_batch_size: int = 8,
        forgetting: bool = True,
        sample_completions: int = 8,
    ) -> None:
        if supervise != "after_m" and min_context_shots:
            raise ValueError("min_context_shots only applies with supervise='after_m'")
        super().__init__(
            pretrained,
            load=load,
            lora=lora,
            loss_reduction="token_mean",
            global_normalization=global_normalization,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            sample_completions=sample_completions,
            max_new_tokens=eval_max_new_tokens,
        )
        self.hparams.pop("loss_reduction", None)
        self.hparams.pop("max_new_tokens", None)
        self.loss_options: dict[str, Any] = {
            "reduction": reduction,
            "supervise": supervise,
            "min_context_shots": min_context_shots,
            "weight_power": weight_power,
        }
        self.scores: ProtocolScores | None = None  # per-task evaluation means, keyed by the DataModule's tasks
        self.forgetting_before: dict[str, float] = {}

    # -------------------------------------------------------------------------------------------------- loss

    @staticmethod
    def aligned_fields(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Targets, shot indices and episode ids aligned with the logits (position ``t`` predicts token ``t + 1``)."""
        targets = next_token_targets(batch["labels"])  # (B, T)
        shots = shift_token_field(batch["shot_index"])  # (B, T)
        if "position_ids" in batch and "attention_mask" not in batch:
            episodes = segment_ids_from_position_ids(batch["position_ids"])  # (1, ΣT)
        else:
            rows = torch.arange(targets.shape[0], device=targets.device)  # (B,)
            episodes = rows[:, None].expand_as(targets)  # (B, T)
        return targets, shots, episodes

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Positions whose logits the loss needs (selected answers only), found on the CPU."""
        if isinstance(batch, dict) and "shot_index" in batch:
            targets, shots, episodes = self.aligned_fields(batch)
            chosen = select_answers(
                shots,
                episodes,
                supervise=self.loss_options["supervise"],
                min_context_shots=self.loss_options["min_context_shots"],
            )
            batch["logit_positions"] = (chosen & (targets != IGNORE_INDEX)).any(0).nonzero().flatten()  # (K,)
        return batch

    def compute_loss(  # type: ignore[override]
        self, batch: dict[str, Tensor], *, denominator: float | Tensor | None = None
    ) -> ManyICLLossOutput:
        """The many-shot loss of a batch (``denominator=1.0`` gives the sum, for global normalisation)."""
        targets, shots, episodes = self.aligned_fields(batch)
        keep = batch["logit_positions"] if "logit_positions" in batch else torch.arange(targets.shape[1])
        keep = keep.to(targets.device)
        inputs = self._model_inputs(batch)
        if self._logits_to_keep:
            logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
        else:
            logits = self.model(**inputs, use_cache=False).logits[:, keep]  # (B, K, V)
        return many_icl_nll(
            logits, targets[:, keep], shots[:, keep], episodes[:, keep], denominator=denominator, **self.loss_options
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch; logs ``train/loss`` and the token-mean loss per shot bucket (``train/loss_shots_*``)."""
        out = self.compute_loss(batch, denominator=1.0)  # a sum
        units = out.units.to(out.loss.device)
        if self._sum_then_rescale:  # the gradient is divided by the global count in on_before_optimizer_step
            self._step_count = self._step_count.to(units.device) + units
            loss = out.loss
        elif self.hparams["global_normalization"] and self.trainer.world_size > 1:  # DeepSpeed: per micro-batch
            total = self.trainer.strategy.reduce(units, reduce_op="sum")
            loss = out.loss * self.trainer.world_size / total.clamp(min=1e-12)
        else:
            loss = out.loss / units.clamp(min=1e-12)
        self._log_train_losses(out, units, size=int(batch["input_ids"].shape[0]))
        return loss

    def _log_train_losses(self, out: ManyICLLossOutput, units: Tensor, *, size: int) -> None:
        """``train/loss`` and ``train/loss_shots_*`` of the micro-batch over all ranks: global sums / global counts.

        One all-reduce of ``[loss sum, units, bucket NLL sums, bucket token counts]``, so the logged values equal a
        single process's on the same global batch (a mean of per-rank means would weigh a rank with few answer
        tokens as much as one with many; the bucket losses would be rank 0's alone).
        """
        n = len(SHOT_BUCKETS)
        stats = torch.cat(
            [
                out.loss.detach().reshape(1).double(),
                units.detach().reshape(1).double(),
                out.bucket_nll_sum.double(),
                out.bucket_tokens.double(),
            ]
        )  # (2 + 2M,)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        values = stats.tolist()  # one device sync for everything
        self.log("train/loss", values[0] / max(values[1], 1e-12), prog_bar=True, batch_size=size)
        for i, name in enumerate(bucket_names(SHOT_BUCKETS)):
            if values[2 + n + i] > 0:
                self.log(f"train/loss_shots_{name}", values[2 + i] / values[2 + n + i], batch_size=size)

    # -------------------------------------------------------------------------------------------- evaluation

    def setup(self, stage: str) -> None:
        """Normalisation mode (see :class:`SFTModule`), and the per-task score keys from the DataModule."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        queries = list(getattr(datamodule, "eval_queries", None) or [])
        heldout = list(getattr(datamodule, "heldout_queries", None) or [])
        keys = sorted({_key(q) for q in queries + heldout})
        if keys and (self.scores is None or tuple(self.scores.keys) != tuple(keys)):
            self.scores = ProtocolScores(keys)  # another DataModule (other tasks): new keys

    def _share(self, queries: list[Any]) -> tuple[list[Any], list[Any]]:
        """``(queries this rank runs, queries it counts)``: each query is counted by exactly one rank.

        Every rank gets the same evaluation batches (the DataModule replicates them, so Lightning's padded
        ``DistributedSampler`` never counts a query twice). Replicated weights (DDP): each rank runs and counts its
        strided share. Sharded weights (FSDP1 / FSDP2 / ZeRO-3): every rank runs every query in lock step (the
        forwards, and the number of them, must match across ranks) and counts its strided share.
        """
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = queries[rank::world]
        return (queries if forward_is_collective(self.trainer, self.model) else mine), mine

    def _score_queries(self, queries: list[Any], counted: list[Any] | None = None) -> dict[str, Tensor]:
        """Per-query scores grouped as ``{"<task>/<metric>": (n,)}`` of the ``counted`` queries (default: all).

        Every query in ``queries`` is run (under FSDP2 all ranks run the same ones); predictions of the counted ones
        are kept for the samples table.
        """
        keep = None if counted is None else {id(q) for q in counted}
        scores: dict[str, list[float]] = {}
        self._last_predictions: list[dict[str, Any]] = []
        options = [q for q in queries if self.hparams["option_scoring"] and q.option_ids]
        generative = [q for q in queries if not (self.hparams["option_scoring"] and q.option_ids)]
        predictions: list[tuple[Any, str, float]] = []
        if options:
            for query, choice in zip(options, self._choose_options(options), strict=True):
                predictions.append((query, query.options[choice], float(query.options[choice] == query.output)))
        if generative:
            texts = self._generate([q.prompt_ids for q in generative], generative[0].stop)
            for query, text in zip(generative, texts, strict=True):
                answer = truncate_at(text, query.stop)
                predictions.append((query, answer, score_answer(answer, query.output, query.metric)))
        for query, answer, value in predictions:
            if keep is not None and id(query) not in keep:
                continue
            scores.setdefault(_key(query), []).append(value)
            self._last_predictions.append(
                {
                    "task": query.task,
                    "k_shots": query.k_shots,
                    "prompt_tail": query.prompt[-200:],
                    "gold": query.output,
                    "prediction": answer,
                    "score": value,
                }  # fmt: skip
            )
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}

    @torch.no_grad()
    def _choose_options(self, queries: list[Any]) -> list[int]:
        """Index of the most likely option per query: summed log-probability of its answer span after the prompt."""
        rows = [(i, j, q.prompt_ids, ids) for i, q in enumerate(queries) for j, ids in enumerate(q.option_ids)]
        best = [(-float("inf"), 0)] * len(queries)
        was_training = self.model.training
        self.model.eval()
        try:
            size = self.hparams["eval_micro_batch_size"]
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                values = self._sequence_logprobs([(p, o) for _, _, p, o in chunk])  # (C,)
                for (i, j, _, _), value in zip(chunk, values.tolist(), strict=True):
                    best[i] = max(best[i], (value, -j))  # ties: the first option
        finally:
            self.model.train(was_training)
        return [-j for _, j in best]

    def _sequence_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> Tensor:
        """Summed log-probability of each continuation given its prompt (right-padded batch, one forward)."""
        length = max(len(p) + len(c) for p, c in pairs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)  # (C, L)
        labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)  # (C, L)
        mask = torch.zeros((len(pairs), length), dtype=torch.long)  # (C, L)
        for row, (prompt, cont) in enumerate(pairs):
            n = len(prompt) + len(cont)
            ids[row, :n] = torch.tensor(prompt + cont)
            labels[row, len(prompt) : n] = torch.tensor(cont)
            mask[row, :n] = 1
        targets = next_token_targets(labels)  # (C, L)
        keep = (targets != IGNORE_INDEX).any(0).nonzero().flatten()  # (K,) only continuation logits are needed
        targets = targets[:, keep].to(self.device)  # (C, K)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "use_cache": False}
        if self._logits_to_keep:
            logits = self.model(**inputs, logits_to_keep=keep.to(self.device)).logits  # (C, K, V)
        else:
            logits = self.model(**inputs).logits[:, keep.to(self.device)]  # (C, K, V)
        rows = torch.arange(len(pairs), device=targets.device)[:, None].expand_as(targets)  # (C, K)
        sums, _ = grouped_token_nll(logits, targets, rows, len(pairs))  # (C,)
        return (-sums).cpu()  # (C,) summed log-probability of each continuation

    def _generate(self, prompts: list[list[int]], stop: str) -> list[str]:
        """Greedy continuations, stopped early at ``stop`` (the separator; every query of a DataModule shares it)."""
        out: list[str] = []
        size, budget = self.hparams["eval_micro_batch_size"], self.hparams["eval_max_new_tokens"]
        stops = [stop] if stop else None
        # sharded: a rank whose sequences stopped early keeps joining the other ranks' forwards (they are collectives)
        extra = {"synced_gpus": True} if forward_is_collective(self.trainer, self.model) else {}
        for start in range(0, len(prompts), size):
            chunk = [torch.tensor(p, dtype=torch.long, device=self.device) for p in prompts[start : start + size]]
            out += generate_texts(self.model, self.tokenizer, chunk, max_new_tokens=budget, stop_strings=stops, **extra)
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        """Score this rank's share of a batch of queries; the first batch's predictions are logged as a table."""
        if self.scores is None:
            raise RuntimeError("ManyICLModule evaluates ManyShotQuery lists from a ManyShotDataModule")
        self.scores.update(self._score_queries(*self._share(list(batch))))
        limit = self.hparams["sample_completions"]
        if batch_idx == 0 and limit > 0 and not self.trainer.sanity_checking:
            log_table(self.trainer, "val/predictions", self._last_predictions[:limit])

    def test_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        """As :meth:`validation_step`, logged under ``test/``."""
        if self.scores is None:
            raise RuntimeError("ManyICLModule evaluates ManyShotQuery lists from a ManyShotDataModule")
        self.scores.update(self._score_queries(*self._share(list(batch))))

    def _log_scores(self, stage: str) -> None:
        assert self.scores is not None
        values = {k: float(v) for k, v in self.scores.compute().items() if not torch.isnan(v)}  # over all ranks
        count = self.scores.count.sum()  # this rank's
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.scores.reset()
        if values:
            self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=False)
        self.log(f"{stage}/num_queries", float(count))  # each query of the set counted once, whatever the ranks
        trained = [v for k, v in values.items() if not k.startswith("heldout/")]
        heldout = [v for k, v in values.items() if k.startswith("heldout/")]
        if trained:
            self.log(f"{stage}/mean", sum(trained) / len(trained), prog_bar=True)
        if heldout:
            self.log(f"{stage}/heldout_mean", sum(heldout) / len(heldout))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<task>/<metric>``, their mean over trained tasks ``val/mean``, and ``val/heldout_mean``."""
        if self.scores is not None:
            self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/<task>/<metric>`` and ``test/mean``."""
        if self.scores is not None:
            self._log_scores("test")

    # -------------------------------------------------------------------------------------------- forgetting

    def score_heldout(self) -> dict[str, float]:
        """Per-task means on the DataModule's held-out tasks (every rank scores its share; results are global)."""
        queries = list(getattr(getattr(self.trainer, "datamodule", None), "heldout_queries", None) or [])
        if not queries or self.scores is None:
            return {}
        run, counted = self._share(queries)
        size = self.hparams["eval_micro_batch_size"]
        with fsdp1_root_gathered(self.trainer):  # called from on_fit_start / on_fit_end, outside a step
            for start in range(0, len(run), size):
                self.scores.update(self._score_queries(run[start : start + size], counted))
        values = {k: float(v) for k, v in self.scores.compute().items() if not torch.isnan(v)}
        self.scores.reset()
        return values

    def on_fit_start(self) -> None:
        """Forgetting probe, before: score the held-out tasks with the base model (kept across a resume)."""
        if self.hparams["forgetting"] and not self.forgetting_before:
            self.forgetting_before = self.score_heldout()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base model's held-out scores survive a resume (the resumed model is no longer the base model)."""
        checkpoint["many_icl_forgetting_before"] = dict(self.forgetting_before)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` saved."""
        self.forgetting_before = dict(checkpoint.get("many_icl_forgetting_before", {}))

    def on_fit_end(self) -> None:
        """Forgetting probe, after: log ``forgetting/<task>/{before,after,drop}`` and write ``forgetting.json``."""
        if not (self.hparams["forgetting"] and self.forgetting_before):
            return
        after = self.score_heldout()
        report: dict[str, float] = {}
        for key, before in self.forgetting_before.items():
            name = key.removeprefix("heldout/")
            report[f"forgetting/{name}/before"] = before
            report[f"forgetting/{name}/after"] = after.get(key, float("nan"))
            report[f"forgetting/{name}/drop"] = before - after.get(key, float("nan"))
        drops = [v for k, v in report.items() if k.endswith("/drop") and v == v]
        report["forgetting/mean_drop"] = sum(drops) / len(drops) if drops else float("nan")
        log_dir = self.trainer.log_dir  # a collective: every rank evaluates it
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(report, step=self.trainer.global_step)
            if log_dir and self.trainer.loggers:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                (Path(log_dir) / "forgetting.json").write_text(json.dumps(report, indent=2))
            rank_zero_info("ManyICL forgetting: " + ", ".join(f"{k}={v:.4f}" for k, v in report.items()))
        self.forgetting_report = report


def _key(query: Any) -> str:
    """Score key of a query: ``<task>/<metric>``, under ``heldout/`` for tasks never trained on."""
    return f"{'heldout/' if getattr(query, 'heldout', False) else ''}{query.task}/{query.metric}"
