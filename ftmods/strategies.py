"""Strategy presets that Lightning has no alias for."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ftmods.models.sharding import transformer_layer_classes


class FSDP2Strategy(ModelParallelStrategy):
    """Pure FSDP2 (``fully_shard``, DTensor parameters): every process is a data-parallel shard, no tensor parallelism.

    ``ModelParallelStrategy`` resolves ``data_parallel_size="auto"`` to the number of *nodes*, which is what 2-D
    (FSDP x TP) training wants; for FSDP alone the data-parallel size must be the world size, whatever the number of
    devices or nodes. Modules shard themselves in ``configure_model`` with ``self.device_mesh["data_parallel"]``
    (ftmods modules do). Runs on CPU with the gloo backend too.

    Args:
        save_distributed_checkpoint: Each rank writes its shard (a checkpoint *folder*); ``False`` gathers a single
            full checkpoint file on rank 0.
        process_group_backend: ``nccl``, ``gloo``, ...; default chosen by the accelerator.
        timeout: Collective timeout.

    Example::

        trainer:
          strategy: {class_path: ftmods.strategies.FSDP2Strategy}
          devices: 8
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(seconds=1800),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
            **kwargs,
        )

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The classes of the repeated blocks inside ``module``.

    Every submodule whose class is listed in the ``_no_split_modules`` of a transformers / diffusers model found
    anywhere inside (through peft wrappers), e.g. ``{LlamaDecoderLayer}`` for an ``SFTModule`` and
    ``{BasicTransformerBlock, ResnetBlock2D, ...}`` for a UNet.

    Example:
        >>> block_classes(nn.Linear(2, 2))
        set()
    """
    names: set[str] = set()
    for sub in module.modules():
        names |= transformer_layer_classes(sub)
    return {type(m) for m in module.modules() if type(m).__name__ in names}


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) with the wrap and checkpoint policies taken from the model itself.

    ``FSDPStrategy`` wants ``auto_wrap_policy={LlamaDecoderLayer}`` in Python, which a YAML file shared by every method
    cannot name. This subclass finds the block classes when the model is wrapped (:func:`block_classes`: the model's
    ``_no_split_modules``), so one config fits Llama, Qwen2, Qwen2-VL, Mistral and diffusers UNets: each block is
    one FSDP unit (``wrap_blocks``) and, with ``checkpoint_blocks``, recomputed in the backward (activation
    checkpointing). An explicit ``auto_wrap_policy`` / ``activation_checkpointing_policy`` still wins. Everything
    else is ``FSDPStrategy``'s (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``, ...); mixed precision
    comes from the trainer's ``precision`` (``bf16-mixed`` / ``bf16-true``). FSDP1 needs CUDA.

    Args:
        wrap_blocks: One FSDP unit per block (default); ``False``: the model as a single unit.
        checkpoint_blocks: Activation checkpointing per block.
        kwargs: ``FSDPStrategy`` arguments.

    Example::

        trainer:
          strategy:
            class_path: ftmods.strategies.BlockFSDPStrategy
            init_args: {sharding_strategy: FULL_SHARD, checkpoint_blocks: true, state_dict_type: sharded}
          precision: bf16-mixed
    """

    def __init__(self, wrap_blocks: bool = True, checkpoint_blocks: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wrap_blocks, self.checkpoint_blocks = wrap_blocks, checkpoint_blocks

    def resolve_policies(self, model: nn.Module) -> set[type[nn.Module]]:
        """Set the wrap / checkpoint policies from ``model``'s blocks (unless given explicitly); return the classes."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = block_classes(model)
        if not classes:
            if self.wrap_blocks or self.checkpoint_blocks:
                rank_zero_warn(f"BlockFSDPStrategy: no block classes in {type(model).__name__}; one FSDP unit")
            return classes
        if self.wrap_blocks and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self.checkpoint_blocks and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)}
        return classes

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.resolve_policies(model)
        return super()._setup_model(model)
