"""Parameter freezing that keeps data-parallel ranks in step: ``ParameterFreezing`` and ``HalfFineTuning``.

``HalfFineTuning`` implements HFT (Hui et al., "HFT: Half Fine-Tuning for Large Language Models",
https://arxiv.org/abs/2404.18466): in every stage, half of the parameters of each transformer block are frozen,
chosen category by category. ``ParameterFreezing`` is the general base: freeze or train parameters by name.

Why not Lightning's ``BaseFinetuning`` (spec ``callbacks.md`` §D.1): it changes ``requires_grad`` at epoch starts,
after DDP has registered the trainable parameters, so unfrozen weights silently differ across ranks (Lightning issue
#20340); it refuses DeepSpeed; it finds parameters in the optimizer by value (``torch.equal``); and it rebuilds
optimizer groups in ``on_fit_start``, before callback state is restored under FSDP / DeepSpeed / ModelParallel.

Here the selection is a pure function of the settings (and, when it is re-drawn per epoch, of the epoch), computed
identically on every rank from parameter names, and applied in one of two ways:

- ``requires_grad``: frozen parameters get ``requires_grad=False`` in ``setup()``, before the strategy wraps the model
  (DDP, FSDP, DeepSpeed) and before ``configure_optimizers``. Frozen parameters get no gradient at all, which is where
  HFT's speed-up comes from.
- ``grad_mask``: every parameter keeps ``requires_grad=True`` (and its place in the optimizer); the gradients of frozen
  parameters are dropped (``p.grad = None``) in ``on_before_optimizer_step``, after DDP's all-reduce, so PyTorch
  optimizers skip them (no update, no weight decay, no moment drift). The selection may then change during training
  without rank divergence. It costs a full backward pass.

Resume: ``setup()`` recomputes the selection from the settings (``load_state_dict`` runs after wrapping under sharded
strategies, too late to apply anything); the checkpoint keeps its SHA-1 and ``load_state_dict`` only compares.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from ftmods.models.sharding import transformer_layer_classes
from ftmods.ops.params import select_by_patterns, selection_hash

Mode = Literal["auto", "requires_grad", "grad_mask"]
AppliedMode = Literal["requires_grad", "grad_mask"]
Side = Literal["trainable", "frozen"]

DEFAULT_CATEGORIES: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "norm": ["input_layernorm", "post_attention_layernorm"],
}
"""HFT's categories for Llama / Qwen2 / Mistral blocks: per category, one regex per member (searched in the name)."""

UNET_CATEGORIES: dict[str, list[str]] = {
    "self_attn": [r"\.attn1\.to_q\.", r"\.attn1\.to_k\.", r"\.attn1\.to_v\.", r"\.attn1\.to_out\."],
    "cross_attn": [r"\.attn2\.to_q\.", r"\.attn2\.to_k\.", r"\.attn2\.to_v\.", r"\.attn2\.to_out\."],
    "ff": [r"\.ff\.net\.0\.", r"\.ff\.net\.2\."],
    "norm": [
        r"transformer_blocks\.\d+\.norm1\.",
        r"transformer_blocks\.\d+\.norm2\.",
        r"transformer_blocks\.\d+\.norm3\.",
    ],
}
"""The same rule for diffusers' ``BasicTransformerBlock`` (Stable Diffusion / SDXL UNets, e.g. under ``PSOModule``):
self-attention, cross-attention, feed-forward and norms are the categories. HFT was published for LLMs; this is its
direct transfer to the UNet's transformer blocks (resnets stay outside the draw and follow ``other``)."""

CATEGORY_PRESETS: dict[str, dict[str, list[str]]] = {"llama": DEFAULT_CATEGORIES, "unet": UNET_CATEGORIES}
"""Named category sets for ``HalfFineTuning(categories=...)``."""

DEFAULT_ALWAYS_TRAINABLE: list[str] = ["embed_tokens", "lm_head"]
"""Regexes (searched) of parameters HFT never freezes: input embeddings and output head."""

FALLBACK_LAYER_REGEX = r"layers\.\d+\."
"""Block pattern used when the module holds no transformers model with ``_no_split_modules``."""

_MAX_NUMEL_MEMBERS = 16  # balance="numel" enumerates the 2**n subsets of a category's members


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Pure selection functions (no Trainer)
# ----------------------------------------------------------------------------------------------------------------------


