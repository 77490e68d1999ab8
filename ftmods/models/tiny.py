"""Tiny random-weight models built in code, for offline tests and CPU ``tiny.yaml`` configs.

Every builder creates a model with deterministic random weights (no downloads), writes it with ``save_pretrained``
into a folder and returns that folder, so callers load it back through the ordinary ``from_pretrained`` path, exactly
like a hub checkpoint.

Reserved ids of the form ``tiny/<name>`` (see :data:`TINY_MODELS`) are turned into such folders by
:func:`resolve_pretrained`, which builds each model once into a cache folder, safely under several processes.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained("tiny/causal-lm")  # builds on first use, then reuses the cache
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

__all__ = [
    "BUILDER_VERSION",
    "CHATML_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN2_VL_TEMPLATE",
    "TINY_MODELS",
    "TINY_PREFIX",
    "build_tiny_causal_lm",
    "build_tiny_chat_tokenizer",
    "build_tiny_clip",
    "build_tiny_clip_tokenizer",
    "build_tiny_sd_pipeline",
    "build_tiny_vlm",
    "is_tiny_id",
    "resolve_pretrained",
    "tiny_cache_dir",
    "tiny_model_dir",
]

TINY_PREFIX = "tiny/"
"""Prefix of the reserved model ids handled by :func:`resolve_pretrained`."""

BUILDER_VERSION = 1
"""Version of the builders; bump it whenever a builder's output changes (it is part of the cache folder name)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""System turn inserted by the ChatML templates when the conversation has none (as Qwen2 / Qwen2.5 do)."""

# ----------------------------------------------------------------------------------------------------------------------
# Chat templates (ChatML, like Qwen2.5 / Qwen2-VL), with {% generation %} markers around the assistant content.
# ----------------------------------------------------------------------------------------------------------------------

_IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
_VIDEO_PART = "<|vision_start|><|video_pad|><|vision_end|>"


