"""Weight averaging: Lightning's EMA / SWA for replicated models, :class:`ShardedEMA` for sharded (FSDP2) ones.

Lightning 2.6 ships ``WeightAveraging`` and ``EMAWeightAveraging``. They keep a deep copy of the whole LightningModule
(``torch.optim.swa_utils.AveragedModel``): right for single-device and DDP runs, impossible for a sharded model (FSDP2
refuses ``deepcopy``; FSDP1 and DeepSpeed are documented as unsupported). ftmods re-exports them as thin subclasses
that add three things: an early, clear error under a sharded strategy (instead of a ``deepcopy`` failure deep inside
``setup``), a check that no second averaging callback fights over the weights, and a ``deepcopy`` that shares the
module's plain callables (optimizer factories) instead of copying them: those built by LightningCLI reference the CLI
and, under DDP, its process group, and copying them fails with "cannot pickle '_thread.lock' object".

:class:`ShardedEMA` keeps its EMA as a submodule of the LightningModule, ``pl_module.ema_shadow``, holding one buffer
per tracked parameter under the parameter's own dotted name. Under FSDP2 each buffer is a DTensor with the placements
of its parameter, so the update is an elementwise ``torch._foreach_lerp_`` on the local shards (no communication, +1
sharded copy of memory), and the strategy's own checkpointing saves and restores the EMA with the model (a DCP
folder under ``ModelParallelStrategy``, a single file under DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMAWeightAveraging
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.callbacks import WeightAveraging as _LightningWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import Self, override

__all__ = ["SHADOW_ATTRIBUTE", "EMAShadow", "EMAWeightAveraging", "ShardedEMA", "WeightAveraging", "ema_state_dict"]

SHADOW_ATTRIBUTE = "ema_shadow"
"""Attribute of the LightningModule that holds :class:`ShardedEMA`'s shadow (its keys: ``ema_shadow.<param name>``)."""

_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"
"""Names ``DistributedDataParallel`` neither broadcasts nor reduces (read from the wrapped module when it wraps)."""


# ---------------------------------------------------------------------------------------------- replicated models


def _is_sharded(strategy: Strategy) -> bool:
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy))


def _check_alone(trainer: Trainer, callback: Callback) -> None:
    """Refuse a second averaging callback: each swaps its average into the model, and two overwrite each other."""
    kinds = (_LightningWeightAveraging, StochasticWeightAveraging, ShardedEMA)
    callbacks = getattr(trainer, "callbacks", [])
    others = [type(cb).__name__ for cb in callbacks if isinstance(cb, kinds) and cb is not callback]
    if others:
        raise ValueError(
            f"{type(callback).__name__} cannot run together with {', '.join(others)}: weight averaging callbacks swap "
            "their average into the model for validation and at the end of fit, so two would overwrite each other"
        )


