"""Grafting's offline toy: a tiny shape classifier pre-trained on one colour set and fine-tuned on another.

Task A ("pre-training"): the shape (circle, square, triangle, star) of a red or blue shape; task B ("fine-tuning"): the
same four shapes drawn in green or yellow, where the pre-trained model is weak. Images come from
:func:`ftmods.models.shapes_toy.draw_shape` at 16 px. The classifier is three 3x3 convolutions with GroupNorm (the
affine norms play the role of a transformer's LayerNorms) and a linear head; about 14.5k parameters at width 16.

Example::

    x_a, y_a = shape_images(("red", "blue"), 500, seed="A")
    model = build_toy_classifier()
    pretrain(model, x_a, y_a)                   # ~4 s on one CPU thread, > 95 % on task A
    x_b, y_b = shape_images(("green", "yellow"), 24, seed="B")
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftmods.models.shapes_toy import draw_shape

__all__ = ["SHAPES", "build_toy_classifier", "pretrain", "shape_images"]

SHAPES = ("circle", "square", "triangle", "star")
"""Class order of the toy (label i is ``SHAPES[i]``)."""


def shape_images(colours: Sequence[str], per_class: int, seed: str, size: int = 16) -> tuple[Tensor, Tensor]:
    """``per_class`` images per (shape, colour), normalised to about zero mean, and their shape labels.

    Args:
        colours: Colour names of :data:`ftmods.models.shapes_toy.COLOURS`.
        per_class: Images per shape and colour.
        seed: Seed string; images are drawn with ``random.Random(f"{seed}:{colour}:{shape}:{i}")``.
        size: Image side in pixels.

    Returns:
        Images ``(N, 3, size, size)`` float32 and labels ``(N,)`` int64, with N = 4 · len(colours) · per_class.
    """
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for colour in colours:
            for i in range(per_class):
                image = draw_shape(f"{colour} {shape}", random.Random(f"{seed}:{colour}:{shape}:{i}"), size=size)
                pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)  # (S·S·3,)
                images.append(pixels.view(size, size, 3))
                labels.append(label)
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S) in [0, 1]
    return (x - 0.5) / 0.25, torch.tensor(labels)


def build_toy_classifier(width: int = 16, groups: int = 8, seed: int = 0) -> nn.Sequential:
    """Conv(3→w)-GN-ReLU-pool, Conv(w→2w)-GN-ReLU-pool, Conv(2w→2w)-GN-ReLU, global average pool, Linear(2w→4)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(groups, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(groups, 2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, len(SHAPES)),
        )  # fmt: skip
    finally:
        torch.random.set_rng_state(generator_state)


def pretrain(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Train ``model`` in place with AdamW on random mini-batches (drawn with a private generator); the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)  # (B,)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())
