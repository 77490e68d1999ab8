"""Disable LoRA adapters for a reference pass without touching which parameters train."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its adapters disabled (the frozen base model), every ``requires_grad`` flag as before on exit.

    peft's ``enable_adapters`` (which ``PeftModel.disable_adapter()`` and diffusers' ``enable_adapters()`` call on
    exit) sets ``requires_grad=True`` on every weight of the active adapter. That silently undoes a freezing callback
    (``ParameterFreezing`` / ``HalfFineTuning`` on a LoRA run), and under DDP gives gradients to parameters the DDP
    wrapper did not register, so ranks would drift apart. Here the flags are recorded first and restored after.

    Args:
        model: A ``PeftModel`` (``disable_adapter()`` context) or a model with ``disable_adapters()`` /
            ``enable_adapters()`` (diffusers / transformers peft integration).

    Example::

        with adapters_disabled(self.model) as reference:
            ref_logits = reference(**inputs).logits
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        peft_model: Any = model
        if hasattr(peft_model, "disable_adapter"):  # peft.PeftModel
            with peft_model.disable_adapter():
                yield model
        else:
            peft_model.disable_adapters()
            try:
                yield model
            finally:
                peft_model.enable_adapters()
    finally:
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
