"""Regenerate the tiny coloured-shapes image dataset under ``configs/data/shapes/`` (deterministic).

Run ``python configs/data/make_shapes.py`` from the repository root. Writes an ImageFolder tree for
``FewShotImageDataModule`` (CLS-RL's tiny config):

- ``shapes/train/<class>/NNN.png`` (8 per class) and ``shapes/test/<class>/NNN.png`` (4 per class): 56x56 palette
  PNGs (56x56 is one 4x4 patch grid, i.e. 4 image tokens, for the tiny Qwen2-VL processor);
- ``shapes/classnames.txt``: the class order. The first half (red circle, blue square, green triangle) is the *base*
  split and the second half (red square, blue circle, yellow star) the *new* one, which recombines the base colours
  and shapes. Folder names use ``_`` for spaces (``red_circle``), as many real datasets do.

Each image is one filled shape on a light background, with seeded jitter of position, size, rotation and
background colour (:func:`ftmods.models.shapes_toy.draw_shape`, which also draws the warm-start images of
``tiny/qwen2-vl-shapes``). A test checks that the committed images equal :func:`make_shapes`' pixels.
"""

from __future__ import annotations

import random
from pathlib import Path

from ftmods.models.shapes_toy import CLASSES, SIZE, draw_shape

HERE = Path(__file__).parent


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
