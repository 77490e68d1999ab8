"""PSO reward models on tiny random CLIPs (transformers and OpenCLIP): the torch preprocessing path scores exactly
what the models' own PIL processors score, lazy loading, frozen weights, scale, errors."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from ftmods.models.tiny import resolve_pretrained
from ftmods.pso.rewards import CLIPScoreReward, PickScoreReward, preprocess_images

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _images(size: int = 32) -> tuple[torch.Tensor, list[Image.Image]]:
    """uint8-exact images, as tensors in [0, 1] and as PIL (the same pixels)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, size, size), generator=generator, dtype=torch.uint8)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    return pixels.float() / 255, pil


def test_pickscore_matches_the_clip_processor_path():
    tensors, pil = _images()
    reward = PickScoreReward("tiny/clip", None)
    assert reward.model is None  # nothing loads before the first call
    ours = reward(tensors, PROMPTS)
    path = resolve_pretrained("tiny/clip")
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
    expected = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.shape == (3,)
    assert ours.dtype == torch.float32


def test_clip_score_matches_open_clip_preprocess():
    tensors, pil = _images()
    reward = CLIPScoreReward("tiny/open-clip", scale=100)
    ours = reward(tensors, PROMPTS)
    name = f"local-dir:{resolve_pretrained('tiny/open-clip')}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text = model.encode_text(tokenizer(PROMPTS), normalize=True)
    torch.testing.assert_close(ours, 100 * (image * text).sum(-1), atol=1e-4, rtol=1e-5)


def test_rewards_are_frozen_and_stay_in_eval_mode():
    reward = CLIPScoreReward("tiny/open-clip").load()
    reward.train()
    assert not reward.training
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(not m.training for m in reward.modules())


def test_preprocess_resizes_the_shorter_side_and_center_crops():
    """A 2x4 image whose left and right quarters are 0 and the middle half 1: resized to 4x8, the centre 4x4 crop is
    the middle half, all 1 (up to bicubic overshoot, which the clamp removes); with mean 0, std 1 the result is 1."""
    image = torch.zeros(1, 3, 20, 40)
    image[..., 10:30] = 1.0
    out = preprocess_images(image, 10, [0.0] * 3, [1.0] * 3)
    assert out.shape == (1, 3, 10, 10)
    assert out[..., 1:-1].min() > 0.99
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(torch.zeros(3, 8, 8), 4, [0.0] * 3, [1.0] * 3)


def test_prompt_count_must_match():
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        PickScoreReward("tiny/clip", None)(torch.rand(3, 3, 32, 32), PROMPTS[:2])