class _ReplicatedAveraging(Callback):
    """What ftmods adds to Lightning's averaging callbacks.

    Fail early under a sharded strategy (pointing to :class:`ShardedEMA`), refuse a second averaging callback, and
    let Lightning's ``AveragedModel`` share the module's plain callables instead of deep-copying them.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if _is_sharded(trainer.strategy):
            name = type(trainer.strategy).__name__
            hint = (
                "use ftmods.callbacks.averaging.ShardedEMA, whose EMA is sharded like the model"
                if isinstance(trainer.strategy, ModelParallelStrategy)
                else "use DDP, or FSDP2 (ftmods.strategies.FSDP2Strategy) with ftmods.callbacks.averaging.ShardedEMA"
            )
            raise NotImplementedError(
                f"{type(self).__name__} keeps a full deep copy of the model and cannot average a model sharded by "
                f"{name}: {hint}"
            )
        _check_alone(trainer, self)
        if stage != TrainerFn.FITTING:
            super().setup(trainer, pl_module, stage)
            return
        if is_overridden("configure_model", pl_module):
            pl_module.configure_model()  # before the callables are set aside (Lightning calls it again: idempotent)
        shared = {k: v for k, v in vars(pl_module).items() if callable(v) and not isinstance(v, (nn.Module, type))}
        for name in shared:
            del pl_module.__dict__[name]
        try:
            super().setup(trainer, pl_module, stage)  # deep-copies the module into an AveragedModel
        finally:
            pl_module.__dict__.update(shared)
            average = getattr(self, "_average_model", None)
            if average is not None:
                average.module.__dict__.update(shared)


class WeightAveraging(_ReplicatedAveraging, _LightningWeightAveraging):
    """Lightning's ``WeightAveraging`` (SWA by default; any ``AveragedModel`` average) for single-device and DDP runs.

    Identical to ``lightning.pytorch.callbacks.WeightAveraging`` (same arguments, same checkpoint layout: averaged
    weights under ``state_dict``, raw ones under ``current_model_state``), except that it raises a clear error under
    FSDP / FSDP2 / DeepSpeed and when another averaging callback is present, and that the module's plain callables
    (optimizer factories) are shared with the average instead of deep-copied. Subclass it and override
    ``should_update`` to choose when to average. Its ``setup`` calls ``configure_model()`` itself, which ftmods modules
    allow (it is idempotent).

    Example::

        trainer = Trainer(callbacks=[WeightAveraging()], strategy="ddp", devices=2)
    """


class EMAWeightAveraging(_ReplicatedAveraging, _LightningEMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` for single-device and DDP runs (for FSDP2 use :class:`ShardedEMA`).

    Identical to ``lightning.pytorch.callbacks.EMAWeightAveraging`` (``decay``, ``update_every_n_steps``,
    ``update_starting_at_step`` / ``_epoch``; validation and the end of fit use the average), except for a clear error
    under FSDP / FSDP2 / DeepSpeed and when another averaging callback is present, and for optimizer factories being
    shared rather than deep-copied (see :class:`WeightAveraging`). Every DDP rank keeps its own identical average, with
    no communication.

    Example::

        trainer = Trainer(callbacks=[EMAWeightAveraging(decay=0.999)], strategy="ddp", devices=2)
    """


# ---------------------------------------------------------------------------------------------- the sharded EMA


class EMAShadow(nn.Module):
    """EMA weights as buffers named like the parameters they follow (``model.layers.0.q_proj.weight``, ...).

    Buffers, not parameters: no optimizer, parameter count or freezing callback ever sees them. They stay in at least
    float32 when the module is cast to half precision (``precision="bf16-true"``): an EMA with decay 0.999 in bfloat16
    would never move, since each update is below bfloat16's resolution.

    Args:
        tensors: ``(parameter name, initial value)`` pairs; DTensors keep their sharding.
    """

    def __init__(self, tensors: Iterable[tuple[str, Tensor]]) -> None:
        super().__init__()
        for name, tensor in tensors:
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner.get_submodule(part)
            owner.register_buffer(leaf, tensor)

    @override
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        def keep_float32(tensor: Tensor) -> Tensor:
            out = fn(tensor)
            halved = out.dtype in (torch.float16, torch.bfloat16) and out.dtype != tensor.dtype
            if tensor.is_floating_point() and halved:
                return tensor.to(device=out.device)  # move, but do not lose precision
            return out

        return super()._apply(keep_float32, recurse)


def ema_state_dict(state_dict: dict[str, Tensor], which: str = "ema") -> dict[str, Tensor]:
    """A plain module state dict from one saved with :class:`ShardedEMA` (``ema_shadow.*`` keys removed).

    Args:
        state_dict: A LightningModule state dict (``checkpoint["state_dict"]``).
        which: ``ema``: the EMA values replace the weights they follow; ``live``: the raw trained weights.

    Example::

        weights = ema_state_dict(torch.load("last.ckpt", weights_only=True)["state_dict"])
        module.load_state_dict(weights)
    """
    if which not in ("ema", "live"):
        raise ValueError(f"which must be 'ema' or 'live', got {which!r}")
    head = SHADOW_ATTRIBUTE + "."
    out = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    if which == "ema":
        out.update({k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)})
    return out


def _local(tensor: Tensor) -> Tensor:
    """The shard of a DTensor held by this rank (shares storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _reshard(module: nn.Module) -> None:
    """Free FSDP2's gathered parameters, so the sharded storage we write is what the next forward gathers."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def _exchange(ema: Tensor, live: Tensor) -> Tensor | None:
    """Put ``ema`` into ``live``; the raw value goes to ``ema`` (same dtype) or is returned.

    A float32 EMA would lose precision if it held bfloat16 weights for a while, hence the returned copy then.
    """
    if ema.dtype == live.dtype:
        raw = live.clone()
        live.copy_(ema)
        ema.copy_(raw)
        return None
    raw = live.clone()
    live.copy_(ema)
    return raw


