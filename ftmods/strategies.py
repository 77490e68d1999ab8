"""Strategy presets that Lightning has no alias for."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override


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
