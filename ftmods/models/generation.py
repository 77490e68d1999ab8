"""Batched greedy or sampled generation from token-id prompts of different lengths."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def left_pad(prompts: list[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Stack 1-D prompts into ``(B, P)`` ids and attention mask, padded on the left (what ``generate`` expects).

    Example:
        >>> ids, mask = left_pad([torch.tensor([5, 6]), torch.tensor([7])], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=prompts[0].device)  # (B, P)
    mask = torch.zeros_like(ids)  # (B, P)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[Tensor],
    *,
    max_new_tokens: int = 64,
    stop_strings: list[str] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate a continuation of each prompt and decode only the new tokens (special tokens skipped).

    ``stop_strings`` end a sequence early once its text contains one of them (the text is returned uncut).

    Greedy unless ``generate_kwargs`` say otherwise (e.g. ``do_sample=True, temperature=1.0``). The model is put in
    eval mode for the call and restored afterwards. Under FSDP every rank must call this (generation runs forwards).
    """
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    generate_kwargs.setdefault("do_sample", False)
    if stop_strings:
        generate_kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **generate_kwargs,
        )  # (B, P + N)
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
