"""Image-text reward models for online PSO and for validation metrics (spec pso §6.1, §7).

- :class:`PickScoreReward`: a transformers ``CLIPModel`` (PickScore: ``yuvalkirstain/PickScore_v1`` with the
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor), the reward of the released online-PSO code.
- :class:`CLIPScoreReward`: an OpenCLIP model (``ViT-H-14`` / ``laion2b_s32b_b79k`` as in the official evaluation, or
  any ``hf-hub:`` / ``local-dir:`` model), the CLIP score.

Both score a batch of images against their prompts with the cosine similarity of the normalised embeddings; the
official code reports the raw cosine (about 0.2), papers report it x100 (``scale=100``). Images are ``(B, 3, H, W)``
floats in ``[0, 1]`` (what a VAE decode gives after ``(x + 1) / 2``), preprocessed in torch on their device: resize of
the shorter side to the model's input size (bicubic, antialiased), centre crop, normalisation. Weights load on first
use (or :meth:`ImageTextReward.load`), never when a config is parsed; the models are frozen and run under
``no_grad``. ``trust_remote_code`` is never used.

Any callable ``(images, prompts) -> (B,) tensor`` works as a reward; these two are the ones the paper uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftmods.models.tiny import resolve_pretrained


def preprocess_images(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """CLIP preprocessing in torch: bicubic antialiased resize of the shorter side to ``size``, centre crop, normalise.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        size: Square input size of the vision tower.
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Returns:
        ``(B, 3, size, size)`` fp32.

    Example:
        >>> out = preprocess_images(torch.full((1, 3, 8, 16), 0.5), 4, [0.5] * 3, [0.25] * 3)
        >>> out.shape, bool(out.abs().max() < 1e-5)
        (torch.Size([1, 3, 4, 4]), True)
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    x = images.float().clamp(0, 1)  # (B, 3, H, W)
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]  # (B, 3, size, size)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class ImageTextReward(nn.Module):
    """Base class: lazy loading, frozen weights, cosine of normalised embeddings times ``scale``.

    Subclasses implement :meth:`_load`, :meth:`_embed_images` and :meth:`_embed_texts`.
    """

    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self._loaded = False

    def load(self) -> ImageTextReward:
        """Load the weights (once), frozen, in eval mode."""
        if not self._loaded:
            self._load()
            self.requires_grad_(False).eval()
            self._loaded = True
        return self

    def train(self, mode: bool = True) -> ImageTextReward:
        """Always eval: a reward model never trains."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``(B,)`` fp32 of ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` against ``prompts`` (``B`` strings)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        self.load()
        image = F.normalize(self._embed_images(images).float(), dim=-1)  # (B, D)
        text = F.normalize(self._embed_texts(list(prompts), images.device).float(), dim=-1)  # (B, D)
        return (image * text).sum(-1) * self.scale  # (B,)

    def _load(self) -> None:
        raise NotImplementedError

    def _embed_images(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _embed_texts(self, prompts: list[str], device: torch.device) -> Tensor:
        raise NotImplementedError


class PickScoreReward(ImageTextReward):
    """PickScore (or any transformers ``CLIPModel``): cosine of the projected text and image embeddings.

    Args:
        model: Hub id, local folder or ``tiny/clip`` of a ``CLIPModel``.
        processor: Where the processor (tokenizer, image size, mean / std) comes from; ``None`` = ``model``.
        scale: Multiplies the cosine (1 = the official code's raw value, 100 = papers).
        local_files_only: Never contact the hub.
        revision: Hub revision of the model.

    Example::

        reward = PickScoreReward()  # yuvalkirstain/PickScore_v1 + the laion ViT-H-14 processor
        scores = reward(images, prompts)  # (B,)
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        scale: float = 1.0,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> None:
        super().__init__(scale=scale)
        self.model_name, self.processor_name = model, processor
        self.local_files_only, self.revision = local_files_only, revision
        self.model: Any = None
        self.tokenizer: Any = None
        self.size, self.mean, self.std = 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        kwargs: dict[str, Any] = {"local_files_only": self.local_files_only, "trust_remote_code": False}
        path = resolve_pretrained(self.model_name)
        revision: dict[str, Any] = {"revision": self.revision} if self.revision else {}
        self.model = CLIPModel.from_pretrained(path, **revision, **kwargs)
        processor = AutoProcessor.from_pretrained(resolve_pretrained(self.processor_name or self.model_name), **kwargs)
        image_processor = processor.image_processor
        crop = getattr(image_processor, "crop_size", None) or {}
        self.size = int(crop.get("height") or self.model.config.vision_config.image_size)
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.tokenizer = processor.tokenizer

    def _embed_images(self, images: Tensor) -> Tensor:
        pixels = preprocess_images(images, self.size, self.mean, self.std).to(self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))  # (B, D)

    def _embed_texts(self, prompts: list[str], device: torch.device) -> Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _features(out)  # (B, D)


def _features(out: Any) -> Tensor:
    """The projected embeddings: a tensor (transformers < 5.2x) or ``pooler_output`` of the returned model output."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPScoreReward(ImageTextReward):
    """CLIP score with OpenCLIP: cosine of the normalised text and image features.

    Args:
        model: An OpenCLIP model name (``ViT-H-14``), ``hf-hub:org/repo``, ``local-dir:/path``, a local folder, or
            ``tiny/open-clip``.
        pretrained: OpenCLIP pretrained tag or checkpoint file for a built-in model name (ignored for hub / folder
            models); the official evaluation uses ``laion2b_s32b_b79k``.
        scale: Multiplies the cosine (1 = raw, 100 = papers).

    Example::

        reward = CLIPScoreReward("ViT-H-14", "laion2b_s32b_b79k", scale=100)
    """

    def __init__(self, model: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k", *, scale: float = 1.0):
        super().__init__(scale=scale)
        self.model_name, self.pretrained = model, pretrained
        self.model: Any = None
        self.tokenizer: Any = None
        self.size, self.mean, self.std = 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def _resolved_name(self) -> tuple[str, str | None]:
        name = self.model_name
        if name.startswith(("hf-hub:", "local-dir:")):
            return name, None
        resolved = resolve_pretrained(name)
        from pathlib import Path

        if Path(resolved).is_dir():
            return f"local-dir:{resolved}", None
        return name, self.pretrained

    def _load(self) -> None:
        import open_clip

        name, pretrained = self._resolved_name()
        self.model = open_clip.create_model(name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(name)
        visual = self.model.visual
        size = visual.image_size
        self.size = int(size[0] if isinstance(size, tuple | list) else size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))

    def _embed_images(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(preprocess_images(images, self.size, self.mean, self.std).to(dtype))

    def _embed_texts(self, prompts: list[str], device: torch.device) -> Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(device))
