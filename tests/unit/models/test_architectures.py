"""Real-size random architectures (``random/<name>``): each spec has its published parameter count, unknown names are
refused, and one is built, cached and loaded back through ``from_pretrained`` (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    AutoModelForCausalLM,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from ftmods.models import architectures as arch
from ftmods.models.loading import load_causal_lm, load_tokenizer
from ftmods.models.tiny import resolve_pretrained


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


@pytest.mark.parametrize(
    ("config", "published"),
    [
        (lambda: Qwen2Config(**arch.QWEN2_5_0_5B), 494_032_768),  # Qwen2.5-0.5B
        (lambda: LlamaConfig(**arch.LLAMA_3_2_1B), 1_235_814_400),  # Llama-3.2-1B
    ],
    ids=["qwen2.5-0.5b", "llama-3.2-1b"],
)
def test_language_models_have_the_published_size(config, published):
    with torch.device("meta"):
        assert _count(AutoModelForCausalLM.from_config(config())) == published


def test_qwen2_vl_2b_has_the_published_size():
    config = Qwen2VLConfig(text_config=arch.QWEN2_VL_2B_TEXT, vision_config=arch.QWEN2_VL_2B_VISION)
    with torch.device("meta"):
        assert _count(Qwen2VLForConditionalGeneration(config)) == 2_208_985_600  # Qwen2-VL-2B-Instruct


def test_sd_1_5_components_have_the_published_sizes():
    """UNet 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text encoder 123,060,480 (stable-diffusion-v1-5)."""
    with torch.device("meta"):
        assert _count(UNet2DConditionModel(**arch.SD_1_5_UNET)) == 859_520_964
        assert _count(AutoencoderKL(**arch.SD_1_5_VAE)) == 83_653_863
        assert _count(CLIPTextModel(CLIPTextConfig(**arch.SD_1_5_TEXT))) == 123_060_480


def test_every_spec_has_a_builder_and_unknown_names_are_refused():
    assert set(arch.RANDOM_MODELS) == set(arch.SPECS) == {"qwen2.5-0.5b", "llama-3.2-1b", "qwen2-vl-2b", "sd-1.5"}
    with pytest.raises(ValueError, match=r"unknown random model 'random/gpt-5'.*random/qwen2\.5-0\.5b"):
        resolve_pretrained("random/gpt-5")


@pytest.mark.slow
def test_random_qwen2_5_0_5b_is_built_once_and_loads_through_from_pretrained():
    """Seeded random weights saved in bf16 (about 1 GB), then the ordinary loading path; a second resolve reuses it."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    path = Path(resolve_pretrained("random/qwen2.5-0.5b"))
    assert path == arch.random_model_dir("qwen2.5-0.5b")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_pretrained("random/qwen2.5-0.5b") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    model = load_causal_lm("random/qwen2.5-0.5b")
    assert _count(model) == 494_032_768
    assert next(model.parameters()).dtype == torch.float32  # loads in the dtype asked for (default), not the saved one
    tokenizer = load_tokenizer("random/qwen2.5-0.5b")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()
    torch.set_num_threads(1)
