"""``S3FTModule``: selective self-to-supervised fine-tuning.

"Selective Self-to-Supervised Fine-Tuning for Generalization in Large Language Models", arXiv:2502.08130.

Implemented:
- ``predict`` builds the selection: batched generation of the model's own answer to every training item, a judge
  (:mod:`ftmods.s3ft.judges`: numeric final answer, unit tests in a sandbox, exact match, similarity, LLM judge);
  for rejected items a paraphrase of the gold answer (the gold as a *reference*, :mod:`ftmods.s3ft.prompts`), SDFT's
  banned-phrase filter and the same judge; else the gold answer. Each item becomes one selection record with
  ``source`` in ``model | paraphrase | gold`` and every intermediate answer and verdict, written per batch by
  :class:`ftmods.s3ft.SelectionWriter` (per-rank part files, merged at the end; items already in the selection are
  skipped on a re-run, so an interrupted ``predict`` resumes). Generation runs on every data-parallel rank, each on
  its share of the items. Under FSDP2 the root unit is gathered for the call
  (:func:`~ftmods.models.sharding.gather_root`), ``generate`` runs with ``synced_gpus`` and every rank joins every
  generation (a rank with nothing to paraphrase generates one throw-away prompt; the DataModule gives the ranks
  equally many batches). An ``LLMJudge`` model is replicated on every rank (it judges the rank's own items).
- ``fit`` is the completion-only SFT of :class:`ftmods.sft.SFTModule` on the selection (prompt = the prediction
  prompt, target = the selected response), with the loss also logged per source (``train/loss_model`` ...: the
  token-mean NLL of that source over all ranks' micro-batches, NaN in a step without an example of it).

Not implemented: a vLLM generation backend (``model.generate`` only); the general-benchmark (MMLU, TruthfulQA,
HellaSwag, Winogrande) delta, which needs lm-evaluation-harness and downloads.

Predict batches are lists of :class:`ftmods.datamodules.S3FTItem`; fit batches are
:class:`ftmods.datamodules.S3FTBatch` (a chat batch plus ``source_ids``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ftmods.models.generation import generate_texts
from ftmods.models.loading import LoadOptions, LoRASpec
from ftmods.models.sharding import forward_is_collective, gather_root
from ftmods.ops.tokens import segment_ids_from_position_ids
from ftmods.s3ft.judges import BaseJudge, Verdict, make_judge
from ftmods.s3ft.prompts import BANNED_PHRASES, PARAPHRASE_PROMPTS, PREDICT_PROMPTS, banned_phrase, render
from ftmods.sft.loss import SFTLossOutput, grouped_token_nll
from ftmods.sft.module import SFTModule

SOURCES = ("model", "paraphrase", "gold")
DEFAULT_JUDGES = {"gsm8k": "numeric", "mbpp": "unit_test", "qa": "exact_match"}
"""The judge of each known task when none is configured (the paper's NQ judge is an LLM: configure ``LLMJudge``)."""


class S3FTModule(SFTModule):
    """Build an S3FT selection with ``predict``; fine-tune on it with ``fit``.

    Args:
        pretrained: Hub id, local folder or ``tiny/<name>`` of the instruct model (it answers, paraphrases and is then
            fine-tuned).
        load: How to load it (dtype, attention kernel, gradient checkpointing, ``trust_remote_code``).
        lora: Fine-tune a LoRA adapter instead of all weights.
        judge: One judge for every item: an instance (``class_path`` in YAML) or a registry name (``numeric``,
            ``exact_match``, ``unit_test``, ``llm``, ``similarity``). ``None``: per task, :data:`DEFAULT_JUDGES`.
        predict_prompt: Prediction prompt (one template, or one per task with a ``default``); also the training prompt.
        paraphrase_prompt: Paraphrase prompt(s), with ``{reference}`` = the gold answer.
        paraphrase: Try a paraphrase of the gold for rejected answers (``False``: model answer or gold, as SSR).
        banned_phrases: Paraphrases containing one of these are rejected (SDFT's filter).
        template: ``chat`` (prompt as one user turn through the chat template) or ``plain`` (``[bos] prompt``); must
            match the DataModule's ``template`` so training sees the prompts the model answered.
        system_prompt: System message for ``chat``.
        max_new_tokens: Generation budget of answers and paraphrases.
        do_sample: Sample instead of greedy decoding (the paper's decoding is not stated; greedy by default).
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        loss_reduction: ``token_mean`` or ``sequence_mean`` (the SFT loss).
        global_normalization: See :class:`SFTModule`.
        optimizer: Optimizer factory; default AdamW(lr=2e-5, weight_decay=0).
        lr_scheduler: Scheduler factory.
        lr_scheduler_interval: ``step`` or ``epoch``.
        sample_completions: Validation samples logged as a table (see :class:`SFTModule`).

    Example::

        module = S3FTModule("mistralai/Mistral-7B-Instruct-v0.2", judge="numeric")
        dm = S3FTDataModule("gsm8k_train.jsonl", "runs/s3ft/selection.jsonl", tokenizer=module.hparams.pretrained)
        Trainer(callbacks=[SelectionWriter()]).predict(module, datamodule=dm, return_predictions=False)
        Trainer(max_epochs=3).fit(module, datamodule=dm)
    """

    def __init__(
        self,
        pretrained: str,
        *,
        load: LoadOptions | None = None,
        lora: LoRASpec | None = None,
        judge: BaseJudge | str | None = None,
        predict_prompt: str | dict[str, str] | None = None,
        paraphrase_prompt: str | dict[str, str] | None = None,
        paraphrase: bool = True,
        banned_phrases: list[str] | None = None,
        template: Literal["chat", "plain"] = "chat",
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean",
        global_normalization: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        sample_completions: int = 0,
    ) -> None:
        super().__init__(
            pretrained,
            load=load,
            lora=lora,
            loss_reduction=loss_reduction,
            global_normalization=global_normalization,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            sample_completions=sample_completions,
            max_new_tokens=max_new_tokens,
        )
        self.judge: BaseJudge | None = _make_judge(judge) if isinstance(judge, str) else judge
        # A plain name in the checkpoint (weights_only loading): the judge's class, not its pickled state.
        self.hparams["judge"] = judge if judge is None or isinstance(judge, str) else _class_path(judge)
        self.predict_prompts = _per_task(predict_prompt, PREDICT_PROMPTS)
        self.paraphrase_prompts = _per_task(paraphrase_prompt, PARAPHRASE_PROMPTS)
        self.banned = tuple(BANNED_PHRASES if banned_phrases is None else banned_phrases)
        self._task_judges: dict[str, BaseJudge] = {}
        self._source_nll: Tensor | None = None  # (2, S) per-source NLL sums and token counts of the step
        self._logged_sources: tuple[str, ...] = SOURCES  # set in on_fit_start from the selection's mixture

    # -------------------------------------------------------------------------------------------- selection

    def judge_for(self, task: str) -> BaseJudge:
        """The configured judge, or the default one of ``task``."""
        if self.judge is not None:
            return self.judge
        if task not in self._task_judges:
            if task not in DEFAULT_JUDGES:
                raise ValueError(
                    f"no judge configured and no default judge for task {task!r} (defaults: {DEFAULT_JUDGES}); "
                    "set model.init_args.judge"
                )
            self._task_judges[task] = _make_judge(DEFAULT_JUDGES[task])
        return self._task_judges[task]

    def prompt_for(self, item: Any, kind: Literal["predict", "paraphrase"]) -> str:
        """The rendered prediction or paraphrase prompt of an item."""
        templates = self.predict_prompts if kind == "predict" else self.paraphrase_prompts
        template = templates.get(item.task, templates["default"])
        return render(template, question=item.prompt, context=item.context, tests=item.tests, reference=item.gold)

    def _prompt_ids(self, prompt: str) -> list[int]:
        tokenizer = self.tokenizer
        if self.hparams["template"] == "plain":
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        messages = [{"role": "user", "content": prompt}]
        if self.hparams["system_prompt"] is not None:
            messages.insert(0, {"role": "system", "content": self.hparams["system_prompt"]})
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[str]:
        """Responses to rendered prompts, batched (left-padded); every rank in lock step when the model is sharded."""
        ids = [torch.tensor(self._prompt_ids(p), dtype=torch.long, device=self.device) for p in prompts]
        kwargs: dict[str, Any] = {"do_sample": self.hparams["do_sample"]}
        if self.hparams["do_sample"]:
            kwargs.update(temperature=self.hparams["temperature"], top_p=self.hparams["top_p"])
        sharded = gather_root(self.model)  # FSDP2: root (embeddings, head) gathered once for the whole call
        if forward_is_collective(self._trainer, self.model):  # FSDP1 / FSDP2 / ZeRO-3 on several ranks
            kwargs["synced_gpus"] = True  # ranks that finish early keep joining the blocks' all-gathers
        try:
            texts = generate_texts(
                self.model, self.tokenizer, ids, max_new_tokens=self.hparams["max_new_tokens"], **kwargs
            )
        finally:
            if sharded:
                self.model.reshard()
        return [t.strip() for t in texts]

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` on any rank (one collective; only when the model is sharded, where generation is collective)."""
        trainer = self._trainer
        if trainer is None or not forward_is_collective(trainer, self.model):
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(trainer.strategy.reduce(value, reduce_op="sum").item() > 0)

    def _judge(self, items: list[Any], candidates: list[str]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        for task in dict.fromkeys(item.task for item in items):
            idx = [i for i, item in enumerate(items) if item.task == task]
            results = self.judge_for(task).batch([items[i] for i in idx], [candidates[i] for i in idx])
            for i, verdict in zip(idx, results, strict=True):
                verdicts[i] = verdict
        return [v for v in verdicts if v is not None]

    def select(self, items: list[Any]) -> list[dict[str, Any]]:
        """The selection records of a batch of items (see the module docstring)."""
        prompts = [self.prompt_for(item, "predict") for item in items]
        answers = self.generate(prompts)
        verdicts = self._judge(items, answers)
        rejected = [i for i, v in enumerate(verdicts) if not v.correct]
        para: dict[int, tuple[str, Verdict]] = {}
        # Sharded model: a rank with nothing rejected still joins the paraphrase generation of the others (one
        # throw-away prompt), else the ranks' all-gathers fall out of step and the run hangs.
        if self.hparams["paraphrase"] and self._any_rank(bool(rejected)):
            if rejected:
                texts = self.generate([self.prompt_for(items[i], "paraphrase") for i in rejected])
            else:
                texts = []
                self.generate([self.prompt_for(items[0], "paraphrase")])
            clean = [(i, t) for i, t in zip(rejected, texts, strict=True) if banned_phrase(t, self.banned) is None]
            for i, text in zip(rejected, texts, strict=True):
                phrase = banned_phrase(text, self.banned)
                if phrase is not None:
                    para[i] = (text, Verdict(False, f"banned phrase: {phrase}"))
            if clean:
                judged = self._judge([items[i] for i, _ in clean], [t for _, t in clean])
                para.update({i: (t, v) for (i, t), v in zip(clean, judged, strict=True)})
        records = []
        for i, item in enumerate(items):
            para_text, para_verdict = para.get(i, (None, None))
            if verdicts[i].correct:
                source, target = "model", answers[i]
            elif para_verdict is not None and para_verdict.correct and para_text is not None:
                source, target = "paraphrase", para_text
            else:
                source, target = "gold", item.gold
            records.append(
                {
                    "id": item.id,
                    "task": item.task,
                    "prompt": prompts[i],
                    "target": target,
                    "source": source,
                    "gold": item.gold,
                    "self_response": answers[i],
                    "self_verdict": verdicts[i].correct,
                    "self_detail": verdicts[i].detail,
                    "para_response": para_text,
                    "para_verdict": None if para_verdict is None else para_verdict.correct,
                    "para_detail": None if para_verdict is None else para_verdict.detail,
                    "judge": self.judge_for(item.task).name,
                    "gen_cfg": {k: self.hparams[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p")},
                    "model": self.hparams["pretrained"],
                }
            )
        return records

    def predict_step(self, batch: list[Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One batch of items → their selection records (written by :class:`ftmods.s3ft.SelectionWriter`)."""
        return self.select(list(batch))

    # ------------------------------------------------------------------------------------------------- train

    def on_fit_start(self) -> None:
        """Log the training mixture of the selection (``s3ft/percent_<source>``; the DataModule prints it)."""
        mixture = getattr(getattr(self.trainer, "datamodule", None), "mixture", None)
        counts = (mixture or {}).get("counts")
        # train/loss_<source> for every source the selection has: logged each step (NaN in a step without one), as a
        # metric logged only in some steps would repeat its stale value in the others (Lightning's on_step cache)
        self._logged_sources = tuple(s for s in SOURCES if counts is None or counts.get(s, 0) > 0)
        if mixture and self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics({f"s3ft/percent_{k}": float(v) for k, v in mixture["percent"].items()}, step=0)

    def compute_loss(self, batch: dict[str, Tensor], *, denominator: float | Tensor | None = None) -> SFTLossOutput:
        """The SFT loss; per-source NLL sums and token counts of the batch are kept for ``train/loss_<source>``."""
        logits, targets, keep = self.supervised_logits(batch)  # (B, K, V), (B, K), (K,)
        if "source_ids" in batch:
            self._source_nll = self._per_source_nll(batch, logits.detach(), targets, keep)
        return self.reduce_nll(batch, logits, targets, keep, denominator=denominator)

    @torch.no_grad()
    def _per_source_nll(self, batch: dict[str, Tensor], logits: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """``(2, S)``: NLL sum and supervised-token count of each source of :data:`SOURCES` in the batch."""
        if "position_ids" in batch and "attention_mask" not in batch:  # packed: one source per segment
            segment = segment_ids_from_position_ids(batch["position_ids"])[:, keep.to(targets.device)]  # (1, K)
            source = batch["source_ids"].to(targets.device)[segment]  # (1, K)
        else:
            source = batch["source_ids"].to(targets.device)[:, None].expand_as(targets)  # (B, K)
        sums, counts = grouped_token_nll(logits, targets, source, len(SOURCES))  # (S,), (S,)
        return torch.stack([sums.float(), counts.float()])  # (2, S)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The SFT step, plus ``train/loss_model``, ``train/loss_paraphrase``, ``train/loss_gold`` diagnostics.

        Each is the token-mean NLL of that source over the micro-batch of *all* data-parallel ranks (sums and counts
        summed over ranks, one collective), NaN when no rank has an example of that source.
        """
        self._source_nll = None
        loss = super().training_step(batch, batch_idx)
        stats = self._source_nll
        if stats is None:
            return loss
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")  # (2, S)
        sums, counts = stats[0], stats[1]  # (S,), (S,)
        means = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.full_like(sums, float("nan")))  # (S,)
        size = int(batch["input_ids"].shape[0])
        for name in self._logged_sources:
            self.log(f"train/loss_{name}", means[SOURCES.index(name)], batch_size=size)
        return loss


def _per_task(value: str | dict[str, str] | None, defaults: dict[str, str]) -> dict[str, str]:
    if value is None:
        return dict(defaults)
    if isinstance(value, str):
        return {"default": value}
    if "default" not in value:
        return {**value, "default": defaults["default"]}
    return dict(value)


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _make_judge(spec: str) -> BaseJudge:
    """A judge from a registry name (``numeric``) or a class path (``ftmods.s3ft.judges.NumericAnswerJudge``)."""
    if "." not in spec:
        return make_judge(spec)
    import importlib

    module, _, name = spec.rpartition(".")
    return getattr(importlib.import_module(module), name)()  # type: ignore[no-any-return]
