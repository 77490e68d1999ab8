r"""Task-specific skill localisation by grafting (Panigrahi, Saunshi, Zhao, Arora; ICML 2023, arXiv 2302.06600).

After fine-tuning, a sparse binary mask γ over the fine-tuned parameters is learnt so that the *grafted* model
θ(γ) = θ_pre + γ ⊙ (θ_ft − θ_pre) keeps the fine-tuned task performance; the paper reports that about 0.01 % of the
parameters recover more than 95 % of it, with better calibration. The algorithm follows the authors' released code
(``Skill-Localization-by-grafting``):

1. base patch γ_base: 1 on the global top-k entries of |Δ| (one threshold over all graftable tensors),
   k = ⌊s·|P|⌋ for sparsity s (the authors' ``int(sparsity_level * num_params)``);
2. relaxation γ = γ_base + (1 − 2γ_base) ⊙ σ(S − b) with scores S ~ U[0, 1) and ``sigmoid_bias`` b = 10, so the
   learnt part can only flip entries of the base patch;
3. plain gradient descent on S, ``S -= lr · ∂L/∂S`` with lr = 1e7, where L is the task loss of θ(γ) averaged over the
   batches of the training data and ∂L/∂S = ∂L/∂θ ⊙ Δ ⊙ (1 − 2γ_base) ⊙ σ'(S − b) (chain rule by hand, as the
   authors do); no sparsity penalty;
4. after each step the mask is binarised and scored by train accuracy + validation accuracy; the best binary mask
   wins.

ftmods differences [design]: binarisation keeps exactly the top-k entries of γ (``binarize="topk"``, the budget is a
hard cap) by default; the authors round γ at 0.5 (``binarize="round"``, the count may drift from k). The base patch
itself is candidate 0 of the selection (the authors only compare the masks after each step), so the result is never
worse than top-|Δ| on the selection score. Ties at the top-|Δ| threshold are broken to keep exactly k entries (the
authors keep the entries strictly above the k-th largest |Δ|). The spec's
``GraftingModule`` is :class:`GraftMask`, a plain ``nn.Module`` driven by the callback instead of a LightningModule
run with ``fit``.

The math lives in :mod:`ftmods.ops.grafting` (re-exported here): :func:`apply_graft`, :func:`global_topk_mask`,
:func:`top_delta_mask`, :func:`graft_budget`, :func:`expected_calibration_error`, :func:`sparse_graft`,
:func:`save_graft` / :func:`load_graft`, :func:`apply_sparse_graft` and :class:`GraftMask` work on plain state dicts
and are usable offline on consolidated checkpoints; this module holds the callback, which decides when to call them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file
from torch import Tensor, nn
from torchmetrics.classification import MulticlassCalibrationError
from typing_extensions import override

from ftmods.ops.grafting import (
    GraftMask,
    SparseGraft,
    apply_graft,
    apply_sparse_graft,
    expected_calibration_error,
    global_topk_mask,
    graft_budget,
    load_graft,
    save_graft,
    sparse_graft,
    state_fingerprint,
    top_delta_mask,
)
from ftmods.ops.params import match_names

__all__ = [
    "GraftMask",
    "GraftResult",
    "SparseGraft",
    "WeightGrafting",
    "apply_graft",
    "apply_sparse_graft",
    "batch_logits",
    "expected_calibration_error",
    "global_topk_mask",
    "graft_budget",
    "load_graft",
    "save_graft",
    "sparse_graft",
    "state_fingerprint",
    "top_delta_mask",
    "training_step_loss",
]

IGNORE_INDEX = -100
"""Targets equal to this are left out of the loss, the accuracy and the ECE (Hugging Face convention)."""

LogitsFn = Callable[[LightningModule, Any], tuple[Tensor, Tensor]]
LossFn = Callable[[LightningModule, Any], Tensor]


def batch_logits(pl_module: LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    """Default ``logits_fn``: classifier logits ``(N, C)`` and targets ``(N,)`` for a batch.

    - ``(inputs, targets)`` (tuple or list): ``pl_module(inputs)``;
    - a mapping with ``labels``: ``pl_module(**other_keys)``.

    An output with a ``logits`` attribute (Hugging Face) is unwrapped. Logits ``(..., C)`` and targets ``(...)`` are
    flattened, so token classification works too; targets equal to ``-100`` are ignored downstream. For causal
    language models (labels predicting the next token) or anything else, pass your own ``logits_fn``.
    """
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out, targets = pl_module(**inputs), batch["labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        out, targets = pl_module(batch[0]), batch[1]
    else:
        raise TypeError(
            f"batch_logits: expected (inputs, targets) or a mapping with 'labels', got {type(batch).__name__}; "
            "pass logits_fn=(pl_module, batch) -> (logits, targets) to WeightGrafting"
        )
    logits = getattr(out, "logits", out)
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def training_step_loss(pl_module: LightningModule, batch: Any) -> Tensor:
    """A ``loss_fn`` for any module whose ``training_step`` returns the loss (or ``{"loss": ...}``).

    A module that optimizes manually (``automatic_optimization=False``: its ``training_step`` steps the optimizer)
    must offer ``training_loss(batch) -> Tensor``, the loss its step minimises without stepping anything
    (``LocFTModule`` and online ``PSOModule`` do); it is called instead.

    ``self.log`` / ``self.log_dict`` are silenced during the call: the callback runs outside Lightning's loops,
    where logging from a step would raise.
    """
    if not pl_module.automatic_optimization:
        method = getattr(pl_module, "training_loss", None)
        if method is None:
            raise TypeError(
                f"training_step_loss: {type(pl_module).__name__} optimizes manually (its training_step steps the "
                "optimizer, which grafting must not do); give it a training_loss(batch) -> Tensor method, or pass "
                "WeightGrafting(loss_fn=...)"
            )
        with _silenced_logging(pl_module):
            loss = method(batch)
        if not isinstance(loss, Tensor):
            raise TypeError(f"{type(pl_module).__name__}.training_loss returned {type(loss).__name__}, not a Tensor")
        return loss
    with _silenced_logging(pl_module):
        out = pl_module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise TypeError(f"training_step returned {type(out).__name__}; training_step_loss needs a loss tensor")
    return loss


@contextlib.contextmanager
def _silenced_logging(pl_module: LightningModule) -> Iterator[None]:
    pl_module.log = _no_log  # type: ignore[method-assign]
    pl_module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


# -------------------------------------------------------------------------------------------------------- the callback


@dataclass
class GraftResult:
    """What one grafting run found; written to ``graft.json``."""

    sparsity: float
    """Grafted entries / graftable entries (|γ|₀ / |P|)."""
    budget: int
    """k = ⌊s·|P|⌋."""
    grafted: int
    """|γ|₀."""
    graftable: int
    """|P|: entries of the graftable parameters."""
    kept: int
    """Entries copied whole from the fine-tuned model (``keep``), outside the budget."""
    best_step: int
    """Mask-learning step of the chosen mask (0 = the top-|Δ| base patch)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``{pretrained,finetuned,grafted}/{loss,accuracy,ece}`` on the evaluation data, plus ``grafted/recovery``."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step: the selection score and the binary mask's size."""
    tensors: dict[str, int] = field(default_factory=dict)
    """Grafted entries per tensor."""


