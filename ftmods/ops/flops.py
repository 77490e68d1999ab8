"""Model FLOPs of decoder-only transformers, for throughput and MFU (model FLOPs utilization).

The count follows PaLM's definition of MFU (Chowdhery et al. 2022, appendix B): only matrix products of the model
are counted, a multiply-add is 2 FLOPs, the backward pass costs twice the forward pass, and attention is counted
over each whole sequence (no saving for the causal mask). Recomputation by gradient checkpointing is *not* counted
(that would be hardware FLOPs utilization), nor are norms, activations, softmax or the optimizer. Frozen weights
(LoRA, partial freezing) skip their weight gradients, so the same count overstates the work of such runs.

For a sequence of ``n`` real tokens (a padded row, or one of the sequences packed in a row; padding excluded) of
a model with ``N`` matrix parameters (:func:`matmul_params`: attention and MLP projections of every layer plus the
output head; embeddings are lookups), ``L`` layers and query width ``Q = heads * head_dim``::

    forward  = 2 * N * n + 4 * L * Q * n**2      # QK^T and AV: 2 * Q * n FLOPs each per token
    training = 3 * forward = 6 * N * n + 12 * L * Q * n**2

Example::

    shape = DecoderShape.from_config(model.config)
    flops = train_flops(shape, sequence_lengths_of(batch))
    print(mfu(flops, seconds=step_time, peak_flops=989e12))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ftmods.ops.tokens import segment_ids_from_position_ids

__all__ = ["DecoderShape", "forward_flops", "matmul_params", "mfu", "sequence_lengths_of", "train_flops"]

GATED_MLP_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"})
"""Model types whose MLP has three projections (gate, up, down) instead of two."""

PLAIN_MLP_TYPES = frozenset({"gpt2", "gpt_neox", "opt", "gptj", "falcon", "phi"})
"""Model types whose MLP has two projections (up, down)."""


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that set a decoder-only transformer's FLOPs.

    Args:
        layers: Number of transformer blocks.
        hidden: Residual width.
        heads: Query heads.
        kv_heads: Key / value heads (grouped-query attention: fewer than ``heads``).
        head_dim: Width of one head.
        intermediate: MLP inner width.
        vocab: Output vocabulary (the head is ``hidden x vocab``, tied or not).
        gated_mlp: Three MLP projections (SwiGLU-style) instead of two.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """Read the shape from a ``transformers`` config (its ``text_config`` for vision-language models).

        Raises:
            ValueError: The config is not a decoder-only architecture whose MLP layout is known here.
        """
        text = getattr(config, "text_config", None) or config
        model_type = str(getattr(text, "model_type", ""))
        base_type = model_type.removesuffix("_text")
        gated = True if base_type in GATED_MLP_TYPES or base_type.startswith("qwen2") else None
        gated = False if base_type in PLAIN_MLP_TYPES else gated
        if gated is None:
            raise ValueError(
                f"cannot count FLOPs of model_type {model_type!r}: known decoder types are "
                f"{sorted(GATED_MLP_TYPES | PLAIN_MLP_TYPES)} (and qwen2* variants)"
            )

        def field(*names: str) -> Any:
            for name in names:
                value = getattr(text, name, None)
                if value is not None:
                    return value
            raise ValueError(f"model_type {model_type!r} config has none of the fields {names}")

        hidden = int(field("hidden_size", "n_embd", "d_model"))
        heads = int(field("num_attention_heads", "n_head"))
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        return cls(
            layers=int(field("num_hidden_layers", "n_layer")),
            hidden=hidden,
            heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate=int(intermediate),
            vocab=int(field("vocab_size")),
            gated_mlp=gated,
        )

    @property
    def query_width(self) -> int:
        """``heads * head_dim``: the width of the attention products."""
        return self.heads * self.head_dim


def matmul_params(shape: DecoderShape) -> int:
    """Parameters used in matrix products per token: q, k, v, o and MLP projections of every layer, plus the head.

    Embedding lookups, norms and biases are not counted; a tied head counts once, as a product.
    """
    q, kv = shape.query_width, shape.kv_heads * shape.head_dim
    attention = shape.hidden * q + 2 * shape.hidden * kv + q * shape.hidden
    mlp = (3 if shape.gated_mlp else 2) * shape.hidden * shape.intermediate
    return shape.layers * (attention + mlp) + shape.hidden * shape.vocab


def _lengths(row_lengths: Tensor | Iterable[int]) -> list[int]:
    if isinstance(row_lengths, Tensor):
        return [int(n) for n in row_lengths.reshape(-1).tolist()]
    return [int(n) for n in row_lengths]


def forward_flops(shape: DecoderShape, row_lengths: Tensor | Iterable[int]) -> int:
    """FLOPs of one forward pass over rows of the given real-token lengths (see the module docstring)."""
    params, attention = matmul_params(shape), 4 * shape.layers * shape.query_width
    return sum(2 * params * n + attention * n * n for n in _lengths(row_lengths))


def train_flops(shape: DecoderShape, row_lengths: Tensor | Iterable[int]) -> int:
    """FLOPs of a forward and backward pass (3x the forward) over rows of the given real-token lengths."""
    return 3 * forward_flops(shape, row_lengths)


def mfu(flops: float, seconds: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the peak FLOP/s of all ``devices``.

    Raises:
        ValueError: ``seconds`` or ``peak_flops`` is not positive.
    """
    if seconds <= 0 or peak_flops <= 0 or devices <= 0:
        raise ValueError(f"seconds, peak_flops and devices must be positive, got {seconds}, {peak_flops}, {devices}")
    return float(flops) / seconds / (peak_flops * devices)


def sequence_lengths_of(batch: Any) -> Tensor | None:
    """Real tokens of each attended sequence of a tokenized batch (``None`` if it holds no token ids).

    Rows are cut into packed sequences where ``position_ids`` restarts at 0 (each attends only to itself); padding
    (``attention_mask`` 0) counts for nothing. Without a mask every position of ``input_ids`` counts.

    Example:
        >>> sequence_lengths_of({"input_ids": torch.ones(2, 5, dtype=torch.long),
        ...                      "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        ...                      "position_ids": torch.tensor([[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])})
        tensor([2, 2, 5])
    """
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), Tensor):
        return None
    ids: Tensor = batch["input_ids"]
    if ids.dim() != 2:
        return None
    mask = batch.get("attention_mask")
    weights = mask.detach().to("cpu", torch.long) if isinstance(mask, Tensor) else torch.ones_like(ids, device="cpu")
    positions = batch.get("position_ids")
    if isinstance(positions, Tensor) and positions.shape == ids.shape:
        segments = segment_ids_from_position_ids(positions.detach().to("cpu"))
    else:
        segments = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    lengths = torch.bincount(segments.flatten(), weights=weights.flatten().double()).long()
    return lengths[lengths > 0]