def _chatml_template(*, vision: bool) -> str:
    r"""ChatML template; ``vision`` adds Qwen2-VL image and video parts.

    Messages are ``<|im_start|>{role}\n{content}<|im_end|>\n``. A default system turn is inserted when the first
    message is not a system message. Content is a string or a list of parts (``{"type": "text", "text": ...}``, and
    with ``vision`` also ``{"type": "image"}`` / ``{"type": "video"}``). The assistant content together with its
    ``<|im_end|>`` is wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask`` marks exactly those tokens;
    the ``<|im_start|>assistant\n`` header and the trailing newline stay outside.
    """
    part = "{%- if 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    if vision:
        part = (
            "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
            f"{{{{- '{_IMAGE_PART}' -}}}}"
            "{%- elif part['type'] == 'video' or 'video' in part -%}"
            f"{{{{- '{_VIDEO_PART}' -}}}}"
            "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
        )
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{- content -}}"
        "{%- else -%}{%- for part in content -%}" + part + "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        f"{{{{- '<|im_start|>system\\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\\n' -}}}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{{- render(message['content']) + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


CHATML_TEMPLATE = _chatml_template(vision=False)
"""ChatML chat template of the tiny text models (string content or text parts)."""

QWEN2_VL_TEMPLATE = _chatml_template(vision=True)
"""Qwen2-VL style chat template of the tiny VLM (adds image and video parts)."""

_TEXT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ----------------------------------------------------------------------------------------------------------------------
# Training corpus of the byte-level BPE: a few hundred short task strings.
# ----------------------------------------------------------------------------------------------------------------------

_CLASS_NAMES = (
    "cat", "dog", "bird", "horse", "deer", "frog", "airplane", "car", "ship", "truck",
    "flower", "rose", "tulip", "daisy", "pizza", "sushi", "burger", "apple", "banana", "forest",
    "river", "mountain", "beach", "desert", "highway", "industrial", "pasture", "residential", "sea lake", "crop",
)  # fmt: skip
_WORDS = (
    "positive", "negative", "neutral", "true", "false", "yes", "no", "correct", "wrong", "great",
    "terrible", "good", "bad", "happy", "sad", "movie", "film", "book", "food", "service",
)  # fmt: skip
_SENTENCES = (
    "You are a helpful assistant.",
    "The answer is",
    "The sentiment is",
    "Classify the sentiment of the review.",
    "What is in the image?",
    "What type of object is in this photo?",
    "Please directly output the answer.",
    "Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    "<think> The image shows a small animal. </think> <answer> cat </answer>",
    "Input: the movie was great\nOutput: positive",
    "Input: the food was terrible\nOutput: negative",
    "Question: what is 3 + 4?\nAnswer: 7",
    "Translate to French: hello -> bonjour",
    "Let me think step by step.",
    "system",
    "user",
    "assistant",
    "a photo of a dog",
    "a photo of a cat",
    "a painting of a mountain at sunset",
    "def add(a, b):\n    return a + b",
    "def is_even(n):\n    return n % 2 == 0",
    "for i in range(10):\n    print(i)",
    "if x > 0:\n    return True\nelse:\n    return False",
    "import torch\nx = torch.zeros(3)",
    "class Model:\n    def forward(self, x):\n        return x",
)


def _corpus() -> list[str]:
    """Deterministic BPE training corpus (numbers, arithmetic, sentences, labels, class names, code)."""
    corpus = list(_SENTENCES)
    corpus += [str(n) for n in range(101)]
    corpus += [f"{a} + {b} = {a + b}" for a in range(0, 20, 2) for b in range(1, 12, 3)]
    corpus += [f"{a} - {b} = {a - b}" for a in range(10, 30, 4) for b in range(0, 10, 3)]
    corpus += [f"{a} * {b} = {a * b}" for a in range(1, 10, 2) for b in range(1, 10, 2)]
    corpus += [f"The answer is {w}." for w in _WORDS + _CLASS_NAMES]
    labelled = (("great", "positive"), ("terrible", "negative"), ("good", "positive"), ("bad", "negative"))
    corpus += [f"This {noun} was {adj}. Sentiment: {label}" for noun in _WORDS[15:] for adj, label in labelled]
    corpus += [f"a photo of a {name}, a type of object." for name in _CLASS_NAMES]
    corpus += [f"<answer> {name} </answer>" for name in _CLASS_NAMES]
    return corpus


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Seed torch inside a forked RNG so the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_model(model: Any, path: Path) -> None:
    """``model.save_pretrained(path)`` on every rank.

    transformers 5.23 (``PreTrainedModel.should_save_on_this_rank``) silently skips writing weights on ranks other than
    0 once ``torch.distributed`` is initialised. A tiny build writes into a private temporary folder of its own
    process, so every rank that builds must write; otherwise a rank > 0 would publish a folder without weights.
    """
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(path)
    del model.should_save_on_this_rank


def _as_dir(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) if needed and return it as a ``Path``."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Id of a token that must be in the vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise KeyError(f"token {token!r} is not in the vocabulary")
    return token_id


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def build_tiny_chat_tokenizer(
    *,
    vocab_size: int = 400,
    extra_special_tokens: Sequence[str] = (),
    padding_side: Literal["left", "right"] = "right",
    chat_template: str = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with ChatML special tokens, trained on a built-in corpus of task strings.

    Special tokens get the first ids: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>`` (eos,
    id 2), then ``extra_special_tokens``. There is no bos token (ChatML has none) and no post-processor, so encoding
    adds no special tokens. The small corpus yields fewer merges than ``vocab_size``: size models from
    ``len(tokenizer)``.

    Args:
        vocab_size: Target vocabulary size of the BPE trainer (an upper bound).
        extra_special_tokens: Further special tokens (e.g. Qwen2-VL's vision tokens), kept whole and never split.
        padding_side: Padding side of the returned tokenizer (``"right"`` for training causal LMs, ``"left"`` for
            batched generation).
        chat_template: Jinja chat template stored with the tokenizer.

    Returns:
        The tokenizer (a ``TokenizersBackend`` in transformers 5, which ``AutoTokenizer`` reloads as the same class).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [*_TEXT_SPECIAL_TOKENS, *extra_special_tokens]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special,
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special if t not in ("<|endoftext|>", "<|im_end|>")],
        padding_side=padding_side,
        model_max_length=4096,
        chat_template=chat_template,
    )


def build_tiny_clip_tokenizer(*, model_max_length: int = 16) -> CLIPTokenizer:
    """Character-level CLIP tokenizer (no merges), as used by the tiny SD / SDXL pipelines and the tiny CLIP.

    The vocabulary has 514 entries: the 256 byte-level characters, the same with a ``</w>`` suffix, then
    ``<|startoftext|>`` (id 512, bos) and ``<|endoftext|>`` (id 513, eos, pad and unk).

    Args:
        model_max_length: Maximum sequence length, bos and eos included (must match the text encoder's positions).

    Returns:
        The tokenizer.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [f"{c}</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------------


def build_tiny_causal_lm(
    folder: str | Path,
    *,
    arch: Literal["llama", "qwen2"] = "llama",
    dims: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a tiny random causal LM (about 0.1 M parameters) and its ChatML tokenizer into ``folder``.

    Dimensions: hidden 64, intermediate 128, 2 layers, 4 attention heads, 2 KV heads, 4096 positions, tied
    embeddings, vocabulary ``len(tokenizer)``. ``eos`` is ``<|im_end|>``, ``pad`` is ``<|endoftext|>``, ``bos`` is
    None, in the config, the generation config and the tokenizer alike.

    Args:
        folder: Output folder (created if missing).
        arch: ``"llama"`` for ``LlamaForCausalLM`` or ``"qwen2"`` for ``Qwen2ForCausalLM``.
        dims: Config fields that replace the tiny ones (``ftmods.models.architectures`` builds real-size models so).
        dtype: Save the weights in this dtype (default float32).

    Returns:
        ``folder``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = _as_dir(folder)
    tokenizer = build_tiny_chat_tokenizer()
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **(dims or {}),
    }
    model: LlamaForCausalLM | Qwen2ForCausalLM
    with _seeded():
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**config))
        elif arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**config))
        else:
            raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    if dtype is not None:
        torch.nn.Module.to(model, dtype)  # (transformers' typing of PreTrainedModel.to confuses mypy)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save_model(model, path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_vlm(
    folder: str | Path,
    *,
    arch: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl",
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    pixels: tuple[int, int] = (56 * 56, 56 * 56),
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a tiny random Qwen2-VL (about 0.2 M parameters) and its ``Qwen2VLProcessor`` into ``folder``.

    The tokenizer is the tiny ChatML tokenizer plus ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>`` and
    ``<|video_pad|>``, with left padding for batched generation. The image processor bounds every image to about
    56 * 56 pixels (``min_pixels = max_pixels = 3136``): a 56x56 image becomes a 4x4 grid of 14-pixel patches, merged
    2x2 into 4 ``<|image_pad|>`` tokens. The language model has the causal LM's dimensions with M-RoPE sections
    (2, 3, 3); the vision tower has depth 2, embed dim 32, 4 heads and a merger to the text hidden size 64.

    ``arch="qwen2_5_vl"`` builds a Qwen2.5-VL instead (vision: hidden 32, MLP 64, merger output 64, window attention
    with a 56-pixel window, block 1 full attention) with the same tokenizer and processor.

    Args:
        folder: Output folder (created if missing).
        arch: ``qwen2_vl`` or ``qwen2_5_vl``.
        text: Text-model config fields that replace the tiny ones.
        vision: Vision config that replaces the tiny one.
        pixels: The image processor's ``(min_pixels, max_pixels)``.
        dtype: Save the weights in this dtype (default float32).

    Returns:
        ``folder``, loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor``. Note that in transformers 5 the
        forward pass with ``pixel_values`` also needs the processor's ``mm_token_type_ids``.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = _as_dir(folder)
    tokenizer = build_tiny_chat_tokenizer(
        extra_special_tokens=_VISION_SPECIAL_TOKENS, padding_side="left", chat_template=QWEN2_VL_TEMPLATE
    )
    bounds = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}  # default: 4 image tokens per image
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=bounds),
        video_processor=Qwen2VLVideoProcessor(
            size=bounds,
            cap_pixels_per_frame=True,  # the reference behaviour
        ),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_TEMPLATE,
    )
    config_cls: Any = Qwen2VLConfig
    model_cls: Any = Qwen2VLForConditionalGeneration
    vision_config: dict[str, Any] = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,  # merger output = text hidden size
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,  # merger output = text hidden size
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    config = config_cls(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},  # sums to 16/2
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **(text or {}),
        },
        vision_config=dict(vision) if vision is not None else vision_config,
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )
    with _seeded():
        model = model_cls(config)
    if dtype is not None:
        model.to(dtype)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save_model(model, path)
    processor.save_pretrained(path)
    return path


_TINY_CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "hidden_act": "gelu",
}


def build_tiny_sd_pipeline(
    folder: str | Path,
    *,
    xl: bool = False,
    unet: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    model_max_length: int = 16,
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a tiny random Stable Diffusion (or SDXL) pipeline into ``folder``.

    Components: a character-level CLIP tokenizer (16 positions), CLIP text encoder(s) of hidden size 32, a UNet with
    block channels (32, 64) and sample size 8, a 4-block VAE with 8x downsampling (64 px image <-> 8x8 latent) and an
    ``EulerAncestralDiscreteScheduler`` with trailing timestep spacing (SDXL-Turbo style: 4 steps are
    [999, 749, 499, 249]). No safety checker. SDXL adds a ``CLIPTextModelWithProjection`` (projection 32), the same
    tokenizer twice and the UNet's ``text_time`` conditioning.

    Args:
        folder: Output folder (created if missing).
        xl: Build a ``StableDiffusionXLPipeline`` instead of a ``StableDiffusionPipeline``.
        unet: ``UNet2DConditionModel`` arguments that replace the tiny ones (not with ``xl``).
        vae: ``AutoencoderKL`` arguments that replace the tiny ones.
        text: CLIP text config fields that replace the tiny ones.
        model_max_length: Token positions of the tokenizer (and the text encoders' default).
        dtype: Save the weights in this dtype (default float32).

    Returns:
        ``folder``, loadable with ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained`` or
        per component (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``, ...).
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = _as_dir(folder)
    tokenizer = build_tiny_clip_tokenizer(model_max_length=model_max_length)
    if xl and unet is not None:
        raise ValueError("unet overrides are for SD pipelines; SDXL is only built tiny")
    unet_xl = {
        "cross_attention_dim": 64,  # both text encoders' hidden states, concatenated: 32 + 32
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "transformer_layers_per_block": (1, 1),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 size/crop ids x 8 + pooled text embedding 32
    }
    unet_kwargs: dict[str, Any] = (
        dict(unet)
        if unet is not None
        else {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            **(unet_xl if xl else {"cross_attention_dim": 32, "attention_head_dim": 8}),
        }
    )
    vae_kwargs: dict[str, Any] = (
        dict(vae)
        if vae is not None
        else {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (8, 8, 8, 8),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 4,
        }
    )
    text_kwargs = {**_TINY_CLIP_TEXT, "max_position_embeddings": model_max_length, **(text or {})}
    with _seeded():
        unet_model = UNet2DConditionModel(**unet_kwargs)
        vae_model = AutoencoderKL(**vae_kwargs)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_kwargs, projection_dim=32)) if xl else None
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,  # what real SD checkpoints store; unused by "trailing" spacing
    )
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae_model,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet_model,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae_model,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet_model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if dtype is not None:
        pipe.to(dtype=dtype)  # type: ignore[union-attr]
    encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
    for encoder in encoders:  # transformers writes no weights on ranks > 0 (see _save_model): this build must
        encoder.should_save_on_this_rank = lambda is_main_process: True  # type: ignore[method-assign]
    pipe.save_pretrained(path)  # type: ignore[union-attr]  # diffusers' own annotations hide the method from mypy
    for encoder in encoders:
        del encoder.should_save_on_this_rank
    return path


def build_tiny_clip(folder: str | Path) -> Path:
    """Build a tiny random transformers ``CLIPModel`` and ``CLIPProcessor`` into ``folder`` (a reward-model stand-in).

    Text tower: the tiny CLIP text encoder of the SD pipeline (character-level tokenizer, 16 positions, hidden 32).
    Vision tower: image size 32, patch 8, hidden 32, 2 layers, 4 heads. Projection dimension 16. The image processor
    resizes and center-crops to 32x32 with the CLIP mean / std.

    Args:
        folder: Output folder (created if missing).

    Returns:
        ``folder``, loadable with ``CLIPModel`` / ``CLIPProcessor`` (or ``AutoModel`` / ``AutoProcessor``).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = _as_dir(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_tiny_clip_tokenizer(),
    )
    config = CLIPConfig(
        text_config=_TINY_CLIP_TEXT,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with _seeded():
        model = CLIPModel(config)
    _save_model(model, path)
    processor.save_pretrained(path)
    return path


OPEN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPEN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_open_clip(folder: str | Path) -> Path:
    """Build a tiny random OpenCLIP model into ``folder`` as an ``open_clip`` ``local-dir`` (a CLIP-score stand-in).

    Writes ``open_clip_config.json`` (``model_cfg``: embed dim 16; vision: image 32, patch 8, width 32, 2 layers;
    text: 16 positions, the standard 49,408-token BPE vocabulary (the tokenizer ships with open_clip), width 32, 2
    layers; ``preprocess_cfg``: the CLIP mean / std) and ``open_clip_model.safetensors``. About 1.6 M parameters.

    Args:
        folder: Output folder (created if missing).

    Returns:
        ``folder``; load with ``open_clip.create_model_and_transforms(f"local-dir:{folder}")``.
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    path = _as_dir(folder)
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    with _seeded():
        model = open_clip.CLIP(**config)
    preprocess = {"mean": list(OPEN_CLIP_MEAN), "std": list(OPEN_CLIP_STD)}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def _build_qwen2_lm(folder: Path) -> Path:
    """``tiny/qwen2-lm``: the tiny causal LM with the Qwen2 architecture."""
    return build_tiny_causal_lm(folder, arch="qwen2")


def _build_sdxl(folder: Path) -> Path:
    """``tiny/sdxl``: the tiny SDXL pipeline."""
    return build_tiny_sd_pipeline(folder, xl=True)


def _build_locft_toy(folder: Path) -> Path:
    """``tiny/locft-toy``: the toy-world Llama pre-trained on synthetic facts (``ftmods.models.toy_world``)."""
    from ftmods.models.toy_world import build_tiny_locft_toy  # imported lazily: toy_world imports this module

    return build_tiny_locft_toy(folder)


def _build_s3ft_toy(folder: Path) -> Path:
    """``tiny/s3ft-toy``: a word-level Llama pre-trained on two synthetic skills (``ftmods.models.s3ft_toy``)."""
    from ftmods.models.s3ft_toy import build_tiny_s3ft_toy  # imported lazily, like the LocFT toy

    return build_tiny_s3ft_toy(folder)


def _build_qwen2_5_vl(folder: Path) -> Path:
    return build_tiny_vlm(folder, arch="qwen2_5_vl")


def _build_shapes_vlm(folder: Path) -> Path:
    """``tiny/qwen2-vl-shapes``: the tiny Qwen2-VL warm-started on coloured shapes (``ftmods.models.shapes_toy``)."""
    from ftmods.models.shapes_toy import build_tiny_shapes_vlm

    return build_tiny_shapes_vlm(folder)


TINY_MODELS: dict[str, Callable[[Path], Path]] = {
    "causal-lm": build_tiny_causal_lm,
    "qwen2-lm": _build_qwen2_lm,
    "qwen2-vl": build_tiny_vlm,
    "qwen2-vl-shapes": _build_shapes_vlm,
    "qwen2.5-vl": _build_qwen2_5_vl,
    "sd": build_tiny_sd_pipeline,
    "sdxl": _build_sdxl,
    "clip": build_tiny_clip,
    "open-clip": build_tiny_open_clip,
    "locft-toy": _build_locft_toy,
    "s3ft-toy": _build_s3ft_toy,
}
"""Reserved names (``tiny/<name>``) and their builders, ``builder(folder) -> folder``."""

# ----------------------------------------------------------------------------------------------------------------------
# Reserved ids and the build cache
# ----------------------------------------------------------------------------------------------------------------------


def is_tiny_id(name: str) -> bool:
    """Whether ``name`` is a reserved tiny-model id, ``"tiny/<name>"`` with ``<name>`` a key of :data:`TINY_MODELS`.

    Args:
        name: A model name or path.

    Returns:
        True iff ``name`` starts with :data:`TINY_PREFIX` and the rest names a tiny model.
    """
    return name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX) :] in TINY_MODELS


def tiny_cache_dir() -> Path:
    """Root of ftmods' cache: ``$FTMODS_CACHE`` if set, else ``~/.cache/ftmods``.

    Tiny models are built under ``<root>/tiny/<name>-v<BUILDER_VERSION>`` (see :func:`tiny_model_dir`).

    Returns:
        The cache root (not created here).
    """
    root = os.environ.get("FTMODS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ftmods"


def tiny_model_dir(name: str) -> Path:
    """Cache folder of the tiny model ``name`` (a key of :data:`TINY_MODELS`), whether built yet or not.

    Args:
        name: Name of the tiny model, without the ``tiny/`` prefix.

    Returns:
        ``tiny_cache_dir() / "tiny" / f"{name}-v{BUILDER_VERSION}"``.
    """
    return tiny_cache_dir() / "tiny" / f"{name}-v{BUILDER_VERSION}"


def resolve_pretrained(name_or_path: str) -> str:
    """Turn a reserved ``tiny/<name>`` or ``random/<name>`` id into a local folder, building the model once.

    Anything else passes through. ``random/`` ids are real-size architectures (:mod:`ftmods.models.architectures`).

    The build goes into a fresh temporary folder next to the target, which is then renamed into place atomically, so
    a half-built model is never visible under the final name. When several processes (e.g. DDP ranks) resolve the
    same id at once, each may build, the first rename wins and the others discard their copy and use the winner's.

    Args:
        name_or_path: A hub id, a local path or a tiny id such as ``"tiny/causal-lm"``.

    Returns:
        The cached folder (as a string) for a tiny id, otherwise ``name_or_path`` unchanged.

    Raises:
        ValueError: If ``name_or_path`` starts with ``tiny/`` or ``random/`` but names no such model.
    """
    if name_or_path.startswith("random/"):
        from ftmods.models.architectures import RANDOM_MODELS, random_model_dir  # imports this module

        arch = name_or_path.removeprefix("random/")
        if arch not in RANDOM_MODELS:
            raise ValueError(
                f"unknown random model {name_or_path!r}; valid names are: random/{', random/'.join(RANDOM_MODELS)}"
            )
        if not random_model_dir(arch).is_dir():
            _build_atomically(RANDOM_MODELS[arch], random_model_dir(arch))
        return str(random_model_dir(arch))
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    name = name_or_path[len(TINY_PREFIX) :]
    if name not in TINY_MODELS:
        valid = ", ".join(TINY_PREFIX + key for key in TINY_MODELS)
        raise ValueError(f"unknown tiny model {name_or_path!r}; valid names are: {valid}")
    target = tiny_model_dir(name)
    if not target.is_dir():
        _build_atomically(TINY_MODELS[name], target)
    return str(target)


def _build_atomically(builder: Callable[[Path], Path], target: Path) -> None:
    """Run ``builder`` into a temporary sibling of ``target`` and rename it to ``target`` unless another process won."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0o700); the cache is an ordinary folder
        builder(tmp)
        if not any((tmp / name).is_file() for name in ("config.json", "model_index.json", "open_clip_config.json")):
            raise RuntimeError(f"tiny build of {target.name} wrote no config file; not published")
        os.rename(tmp, target)  # atomic; fails if another process renamed a non-empty folder there first
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