class WeightGrafting(Callback):
    """Learn a sparse graft of the fine-tuned weights onto the pre-trained ones at the end of fit, export and log it.

    When: ``on_train_end`` (before the strategy tears down, so the model is still on its device), after callbacks
    listed before this one (put weight averaging first). :meth:`graft` can also be called by hand after ``fit``
    with any dataloaders (``at_train_end=False`` skips the automatic run).

    What the module must offer: a task loss on a batch, given by ``loss_fn(pl_module, batch) -> Tensor``. By default
    the loss is cross-entropy on ``logits_fn(pl_module, batch) -> (logits (N, C), targets (N,))``, which also gives
    accuracy and ECE; :func:`batch_logits` handles ``(x, y)`` batches and mappings with ``labels``. For a module
    without classifier logits (a language model trained by ``training_step``), pass
    ``loss_fn=ftmods.callbacks.grafting.training_step_loss`` and ``logits_fn=None``: the mask is then selected by
    the loss alone and accuracy / ECE are not reported.

    Data: the gradient comes from the training dataloader (every batch, or ``max_batches``), each batch through the
    module's batch hooks (``on_before_batch_transfer`` ...) as in training; selection and reported metrics use the
    training and validation dataloaders (train accuracy + val accuracy, as the authors do; see ``validation``);
    metrics are reported on the validation data when it is used, else on the training data. The model is put in ``eval``
    mode meanwhile (no dropout, no BatchNorm updates). Under DDP each rank uses its own shard; gradients, counts and
    ECE are reduced over ranks, so the mask is identical everywhere. Sharded strategies (FSDP, DeepSpeed,
    ModelParallel) are refused: graft offline on a consolidated checkpoint with the pure functions. Memory: about
    five copies of the graftable parameters on the device (live weights and their gradients, θ_pre, θ_ft, S) plus
    the CPU snapshot.

    Parameters: the graftable set P is every parameter with ``requires_grad`` at the start of fit that matches
    ``include`` (all by default) and neither ``exclude`` nor ``keep`` (the authors' "trainable parameters"). Excluded
    parameters go back to their pre-trained values; ``keep`` parameters (e.g. a freshly initialised head) are copied
    whole from the fine-tuned model and counted apart (``kept``); frozen parameters are left alone. Buffers (e.g.
    BatchNorm statistics) are never grafted: they keep their fine-tuned values.

    Pre-trained weights (θ_pre), ``pretrained``:

    - ``"snapshot"`` (default): copied to CPU at ``on_fit_start`` of the first run and stored in this callback's
      checkpoint state, so a resumed run has it (checkpoints grow by one copy of the trainable weights);
    - ``"rebuild"``: at grafting time, ``type(pl_module)(**pl_module.hparams)`` followed by ``configure_model()``;
      right for modules that load fixed weights (every ftmods module loads ``pretrained`` in ``configure_model``);
    - a path: a ``.safetensors`` file, or a Lightning ``.ckpt`` (its ``state_dict``), with the module's parameter
      names.

    In every mode a SHA-1 fingerprint of θ_pre is taken at the first ``on_fit_start`` and kept in the checkpoint
    state; "rebuild" and path sources are checked against it (a mismatch raises) [spec §E rule 1].

    Output (rank 0): ``<dirpath>/graft.safetensors`` (:func:`save_graft`: flat indices and fine-tuned values per
    tensor, including ``keep`` tensors in full) and ``<dirpath>/graft.json`` (:class:`GraftResult` and the settings).
    Logged to the trainer's loggers: ``graft/sparsity``, ``graft/accuracy``, ``graft/ece``, ``graft/loss``,
    ``graft/recovery`` (grafted / fine-tuned accuracy), and the fine-tuned and pre-trained metrics.

    Args:
        sparsity: s, the fraction of graftable entries to graft (paper: ~1e-4; authors' default 1e-5).
        steps: Mask-learning steps (authors: 10 in the task script, 100 in the README example).
        mask_lr: Learning rate of the plain gradient descent on S (authors: 1e7, since σ' ≈ 1e-4 and Δ is small).
        sigmoid_bias: b in σ(S − b) (authors: 10).
        binarize: ``"topk"`` keeps exactly the k best entries of γ; ``"round"`` is the authors' γ > 0.5.
        include: Graftable parameter names (default: every trainable parameter); a pattern matching nothing raises.
        exclude: Parameter names removed from the graftable set; they revert to pre-trained values.
        keep: Parameter names copied whole from the fine-tuned model, outside the budget.
        syntax: Pattern syntax of include / exclude / keep: ``regex`` (exact names or ``re.fullmatch``) or ``glob``
            (``fnmatch`` on the whole name), as in :class:`~ftmods.callbacks.freezing.ParameterFreezing`.
        pretrained: ``"snapshot"``, ``"rebuild"`` or a path (see above).
        loss_fn: ``(pl_module, batch) -> scalar loss``; default cross-entropy on ``logits_fn``. Reported losses are the
            cross-entropy of the logits when ``logits_fn`` is set, else the mean of ``loss_fn`` over batches (with
            :func:`training_step_loss`, whatever ``training_step`` returns).
        logits_fn: ``(pl_module, batch) -> (logits (N, C), targets (N,))`` or None (no accuracy / ECE).
        max_batches: Batches per pass (gradient and evaluation) at most; default all (set it for endless or streaming
            dataloaders; the authors use up to 128).
        validation: Whether the run at the end of fit also selects and reports on the trainer's validation
            dataloader. ``None``: only with ``logits_fn`` (a classifier, whose validation batches look like its
            training batches). Loss-only modules validate differently (``PSOModule`` on prompts, ``ManyICLModule``
            on episodes), so they use the training data alone unless this is ``True``.
        n_bins: ECE bins.
        apply: Leave the grafted weights in the module afterwards (default: restore the fine-tuned ones).
        at_train_end: Graft at the end of fit with the trainer's dataloaders; False only records θ_pre, and you call
            :meth:`graft` yourself (e.g. with a held-out loader).
        dirpath: Output folder; default ``<log_dir or default_root_dir>/graft``.
        seed: Seed of the initial scores.

    Example::

        trainer = Trainer(max_epochs=3, callbacks=[WeightGrafting(sparsity=1e-3)])
        trainer.fit(MyClassifier(), datamodule=dm)   # writes <log_dir>/graft/graft.{safetensors,json}
        pretrained = load_file("base.safetensors")
        grafted = apply_sparse_graft(pretrained, load_graft("lightning_logs/version_0/graft/graft.safetensors"))
    """

    def __init__(
        self,
        sparsity: float = 1e-4,
        *,
        steps: int = 10,
        mask_lr: float = 1e7,
        sigmoid_bias: float = 10.0,
        binarize: Literal["topk", "round"] = "topk",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        keep: list[str] | None = None,
        syntax: Literal["regex", "glob"] = "regex",
        pretrained: str = "snapshot",
        loss_fn: LossFn | None = None,
        logits_fn: LogitsFn | None = batch_logits,
        max_batches: int | None = None,
        validation: bool | None = None,
        n_bins: int = 10,
        apply: bool = False,
        at_train_end: bool = True,
        dirpath: str | None = None,
        seed: int = 0,
    ) -> None:
        graft_budget(1, sparsity)  # validates the range
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if loss_fn is None and logits_fn is None:
            raise ValueError("WeightGrafting needs loss_fn or logits_fn (the default loss is cross-entropy on logits)")
        if binarize not in ("topk", "round") or syntax not in ("regex", "glob"):
            raise ValueError(f"binarize must be topk or round and syntax regex or glob, got {binarize!r}, {syntax!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.sparsity, self.steps, self.mask_lr, self.sigmoid_bias = sparsity, steps, mask_lr, sigmoid_bias
        self.binarize = binarize
        self.include, self.exclude, self.keep = include, list(exclude or []), list(keep or [])
        self.syntax = syntax
        self.pretrained, self.loss_fn, self.logits_fn = pretrained, loss_fn, logits_fn
        self.max_batches, self.n_bins, self.apply, self.dirpath, self.seed = max_batches, n_bins, apply, dirpath, seed
        self.at_train_end, self.validation = at_train_end, validation
        self._snapshot: dict[str, Tensor] | None = None  # θ_pre on CPU, taken at the first on_fit_start ("snapshot")
        self._fingerprint: str | None = None  # state_fingerprint of θ_pre, taken at the first on_fit_start
        self._trainable: list[str] | None = None  # names requiring grad at the first on_fit_start
        self.result: GraftResult | None = None  # set by graft()
        self.done = False  # whether graft() has run (restored on resume)
        self.last_export: Path | None = None  # folder of the last export

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            sparsity=self.sparsity, include=self.include, exclude=self.exclude, keep=self.keep
        )

    # ------------------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise NotImplementedError(
                f"WeightGrafting does not support {type(trainer.strategy).__name__} (sharded parameters): graft "
                "offline on a consolidated checkpoint with ftmods.callbacks.grafting.top_delta_mask / apply_graft"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # On resume the weights may already hold the checkpoint (single device / DDP restore before this hook), so
        # θ_pre is only taken on a fresh run; a resumed run gets it from load_state_dict.
        if trainer.ckpt_path is not None or self._fingerprint is not None:
            return
        self._trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        state = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters() if p.requires_grad}
        self._fingerprint = state_fingerprint(state)
        if self.pretrained == "snapshot":
            self._snapshot = state

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        val = trainer.val_dataloaders if self._uses_validation() else None
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        train = trainer.train_dataloader
        if train is None or isinstance(train, (Mapping, list, tuple)):
            raise NotImplementedError(
                "WeightGrafting grafts at the end of fit from one training dataloader; with several (or none), call "
                "graft(trainer, pl_module, train_loader, eval_loader) yourself after fit"
            )
        self.graft(trainer, pl_module, train, val)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pretrained": self.pretrained,
            "fingerprint": self._fingerprint,
            "trainable": self._trainable,
            "snapshot": self._snapshot,
            "done": self.done,
            "result": asdict(self.result) if self.result is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fingerprint, self._trainable = state_dict["fingerprint"], state_dict["trainable"]
        self._snapshot, self.done = state_dict["snapshot"], state_dict["done"]
        self.result = GraftResult(**state_dict["result"]) if state_dict["result"] is not None else None
        if self.pretrained == "snapshot" and self._snapshot is None:
            rank_zero_warn(
                "WeightGrafting: the checkpoint holds no pre-trained snapshot (it was written with "
                f"pretrained={state_dict['pretrained']!r}); grafting will fail unless pretrained= names a source"
            )

    # ------------------------------------------------------------------------------------------------------ public

    def graft(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        train_dataloader: Iterable[Any],
        eval_dataloader: Iterable[Any] | None = None,
    ) -> GraftResult:
        """Learn the mask on ``train_dataloader``, select and report on both, export, log; every rank must call it.

        Returns:
            The :class:`GraftResult` (also in ``self.result``).
        """
        params = dict(pl_module.named_parameters())
        pre_state = self._pretrained_state(pl_module)
        names, kept, reverted = self._split_names(pre_state, params)
        every = [*names, *kept, *reverted]
        pre = {n: pre_state[n].to(params[n].device, params[n].dtype) for n in every}
        ft = {n: params[n].detach().clone() for n in every}
        run = _Run(self, trainer, pl_module, params, train_dataloader, eval_dataloader)
        with run.evaluating():
            result = run.learn(pre, ft, names, kept)
            mask = {**run.best_mask, **{n: torch.ones_like(ft[n], dtype=torch.bool) for n in kept}}
            run.write(apply_graft(pre, ft, mask) if self.apply else ft)
        self.result, self.done = result, True
        self._export(trainer, ft, mask)
        self._log(trainer, result)
        return result

    # ----------------------------------------------------------------------------------------------------- helpers

    def _uses_validation(self) -> bool:
        return self.logits_fn is not None if self.validation is None else self.validation

    def _pretrained_state(self, pl_module: LightningModule) -> dict[str, Tensor]:
        if self.pretrained == "snapshot":
            if self._snapshot is None:
                raise RuntimeError(
                    "WeightGrafting: no pre-trained snapshot (taken at the first on_fit_start, restored from the "
                    "checkpoint); call graft() after fit, or pass pretrained='rebuild' or a weights file"
                )
            return self._snapshot
        if self.pretrained == "rebuild":
            fresh = type(pl_module)(**pl_module.hparams)
            fresh.configure_model()
            state = {n: p.detach() for n, p in fresh.named_parameters()}
        else:
            state = _read_state(self.pretrained)
        if self._fingerprint is not None and self._trainable is not None:
            missing = [n for n in self._trainable if n not in state]
            if missing:
                raise KeyError(f"WeightGrafting: pre-trained source {self.pretrained!r} lacks {missing[:5]}")
            if state_fingerprint({n: state[n] for n in self._trainable}) != self._fingerprint:
                raise ValueError(
                    f"WeightGrafting: pre-trained weights from {self.pretrained!r} differ from those at the start of "
                    "fit (fingerprint mismatch)"
                )
        return state

    def _split_names(
        self, pre_state: Mapping[str, Tensor], params: Mapping[str, Tensor]
    ) -> tuple[list[str], list[str], list[str]]:
        """(graftable names P, ``keep`` names, the other trainable names: they revert to pre-trained values)."""
        trainable = self._trainable or [n for n, p in params.items() if p.requires_grad]
        trainable = [n for n in trainable if n in pre_state]
        keep = match_names(trainable, self.keep, self.syntax)
        chosen = match_names(trainable, self.include, self.syntax) if self.include is not None else set(trainable)
        chosen -= keep | match_names(trainable, self.exclude, self.syntax)
        names = [n for n in trainable if n in chosen]
        if not names:
            raise ValueError("WeightGrafting: no trainable parameter is graftable (check include / exclude / keep)")
        if all(_same(pre_state[n], params[n]) for n in names):
            raise RuntimeError("WeightGrafting: no graftable parameter changed during fine-tuning")
        return names, [n for n in trainable if n in keep], [n for n in trainable if n not in chosen and n not in keep]

    def _export(self, trainer: Trainer, finetuned: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> None:
        root = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "graft")
        if trainer.is_global_zero:
            assert self.result is not None
            settings = {
                "sparsity": self.sparsity, "steps": self.steps, "mask_lr": self.mask_lr,
                "sigmoid_bias": self.sigmoid_bias, "binarize": self.binarize, "include": self.include,
                "exclude": self.exclude, "keep": self.keep, "syntax": self.syntax, "pretrained": self.pretrained,
                "seed": self.seed,
            }  # fmt: skip
            save_graft(root / "graft.safetensors", sparse_graft(finetuned, mask), {"settings": settings})
            payload = {"settings": settings, **asdict(self.result)}
            (root / "graft.json").write_text(json.dumps(payload, indent=1) + "\n")
            rank_zero_info(f"WeightGrafting: wrote {root}")
        self.last_export = root
        trainer.strategy.barrier("weight_grafting_export")

    def _log(self, trainer: Trainer, result: GraftResult) -> None:
        metrics = {"graft/sparsity": result.sparsity, **{f"graft/{k}": v for k, v in result.metrics.items()}}
        metrics = {k.replace("graft/grafted/", "graft/"): v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        summary = ", ".join(f"{k.removeprefix('graft/')} {v:.4g}" for k, v in metrics.items())
        rank_zero_info(f"WeightGrafting: {result.grafted}/{result.graftable} entries; {summary}")


def _same(a: Tensor, b: Tensor) -> bool:
    return bool(torch.equal(a.to(b.device, b.dtype), b.detach()))


def _grad_or_zeros(param: Tensor) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def _read_state(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a Lightning ``.ckpt`` (its ``state_dict``)."""
    if path.endswith(".safetensors"):
        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state: dict[str, Tensor] = checkpoint.get("state_dict", checkpoint)
    return state


class _Run:
    """One grafting run: the loops over data and the live-weight bookkeeping of :meth:`WeightGrafting.graft`."""

    def __init__(
        self,
        cb: WeightGrafting,
        trainer: Trainer,
        pl_module: LightningModule,
        params: dict[str, nn.Parameter],
        train: Iterable[Any],
        evaluation: Iterable[Any] | None,
    ) -> None:
        self.cb, self.trainer, self.pl_module, self.params = cb, trainer, pl_module, params
        self.train, self.evaluation = train, evaluation
        self.best_mask: dict[str, Tensor] = {}  # binary mask of the best step

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and no parameter gradients outside the explicit gradient passes; restores both."""
        was_training = self.pl_module.training
        flags = {n: p.requires_grad for n, p in self.params.items()}
        self.pl_module.eval()
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.requires_grad_(flags[name])
                p.grad = None
            self.pl_module.train(was_training)

    @torch.no_grad()
    def write(self, weights: Mapping[str, Tensor]) -> None:
        for name, value in weights.items():
            self.params[name].copy_(value)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches through the module's batch hooks and onto the device, as Lightning's loops do."""
        for i, batch in enumerate(loader):
            if self.cb.max_batches is not None and i >= self.cb.max_batches:
                return
            batch = self.pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            yield self.trainer.strategy.batch_to_device(batch)

    def loss(self, batch: Any) -> Tensor:
        with self.trainer.precision_plugin.forward_context():
            if self.cb.loss_fn is not None:
                return self.cb.loss_fn(self.pl_module, batch)
            assert self.cb.logits_fn is not None
            logits, targets = self.cb.logits_fn(self.pl_module, batch)
            return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)

    def param_grads(self, names: Sequence[str]) -> dict[str, Tensor]:
        """∂L/∂θ for ``names`` at the live weights: mean over the training batches and over ranks."""
        chosen = set(names)
        for name, p in self.params.items():
            p.requires_grad_(name in chosen)
            p.grad = None
        count = 0
        with torch.enable_grad():
            for batch in self.batches(self.train):
                self.loss(batch).backward()
                count += 1
        if count == 0:
            raise RuntimeError("WeightGrafting: the training dataloader is empty")
        grads = [_grad_or_zeros(self.params[n]).float().flatten() for n in names]
        flat = torch.cat(grads) / count  # (|P|,)
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        out, offset = {}, 0
        for name in names:
            size = self.params[name].numel()
            out[name] = flat[offset : offset + size].view_as(self.params[name])
            offset += size
        for p in self.params.values():
            p.requires_grad_(False)
            p.grad = None
        return out

    @torch.no_grad()
    def measure(self, loader: Iterable[Any]) -> dict[str, float]:
        """Loss, and accuracy / ECE when there are logits, of the live weights on ``loader`` (reduced over ranks)."""
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, counted
        ece: MulticlassCalibrationError | None = None
        batches = 0
        for batch in self.batches(loader):
            batches += 1
            if self.cb.logits_fn is None:
                sums[0] += float(self.loss(batch))
                continue
            with self.trainer.precision_plugin.forward_context():
                logits, targets = self.cb.logits_fn(self.pl_module, batch)
            logits = logits.float()
            keep = targets != IGNORE_INDEX
            sums[0] += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            sums[1] += float((logits.argmax(-1)[keep] == targets[keep]).sum())
            sums[2] += float(keep.sum())
            if ece is None:
                ece = MulticlassCalibrationError(logits.shape[-1], n_bins=self.cb.n_bins, validate_args=False)
                ece = ece.to(logits.device)
            ece.update(logits.softmax(-1)[keep], targets[keep])
        device = self.trainer.strategy.root_device
        totals = self.trainer.strategy.reduce(torch.tensor([*sums.tolist(), batches], device=device), reduce_op="sum")
        if self.cb.logits_fn is None:
            return {"loss": float(totals[0] / totals[3].clamp(min=1))}
        counted = float(totals[2].clamp(min=1))
        out = {"loss": float(totals[0]) / counted, "accuracy": float(totals[1]) / counted}
        if ece is not None:
            out["ece"] = float(ece.compute())
        return out

    def selection_score(self) -> float:
        """Train accuracy + eval accuracy (the authors' rule); minus the losses when there are no logits."""
        key = "accuracy" if self.cb.logits_fn is not None else "loss"
        sign = 1.0 if key == "accuracy" else -1.0
        loaders = [self.train] if self.evaluation is None else [self.train, self.evaluation]
        return sum(sign * self.measure(loader)[key] for loader in loaders)

    def learn(self, pre: dict[str, Tensor], ft: dict[str, Tensor], names: list[str], kept: list[str]) -> GraftResult:
        """Base patch, reference metrics, mask learning with selection; leaves the best mask in ``best_mask``."""
        cb = self.cb
        report_on = self.evaluation if self.evaluation is not None else self.train
        metrics = {f"finetuned/{k}": v for k, v in self.measure(report_on).items()}
        self.write(pre)  # kept and reverted parameters included
        metrics |= {f"pretrained/{k}": v for k, v in self.measure(report_on).items()}
        self.write({n: ft[n] for n in kept})  # reverted ones stay pre-trained from here on
        graftable = sum(ft[n].numel() for n in names)
        budget = graft_budget(graftable, cb.sparsity)
        if budget == 0:
            raise ValueError(f"WeightGrafting: sparsity {cb.sparsity} of {graftable} graftable entries is 0 entries")
        base = top_delta_mask(pre, ft, cb.sparsity, names)  # the budget over P only
        mask = GraftMask(pre, ft, base, sigmoid_bias=cb.sigmoid_bias, seed=cb.seed)
        limit = budget if cb.binarize == "topk" else None
        self.best_mask, best_score, best_step, history = base, -math.inf, 0, []
        for step in range(cb.steps + 1):
            if step > 0:
                with torch.no_grad():
                    self.write(mask.grafted(mask.relaxed()))  # ∂L/∂θ is taken at θ(γ) of the relaxed mask
                mask.step(self.param_grads(names), cb.mask_lr)
            candidate = base if step == 0 else mask.binary(limit)
            self.write(mask.grafted(candidate))
            score = self.selection_score()
            history.append(
                {"step": step, "score": score, "grafted": float(sum(int(m.sum()) for m in candidate.values()))}
            )
            if score > best_score:
                self.best_mask, best_score, best_step = candidate, score, step
        self.write(mask.grafted(self.best_mask))
        metrics |= {f"grafted/{k}": v for k, v in self.measure(report_on).items()}
        if "finetuned/accuracy" in metrics:
            metrics["grafted/recovery"] = metrics["grafted/accuracy"] / max(metrics["finetuned/accuracy"], 1e-12)
        grafted = {n: int(m.sum()) for n, m in self.best_mask.items()}
        return GraftResult(
            sparsity=sum(grafted.values()) / graftable,
            budget=budget,
            grafted=sum(grafted.values()),
            graftable=graftable,
            kept=sum(ft[n].numel() for n in kept),
            best_step=best_step,
            metrics=metrics,
            history=history,
            tensors={n: c for n, c in grafted.items() if c},
        )
