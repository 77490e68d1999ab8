"""Real-size architectures with random weights, for GPU checks and benchmarks without downloads.

A reserved id ``random/<name>`` (see :data:`RANDOM_MODELS`) resolves, through
:func:`ftmods.models.tiny.resolve_pretrained` like the ``tiny/`` ids, to a cache folder holding that architecture's
published configuration with seeded random weights (saved in bfloat16 with ``save_pretrained``) and a tiny tokenizer /
processor. Every module then loads it through its ordinary ``from_pretrained`` path, so memory, throughput and
sharding behave as with the real checkpoint; only the outputs are meaningless. The tokenizers are the tiny ones (a
few hundred ids), so token ids stay far below the real vocabulary size, which the embedding and head keep.

| id | architecture | parameters |
| --- | --- | --- |
| ``random/qwen2.5-0.5b`` | ``Qwen2ForCausalLM`` as Qwen2.5-0.5B | 494,032,768 |
| ``random/llama-3.2-1b`` | ``LlamaForCausalLM`` as Llama-3.2-1B | 1,235,814,400 |
| ``random/qwen2-vl-2b`` | ``Qwen2VLForConditionalGeneration`` as Qwen2-VL-2B | 2,208,985,600 |
| ``random/sd-1.5`` | Stable Diffusion 1.5 (UNet, VAE, CLIP ViT-L/14 text encoder) | 859,520,964 (UNet) |

Example::

    python cli.py fit -c configs/sft/qwen2.5-0.5b.yaml --model.init_args.pretrained random/qwen2.5-0.5b
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftmods.models.tiny import build_tiny_causal_lm, build_tiny_sd_pipeline, build_tiny_vlm

__all__ = ["ARCH_VERSION", "RANDOM_MODELS", "RANDOM_PREFIX", "SPECS", "random_model_dir"]

RANDOM_PREFIX = "random/"
"""Prefix of the reserved real-architecture ids."""

ARCH_VERSION = 1
"""Version of these builders (part of the cache folder name): bump it whenever a spec changes."""

QWEN2_5_0_5B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "tie_word_embeddings": True,
}
"""``Qwen/Qwen2.5-0.5B`` ``config.json`` (the fields that set shape and positions)."""

LLAMA_3_2_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}
"""``meta-llama/Llama-3.2-1B`` ``config.json`` (the fields that set shape and positions)."""

QWEN2_VL_2B_TEXT: dict[str, Any] = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
}
"""``Qwen/Qwen2-VL-2B-Instruct`` text model."""

QWEN2_VL_2B_VISION: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,  # merger output = text hidden size
    "num_heads": 16,
    "mlp_ratio": 4,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
"""``Qwen/Qwen2-VL-2B-Instruct`` vision tower (ViT-600M-like, 32 blocks)."""

SD_1_5_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
"""``stable-diffusion-v1-5`` UNet."""

SD_1_5_VAE: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
"""``stable-diffusion-v1-5`` VAE (8x downsampling)."""

SD_1_5_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
"""CLIP ViT-L/14 text encoder of ``stable-diffusion-v1-5``."""

SPECS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"kind": "causal_lm", "arch": "qwen2", "dims": QWEN2_5_0_5B},
    "llama-3.2-1b": {"kind": "causal_lm", "arch": "llama", "dims": LLAMA_3_2_1B},
    "qwen2-vl-2b": {"kind": "vlm", "text": QWEN2_VL_2B_TEXT, "vision": QWEN2_VL_2B_VISION},
    "sd-1.5": {"kind": "sd", "unet": SD_1_5_UNET, "vae": SD_1_5_VAE, "text": SD_1_5_TEXT},
}
"""What each ``random/<name>`` is built from."""

QWEN2_VL_PIXELS = (56 * 56, 28 * 28 * 1280)
"""``(min_pixels, max_pixels)`` of the random Qwen2-VL's processor: at most 1280 merged image tokens per image, as
the CLS-RL / R1-V scripts bound them (Qwen2-VL's own default allows 16384)."""


def _builder(name: str) -> Callable[[Path], Path]:
    spec = SPECS[name]

    def build(folder: Path) -> Path:
        if spec["kind"] == "causal_lm":
            return build_tiny_causal_lm(folder, arch=spec["arch"], dims=spec["dims"], dtype=torch.bfloat16)
        if spec["kind"] == "vlm":
            return build_tiny_vlm(
                folder, text=spec["text"], vision=spec["vision"], pixels=QWEN2_VL_PIXELS, dtype=torch.bfloat16
            )
        return build_tiny_sd_pipeline(
            folder, unet=spec["unet"], vae=spec["vae"], text=spec["text"], model_max_length=77, dtype=torch.bfloat16
        )

    build.__name__ = f"build_random_{name}"
    return build


RANDOM_MODELS: dict[str, Callable[[Path], Path]] = {name: _builder(name) for name in SPECS}
"""Reserved names (``random/<name>``) and their builders, ``builder(folder) -> folder``."""


def random_model_dir(name: str) -> Path:
    """Cache folder of ``random/<name>``: ``<ftmods cache>/random/<name>-v<ARCH_VERSION>``."""
    from ftmods.models.tiny import tiny_cache_dir

    return tiny_cache_dir() / "random" / f"{name}-v{ARCH_VERSION}"
