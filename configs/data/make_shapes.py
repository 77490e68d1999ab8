"""Regenerate the tiny coloured-shapes image dataset under ``configs/data/shapes/`` (deterministic).

Run ``python configs/data/make_shapes.py`` from the repository root. Writes an ImageFolder tree for
``FewShotImageDataModule`` (CLS-RL's tiny config):

- ``shapes/train/<class>/NNN.png`` (8 per class) and ``shapes/test/<class>/NNN.png`` (4 per class): 56x56 palette
  PNGs (56x56 is one 4x4 patch grid, i.e. 4 image tokens, for the tiny Qwen2-VL processor);
- ``shapes/classnames.txt``: the class order. The first half (red circle, blue square, green triangle) is the *base*
  split and the second half (red square, blue circle, yellow star) the *new* one, which recombines the base colours
  and shapes. Folder names use ``_`` for spaces (``red_circle``), as many real datasets do.

Each image is one filled shape on a light background, with seeded jitter of position, size, rotation and
background colour. Uses only Pillow; a test checks that the committed images equal :func:`make_shapes`' pixels.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
CLASSES = ("red circle", "blue square", "green triangle", "red square", "blue circle", "yellow star")
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 200, 30)}
BACKGROUNDS = ((245, 245, 245), (230, 236, 242), (242, 236, 226))
SIZE = 56


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or five-pointed star of circumradius ``r``, rotated by ``angle`` radians."""
    if shape == "star":
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
        angles = [angle - math.pi / 2 + i * math.pi / 5 for i in range(10)]
    else:
        corners = {"square": 4, "triangle": 3}[shape]
        radii = [r] * corners
        start = -math.pi / 2 if shape == "triangle" else math.pi / 4
        angles = [angle + start + i * 2 * math.pi / corners for i in range(corners)]
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in zip(radii, angles, strict=True)]


def draw_shape(name: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One ``"<colour> <shape>"`` image (palette mode: index 0 background, 1 shape) with seeded jitter."""
    colour, shape = name.split(" ")
    image = Image.new("P", (size, size), 0)
    image.putpalette([*rng.choice(BACKGROUNDS), *COLOURS[colour]])
    r = rng.uniform(0.22, 0.34) * size  # circumradius
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=1)
    return image


def make_shapes(
    root: str | Path = HERE / "shapes",
    *,
    classes: tuple[str, ...] = CLASSES,
    n_train: int = 8,
    n_test: int = 4,
    size: int = SIZE,
    seed: int = 0,
) -> list[Path]:
    """Write the ImageFolder tree and ``classnames.txt`` under ``root``; returns the written files (sorted).

    Every image is drawn from its own generator seeded by ``(seed, split, class, number)``, so the output is a pure
    function of the arguments.
    """
    root = Path(root)
    written = []
    for split, count in (("train", n_train), ("test", n_test)):
        for name in classes:
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                image = draw_shape(name, random.Random(f"{seed}:{split}:{name}:{number}"), size)
                path = folder / f"{number:03d}.png"
                image.save(path, format="PNG", optimize=True)
                written.append(path)
    names = root / "classnames.txt"
    names.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    return sorted([*written, names])


if __name__ == "__main__":
    files = make_shapes()
    total = sum(path.stat().st_size for path in files)
    print(f"wrote {len(files)} files ({total / 1024:.1f} KiB) under {HERE / 'shapes'}")