class ShardedEMA(Callback):
    """Exponential moving average of the weights that works on sharded models (FSDP2) as well as on DDP.

    ``ema ← ema + (1 − d)·(θ − ema)`` after every ``update_every_n_steps``-th optimizer step from
    ``update_starting_at_step`` on, where the first update copies the weights (as Lightning's ``AveragedModel`` does)
    and ``d = decay``, or ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates with ``warmup``. The EMA lives in
    ``pl_module.ema_shadow`` (buffers named like the parameters, at least float32), so checkpoints hold it under
    ``ema_shadow.*`` and every strategy saves and restores it with the model; resume is exact.

    - FSDP2 (``ModelParallelStrategy`` / :class:`ftmods.strategies.FSDP2Strategy`): the shadow is created in
      ``on_fit_start`` from the already sharded parameters (DTensors with the same placements) and before a
      checkpoint is restored; updates touch only local shards.
    - Single device and DDP: the shadow is created in ``setup`` (calling the module's idempotent
      ``configure_model()`` first, as Lightning's ``WeightAveraging`` does) so that a resumed checkpoint finds it;
      DDP is told not to broadcast it every step.
    - FSDP1 and DeepSpeed: not supported (their flat parameter shards do not line up elementwise with a shadow); an
      error says so.

    Only floating-point parameters that require grad when the shadow is made are tracked (``include_frozen`` tracks
    all; a warning says when parameters become trainable later, e.g. with ``HalfFineTuning(reselect="epoch")``);
    buffers (BatchNorm statistics) are not averaged. Put freezing callbacks before this one, so that their ``setup``
    has run. Validation during fit, and ``validate`` / ``test`` / ``predict`` runs, use the EMA weights
    (``evaluate_ema``): given a checkpoint without the shadow in memory, its ``ema_shadow.*`` values are loaded
    into the model. Without this callback, load such a checkpoint with :func:`ema_state_dict` (or ``strict=False``
    for the raw weights).

    Args:
        decay: EMA decay per update, in [0, 1].
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (a short memory early in training).
        update_every_n_steps: Update after every N-th optimizer step.
        update_starting_at_step: First optimizer step (0-based) that may update; the first update copies the weights.
        include_frozen: Also track parameters that do not require grad (they do not move; only costs memory).
        evaluate_ema: Validation, test and predict use the EMA weights (swapped in and back out).
        swap_at_end: Copy the EMA into the model at the end of fit (the shadow keeps it too), so exports after fit
            (e.g. :class:`ftmods.callbacks.PretrainedExport`) write the EMA weights. As with Lightning's
            ``EMAWeightAveraging``, a checkpoint written after that (``ModelCheckpoint(save_last=True)`` at the end
            of training) then holds the EMA as the model weights too; set ``False`` to keep the raw weights there
            (and read the EMA with :func:`ema_state_dict`).

    Example::

        trainer = Trainer(strategy=FSDP2Strategy(), devices=8, callbacks=[ShardedEMA(decay=0.999)])
        trainer.fit(SFTModule("Qwen/Qwen2.5-0.5B-Instruct"), datamodule=dm)  # the model now holds the EMA weights
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        include_frozen: bool = False,
        evaluate_ema: bool = True,
        swap_at_end: bool = True,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if update_every_n_steps < 1 or update_starting_at_step < 0:
            raise ValueError("update_every_n_steps must be >= 1 and update_starting_at_step >= 0")
        self.decay, self.warmup = decay, warmup
        self.update_every_n_steps, self.update_starting_at_step = update_every_n_steps, update_starting_at_step
        self.include_frozen, self.evaluate_ema, self.swap_at_end = include_frozen, evaluate_ema, swap_at_end
        self.num_updates = 0  # EMA updates so far (0: the next one copies the weights)
        self._last_update_step = 0  # trainer.global_step of the last update (gradient accumulation safe)
        self._pairs: list[tuple[Tensor, Tensor]] = []  # (shadow buffer, live parameter), cached for updates
        self._swapped: tuple[list[tuple[Tensor, Tensor]], list[Tensor | None]] | None = None
        self._hook: Any = None  # load_state_dict pre-hook handle
        self._warned_untracked = False

    # ------------------------------------------------------------------------------------------- schedule

    def should_update(self, step_idx: int) -> bool:
        """Whether to update after the optimizer step with 0-based index ``step_idx`` (Lightning's convention)."""
        return step_idx >= self.update_starting_at_step and step_idx % self.update_every_n_steps == 0

    def current_decay(self) -> float:
        """The decay the next update uses (after ``num_updates`` updates)."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    # -------------------------------------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise NotImplementedError(
                f"ShardedEMA supports single-device, DDP and FSDP2 (ModelParallelStrategy, ftmods.strategies."
                f"FSDP2Strategy) runs, not {type(trainer.strategy).__name__}: its flat parameter shards do not line up "
                "elementwise with a shadow copy. Use FSDP2, or DDP with EMAWeightAveraging."
            )
        _check_alone(trainer, self)
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._on_load_state_dict)
        if stage != TrainerFn.FITTING:
            return
        self.num_updates, self._last_update_step, self._pairs, self._warned_untracked = 0, 0, [], False
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            if is_overridden("configure_model", pl_module):
                pl_module.configure_model()  # idempotent; the shadow must exist before a checkpoint is restored
            shadow = self._create_shadow(pl_module)
            if isinstance(trainer.strategy, DDPStrategy):  # identical on every rank: never broadcast it per step
                ignored = list(getattr(pl_module, _DDP_IGNORE, []))
                names = [f"{SHADOW_ATTRIBUTE}.{name}" for name, _ in shadow.named_buffers()]
                setattr(pl_module, _DDP_IGNORE, ignored + [n for n in names if n not in ignored])

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._create_shadow(pl_module)  # parameters are sharded now; a checkpoint is restored after this hook
        self._pairs = _shadow_pairs(pl_module)  # after the strategy moved and cast the module

    def _create_shadow(self, pl_module: LightningModule) -> EMAShadow:
        if isinstance(getattr(pl_module, SHADOW_ATTRIBUTE, None), EMAShadow):
            delattr(pl_module, SHADOW_ATTRIBUTE)  # from an earlier fit
        tracked = [
            (name, param)
            for name, param in pl_module.named_parameters()
            if param.is_floating_point() and (param.requires_grad or self.include_frozen)
        ]
        if not tracked:
            raise ValueError(f"ShardedEMA: {type(pl_module).__name__} has no trainable floating-point parameters")
        shadow = EMAShadow((name, _float32_copy(param)) for name, param in tracked)
        pl_module.add_module(SHADOW_ATTRIBUTE, shadow)
        numel = sum(_local(b).numel() for b in shadow.buffers())
        rank_zero_info(f"ShardedEMA: tracking {len(tracked)} tensors ({numel:,} elements on rank 0)")
        return shadow

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------------------------------- updates

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps so far: unchanged over accumulated micro-batches
        if step > self._last_update_step and self.should_update(step - 1):
            self.update()
            self._last_update_step = step

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step on the local shards (the first copies the weights)."""
        ema = [_local(shadow) for shadow, _ in self._pairs]
        live = [_local(param) for _, param in self._pairs]
        if self.num_updates == 0:
            torch._foreach_copy_(ema, live)
        else:
            weight = 1.0 - self.current_decay()
            same = [i for i, (e, p) in enumerate(zip(ema, live, strict=True)) if e.dtype == p.dtype]
            if same:
                torch._foreach_lerp_([ema[i] for i in same], [live[i] for i in same], weight)
            for i in sorted(set(range(len(ema))) - set(same)):  # e.g. float32 EMA of bfloat16 weights
                ema[i].lerp_(live[i].to(ema[i].dtype), weight)
        self.num_updates += 1

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._warned_untracked:
            return
        _reshard(pl_module)  # FSDP2 registers gathered parameters while unsharded: look at the sharded ones
        tracked = {id(param) for _, param in self._pairs}
        untracked = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in tracked]
        if untracked:
            rank_zero_warn(
                f"ShardedEMA: {len(untracked)} parameters became trainable after the EMA was set up (e.g. "
                f"{untracked[0]}) and are not averaged; pass include_frozen=True when the trainable set changes "
                "during fit (e.g. HalfFineTuning(reselect='epoch'))"
            )
            self._warned_untracked = True

    # ---------------------------------------------------------------------------------------- evaluation

    def _swap_in(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not self.evaluate_ema or self._swapped is not None or (fitting and self.num_updates == 0):
            return
        _reshard(pl_module)
        pairs = _shadow_pairs(pl_module)
        with torch.no_grad():
            raw = [_exchange(_local(shadow), _local(param)) for shadow, param in pairs]
        self._swapped = (pairs, raw)

    def _swap_out(self, pl_module: LightningModule) -> None:
        if self._swapped is None:
            return
        _reshard(pl_module)
        pairs, raws = self._swapped
        with torch.no_grad():
            for (shadow, param), raw in zip(pairs, raws, strict=True):
                if raw is None:
                    _exchange(_local(shadow), _local(param))
                else:
                    _local(param).copy_(raw)
        self._swapped = None

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.swap_at_end or self.num_updates == 0:
            return
        _reshard(pl_module)
        with torch.no_grad():
            for shadow, param in _shadow_pairs(pl_module):
                _local(param).copy_(_local(shadow))

    # --------------------------------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_update_step": self._last_update_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self._last_update_step = state_dict["last_update_step"]

    def _on_load_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Make checkpoints with and without ``ema_shadow.*`` keys load into modules with and without a shadow."""
        head = f"{prefix}{SHADOW_ATTRIBUTE}."
        incoming = [key for key in state_dict if key.startswith(head)]
        shadow = getattr(module, SHADOW_ATTRIBUTE, None)
        if isinstance(shadow, EMAShadow):
            if not incoming:  # resuming a run made without ShardedEMA: start the EMA from the loaded weights
                rank_zero_warn("ShardedEMA: the checkpoint holds no EMA; it starts from the checkpoint's weights")
                for name, _ in shadow.named_buffers():
                    if prefix + name in state_dict:
                        state_dict[head + name] = state_dict[prefix + name]
            return
        for key in incoming:  # evaluation: the EMA values replace the weights (or are dropped)
            value = state_dict.pop(key)
            if self.evaluate_ema:
                state_dict[prefix + key[len(head) :]] = value
        if incoming and self.evaluate_ema:
            rank_zero_info(f"ShardedEMA: loaded the checkpoint's EMA weights ({len(incoming)} tensors)")

    def _load_ema_from_sharded_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluation from a DCP folder (FSDP2): the strategy loaded only the live keys; load the EMA into them."""
        path = trainer.ckpt_path
        if (
            trainer.state.fn == TrainerFn.FITTING
            or not self.evaluate_ema
            or isinstance(getattr(pl_module, SHADOW_ATTRIBUTE, None), EMAShadow)
            or path is None
            or not Path(path).is_dir()
        ):
            return
        from torch.distributed.checkpoint import FileSystemReader, load

        head = f"state_dict.{SHADOW_ATTRIBUTE}."
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        names = [key[len(head) :] for key in metadata if key.startswith(head)]
        if not names:
            return
        params = dict(pl_module.named_parameters())
        _reshard(pl_module)
        load({"state_dict": {f"{SHADOW_ATTRIBUTE}.{n}": params[n].detach() for n in names}}, checkpoint_id=path)
        rank_zero_info(f"ShardedEMA: loaded the checkpoint's EMA weights ({len(names)} tensors)")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load_ema_from_sharded_checkpoint(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load_ema_from_sharded_checkpoint(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load_ema_from_sharded_checkpoint(trainer, pl_module)


def _float32_copy(param: Tensor) -> Tensor:
    """A detached copy in at least float32 (a DTensor stays a DTensor with the same placements)."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    value = param.detach()
    return value.to(dtype) if value.dtype != dtype else value.clone()


def _shadow_pairs(pl_module: LightningModule) -> list[tuple[Tensor, Tensor]]:
    """``(shadow buffer, live parameter)`` pairs, looked up by name (objects may change when a module is moved)."""
    shadow = getattr(pl_module, SHADOW_ATTRIBUTE, None)
    if not isinstance(shadow, EMAShadow):
        return []
    params = dict(pl_module.named_parameters())
    return [(buffer, params[name]) for name, buffer in shadow.named_buffers()]
