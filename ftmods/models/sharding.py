"""FSDP2 sharding of Hugging Face models (``torch.distributed.fsdp.fully_shard``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def transformer_layer_classes(model: Any) -> set[str]:
    """Class names of the repeated blocks, from transformers' ``_no_split_modules`` (looking through peft wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = getattr(base, "_no_split_modules", None) or []
    return set(names)


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
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    return len(blocks)