def resolve_mode(strategy: Strategy, mode: Mode, *, per_epoch: bool) -> AppliedMode:
    """How a selection is applied under ``strategy``; raises where it cannot be applied safely.

    - DeepSpeed: only a selection fixed at setup with ``requires_grad``. ZeRO builds its flat fp32 partitions and
      gradient hooks at engine init, and ``p.grad`` is not what its optimizer reads, so neither a per-epoch re-draw
      nor ``grad_mask`` can work: both raise.
    - Re-drawing per epoch by toggling ``requires_grad`` is safe only on one device and under FSDP2
      (``ModelParallelStrategy``); under DDP it fails or silently desynchronises ranks (Lightning #20340), so there
      ``auto`` picks ``grad_mask`` and an explicit ``requires_grad`` raises.
    - Otherwise ``auto`` is ``requires_grad``.

    Args:
        strategy: ``trainer.strategy``.
        mode: ``auto``, ``requires_grad`` or ``grad_mask``.
        per_epoch: Whether the selection changes between epochs.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> resolve_mode(DDPStrategy(), "auto", per_epoch=True)
        'grad_mask'
    """
    _check_choice("mode", mode, ("auto", "requires_grad", "grad_mask"))
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        if per_epoch:
            raise ValueError(
                f"{name}: the frozen set can only be chosen once, at setup (ZeRO fixes its partitions and gradient "
                "hooks at engine init); per-epoch re-selection is not supported. Use reselect='stage' (one fit per "
                "stage) or a DDP / FSDP2 strategy."
            )
        if mode == "grad_mask":
            raise ValueError(
                f"{name}: mode='grad_mask' cannot work (DeepSpeed's optimizer does not read p.grad); use "
                "mode='requires_grad' or 'auto'."
            )
        return "requires_grad"
    toggles_safely = isinstance(strategy, (SingleDeviceStrategy, ModelParallelStrategy))
    if mode == "auto":
        return "requires_grad" if toggles_safely or not per_epoch else "grad_mask"
    if mode == "requires_grad" and per_epoch and not toggles_safely:
        raise ValueError(
            f"{name}: re-selecting per epoch with mode='requires_grad' changes requires_grad after the model was "
            "wrapped, which fails or silently desynchronises the ranks (Lightning #20340); use mode='grad_mask' "
            "(or 'auto')."
        )
    return mode


def find_blocks(module: nn.Module, layer_regex: str | None = None) -> dict[str, str]:
    """Map every parameter inside a transformer block to the block's name.

    With ``layer_regex=None`` the blocks are the submodules whose class is listed in the ``_no_split_modules`` of a
    transformers model found anywhere inside ``module`` (through peft wrappers, as
    :func:`ftmods.models.sharding.transformer_layer_classes` does for FSDP2), e.g. ``LlamaDecoderLayer`` or
    ``Qwen2DecoderLayer``; a module without one falls back to :data:`FALLBACK_LAYER_REGEX`. With a regex, the block of
    a parameter is its name up to the end of the regex's first match (searched).

    Example:
        >>> net = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), "head": nn.Linear(2, 1)})
        >>> sorted(set(find_blocks(net).values()))
        ['layers.0', 'layers.1']
    """
    names = [n for n, _ in module.named_parameters()]
    if layer_regex is None:
        classes: set[str] = set()
        for sub in module.modules():
            classes |= transformer_layer_classes(sub)
        prefixes = {n for n, m in module.named_modules() if n and type(m).__name__ in classes}
        if prefixes:
            return {n: block for n in names if (block := _owner(n, prefixes))}
        layer_regex = FALLBACK_LAYER_REGEX
    regex = re.compile(layer_regex)
    return {n: n[: m.end()].rstrip(".") for n in names if (m := regex.search(n))}


