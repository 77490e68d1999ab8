"""Token-level helpers: masked reductions, label shifting, packed-segment ids."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; entries with an empty mask give 0, not NaN.

    Args:
        values: Any shape.
        mask: Boolean or 0/1 tensor broadcastable to ``values``.
        dim: Dimension(s) to reduce; ``None`` reduces everything.

    Example:
        >>> masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]))
        tensor(1.5000)
    """
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def next_token_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Align labels with the logits that predict them: ``targets[:, t] = labels[:, t + 1]``.

    The last position has no next token and gets ``ignore_index``. In a packed row the first label of every segment
    must already be ``ignore_index`` (the collate does this), so no position predicts across a segment boundary.

    Example:
        >>> next_token_targets(torch.tensor([[5, 6, 7]]))
        tensor([[   6,    7, -100]])
    """
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)  # (B, 1)
    return torch.cat([labels[..., 1:], pad], dim=-1)  # (B, T)


def supervised_positions(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sequence positions whose logits are needed: those predicting a supervised label in at least one row.

    Position ``t`` predicts ``labels[:, t + 1]``. Never empty (position 0 stands in when nothing is supervised, so the
    loss keeps a graph and is 0). Compute it on the CPU before the batch moves: ``nonzero`` syncs a GPU.

    Example:
        >>> supervised_positions(torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]]))
        tensor([0, 1, 2])
    """
    keep = (next_token_targets(labels, ignore_index) != ignore_index).any(0).nonzero().flatten()  # (K,)
    return keep if keep.numel() else labels.new_zeros(1)


def segment_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """Number the packed sequences of each row: a new segment starts wherever ``position_ids`` is 0.

    Segment ids are unique across the whole batch (row-major), starting at 0.

    Example:
        >>> segment_ids_from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
        tensor([[0, 0, 0, 1, 1],
                [2, 2, 3, 3, 3]])
    """
    starts = (position_ids == 0).long()  # (B, T)
    starts[:, 0] = 1  # a row always begins a segment
    return starts.flatten().cumsum(0).view_as(position_ids) - 1  # (B, T)


def split_prompt_and_target(
    input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> list[tuple[Tensor, Tensor]]:
    """Cut each example of a batch into (prompt ids, supervised target ids) at its first supervised label.

    Padded batches hold one example per row (padding carries ``ignore_index`` labels). Packed rows (``position_ids``
    given) hold several, each starting where ``position_ids`` is 0. Examples with no supervised label are skipped;
    for a multi-turn example the prompt is everything before the first supervised token.

    Example:
        >>> split_prompt_and_target(torch.tensor([[7, 8, 9, 0]]), torch.tensor([[-100, -100, 9, -100]]))
        [(tensor([7, 8]), tensor([9]))]
    """
    if position_ids is None:
        segments = [(input_ids[row], labels[row]) for row in range(input_ids.shape[0])]
    else:
        ids = segment_ids_from_position_ids(position_ids).flatten()  # (B*T,)
        flat_ids, flat_labels = input_ids.flatten(), labels.flatten()
        segments = [(flat_ids[ids == s], flat_labels[ids == s]) for s in torch.unique(ids).tolist()]
    out = []
    for ids_row, labels_row in segments:
        supervised = (labels_row != ignore_index).nonzero().flatten()  # (S,)
        if supervised.numel():
            out.append((ids_row[: supervised[0]], labels_row[supervised]))
    return out
