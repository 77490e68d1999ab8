"""Strategy presets that Lightning has no alias for."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
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
    comes from the trainer's ``precision`` (``bf16-mixed`` / ``bf16-true``). On CPU processes (gloo) it runs too,
    in full precision: what the CPU tests use.

    Beyond ``FSDPStrategy``: ``gradient_clip_val`` (norm) works, through the root unit's ``clip_grad_norm_``; a
    LightningModule may list frozen parts to keep replicated outside FSDP in a ``fsdp_ignored_modules()`` method
    (PSO: VAE, text encoders, reward model); model calls outside the ``*_step`` hooks gather the root unit's own
    parameters with :func:`ftmods.models.sharding.fsdp1_root_gathered`; exports gather the full state dict
    (:class:`ftmods.callbacks.PretrainedExport`).

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
    def setup(self, trainer: Any) -> None:
        module = trainer.lightning_module
        if trainer.training and not module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(module).__name__} optimizes manually inside training_step (LocFT, online PSO): FSDP1 "
                "(BlockFSDPStrategy, configs/strategy/fsdp.yaml) ends its backward passes only when the step returns, "
                "so its units would be left mid-backward. Use configs/strategy/fsdp2_model_parallel.yaml (FSDP2), "
                "a DeepSpeed snippet or ddp.yaml instead."
            )
        super().setup(trainer)
        root: Any = self.model

        def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
            root.clip_grad_norm_(clip_val)  # the norm over all ranks' shards

        # Lightning's FSDPPrecision refuses `gradient_clip_val` with the (default) norm algorithm; the root unit's
        # clip_grad_norm_ is the FSDP way, so configs that clip keep working under this strategy
        self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.resolve_policies(model)
        ignored = list(getattr(model, "fsdp_ignored_modules", list)())
        if ignored and "ignored_modules" not in self.kwargs:  # replicated, frozen parts (e.g. PSO's VAE, reward)
            for module in ignored:
                module.to(self.root_device)  # FSDP moves only what it manages
            self.kwargs["ignored_modules"] = ignored
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        return self._setup_model_on_cpu(model)

    def _setup_model_on_cpu(self, model: nn.Module) -> nn.Module:
        """``FSDPStrategy._setup_model`` with ``device_id=cpu``.

        Lightning passes the device *index*, which is ``None`` on CPU, and FSDP then looks for an accelerator. With the
        gloo backend FSDP1 runs on CPU processes (the tests).
        """
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
