"""Regenerate the tiny PSO data under ``configs/data/pso_tiny/`` (deterministic).

Run ``python configs/data/make_pso_tiny.py`` from the repository root. Writes one small example of every source
``ftmods.datamodules.pso`` reads, with 64x64 PNGs of coloured shapes (:func:`ftmods.models.shapes_toy.draw_shape`)
captioned ``"a <colour> <shape> on a light background"``:

- ``pickapic.parquet``: 16 Pick-a-Pic v2 style rows (``ranking_id, caption, jpg_0, jpg_1, label_0, label_1``) with
  embedded PNG bytes. The preferred image shows the captioned shape, the other a different one; the winner side
  alternates (``label_0`` 1.0 / 0.0), and rows 5 and 11 are ties (0.5 / 0.5, both images correct);
- ``manifest.jsonl`` + ``manifest/``: 8 rows ``{id, caption, target, reference}`` with image paths relative to the
  file; the reference is a blurred drawing of the same caption (a stand-in for a soft few-step model sample);
- ``imagefolder/``: 8 style images with a Hugging Face ``metadata.jsonl`` (``{"file_name", "text"}``);
- ``dreambooth/``: 4 instance images of one subject (a yellow star), for ``instance_prompt="a photo of sks star"``;
- ``prompts.json``: 16 online-PSO prompts in the official ``4k_training_prompts.json`` form (``{caption,
  trainset_idx}``), and ``val_prompts.txt``: 4 validation prompts, one per line.

Every image is drawn from its own generator seeded by ``(seed, part, number)``, so the output is a pure function of
the arguments. A test checks that the committed files equal a fresh generation (pixels, records, text).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageFilter

from ftmods.models.shapes_toy import draw_shape

HERE = Path(__file__).parent
SIZE = 64
NAMES = (
    "red circle",
    "blue square",
    "green triangle",
    "yellow star",
    "blue circle",
    "red square",
    "yellow triangle",
    "green star",
)
"""Caption subjects, cycled in this order."""
TIES = (5, 11)
"""Pick-a-Pic rows with a tie."""


def caption(name: str) -> str:
    """The caption of a drawing of ``name``."""
    return f"a {name} on a light background"


def _other(name: str) -> str:
    """A subject with the same colour and a different shape (the dispreferred image)."""
    colour, shape = name.split(" ")
    shapes = ("circle", "square", "triangle", "star")
    return f"{colour} {shapes[(shapes.index(shape) + 1) % len(shapes)]}"


def _draw(name: str, seed: int, part: str, number: int) -> Image.Image:
    return draw_shape(name, random.Random(f"{seed}:{part}:{number}"), SIZE)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(image))
    return path


def _jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_pickapic(root: Path, rows: int, seed: int) -> Path:
    """``pickapic.parquet`` with ``rows`` rows (ties at :data:`TIES`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[object]] = {
        k: [] for k in ("ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1")
    }
    for row in range(rows):
        name = NAMES[row % len(NAMES)]
        tie = row in TIES
        good = _png(_draw(name, seed, "pickapic-good", row))
        bad = _png(_draw(name if tie else _other(name), seed, "pickapic-bad", row))
        first_wins = row % 2 == 0
        label_0 = 0.5 if tie else (1.0 if first_wins else 0.0)
        columns["ranking_id"].append(1000 + row)
        columns["caption"].append(caption(name))
        columns["jpg_0"].append(good if first_wins else bad)
        columns["jpg_1"].append(bad if first_wins else good)
        columns["label_0"].append(label_0)
        columns["label_1"].append(1.0 - label_0)
    schema = pa.schema(
        [
            ("ranking_id", pa.int64()),
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
        ]
    )
    path = root / "pickapic.parquet"
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def make_manifest(root: Path, rows: int, seed: int) -> list[Path]:
    """``manifest.jsonl`` and its ``manifest/target_NNN.png`` / ``manifest/reference_NNN.png`` images."""
    written, records = [], []
    for row in range(rows):
        name = NAMES[(row + 3) % len(NAMES)]
        target = _save(_draw(name, seed, "manifest", row), root / "manifest" / f"target_{row:03d}.png")
        blurred = _draw(name, seed, "manifest-reference", row).convert("RGB").filter(ImageFilter.GaussianBlur(2))
        reference = _save(blurred.quantize(16), root / "manifest" / f"reference_{row:03d}.png")
        written += [target, reference]
        records.append(
            {
                "id": f"m{row:03d}",
                "caption": caption(name),
                "target": target.relative_to(root).as_posix(),
                "reference": reference.relative_to(root).as_posix(),
            }
        )
    return [*written, _jsonl(root / "manifest.jsonl", records)]


def make_imagefolder(root: Path, count: int, seed: int) -> list[Path]:
    """``imagefolder/NNN.png`` and ``imagefolder/metadata.jsonl``."""
    folder, written, records = root / "imagefolder", [], []
    for number in range(count):
        name = NAMES[(number * 3) % len(NAMES)]
        written.append(_save(_draw(name, seed, "imagefolder", number), folder / f"{number:03d}.png"))
        records.append({"file_name": f"{number:03d}.png", "text": caption(name)})
    return [*written, _jsonl(folder / "metadata.jsonl", records)]


def make_dreambooth(root: Path, count: int, seed: int) -> list[Path]:
    """``dreambooth/NN.png``: ``count`` photos of one subject (a yellow star)."""
    return [
        _save(_draw("yellow star", seed, "dreambooth", n), root / "dreambooth" / f"{n:02d}.png") for n in range(count)
    ]


def make_prompts(root: Path, count: int, val_count: int) -> list[Path]:
    """``prompts.json`` (``{caption, trainset_idx}``) and ``val_prompts.txt``."""
    prompts = [{"caption": caption(NAMES[i % len(NAMES)]), "trainset_idx": 500 + 7 * i} for i in range(count)]
    train = root / "prompts.json"
    train.write_text(json.dumps(prompts, indent=1) + "\n", encoding="utf-8")
    val = root / "val_prompts.txt"
    val.write_text("".join(f"a {_other(n)} on a white background\n" for n in NAMES[:val_count]), encoding="utf-8")
    return [train, val]


def make_pso_tiny(
    root: str | Path = HERE / "pso_tiny",
    *,
    pickapic_rows: int = 16,
    manifest_rows: int = 8,
    imagefolder_images: int = 8,
    dreambooth_images: int = 4,
    prompts: int = 16,
    val_prompts: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Write every tiny PSO source under ``root``; returns the written files (sorted)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = [
        make_pickapic(root, pickapic_rows, seed),
        *make_manifest(root, manifest_rows, seed),
        *make_imagefolder(root, imagefolder_images, seed),
        *make_dreambooth(root, dreambooth_images, seed),
        *make_prompts(root, prompts, val_prompts),
    ]
    return sorted(written)


if __name__ == "__main__":
    files = make_pso_tiny()
    total = sum(path.stat().st_size for path in files)
    print(f"wrote {len(files)} files ({total / 1024:.1f} KiB) under {HERE / 'pso_tiny'}")
