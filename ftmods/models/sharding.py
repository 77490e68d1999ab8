"""Sharding of Hugging Face models: FSDP2 (``torch.distributed.fsdp.fully_shard``) and helpers for FSDP1 / ZeRO-3."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn


def transformer_layer_classes(model: Any) -> set[str]:
    """Class names of the repeated blocks, from transformers' ``_no_split_modules`` (looking through peft wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = getattr(base, "_no_split_modules", None) or []
    return set(names)


VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")
"""Attribute names of the vision encoder in transformers' VLMs (Qwen2-VL, LLaVA, Gemma3, ...)."""


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM (first module named ``visual``, ``vision_tower`` or ``vision_model``), or None."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            return module
    return None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor shard (FSDP2): every forward is then a collective of all ranks.

    Example:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def fully_shard_model(model: nn.Module, mesh: Any, *, reshard_after_forward: bool = True, **fsdp_kwargs: Any) -> int:
    """Shard every transformer block as its own FSDP2 unit, then the root (embeddings, head, norms).

    Args:
        model: A transformers model (optionally wrapped by peft).
        mesh: The 1-D data-parallel ``DeviceMesh`` (``self.device_mesh["data_parallel"]`` in a LightningModule).
        reshard_after_forward: Free gathered parameters after each block's forward (ZeRO-3 style); ``False`` keeps
            them until the backward (ZeRO-2 style, more memory, less communication).
        fsdp_kwargs: More ``fully_shard`` arguments, e.g. ``mp_policy``.

    Returns:
        The number of blocks sharded (a model without ``_no_split_modules`` is sharded as one unit: 0).
    """
    from torch.distributed.fsdp import fully_shard

    classes = transformer_layer_classes(model)
    # children before parents: fully_shard(parent) takes every parameter not yet sharded (diffusers' UNet lists
    # CrossAttnUpBlock2D, which contains ResnetBlock2D); reversed pre-order visits a module after its descendants
    blocks = [m for m in reversed(list(model.modules())) if type(m).__name__ in classes and m is not model]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    return len(blocks)


def gather_root(model: nn.Module) -> bool:
    """Prepare an FSDP2-sharded model for calls that do not start with its forward (``generate`` of a VLM).

    transformers (5.x) encodes the images of a VLM in ``generate`` before the first forward, i.e. it calls the vision
    tower directly: FSDP2 would then take a vision block for the root and fail once the real root runs. This runs the
    root's lazy initialisation first and gathers the root unit's parameters (embeddings, head, the tower's patch
    embedding and merger); sharded blocks still gather their own in their forwards. Undo with ``model.reshard()``.

    Returns:
        Whether ``model`` is an FSDP2 module (and was gathered).
    """
    if not (hasattr(model, "unshard") and hasattr(model, "_get_fsdp_state")):
        return False
    fsdp: Any = model
    fsdp._get_fsdp_state()._lazy_init()  # private in torch 2.x; idempotent
    fsdp.unshard()
    return True


def uses_fsdp1(trainer: Any) -> bool:
    """Whether ``trainer`` runs Lightning's ``FSDPStrategy`` (FSDP1, e.g. ``BlockFSDPStrategy``), wrapped yet or not."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def fsdp1_root(trainer: Any) -> Any:
    """The root ``FullyShardedDataParallel`` unit of an FSDP1 run (the wrapped LightningModule), else ``None``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = getattr(getattr(trainer, "strategy", None), "model", None)
    return root if isinstance(root, FullyShardedDataParallel) else None


@contextlib.contextmanager
def fsdp1_root_gathered(trainer: Any) -> Iterator[None]:
    """Gather FSDP1's root parameters for model calls made outside Lightning's ``*_step`` hooks.

    Under FSDP1 the root unit is the whole LightningModule, and it owns the parameters outside the wrapped blocks
    (embeddings, final norm, head; a UNet's stem and time embedding). Lightning unshards them around
    ``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step`` (its forward redirection); a forward
    from another hook (``on_fit_start``, ``on_train_end``, a callback) would see their flat shards. Inside this context
    they are full (read-only: ``writeback=False``); the blocks still gather their own in their forwards. Every rank
    must enter it (a collective). A no-op for other strategies, and inside a step, where they are already gathered.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    root = fsdp1_root(trainer)
    if root is None or root.training_state != TrainingState.IDLE:
        yield
        return
    with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False):
        yield


def forward_is_collective(trainer: Any, model: nn.Module) -> bool:
    """Whether every forward of ``model`` is a collective of all ranks, so ``generate`` needs ``synced_gpus=True``.

    True with several ranks under FSDP2 (DTensor parameters), FSDP1 (``FSDPStrategy``) and DeepSpeed ZeRO-3.
    """
    if trainer is None or getattr(trainer, "world_size", 1) <= 1:
        return False
    if is_sharded(model) or fsdp1_root(trainer) is not None:
        return True
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return isinstance(strategy, DeepSpeedStrategy) and bool(getattr(strategy, "zero_stage_3", False))


FrozenParts = Callable[[nn.Module], Iterable[tuple[str, "nn.Module | None"]]]
"""``module -> [(state-dict prefix, part or None), ...]``: the parts that never train and are rebuilt on load."""


def drop_frozen_state(state_dict: dict[str, Any], prefixes: Iterable[str]) -> None:
    """Delete the keys under ``prefixes`` from ``state_dict`` (frozen parts left out of a checkpoint), in place.

    Example:
        >>> state = {"model.w": 1, "ref_model.w": 2}
        >>> drop_frozen_state(state, ["ref_model."]); state
        {'model.w': 1}
    """
    frozen = tuple(prefixes)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def fill_frozen_state(state_dict: dict[str, Any], parts: Iterable[tuple[str, nn.Module | None]]) -> None:
    """Put the live frozen parts' tensors back under their prefixes where ``state_dict`` lacks them, in place.

    Example:
        >>> state = {"model.weight": 0}
        >>> fill_frozen_state(state, [("ref.", nn.Linear(1, 1, bias=False)), ("gone.", None)]); sorted(state)
        ['model.weight', 'ref.weight']
    """
    for prefix, part in parts:
        if part is not None:
            for key, value in part.state_dict().items():
                state_dict.setdefault(prefix + key, value)


def _drop_hook(parts: FrozenParts, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    drop_frozen_state(state_dict, [prefix + p for p, part in parts(module) if part is not None])


def _fill_hook(parts: FrozenParts, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    fill_frozen_state(state_dict, [(prefix + p, part) for p, part in parts(module)])


def keep_frozen_parts_out_of_checkpoints(module: nn.Module, parts: FrozenParts) -> None:
    """Leave ``parts(module)`` out of ``module.state_dict()`` and restore them from the live parts on load.

    For FSDP2 and FSDP1: ``ModelParallelStrategy`` and ``FSDPStrategy`` save and load the module's own (sharded)
    state dict, so a ``LightningModule.on_save_checkpoint`` / ``on_load_checkpoint`` filter never reaches their
    loader (which then asks the checkpoint for the missing frozen keys). State-dict hooks do: frozen references, VAEs
    and text encoders are rebuilt from ``pretrained`` in ``configure_model`` and never written.
    """
    module.register_state_dict_post_hook(functools.partial(_drop_hook, parts))
    module.register_load_state_dict_pre_hook(functools.partial(_fill_hook, parts))
