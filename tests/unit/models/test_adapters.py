"""adapters_disabled: the base model inside, every requires_grad flag as before afterwards."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ftmods.models.adapters import adapters_disabled


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _lora_net() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    for name, param in model.named_parameters():
        if ".b.lora_" in name:
            param.requires_grad_(False)  # as a freezing callback would: only the adapter of `a` trains
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_peft_itself_re_enables_frozen_adapters():
    """Why the helper exists: peft's own context turns the frozen adapter of `b` trainable again."""
    model = _lora_net()
    with model.disable_adapter():
        pass
    assert all(flag for name, flag in _flags(model).items() if "lora_" in name)


def _target(model: nn.Module, integration: str) -> nn.Module:
    """The PeftModel itself, or its inner model given diffusers' ``disable_adapters()`` / ``enable_adapters()``."""
    if integration == "peft_model":
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = model.base_model.model  # no disable_adapter context here
    layers = [m for m in inner.modules() if isinstance(m, BaseTunerLayer)]
    inner.disable_adapters = lambda: [m.enable_adapters(False) for m in layers]
    inner.enable_adapters = lambda: [m.enable_adapters(True) for m in layers]
    return inner


@pytest.mark.parametrize("integration", ["peft_model", "diffusers_style"])
def test_flags_survive_and_the_inside_is_the_base_model(integration):
    model, expected_model = _lora_net(), _lora_net()
    before = _flags(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        tuned = model(x)
        with adapters_disabled(_target(model, integration)) as reference:
            base = reference(x)
        restored = model(x)
        with expected_model.disable_adapter():
            expected = expected_model(x)
    assert _flags(model) == before  # the frozen adapter of `b` stays frozen
    assert torch.equal(base, expected)  # inside: the frozen base model
    assert not torch.allclose(base, tuned)  # init_lora_weights=False: the adapters change the output
    assert torch.equal(restored, tuned)  # adapters back on afterwards


def test_flags_are_restored_when_the_body_raises():
    model = _lora_net()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    assert _flags(model) == before
    assert not model.base_model.model.a._disable_adapters  # adapters enabled again