def _owner(name: str, prefixes: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if (prefix := ".".join(parts[:end])) in prefixes:
            return prefix
    return None


@dataclass
class _Group:
    """The parameters of one category member in one block (weight, bias, LoRA A/B move together)."""

    names: list[str]
    numel: int


class HFTDraw(NamedTuple):
    """Result of :func:`half_fine_tuning_selection`."""

    trainable: list[str]  # trainable names, in the order of the input
    drawn_numel: int  # parameters subject to the draw (category members inside blocks)
    drawn_trainable_numel: int  # of which the draw left trainable


def half_fine_tuning_selection(
    params: Sequence[tuple[str, int]],
    blocks: Mapping[str, str],
    *,
    key: Sequence[int],
    ratio: float = 0.5,
    granularity: Literal["category", "layer", "model"] = "category",
    categories: Mapping[str, Sequence[str]] | None = None,
    always_trainable: Sequence[str] | None = None,
    other: Side = "trainable",
    balance: Literal["count", "numel"] = "count",
) -> HFTDraw:
    """HFT's draw: which of ``params`` stay trainable, deterministic in ``key`` (the same on every rank).

    1. A private generator ``numpy.random.default_rng(key)`` (a SeedSequence over e.g. ``[seed, stage, epoch]``); the
       global RNGs are never touched.
    2. A parameter inside a block (``blocks``) belongs to the first category member whose regex is found in its name;
       the weight and bias of a projection (or its LoRA A and B) form one group and move together.
    3. ``granularity="category"`` (the paper's rule): per block and category, a random subset of the members stays
       trainable, ``ratio`` of them; when that is not a whole number, blocks alternate between the two nearest
       subset sizes so the category is ``ratio`` trainable over all blocks (at ``ratio=0.5`` on Llama blocks: 2 of 4
       attention projections, 2 of 3 MLP projections in a random half of the blocks and 1 of 3 in the other half, 1 of
       2 norms). With an odd number of blocks the extra one goes to whichever side keeps the drawn parameter count
       closest to ``ratio``. ``balance="numel"`` picks the subsets whose parameter count is closest to ``ratio``
       instead of their number of members (grouped-query attention makes k/v smaller than q/o).
       ``"layer"``: ``round(ratio * blocks)`` whole blocks stay trainable; ``"model"``: ``round(ratio * groups)`` of
       all groups of all blocks (both by count).
    4. ``always_trainable`` regexes (searched; default embeddings and ``lm_head``) win over everything; parameters in
       no group follow ``other``.

    Args:
        params: ``(name, numel)`` of the parameters to choose from, in a fixed order (``named_parameters()``).
        blocks: Parameter name to block name for parameters inside transformer blocks (:func:`find_blocks`).
        key: Non-negative integers seeding the draw.
        ratio: Fraction of the drawn parameters to keep trainable, in (0, 1].
        granularity: ``category``, ``layer`` or ``model``.
        categories: Category name to member regexes (searched); default :data:`DEFAULT_CATEGORIES`.
        always_trainable: Regexes (searched) never frozen; default :data:`DEFAULT_ALWAYS_TRAINABLE`.
        other: What happens to parameters in no group.
        balance: ``count`` or ``numel`` (category granularity only).

    Example:
        >>> params = [(f"layers.{i}.{m}.weight", 4) for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        >>> blocks = {n: n.rsplit(".", 2)[0] for n, _ in params}
        >>> draw = half_fine_tuning_selection(params, blocks, key=[0, 0])
        >>> len(draw.trainable), draw.drawn_numel, draw.drawn_trainable_numel
        (4, 32, 16)
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    _check_choice("granularity", granularity, ("category", "layer", "model"))
    _check_choice("balance", balance, ("count", "numel"))
    _check_choice("other", other, ("trainable", "frozen"))
    categories = DEFAULT_CATEGORIES if categories is None else categories
    always = [re.compile(p) for p in (DEFAULT_ALWAYS_TRAINABLE if always_trainable is None else always_trainable)]
    pinned = {n for n, _ in params if any(r.search(n) for r in always)}
    layout = _layout([(n, k) for n, k in params if n not in pinned], blocks, categories)
    rng = np.random.default_rng(list(key))
    if granularity == "category":
        chosen = _draw_by_category(rng, layout, list(categories), ratio, balance)
    elif granularity == "layer":
        chosen = _draw_whole(rng, [[g for gs in layer.values() for g in gs] for layer in layout.values()], ratio)
    else:
        chosen = _draw_whole(rng, [[g] for layer in layout.values() for gs in layer.values() for g in gs], ratio)
    drawn = {n for layer in layout.values() for gs in layer.values() for g in gs for n in g.names}
    kept = pinned | {n for g in chosen for n in g.names}
    trainable = [n for n, _ in params if n in kept or (n not in drawn and other == "trainable")]
    drawn_numel = sum(g.numel for layer in layout.values() for gs in layer.values() for g in gs)
    return HFTDraw(trainable, drawn_numel, sum(g.numel for g in chosen))


def _layout(
    params: Sequence[tuple[str, int]], blocks: Mapping[str, str], categories: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, list[_Group]]]:
    """Block → category → member groups (in member order), blocks in order of first appearance."""
    members = [(c, j, re.compile(p)) for c, patterns in categories.items() for j, p in enumerate(patterns)]
    found: dict[str, dict[str, dict[int, _Group]]] = {}
    for name, numel in params:
        block = blocks.get(name)
        hit = next(((c, j) for c, j, regex in members if regex.search(name)), None) if block else None
        if block is None or hit is None:
            continue
        group = found.setdefault(block, {}).setdefault(hit[0], {}).setdefault(hit[1], _Group([], 0))
        group.names.append(name)
        group.numel += numel
    return {b: {c: [g for _, g in sorted(ms.items())] for c, ms in cats.items()} for b, cats in found.items()}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _draw_whole(rng: np.random.Generator, units: list[list[_Group]], ratio: float) -> list[_Group]:
    """``round(ratio * len(units))`` random units stay trainable."""
    order = rng.permutation(len(units))
    return [g for i in order[: _round_half_up(ratio * len(units))] for g in units[i]]


class _Options(NamedTuple):
    lo: list[_Group]  # the subset a "low" block keeps trainable
    hi: list[_Group]  # the subset a "high" block keeps trainable (same as lo when ratio is met exactly)
    weight: float  # how far between lo and hi the target lies, in [0, 1)


def _subset_options(groups: list[_Group], rank: list[int], ratio: float, balance: str) -> _Options:
    """The nearest subsets below and above ``ratio`` of the members; ties go to members ranked first by the draw."""

    def size(subset: Sequence[int]) -> int:
        return len(subset) if balance == "count" else sum(groups[i].numel for i in subset)

    if balance == "count":  # the first k members in draw order
        ordered = sorted(range(len(groups)), key=lambda i: rank[i])
        subsets = [tuple(ordered[:k]) for k in range(len(groups) + 1)]
    elif len(groups) > _MAX_NUMEL_MEMBERS:
        raise ValueError(f"balance='numel' supports at most {_MAX_NUMEL_MEMBERS} members per category")
    else:
        subsets = [tuple(i for i in range(len(groups)) if mask >> i & 1) for mask in range(1 << len(groups))]
    target, eps = ratio * size(range(len(groups))), 1e-9

    def tie_break(s: tuple[int, ...]) -> list[int]:
        return sorted(rank[i] for i in s)

    lo = min((s for s in subsets if size(s) <= target + eps), key=lambda s: (target - size(s), tie_break(s)))
    hi = min((s for s in subsets if size(s) >= target - eps), key=lambda s: (size(s) - target, tie_break(s)))
    span = size(hi) - size(lo)
    weight = (target - size(lo)) / span if span > eps else 0.0
    return _Options([groups[i] for i in lo], [groups[i] for i in hi], weight)


def _draw_by_category(
    rng: np.random.Generator,
    layout: dict[str, dict[str, list[_Group]]],
    categories: list[str],
    ratio: float,
    balance: str,
) -> list[_Group]:
    chosen: list[_Group] = []
    ties: list[tuple[list[_Options], list[int], int]] = []  # (options, high-first order, floor) of undecided counts
    for category in categories:
        layers = [layer[category] for layer in layout.values() if layer.get(category)]
        options = [_subset_options(gs, list(rng.permutation(len(gs))), ratio, balance) for gs in layers]
        order = [int(i) for i in rng.permutation(len(layers)) if options[i].weight > 0]
        total = sum(o.weight for o in options)
        n_high = math.floor(total + 1e-9)
        if abs(total - n_high - 0.5) < 1e-9:  # exactly between: decided below on the drawn parameter count
            ties.append((options, order, n_high))
        elif total - n_high > 0.5:
            n_high += 1
        high = set(order[:n_high])
        chosen += [g for i, o in enumerate(options) for g in (o.hi if i in high else o.lo)]
    drawn = sum(g.numel for layer in layout.values() for gs in layer.values() for g in gs)
    kept = sum(g.numel for g in chosen)
    for options, order, n_high in ties:  # give the extra block to the side that keeps the total closest to ratio
        extra = options[order[n_high]]
        delta = sum(g.numel for g in extra.hi) - sum(g.numel for g in extra.lo)
        if abs(kept + delta - ratio * drawn) < abs(kept - ratio * drawn):
            chosen = [g for g in chosen if all(g is not x for x in extra.lo)] + extra.hi
            kept += delta
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------------------


def _numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # DeepSpeed ZeRO-3 partitions report numel() == 0


def _configure_model_now(trainer: Trainer, pl_module: LightningModule) -> None:
    """Run an (idempotent) ``configure_model`` now, in the contexts Lightning's ``_call_configure_model`` uses.

    Lightning calls callbacks' ``setup`` before ``configure_model``, and ftmods modules build their model there; as
    Lightning's own ``WeightAveraging`` does, build it early so the parameters exist (the later call does nothing).
    """
    if not is_overridden("configure_model", pl_module):
        return
    strategy = trainer.strategy
    with (
        strategy.tensor_init_context(),
        strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()


class ParameterFreezing(Callback):
    r"""Freeze or train parameters by name, identically on every rank, safely under DDP / FSDP / DeepSpeed.

    Names are those of ``pl_module.named_parameters()`` (for ftmods modules they start with the attribute holding the
    model, e.g. ``model.model.layers.0.mlp.up_proj.weight`` for ``SFTModule``). Rules (:func:`select_by_patterns`):
    a name matched only by ``train`` is trainable, only by ``freeze`` frozen; one matched by both follows
    ``precedence``; one matched by neither follows ``other``. A pattern that matches no parameter is an error.

    The callback only ever freezes: parameters the module froze itself (a reference model, LoRA base weights) are
    not candidates and stay frozen. The model must exist when callbacks' ``setup`` runs: built in ``__init__`` or in
    an idempotent ``configure_model`` (called early, as Lightning's ``WeightAveraging`` does). At the end of fit the
    parameters it froze get ``requires_grad=True`` back, so the same module can go through another stage.

    ``configure_optimizers`` may pass all parameters or only those with ``requires_grad``: both are correct
    (optimizers skip parameters without gradient); filtering saves optimizer memory in ``requires_grad`` mode.

    Logs ``freezing/trainable_fraction`` (trainable numel / numel of the candidates) at every epoch end and says on
    rank 0 what it selected. ``state_dict`` holds the selection's SHA-1 and names; resuming with settings that select
    differently raises. Subclasses override :meth:`selection` (and :attr:`per_epoch` to re-select every epoch).

    Args:
        freeze: Patterns of parameters to freeze.
        train: Patterns of parameters to keep trainable.
        syntax: ``regex`` (exact names or ``re.fullmatch`` regexes) or ``glob`` (``fnmatch`` on the whole name).
        precedence: Which list wins for a name matched by both.
        other: Parameters matched by neither list; ``None``: ``frozen`` if only ``train`` is given, else ``trainable``.
        mode: ``requires_grad`` (set in ``setup``, before wrapping), ``grad_mask`` (drop frozen gradients before each
            optimizer step; every parameter stays in the optimizer) or ``auto`` (see :func:`resolve_mode`).

    Example::

        # train only the (tied) embeddings / LM head and the last two of 24 blocks; freeze everything else
        freezing = ParameterFreezing(train=["*.embed_tokens.*", "*.layers.2[23].*"], syntax="glob")
        trainer = Trainer(callbacks=[freezing])
        trainer.fit(SFTModule("Qwen/Qwen2.5-0.5B-Instruct"), datamodule=dm)
    """

    def __init__(
        self,
        freeze: list[str] | None = None,
        train: list[str] | None = None,
        *,
        syntax: Literal["regex", "glob"] = "regex",
        precedence: Literal["train", "freeze"] = "train",
        other: Side | None = None,
        mode: Mode = "auto",
    ) -> None:
        _check_choice("syntax", syntax, ("regex", "glob"))
        _check_choice("precedence", precedence, ("train", "freeze"))
        _check_choice("other", other, ("trainable", "frozen", None))
        _check_choice("mode", mode, ("auto", "requires_grad", "grad_mask"))
        self.freeze, self.train = list(freeze or []), list(train or [])
        self.syntax, self.precedence, self.other, self.mode = syntax, precedence, other, mode
        self.reset_optimizer_state_on_unfreeze = False  # subclasses that re-select per epoch may set it
        self._names: list[str] = []  # every parameter name of the module, set in setup("fit")
        self._params: list[tuple[str, int]] = []  # (name, numel) of the candidates: trainable before this callback
        self._applied: AppliedMode | None = None  # resolved in setup("fit")
        self._trainable: frozenset[str] | None = None  # the selection in effect
        self._epoch_of_draw: int | None = None  # epoch of that selection (None unless per_epoch)
        self._frozen_here: set[str] = set()  # requires_grad switched off by this callback, restored in teardown
        self._masked: list[nn.Parameter] = []  # parameters whose gradients are dropped before the optimizer step
        self._pending: dict[str, Any] | None = None  # state loaded before setup, checked in setup

    # ------------------------------------------------------------------------------------------------ selection

    @property
    def per_epoch(self) -> bool:
        """Whether the selection is re-drawn at every epoch start (False here; see :class:`HalfFineTuning`)."""
        return False

    def selection(self, epoch: int) -> frozenset[str]:
        """The names among the candidates that stay trainable in ``epoch`` (available after ``setup``)."""
        if not (self.freeze or self.train):
            rank_zero_warn(f"{type(self).__name__}: neither freeze nor train patterns given; nothing is frozen")
        names = select_by_patterns(
            self._names,
            freeze=self.freeze,
            train=self.train,
            syntax=self.syntax,
            precedence=self.precedence,
            other=self.other,
        )
        keep = set(names)
        return frozenset(n for n, _ in self._params if n in keep)

    def _inspect(self, pl_module: LightningModule) -> None:
        """Read what the selection needs from the module (called in ``setup`` once the parameters exist)."""

    def _identity(self) -> dict[str, Any]:
        """Arguments that identify this instance in ``state_key`` and in the checkpointed state."""
        return {"freeze": self.freeze, "train": self.train}

    def _describe(self, trainable: frozenset[str]) -> str:
        return ""

    @property
    def state_key(self) -> str:
        """Class name plus identifying arguments, so two instances never share a checkpoint entry."""
        return self._generate_state_key(**self._identity())

    @property
    def trainable_fraction(self) -> float:
        """Trainable numel / numel of the candidates under the selection in effect (1.0 before setup)."""
        total = sum(k for _, k in self._params)
        if self._trainable is None or total == 0:
            return 1.0
        return sum(k for n, k in self._params if n in self._trainable) / total

    # ---------------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._applied = resolve_mode(trainer.strategy, self.mode, per_epoch=self.per_epoch)
        _configure_model_now(trainer, pl_module)
        named = list(pl_module.named_parameters())
        if not named:
            raise RuntimeError(
                f"{type(self).__name__}: {type(pl_module).__name__} has no parameters when callbacks are set up; "
                "build the model in __init__ or in an idempotent configure_model()"
            )
        self._names = [n for n, _ in named]
        self._params = [(n, _numel(p)) for n, p in named if p.requires_grad]
        self._inspect(pl_module)
        self._activate(self.selection(0), epoch=0 if self.per_epoch else None)
        if self._applied == "requires_grad" and not self.per_epoch:
            self._set_requires_grad(pl_module)
        if self._pending is not None:
            self._verify(self._pending)
            self._pending = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer, pl_module)  # also runs when resuming mid-epoch, where on_train_epoch_start does not

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the same value on every rank; sync_dist only avoids Lightning's epoch-level warning under DDP
        pl_module.log(
            "freezing/trainable_fraction", self.trainable_fraction, on_step=False, on_epoch=True, sync_dist=True
        )

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for param in self._masked:  # after DDP's all-reduce; the optimizer skips parameters whose grad is None
            param.grad = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name, param in pl_module.named_parameters():
            if name in self._frozen_here:
                param.requires_grad_(True)
        self._frozen_here.clear()
        self._masked = []

    # --------------------------------------------------------------------------------------------------- resume

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._trainable is None:
            return {}
        return {
            **self._identity(),
            "epoch_of_draw": self._epoch_of_draw,
            "selection_sha1": selection_hash(self._trainable),
            "trainable_names": sorted(self._trainable),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._applied is None:  # not set up yet: check once the parameters are known
            self._pending = state_dict
        else:
            self._verify(state_dict)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Catch a resume whose identifying arguments changed (the checkpoint entry then has another ``state_key``)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict compares
        prefix = type(self).__qualname__ + "{"
        theirs = {k: v for k, v in states.items() if isinstance(k, str) and k.startswith(prefix)}
        if len(theirs) == 1 and sum(type(cb) is type(self) for cb in getattr(trainer, "callbacks", [])) == 1:
            ((key, state),) = theirs.items()
            if state:
                self._verify(state, source=key)
                return
        found = f" (it holds {sorted(theirs)})" if theirs else ""
        rank_zero_warn(f"{self.state_key}: no state of this callback in the checkpoint{found}; selection not verified")

    def _verify(self, state: dict[str, Any], source: str | None = None) -> None:
        epoch = state.get("epoch_of_draw")
        expected = self.selection(epoch or 0)
        if selection_hash(expected) != state["selection_sha1"]:
            stored = set(state.get("trainable_names", []))
            only_then, only_now = sorted(stored - expected)[:3], sorted(expected - stored)[:3]
            at = f" for epoch {epoch}" if epoch is not None else ""
            raise ValueError(
                f"{self.state_key}: selection hash mismatch on resume: the checkpoint's entry "
                f"{source or self.state_key} was trained with another set of trainable parameters (sha1 "
                f"{state['selection_sha1'][:12]}) than these settings select{at} (sha1 "
                f"{selection_hash(expected)[:12]}). Trainable only in the checkpoint: {only_then}; only now: "
                f"{only_now}. Resume with the original settings, or start a new fit from the weights instead of "
                "--ckpt_path."
            )
        self._trainable, self._epoch_of_draw = expected, epoch

    # -------------------------------------------------------------------------------------------------- helpers

    def _sync(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the selection of the current epoch in effect (re-draw, requires_grad toggles, gradient mask)."""
        if self.per_epoch:
            epoch = trainer.current_epoch
            if epoch != self._epoch_of_draw:
                new = self.selection(epoch)
                if self.reset_optimizer_state_on_unfreeze and self._trainable is not None:
                    _drop_optimizer_state(trainer, pl_module, new - self._trainable)
                self._activate(new, epoch=epoch)
            if self._applied == "requires_grad":
                self._set_requires_grad(pl_module)
        if self._applied == "grad_mask" or self.per_epoch:  # per-epoch requires_grad: masked too, belt and braces
            assert self._trainable is not None
            frozen = {n for n, _ in self._params} - self._trainable
            self._masked = [p for n, p in pl_module.named_parameters() if n in frozen]

    def _activate(self, trainable: frozenset[str], *, epoch: int | None) -> None:
        if self._params and not trainable:
            names = [n for n, _ in self._params]
            when = f" in epoch {epoch}" if epoch is not None else ""
            raise ValueError(
                f"{type(self).__name__}: the selection leaves none of the {len(names)} trainable parameter tensors "
                f"trainable{when} (candidates: {names[:5]}{' ...' if len(names) > 5 else ''}); nothing would train. "
                "Loosen the freeze patterns, or raise the ratio / change the seed"
            )
        self._trainable, self._epoch_of_draw = trainable, epoch
        total = sum(k for _, k in self._params)
        kept = sum(k for n, k in self._params if n in trainable)
        when = f" for epoch {epoch}" if epoch is not None else ""
        rank_zero_info(
            f"{type(self).__name__}: {kept:,} of {total:,} parameters trainable{when} ({self.trainable_fraction:.1%}; "
            f"{len(trainable)} of {len(self._params)} tensors), mode {self._applied}{self._describe(trainable)}"
        )

    def _set_requires_grad(self, pl_module: LightningModule) -> None:
        assert self._trainable is not None
        candidates = {n for n, _ in self._params}
        for name, param in pl_module.named_parameters():
            if name not in candidates:
                continue
            keep = name in self._trainable
            if param.requires_grad != keep:
                param.requires_grad_(keep)
            (self._frozen_here.discard if keep else self._frozen_here.add)(name)


def _drop_optimizer_state(trainer: Trainer, pl_module: LightningModule, names: Iterable[str]) -> None:
    """Forget optimizer state (e.g. Adam moments) of parameters that become trainable again: it is stale."""
    names = set(names)
    params = [p for n, p in pl_module.named_parameters() if n in names]
    for optimizer in trainer.optimizers:
        for param in params:
            optimizer.state.pop(param, None)


class HalfFineTuning(ParameterFreezing):
    r"""HFT: freeze a random half of every transformer block, category by category (arXiv:2404.18466).

    The draw (:func:`half_fine_tuning_selection`) is a pure function of ``(seed, stage_index[, epoch])``: every rank
    computes the same selection without communication, and a resumed run recomputes it. At ``ratio=0.5`` on Llama /
    Qwen2 blocks each block keeps 2 of its 4 attention projections, 2 of 3 MLP projections (in a random half of the
    blocks; 1 of 3 in the other half) and 1 of its 2 norms trainable; embeddings and the LM head stay trainable, as do
    parameters outside the categories (``other``), such as the final norm.

    Blocks (:func:`find_blocks`): by default the modules whose class is in the transformers model's
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), found anywhere in the LightningModule
    and through peft wrappers, as ``ftmods.models.sharding`` does for FSDP2; ``layer_regex`` overrides this. For a VLM
    both towers' blocks count; set ``layer_regex`` (e.g. ``r"language_model\.layers\.\d+\."``) to restrict it.

    With LoRA only the adapter weights are candidates (the module froze the rest): HFT then trains half of the
    adapters, with the A and B of one projection as one member.

    When the set is re-drawn (``reselect``):
        - ``stage`` (default, the paper's rule): once per ``fit``, from ``(seed, stage_index)``; set ``stage_index`` per
          stage of a multi-stage pipeline (SFT, then DPO, then each continual-learning task).
        - ``epoch``: at every epoch start, from ``(seed, stage_index, epoch)``. ``auto`` then uses ``grad_mask`` under
          DDP / FSDP1 (no speed-up) and ``requires_grad`` toggling on one device and under FSDP2; DeepSpeed raises.
          Mid-epoch resume is exact: the draw depends only on the epoch number.
        - ``never``: from ``seed`` alone, the same set in every stage.

    The trainable fraction of all candidates is logged as ``freezing/trainable_fraction``; a warning is given when the
    drawn part (block parameters in the categories) is more than 2 percentage points from ``ratio``, e.g. with
    grouped-query attention and ``balance="count"``.

    Args:
        ratio: Fraction of each category to keep trainable, in (0, 1]; 40-60 % are reported to work well.
        granularity: ``category`` (the paper's rule), ``layer`` (whole blocks) or ``model`` (any groups).
        reselect: ``stage``, ``epoch`` or ``never``.
        seed: Seed of the draw (non-negative; independent of ``seed_everything``).
        stage_index: Index of this stage in a multi-stage pipeline.
        mode: ``auto``, ``requires_grad`` or ``grad_mask`` (:func:`resolve_mode`).
        categories: Category name to member regexes (searched in the parameter name), or a preset name: ``llama``
            (:data:`DEFAULT_CATEGORIES`, Llama / Qwen2 / Mistral names; the default) or ``unet``
            (:data:`UNET_CATEGORIES`, diffusers UNets as in ``PSOModule``).
        layer_regex: Regex whose match (searched) ends a block's name prefix; ``None``: ``_no_split_modules``.
        always_trainable: Regexes (searched) of parameters never frozen; default ``["embed_tokens", "lm_head"]``
            (pass ``[]`` to let them follow ``other``).
        other: Parameters in no category and not always trainable (e.g. the final norm): ``trainable`` or ``frozen``.
        balance: ``count`` (the paper: number of matrices) or ``numel`` (parameter count, for grouped-query attention).
        reset_optimizer_state_on_unfreeze: With ``reselect="epoch"``, forget the optimizer state (Adam moments) of a
            parameter that becomes trainable again, since it is stale.

    Example::

        # configs/callbacks/hft.yaml, or in Python:
        hft = HalfFineTuning(ratio=0.5, seed=0, stage_index=0)
        trainer = Trainer(callbacks=[hft], strategy="ddp")
        trainer.fit(SFTModule("Qwen/Qwen2.5-0.5B-Instruct"), datamodule=dm)  # ~half of every block frozen
    """

    def __init__(
        self,
        ratio: float = 0.5,
        *,
        granularity: Literal["category", "layer", "model"] = "category",
        reselect: Literal["stage", "epoch", "never"] = "stage",
        seed: int = 0,
        stage_index: int = 0,
        mode: Mode = "auto",
        categories: dict[str, list[str]] | Literal["llama", "unet"] | None = None,
        layer_regex: str | None = None,
        always_trainable: list[str] | None = None,
        other: Side = "trainable",
        balance: Literal["count", "numel"] = "count",
        reset_optimizer_state_on_unfreeze: bool = False,
    ) -> None:
        super().__init__(mode=mode)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if seed < 0 or stage_index < 0:
            raise ValueError(f"seed and stage_index must be >= 0, got {seed} and {stage_index}")
        _check_choice("granularity", granularity, ("category", "layer", "model"))
        _check_choice("reselect", reselect, ("stage", "epoch", "never"))
        _check_choice("other", other, ("trainable", "frozen"))
        _check_choice("balance", balance, ("count", "numel"))
        if isinstance(categories, str):
            _check_choice("categories", categories, tuple(CATEGORY_PRESETS))
            categories = CATEGORY_PRESETS[categories]
        self.categories = {k: list(v) for k, v in (categories or DEFAULT_CATEGORIES).items()}
        self.always_trainable = list(DEFAULT_ALWAYS_TRAINABLE if always_trainable is None else always_trainable)
        for pattern in [p for ps in self.categories.values() for p in ps] + self.always_trainable + [layer_regex or ""]:
            re.compile(pattern)  # fail at construction on a bad regex
        self.ratio, self.granularity, self.reselect = ratio, granularity, reselect
        self.seed, self.stage_index = seed, stage_index
        self.layer_regex, self.other, self.balance = layer_regex, other, balance
        self.reset_optimizer_state_on_unfreeze = reset_optimizer_state_on_unfreeze
        self._blocks: dict[str, str] = {}  # parameter name -> block name, found in setup

    @property
    @override
    def per_epoch(self) -> bool:
        return self.reselect == "epoch"

    def draw_key(self, epoch: int) -> list[int]:
        """The integers seeding the draw: ``[seed]``, ``[seed, stage_index]`` or ``[seed, stage_index, epoch]``."""
        return {"never": [self.seed], "stage": [self.seed, self.stage_index]}.get(
            self.reselect, [self.seed, self.stage_index, epoch]
        )

    def draw(self, epoch: int) -> HFTDraw:
        """The full draw for ``epoch`` (after ``setup``): trainable names and the drawn parameter counts."""
        return half_fine_tuning_selection(
            self._params,
            self._blocks,
            key=self.draw_key(epoch),
            ratio=self.ratio,
            granularity=self.granularity,
            categories=self.categories,
            always_trainable=self.always_trainable,
            other=self.other or "trainable",
            balance=self.balance,
        )

    @override
    def selection(self, epoch: int) -> frozenset[str]:
        return frozenset(self.draw(epoch).trainable)

    @override
    def _inspect(self, pl_module: LightningModule) -> None:
        self._blocks = find_blocks(pl_module, self.layer_regex)
        if self.draw(0).drawn_numel == 0:
            raise ValueError(
                f"HalfFineTuning: no trainable parameter of {type(pl_module).__name__} is a category member "
                f"({self.categories}) inside a transformer block ({len(set(self._blocks.values()))} blocks found); "
                "set categories= / layer_regex= for this architecture (categories='unet' for a diffusers UNet)"
            )

    @override
    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "stage_index": self.stage_index}

    @override
    def _describe(self, trainable: frozenset[str]) -> str:
        draw = self.draw(self._epoch_of_draw or 0)
        drawn = draw.drawn_trainable_numel / max(draw.drawn_numel, 1)
        if abs(drawn - self.ratio) > 0.02:
            rank_zero_warn(
                f"HalfFineTuning: the draw keeps {drawn:.1%} of the block parameters trainable, more than 2 points "
                f"from ratio={self.ratio} (grouped-query attention? try balance='numel')"
            )
        key = self.draw_key(self._epoch_of_draw or 0)
        return f"; block parameters {drawn:.1%} trainable (ratio {self.ratio}, draw key {key})"
