r"""Data for PSO (arXiv 2410.03190) on Stable Diffusion / SDXL: offline target/reference pairs and online prompts.

:class:`PSODataModule` (offline PSO) yields :class:`PSOBatch` es: a target image per item, the SDXL
micro-conditioning of that image, and the item's reference, either **cached VAE latents of a sample of the frozen
distilled model** (``reference_source="model_samples"``, the paper's default, spec §3.4) or a **reference image from
the dataset** (``reference_source="dataset_loser"``: the Pick-a-Pic loser or a manifest ``reference``).
:class:`PromptDataModule` (online PSO) yields prompts only; the module rolls out and ranks the pairs itself.

Training sources (``train_source``; ``format="auto"`` picks by layout, see :func:`detect_format`):

- **pickapic**: ``.parquet`` / ``.jsonl`` / ``.json`` files (globs or lists) with Pick-a-Pic v2 columns ``caption,
  jpg_0, jpg_1, label_0, label_1``. ``jpg_*`` hold image bytes (Parquet), or a path relative to the file's folder or
  base64 text (JSON). Ties (``label_0 == label_1``, i.e. 0.5/0.5) are dropped and counted; the winner
  (``label_0 > label_1`` → ``jpg_0``, else ``jpg_1``) is the target and the other image the loser. Item id = the
  ``ranking_id`` column if present, else ``<file stem>:<row>`` (0-based row, the same for JSONL and Parquet).
- **manifest**: ``.jsonl`` / ``.json`` / ``.parquet`` with ``caption``, ``target`` (path, bytes or base64), optional
  ``reference`` (a pre-generated reference image, used with ``reference_source="dataset_loser"``) and optional
  ``id`` (default ``<file stem>:<row>``).
- **imagefolder** (style transfer): one folder with a ``metadata.jsonl`` of ``{"file_name": ..., "text": ...}``
  lines (the Hugging Face imagefolder convention; ``caption_column`` is read first, then ``text``), or a ``.txt``
  caption next to every image. Item id = the image path relative to the folder.
- **dreambooth**: one folder of 3–6 instance images (not recursive), every item captioned ``instance_prompt``. The
  references are ``num_references`` samples of ``class_prompt`` (cache keys ``class:0`` … ``class:{n-1}``) shared by
  all items; in epoch ``e`` item ``i`` is paired with reference ``Random((seed, e, i)).randrange(n)``.

Images are read lazily (Parquet bytes stay in ``datasets``' memory-mapped Arrow cache until ``__getitem__``), made
RGB, resized so that the shorter side is ``resolution`` (bilinear, antialiased, as ``torchvision``'s
``Resize(resolution)``), cropped to ``resolution``² (centre, or a random position drawn from ``(seed, epoch, item
id)``), optionally mirrored (same draw), and scaled to ``[-1, 1]``. A dataset reference image gets the same crop
position (relative to its own size) and flip as its target, and the pair shares the target's micro-conditioning.
SDXL micro-conditioning per item: ``original_size = (h, w)`` before the resize, ``crop_top_left = (top, left)`` of
the crop in the resized image (for a mirrored image: in the mirrored image).

**Reference latents cache** (``reference_source="model_samples"``). The module, not this DataModule, samples the
references with the frozen distilled pipeline (``PSODataModule.reference_requests()`` lists what is missing; call it
in the module's ``setup("fit")`` or ``on_fit_start``, which run before ``train_dataloader()``) and stores the VAE
latents with :func:`save_reference_latents`: one safetensors file per key in ``reference_cache``, named by
:func:`reference_cache_file` (a readable prefix of the key plus 16 hex digits of its SHA-256), holding one tensor
``latents`` ``(C, h, w)`` and string metadata that always includes ``key`` (checked on load) and, if the writer
gives it, ``prompt`` (checked against the item's prompt on load: a stale cache after editing captions is an error).
Files are written to a temporary file and renamed, so a killed writer never leaves a partial entry. Nothing is ever
pickled. :class:`ReferenceRequest` seeds come from :func:`reference_seed` (SHA-256 of the DM seed and the key).

Errors: a malformed record raises :class:`~ftmods.datamodules.records.RecordError` naming file, line (JSONL,
1-based) or record (other files, 0-based, as the shared records code does) and column; an image that cannot be
decoded raises :class:`PSOImageError` (an :class:`~ftmods.datamodules.fewshot_images.ImageError`) naming the image
and the record behind it. The DataModule writes nothing except through :func:`save_reference_latents`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ftmods.datamodules.fewshot_images import IMAGE_EXTENSIONS, ImageError, ImageItem
from ftmods.datamodules.records import RecordError, as_file_list, check_record, load_records, record_location
from ftmods.datamodules.samplers import epoch_loader, resumable_loader

SourceFormat = Literal["auto", "pickapic", "manifest", "imagefolder", "dreambooth"]
ReferenceSource = Literal["model_samples", "dataset_loser"]

FILE_FORMATS = ("pickapic", "manifest")
FOLDER_FORMATS = ("imagefolder", "dreambooth")
PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1")
"""Pick-a-Pic v2 columns read besides the caption (``ranking_id`` is used as the id when present)."""
DEFAULT_NUM_REFERENCES = 20
"""DreamBooth references per subject: the official scripts' ``num_negatives``."""
LATENTS_TENSOR = "latents"
"""Tensor name inside a reference cache file."""
CACHE_SUFFIX = ".safetensors"

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]+")
_DATA_URI = re.compile(r"^data:[^;,]*;base64,")


# ------------------------------------------------------------------------------------------- reference latents


class ReferenceRequest(NamedTuple):
    """A reference sample the training set needs and the cache lacks: generate it and save its latents under ``key``."""

    key: str
    """Cache key (the item id; ``class:{i}`` for DreamBooth)."""
    prompt: str
    """Prompt to sample (the item's caption; the class prompt for DreamBooth)."""
    seed: int
    """Sampling seed, :func:`reference_seed` of the key and the DataModule's seed."""


class MissingReferenceError(FileNotFoundError):
    """A reference-latents cache entry is missing; the message names the key and how to generate it."""


def reference_seed(key: str, seed: int = 0) -> int:
    """A stable sampling seed in ``[0, 2**32)`` for ``key`` (SHA-256 of ``"{seed}:{key}"``, not Python's ``hash``).

    Example:
        >>> reference_seed("class:0") == reference_seed("class:0"), reference_seed("class:0") != reference_seed("a")
        (True, True)
        >>> 0 <= reference_seed("class:0", seed=7) < 2**32
        True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "big")


def reference_cache_file(cache_dir: str | Path, key: str) -> Path:
    """The cache file of ``key``: ``<key, unsafe characters as _, at most 80>-<16 hex of SHA-256(key)>.safetensors``.

    The hash suffix keeps keys that sanitise alike (or differ only in case) apart; the full key is stored in the
    file's metadata.

    Example:
        >>> reference_cache_file("cache", "pickapic:12").name
        'pickapic_12-de50a5940e8343a1.safetensors'
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"a reference cache key must be a non-empty string, got {key!r}")
    stem = _UNSAFE_CHARS.sub("_", key)[:80].strip("._") or "ref"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"{stem}-{digest}{CACHE_SUFFIX}"


def save_reference_latents(cache_dir: str | Path, key: str, latents: Tensor, metadata: dict[str, str]) -> Path:
    """Write one reference's VAE latents ``(C, h, w)`` to the cache atomically (temporary file, then rename).

    Args:
        cache_dir: The ``reference_cache`` folder (created if missing).
        key: The :class:`ReferenceRequest` key.
        latents: ``(C, h, w)`` latents, any dtype; stored bit-exactly (moved to CPU, made contiguous).
        metadata: String metadata, e.g. ``prompt``, ``seed``, ``model``, ``steps``. ``key`` is added (and must not
            differ if given); a given ``prompt`` is checked against the item's prompt when training loads the entry.

    Returns:
        The written file.
    """
    from safetensors.torch import save_file

    if latents.ndim != 3:
        raise ValueError(f"reference latents for {key!r} must be (C, h, w), got shape {tuple(latents.shape)}")
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata must map str to str; not: {bad!r:.200}")
    if metadata.get("key", key) != key:
        raise ValueError(f"metadata key {metadata['key']!r} differs from the cache key {key!r}")
    path = reference_cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({LATENTS_TENSOR: latents.detach().cpu().contiguous()}, temporary, metadata={**metadata, "key": key})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_reference_latents(cache_dir: str | Path, key: str) -> Tensor:
    """The cached latents ``(C, h, w)`` of ``key``; a missing entry raises :class:`MissingReferenceError`."""
    return read_reference_entry(cache_dir, key)[0]


def read_reference_entry(cache_dir: str | Path, key: str) -> tuple[Tensor, dict[str, str]]:
    """The cached latents of ``key`` and the entry's metadata (the stored ``key`` is checked)."""
    from safetensors import safe_open

    path = reference_cache_file(cache_dir, key)
    if not path.is_file():
        raise MissingReferenceError(
            f"reference latents for key {key!r} are not in reference_cache {cache_dir} (expected {path.name}); let "
            "the PSO module generate the missing references (trainer.fit generates them before training; "
            "PSODataModule.reference_requests() lists them) or write them with save_reference_latents()"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if LATENTS_TENSOR not in handle.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                raise ValueError(f"no tensor {LATENTS_TENSOR!r}")
            latents = handle.get_tensor(LATENTS_TENSOR)
    except Exception as error:
        raise ValueError(f"{path}: unreadable reference cache entry for key {key!r}: {error}") from error
    if metadata.get("key", key) != key:
        raise ValueError(f"{path}: holds the latents of key {metadata['key']!r}, not {key!r}")
    return latents, metadata


# ------------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    """Where one image is: a file, or bytes / base64 text stored in a record column (read lazily)."""

    source: str
    """Record file (or image folder) the image belongs to, for error messages."""
    index: int
    """0-based record index in ``source`` (-1 for a folder image without a record)."""
    column: str | None
    """Record column naming or holding the image (``None`` for a folder image without a record)."""
    path: Path | None = None
    """Image file; ``None`` when the image is stored in the record."""
    records: Any = field(default=None, repr=False, compare=False)
    """The ``datasets.Dataset`` holding the stored image (memory-mapped), when ``path`` is ``None``."""
    base64: bool = False
    """The stored value is base64 text (optionally a ``data:`` URI) rather than bytes."""


class PSOImageError(ImageError):
    """An image cannot be decoded; the message names the image (file or stored bytes) and its record and column."""

    def __init__(self, ref: ImageRef, reason: str) -> None:
        image = ref.path if ref.path is not None else Path(f"<image stored in column {ref.column!r}>")
        if ref.column is not None:
            super().__init__(ImageItem(str(image), image, "", ref.source, ref.index, ref.column), reason)
            return
        self.image, self.file, self.index, self.field = str(image), str(image), ref.index, None
        ValueError.__init__(self, f"{image}: cannot read image (of the image folder {ref.source}): {reason}")


def _stored_bytes(ref: ImageRef) -> bytes:
    value = ref.records.data.column(ref.column)[ref.index].as_py()
    if isinstance(value, dict):  # a datasets ``Image`` feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if ref.base64:
        return base64.b64decode(_DATA_URI.sub("", value.strip()), validate=True)
    if not isinstance(value, bytes):
        raise ValueError(f"expected image bytes, got {type(value).__name__}")
    return value


def read_image(ref: ImageRef) -> Image.Image:
    """The referenced image as RGB; undecodable bytes or a vanished file raise :class:`PSOImageError`."""
    try:
        with Image.open(ref.path if ref.path is not None else io.BytesIO(_stored_bytes(ref))) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, binascii.Error) as error:
        raise PSOImageError(ref, f"{type(error).__name__}: {error}") from error


def resize_and_crop(
    image: Image.Image, resolution: int, *, crop: tuple[float, float] | None = None, flip: bool = False
) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution``, crop a square, optionally mirror, scale to ``[-1, 1]``.

    Args:
        image: An RGB image.
        resolution: Output side R.
        crop: Relative crop position ``(u, v)`` in ``[0, 1)``: ``top = floor(u · (h' - R + 1))``, same for ``left``;
            ``None`` = the centre crop (``round((h' - R) / 2)``, as ``torchvision``'s ``CenterCrop``).
        flip: Mirror horizontally after cropping; ``left`` is then reported in the mirrored image.

    Returns:
        ``(3, R, R)`` float tensor in ``[-1, 1]``, ``original_size = (h, w)`` before resizing and
        ``crop_top_left = (top, left)`` (SDXL micro-conditioning).

    Example:
        >>> pixels, size, top_left = resize_and_crop(Image.new("RGB", (80, 40), (255, 0, 0)), 20)
        >>> tuple(pixels.shape), size, top_left, pixels[0].min().item(), pixels[1].max().item()
        ((3, 20, 20), (40, 80), (0, 10), 1.0, -1.0)
    """
    width, height = image.size
    resized = TF.resize(image, [resolution], interpolation=InterpolationMode.BILINEAR, antialias=True)
    new_width, new_height = resized.size
    if crop is None:
        top, left = round((new_height - resolution) / 2), round((new_width - resolution) / 2)
    else:
        top = min(int(crop[0] * (new_height - resolution + 1)), new_height - resolution)
        left = min(int(crop[1] * (new_width - resolution + 1)), new_width - resolution)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_width - left - resolution
    pixels = TF.pil_to_tensor(cropped).float().div(127.5).sub(1.0)  # (3, R, R)
    return pixels, (height, width), (top, left)


# ------------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class PairItem:
    """One training item: caption, target image and (dataset sources) the reference image."""

    id: str
    caption: str
    target: ImageRef
    reference: ImageRef | None = None
    """Pick-a-Pic loser or manifest ``reference`` (used with ``reference_source="dataset_loser"``)."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt (online PSO training, validation images)."""

    id: str
    caption: str


def _problem(field: str, problem: str) -> ValueError:
    return ValueError((field, problem))


def _check_caption(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        raise _problem(field, "missing")
    if not isinstance(value, str) or not value.strip():
        raise _problem(field, f"must be a non-empty string, got {value!r:.60}")
    return value


def _check_label(record: dict[str, Any], field: str) -> float:
    value = record.get(field)
    if value is None:
        raise _problem(field, "missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _problem(field, f"must be a finite number, got {value!r:.60}")
    return float(value)


def _row_id(file: str, row: int, value: Any) -> str:
    if value is None:
        return f"{Path(file).stem}:{row}"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RecordError(file, row, "id", f"must be a non-empty string or an integer, got {value!r:.60}")
    return str(value)


def _require_columns(file: str, records: Any, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in records.column_names]
    if missing:
        raise RecordError(file, 0, missing[0], f"missing column (the file has {sorted(records.column_names)})")


def _small_columns(records: Any, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The given (non-image) columns of every record, as dicts; absent columns are left out."""
    present = [column for column in columns if column in records.column_names]
    if not present:
        return [{} for _ in range(len(records))]
    return list(records.select_columns(present).to_list())


class ImageColumn:
    """An image column of a record file: validates every row at setup, reads stored bytes only on demand.

    Binary columns (Parquet bytes, ``datasets`` ``Image`` features) stay in the memory-mapped Arrow table; only their
    nulls are checked. Text columns hold a path (relative to the file's folder) or base64 text (``data:`` URI, or
    base64 characters only when no such file exists); paths are checked to exist.
    """

    def __init__(self, file: str, records: Any, column: str) -> None:
        self.file, self.records, self.column = file, records, column
        feature = records.features[column]
        self.stored = getattr(feature, "dtype", None) in ("binary", "large_binary") or type(feature).__name__ == "Image"
        if self.stored:
            self.nulls: list[bool] = records.data.column(column).is_null().to_pylist()
            self.values: list[Any] = []
        else:
            self.values = [row[column] for row in records.select_columns([column]).to_list()]

    def ref(self, row: int, *, optional: bool = False) -> ImageRef | None:
        """The row's image (``None`` if empty and ``optional``); missing / invalid / not found raise RecordError."""
        if self.stored:
            missing, value = self.nulls[row], None
        else:
            value = self.values[row]
            missing = value is None
        if missing:
            if optional:
                return None
            raise RecordError(self.file, row, self.column, "missing")
        if self.stored:
            return ImageRef(self.file, row, self.column, records=self.records)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(self.file, row, self.column, f"must be image bytes, a path or base64, got {value!r:.60}")
        if _DATA_URI.match(value):
            return ImageRef(self.file, row, self.column, records=self.records, base64=True)
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path(self.file).parent / path
        if path.is_file():
            return ImageRef(self.file, row, self.column, path=path)
        if len(value) >= 64 and "." not in value and _BASE64_TEXT.fullmatch(value):
            return ImageRef(self.file, row, self.column, records=self.records, base64=True)
        raise RecordError(self.file, row, self.column, f"image file not found: {path}")


def _validate_caption(caption_column: str) -> Callable[[dict[str, Any]], None]:
    """Record check for ``load_records``' line-by-line scan of a JSONL file ``datasets`` cannot read."""

    def validate(record: dict[str, Any]) -> None:
        _check_caption(record, caption_column)

    return validate


def _parse_record(file: str, row: int, record: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> Any:
    """``parse(record)``, with its ``(field, problem)`` errors raised as RecordError (file, row, field)."""
    out: list[Any] = []
    check_record(file, row, record, lambda r: out.append(parse(r)))
    return out[0]


def _pickapic_fields(record: dict[str, Any], caption_column: str) -> tuple[str, float, float]:
    return _check_caption(record, caption_column), _check_label(record, "label_0"), _check_label(record, "label_1")


def read_pickapic(file: str, records: Any, caption_column: str = "caption") -> tuple[list[PairItem], int]:
    """The non-tied pairs of a Pick-a-Pic v2 file (target = winner, reference = loser) and the number of ties.

    Args:
        file: The file (for messages and relative image paths).
        records: Its records (``load_records(file)``).
        caption_column: Caption column.
    """
    _require_columns(file, records, [caption_column, *PICKAPIC_COLUMNS])
    meta = _small_columns(records, [caption_column, "label_0", "label_1", "ranking_id"])
    images = {column: ImageColumn(file, records, column) for column in ("jpg_0", "jpg_1")}
    items, ties = [], 0
    for row, record in enumerate(meta):
        caption, label_0, label_1 = _parse_record(file, row, record, lambda r: _pickapic_fields(r, caption_column))
        if label_0 == label_1:
            ties += 1
            continue
        winner, loser = ("jpg_0", "jpg_1") if label_0 > label_1 else ("jpg_1", "jpg_0")
        target, reference = images[winner].ref(row), images[loser].ref(row)
        assert target is not None
        items.append(PairItem(_row_id(file, row, record.get("ranking_id")), caption, target, reference))
    return items, ties


def read_manifest(file: str, records: Any, caption_column: str = "caption") -> list[PairItem]:
    """The items of a manifest file: ``caption``, ``target``, optional ``reference`` and ``id``."""
    _require_columns(file, records, [caption_column, "target"])
    meta = _small_columns(records, [caption_column, "id"])
    target = ImageColumn(file, records, "target")
    reference = ImageColumn(file, records, "reference") if "reference" in records.column_names else None
    items = []
    for row, record in enumerate(meta):
        check_record(file, row, record, _validate_caption(caption_column))
        image = target.ref(row)
        assert image is not None
        other = reference.ref(row, optional=True) if reference is not None else None
        items.append(PairItem(_row_id(file, row, record.get("id")), record[caption_column], image, other))
    return items


def _folder_images(root: Path, recursive: bool) -> list[Path]:
    files = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_imagefolder(root: str | Path, caption_column: str = "caption") -> list[PairItem]:
    """Images of a folder with ``metadata.jsonl`` (``file_name`` + ``caption_column`` or ``text``) or ``.txt`` captions.

    With ``metadata.jsonl`` only the listed images are used; without it every image (recursively) needs a non-empty
    ``.txt`` caption of the same name.
    """
    root = Path(root)
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        return _read_metadata(metadata, caption_column)
    items = []
    for image in _folder_images(root, recursive=True):
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        if not caption:
            state = "is empty" if caption_file.is_file() else "is missing"
            raise ValueError(
                f"{image}: no caption: {caption_file} {state} (an imagefolder without metadata.jsonl needs a "
                "non-empty .txt caption next to every image)"
            )
        items.append(PairItem(image.relative_to(root).as_posix(), caption, ImageRef(str(root), -1, None, image)))
    return items


def _read_metadata(metadata: Path, caption_column: str) -> list[PairItem]:
    file = str(metadata)

    def validate(record: dict[str, Any]) -> None:
        name = record.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise _problem("file_name", "missing" if name is None else f"must be a non-empty string, got {name!r:.60}")
        if caption_column not in record and "text" not in record:
            raise _problem(caption_column, f"missing (imagefolder metadata needs {caption_column!r} or 'text')")
        _check_caption(record, caption_column if caption_column in record else "text")

    items = []
    for row, record in enumerate(load_records(file, validate).to_list()):
        record = {key: value for key, value in record.items() if value is not None}  # columns other rows have
        check_record(file, row, record, validate)
        path = metadata.parent / record["file_name"]
        if not path.is_file():
            raise RecordError(file, row, "file_name", f"image file not found: {path}")
        caption = record[caption_column if caption_column in record else "text"]
        items.append(PairItem(Path(record["file_name"]).as_posix(), caption, ImageRef(file, row, "file_name", path)))
    return items


def read_dreambooth(root: str | Path, instance_prompt: str) -> list[PairItem]:
    """The instance images directly in ``root`` (sorted by name), each captioned ``instance_prompt``."""
    root = Path(root)
    items = [PairItem(p.name, instance_prompt, ImageRef(str(root), -1, None, p)) for p in _folder_images(root, False)]
    if not items:
        raise ValueError(f"{root}: no instance images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    if not 3 <= len(items) <= 6:
        rank_zero_info(f"{root}: {len(items)} instance images (DreamBooth subjects usually have 3-6)")
    return items


def detect_format(root_or_file: str | Path, columns: Sequence[str] = ()) -> str:
    """The source format of a folder or of a record file with ``columns``.

    A folder with ``metadata.jsonl`` or ``.txt`` captions is ``imagefolder``; a file is ``pickapic`` if ``jpg_0`` is
    one of its columns, else ``manifest``. A folder without captions raises: it may hold DreamBooth instance
    images, which need explicit settings.
    """
    path = Path(root_or_file)
    if not path.is_dir():
        return "pickapic" if "jpg_0" in columns else "manifest"
    if (path / "metadata.jsonl").is_file() or any(p.with_suffix(".txt").is_file() for p in _folder_images(path, True)):
        return "imagefolder"
    raise ValueError(
        f"{path}: a folder without metadata.jsonl or .txt captions; for DreamBooth instance images set "
        "format: dreambooth with instance_prompt ('a photo of sks dog') and class_prompt ('a photo of dog'); for "
        "style images add captions"
    )


def _prompt_id(record: dict[str, Any], file: str, index: int) -> str:
    for key in ("trainset_idx", "id"):
        if record.get(key) is not None:
            return str(record[key])
    return f"{Path(file).stem}:{index}"


def _prompts_from_records(file: str, records: Sequence[Any], caption_column: str) -> list[PromptItem]:
    items = []
    for index, record in enumerate(records):
        if isinstance(record, str):
            record = {caption_column: record}
        elif not isinstance(record, dict):
            raise RecordError(file, index, None, f"expected a caption string or an object, got {record!r:.60}")
        check_record(file, index, record, _validate_caption(caption_column))
        items.append(PromptItem(_prompt_id(record, file, index), record[caption_column]))
    return items


def read_prompts(spec: str | Sequence[str], caption_column: str = "caption") -> list[PromptItem]:
    """Prompts from a file or an inline list (ids ``"0"``, ``"1"``, ...).

    Files: ``.txt`` one prompt per line (blank lines skipped, ids ``<stem>:<line>``); ``.json`` a list of strings
    or of objects with ``caption_column`` (the official ``4k_training_prompts.json``: ``{"caption", "trainset_idx"}``);
    ``.jsonl`` / ``.parquet`` records with ``caption_column``. Object ids: ``trainset_idx``, else ``id``, else
    ``<stem>:<record index>``. Nothing is deduplicated; an empty or non-string caption raises
    :class:`~ftmods.datamodules.records.RecordError` (file, line or record, field).
    """
    if not isinstance(spec, str):
        return [PromptItem(str(i), _inline_prompt(i, p)) for i, p in enumerate(spec)]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {spec} (pass a list for inline prompts)")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [PromptItem(f"{path.stem}:{n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(content, list):
            raise ValueError(f"{path}: expected a JSON list of captions or of objects with {caption_column!r}")
        return _prompts_from_records(str(path), content, caption_column)
    if path.suffix in (".jsonl", ".parquet"):
        records = load_records(str(path), _validate_caption(caption_column))
        return _prompts_from_records(str(path), records.to_list(), caption_column)
    raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt, .json, .jsonl or .parquet")


def _inline_prompt(index: int, prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"inline prompt {index}: must be a non-empty string, got {prompt!r:.60}")
    return prompt


# ------------------------------------------------------------------------------------------- datasets, batches


class _PSOSampleRequired(TypedDict):
    id: str
    caption: str
    target: Tensor  # (3, R, R) float in [-1, 1]
    original_size: Tensor  # (2,) long, (h, w) before resizing
    crop_top_left: Tensor  # (2,) long, (top, left) in the resized image


class PSOSample(_PSOSampleRequired, total=False):
    """One training item; exactly one of ``reference`` / ``reference_latents`` is present."""

    reference: Tensor  # (3, R, R) float in [-1, 1], cropped / flipped like the target
    reference_latents: Tensor  # (C, h, w) as cached


class _PSOBatchRequired(TypedDict):
    ids: list[str]  # B item ids (cache keys of model-sample references, except DreamBooth)
    captions: list[str]  # B prompts
    target: Tensor  # (B, 3, R, R) float in [-1, 1]
    original_sizes: Tensor  # (B, 2) long, (h, w) of the target before resizing (SDXL micro-conditioning)
    crop_top_lefts: Tensor  # (B, 2) long, (top, left) of the target's crop (SDXL micro-conditioning)


class PSOBatch(_PSOBatchRequired, total=False):
    """A collated offline PSO batch: targets, their micro-conditioning, and one kind of reference.

    ``reference_latents`` with ``reference_source="model_samples"``, ``reference`` with ``"dataset_loser"``; the pair
    uses the target's ``original_sizes`` / ``crop_top_lefts``.
    """

    reference: Tensor  # (B, 3, R, R) float in [-1, 1]
    reference_latents: Tensor  # (B, C, h, w), dtype as cached


class PromptBatch(TypedDict):
    """A batch of prompts (online PSO training, validation images)."""

    ids: list[str]  # B prompt ids
    captions: list[str]  # B prompts


class PSODataset(Dataset[PSOSample]):
    """Training items with lazily read images and (``model_samples``) cached reference latents.

    Keys are item indices or ``(epoch, index)`` pairs (:class:`EpochKeySampler`); the epoch seeds the random crop /
    flip (by item id) and the DreamBooth reference draw (by index). A plain index uses :attr:`epoch`.

    Args:
        items: The training items.
        resolution: Output side.
        references: ``"latents"`` (from ``cache_dir``) or ``"image"`` (each item's ``reference``).
        cache_dir: The reference latents cache (``"latents"``).
        num_references: DreamBooth: items share keys ``class:{j}``, ``j < num_references``; ``None``: key = item id.
        reference_prompt: DreamBooth: the class prompt (the prompt of every shared reference).
        random_crop: Random instead of centre crops.
        random_flip: Mirror with probability 1/2.
        seed: Seed of crops, flips and DreamBooth pairing.
    """

    def __init__(
        self,
        items: Sequence[PairItem],
        *,
        resolution: int,
        references: Literal["latents", "image"],
        cache_dir: str | None = None,
        num_references: int | None = None,
        reference_prompt: str | None = None,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.items, self.resolution, self.references = list(items), resolution, references
        self.cache_dir, self.num_references, self.reference_prompt = cache_dir, num_references, reference_prompt
        self.random_crop, self.random_flip, self.seed = random_crop, random_flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def reference_key(self, index: int, epoch: int = 0) -> str:
        """Cache key of item ``index``'s reference in ``epoch``: its id, or DreamBooth's seeded ``class:{j}``."""
        if self.num_references is None:
            return self.items[index].id
        rng = random.Random(f"{self.seed}:{epoch}:{index}:reference")
        return f"class:{rng.randrange(self.num_references)}"

    def __getitem__(self, key: int | tuple[int, int]) -> PSOSample:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item = self.items[index]
        rng = random.Random(f"{self.seed}:{epoch}:{item.id}:crop")
        draws = (rng.random(), rng.random(), rng.random())  # always drawn: the flip does not depend on random_crop
        crop = draws[:2] if self.random_crop else None
        flip = self.random_flip and draws[2] < 0.5
        target, size, top_left = resize_and_crop(read_image(item.target), self.resolution, crop=crop, flip=flip)
        sample = PSOSample(
            id=item.id,
            caption=item.caption,
            target=target,
            original_size=torch.tensor(size, dtype=torch.long),
            crop_top_left=torch.tensor(top_left, dtype=torch.long),
        )
        if self.references == "image":
            assert item.reference is not None
            reference = read_image(item.reference)
            sample["reference"] = resize_and_crop(reference, self.resolution, crop=crop, flip=flip)[0]
        else:
            sample["reference_latents"] = self._latents(index, epoch)
        return sample

    def _latents(self, index: int, epoch: int) -> Tensor:
        assert self.cache_dir is not None
        key = self.reference_key(index, epoch)
        latents, metadata = read_reference_entry(self.cache_dir, key)
        expected = self.reference_prompt if self.num_references is not None else self.items[index].caption
        if metadata.get("prompt", expected) != expected:
            raise ValueError(
                f"reference_cache {self.cache_dir}: the entry for key {key!r} was sampled for prompt "
                f"{metadata['prompt']!r:.80}, but the item's prompt is {expected!r:.80}; delete the stale entry and "
                "let the module generate it again"
            )
        return latents


class PromptDataset(Dataset[PromptItem]):
    """Prompts as a map-style dataset."""

    def __init__(self, items: Sequence[PromptItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]


def _stack(samples: Sequence[PSOSample], key: str) -> Tensor:
    shapes = {tuple(sample[key].shape) for sample in samples}  # type: ignore[literal-required]
    if len(shapes) > 1:
        found = ", ".join(f"{s['id']!r}: {tuple(s[key].shape)}" for s in samples)  # type: ignore[literal-required]
        raise ValueError(f"cannot batch {key} of different shapes ({found}); regenerate the reference cache")
    return torch.stack([sample[key] for sample in samples])  # type: ignore[literal-required]


def collate_pso(samples: Sequence[PSOSample]) -> PSOBatch:
    """Gather samples into a :class:`PSOBatch` (mixed reference kinds or latent shapes raise)."""
    batch = PSOBatch(
        ids=[s["id"] for s in samples],
        captions=[s["caption"] for s in samples],
        target=torch.stack([s["target"] for s in samples]),  # (B, 3, R, R)
        original_sizes=torch.stack([s["original_size"] for s in samples]),  # (B, 2)
        crop_top_lefts=torch.stack([s["crop_top_left"] for s in samples]),  # (B, 2)
    )
    for key in ("reference", "reference_latents"):
        present = sum(key in s for s in samples)
        if present and present != len(samples):
            raise ValueError(f"only {present} of {len(samples)} samples carry {key}")
        if present:
            batch[key] = _stack(samples, key)  # type: ignore[literal-required]
    return batch


def collate_prompts(samples: Sequence[PromptItem]) -> PromptBatch:
    """Gather prompts into a :class:`PromptBatch`.

    Example:
        >>> collate_prompts([PromptItem("0", "a red circle"), PromptItem("1", "a blue square")])
        {'ids': ['0', '1'], 'captions': ['a red circle', 'a blue square']}
    """
    return PromptBatch(ids=[s.id for s in samples], captions=[s.caption for s in samples])


class EpochKeySampler(DistributedSampler):
    """This rank's share of the ``(seed + epoch)`` permutation, yielded as ``(epoch, index)`` keys.

    On one rank the order is :class:`~ftmods.datamodules.samplers.EpochShuffleSampler`'s (the same ``randperm`` of
    ``seed + epoch``), and the loader resumes the same way. The epoch travels with each key, so per-epoch draws in
    the dataset (random crops, DreamBooth pairing) are right in worker processes and after a resume. Being a
    ``DistributedSampler``, Lightning keeps it under DDP (and calls :meth:`set_epoch`) instead of swapping in its own.

    Example:
        >>> list(EpochKeySampler(range(3), seed=0, epoch=2))[0][0]
        2
    """

    def __init__(self, dataset: Sized, *, seed: int = 0, epoch: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        """``(epoch, index)`` for this epoch's share."""
        epoch = self.epoch
        return iter([(epoch, index) for index in super().__iter__()])


# ---------------------------------------------------------------------------------------------------- DataModules


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _val_loader(items: list[PromptItem] | None, batch_size: int, num_workers: int) -> Any:
    if items is None:
        return []
    dataset = PromptDataset(items)
    return resumable_loader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_prompts, num_workers=num_workers
    )


class PSODataModule(LightningDataModule):
    """Offline PSO data: target images with SDXL micro-conditioning and a reference per item (module docstring).

    Training batches (:class:`PSOBatch`) are shuffled by ``(seed, epoch)`` and resumable mid-epoch; validation
    batches (:class:`PromptBatch`) are the ``val_prompts`` in order, for few-step validation images. With
    ``reference_source="model_samples"``, :meth:`reference_requests` lists the references to generate and
    ``train_dataloader()`` refuses to start while any is missing from ``reference_cache``.

    Args:
        train_source: Record file(s) (``.parquet`` / ``.jsonl`` / ``.json``, globs or a list) for ``pickapic`` /
            ``manifest``, or one folder for ``imagefolder`` / ``dreambooth``.
        val_prompts: Validation prompts: an inline list or a file (:func:`read_prompts`); ``None`` = no validation.
        format: Source format, or ``auto`` (:func:`detect_format`, per file).
        reference_source: ``model_samples``: cached latents of frozen-model samples (the paper's default);
            ``dataset_loser``: the Pick-a-Pic loser / manifest ``reference`` image.
        reference_cache: Folder of the reference latents cache (required with ``model_samples``).
        instance_prompt: DreamBooth: the caption of every instance image (``"a photo of sks dog"``).
        class_prompt: DreamBooth: the prompt of the shared references (``"a photo of dog"``).
        num_references: DreamBooth: number of shared references (default 20, the paper's ``num_negatives``).
        caption_column: Caption column of record files (imagefolder metadata falls back to ``text``).
        resolution: Side R of the square training images.
        random_crop: Random crops (seeded by ``(seed, epoch, item id)``) instead of centre crops.
        random_flip: Mirror with probability 1/2 (same seed).
        batch_size: Training pairs per batch (per device).
        val_batch_size: Validation prompts per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the shuffling, crops, flips, DreamBooth pairing and reference seeds.
        max_items: Keep only the first ``max_items`` training items (after dropping ties).

    Example::

        dm = PSODataModule("data/pickapic/train-*.parquet", "prompts/val.txt", reference_cache="cache/refs",
                           resolution=1024)
        dm.setup("fit")
        for request in dm.reference_requests():  # the module does this in setup("fit")
            latents = vae_encode(pipeline(request.prompt, generator=seeded(request.seed)))
            save_reference_latents("cache/refs", request.key, latents[0], {"prompt": request.prompt})
        batch = next(iter(dm.train_dataloader()))  # PSOBatch with reference_latents
    """

    def __init__(
        self,
        train_source: str | list[str],
        val_prompts: str | list[str] | None = None,
        *,
        format: SourceFormat = "auto",
        reference_source: ReferenceSource = "model_samples",
        reference_cache: str | None = None,
        instance_prompt: str | None = None,
        class_prompt: str | None = None,
        num_references: int | None = None,
        caption_column: str = "caption",
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        batch_size: int = 4,
        val_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        max_items: int | None = None,
    ) -> None:
        super().__init__()
        if format not in ("auto", *FILE_FORMATS, *FOLDER_FORMATS):
            raise ValueError(f"format must be 'auto' or one of {FILE_FORMATS + FOLDER_FORMATS}, got {format!r}")
        if reference_source not in ("model_samples", "dataset_loser"):
            raise ValueError(f"reference_source must be 'model_samples' or 'dataset_loser', got {reference_source!r}")
        if reference_source == "model_samples" and reference_cache is None:
            raise ValueError("reference_source='model_samples' needs reference_cache (a folder for the latents)")
        _check_positive(
            resolution=resolution,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_references=num_references,
            max_items=max_items,
        )
        self.save_hyperparameters()
        if format != "auto":
            self._check_format_options(format)
        self.format: str | None = None  # resolved in setup (per-file auto detection may give pickapic + manifest)
        self.ties_dropped = 0  # Pick-a-Pic ties skipped by the last read
        self._items: list[PairItem] | None = None  # read on first use
        self.train_dataset: PSODataset | None = None  # built in setup("fit")
        self.val_items: list[PromptItem] | None = None  # built in setup("fit" / "validate")

    # ------------------------------------------------------------------------------------------------- hooks

    def setup(self, stage: str) -> None:
        """Read the training source and build the training dataset (``fit``), and the validation prompts."""
        hp = self.hparams
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._train_dataset()
        if stage in ("fit", "validate") and self.val_items is None and hp["val_prompts"] is not None:
            self.val_items = read_prompts(hp["val_prompts"], hp["caption_column"])
            rank_zero_info(f"{type(self).__name__} val: {len(self.val_items)} prompts")

    def reference_requests(self) -> list[ReferenceRequest]:
        """The model-sample references the training set needs that ``reference_cache`` lacks, in item order.

        Reads the training source on first use (as ``setup("fit")`` does), so it works before or after setup. Per
        item (pickapic / manifest / imagefolder): key = item id, prompt = caption. DreamBooth: keys ``class:{i}``
        for ``i < num_references``, prompt = ``class_prompt``. Empty with ``reference_source="dataset_loser"``.
        """
        hp = self.hparams
        if hp["reference_source"] != "model_samples":
            return []
        cache = hp["reference_cache"]
        return [
            ReferenceRequest(key, prompt, reference_seed(key, hp["seed"]))
            for key, prompt in self._needed_references().items()
            if not reference_cache_file(cache, key).is_file()
        ]

    def train_dataloader(self) -> Any:
        """Shuffled by ``(seed, epoch)`` (:class:`EpochKeySampler`), resumable mid-epoch."""
        dataset, trainer = self._train(), self.trainer
        missing = self.reference_requests()
        if missing:
            keys = ", ".join(repr(request.key) for request in missing[:3])
            raise MissingReferenceError(
                f"{len(missing)} reference latents are missing from reference_cache {self.hparams['reference_cache']} "
                f"(keys {keys}{', ...' if len(missing) > 3 else ''}); let the PSO module generate them (trainer.fit "
                "does so in the module's setup) or save them with save_reference_latents() for "
                "PSODataModule.reference_requests()"
            )
        sampler = EpochKeySampler(
            dataset,
            seed=self.hparams["seed"],
            epoch=trainer.current_epoch if trainer is not None else 0,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        dataset.epoch = sampler.epoch
        return resumable_loader(
            dataset,
            batch_size=self.hparams["batch_size"],
            sampler=sampler,
            collate_fn=collate_pso,
            num_workers=self.hparams["num_workers"],
        )

    def val_dataloader(self) -> Any:
        """The validation prompts in order (:class:`PromptBatch`); empty without ``val_prompts``."""
        return _val_loader(self.val_items, self.hparams["val_batch_size"], self.hparams["num_workers"])

    # ----------------------------------------------------------------------------------------------- helpers

    def _check_format_options(self, fmt: str) -> None:
        hp = self.hparams
        if fmt == "dreambooth":
            if not hp["instance_prompt"] or not hp["class_prompt"]:
                raise ValueError("format 'dreambooth' needs instance_prompt and class_prompt")
            if hp["reference_source"] != "model_samples":
                raise ValueError("format 'dreambooth' has no dataset references; use reference_source='model_samples'")
            return
        given = [name for name in ("instance_prompt", "class_prompt", "num_references") if hp[name] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to format 'dreambooth', not {fmt!r}")

    def _train(self) -> PSODataset:
        if self.train_dataset is None:
            raise ValueError("call setup('fit') before train_dataloader()")
        return self.train_dataset

    def _read_items(self) -> list[PairItem]:
        if self._items is not None:
            return self._items
        hp = self.hparams
        spec = hp["train_source"]
        specs = [spec] if isinstance(spec, str) else list(spec)
        folders = [s for s in specs if Path(s).expanduser().is_dir()]
        if folders:
            if len(specs) != 1:
                raise ValueError(f"train_source: folder formats take exactly one folder, got {specs}")
            items = self._read_folder(Path(folders[0]).expanduser())
        else:
            if hp["format"] in FOLDER_FORMATS:
                raise ValueError(f"format {hp['format']!r} needs a folder as train_source, got {spec!r}")
            items = self._read_files(as_file_list(specs))
        if hp["max_items"] is not None:
            items = items[: hp["max_items"]]
        _check_unique_ids(items)
        if not items:
            raise ValueError(f"no training items in {spec!r}")
        self._items = items
        return items

    def _read_folder(self, root: Path) -> list[PairItem]:
        hp = self.hparams
        fmt = hp["format"] if hp["format"] != "auto" else detect_format(root)
        if fmt not in FOLDER_FORMATS:
            raise ValueError(f"{root} is a folder, but format {fmt!r} reads record files")
        self._check_format_options(fmt)
        self.format = fmt
        if fmt == "dreambooth":
            items = read_dreambooth(root, hp["instance_prompt"])
        else:
            items = read_imagefolder(root, hp["caption_column"])
        rank_zero_info(f"{type(self).__name__} train: {len(items)} {fmt} images from {root}")
        return items

    def _read_files(self, files: list[str]) -> list[PairItem]:
        hp = self.hparams
        items: list[PairItem] = []
        ties, formats = 0, set()
        for file in files:
            if hp["max_items"] is not None and len(items) >= hp["max_items"]:
                break
            records = load_records(file, _validate_caption(hp["caption_column"]))
            if not len(records):
                rank_zero_warn(f"{file}: no records")
                continue
            fmt = hp["format"] if hp["format"] != "auto" else detect_format(file, records.column_names)
            self._check_format_options(fmt)
            formats.add(fmt)
            if fmt == "pickapic":
                pairs, file_ties = read_pickapic(file, records, hp["caption_column"])
                items, ties = items + pairs, ties + file_ties
            else:
                items += read_manifest(file, records, hp["caption_column"])
        self.format, self.ties_dropped = "+".join(sorted(formats)) or None, ties
        dropped = f"; {ties} ties dropped" if "pickapic" in formats else ""
        rank_zero_info(f"{type(self).__name__} train: {len(items)} pairs from {len(files)} file(s){dropped}")
        return items

    def _train_dataset(self) -> PSODataset:
        hp, items = self.hparams, self._read_items()
        if hp["reference_source"] == "dataset_loser":
            _check_dataset_references(items, self.format)
        dreambooth = self.format == "dreambooth"
        return PSODataset(
            items,
            resolution=hp["resolution"],
            references="latents" if hp["reference_source"] == "model_samples" else "image",
            cache_dir=hp["reference_cache"],
            num_references=(hp["num_references"] or DEFAULT_NUM_REFERENCES) if dreambooth else None,
            reference_prompt=hp["class_prompt"] if dreambooth else None,
            random_crop=hp["random_crop"],
            random_flip=hp["random_flip"],
            seed=hp["seed"],
        )

    def _needed_references(self) -> dict[str, str]:
        """Cache key → prompt of every reference training needs."""
        items, hp = self._read_items(), self.hparams
        if self.format == "dreambooth":
            count = hp["num_references"] or DEFAULT_NUM_REFERENCES
            return {f"class:{i}": hp["class_prompt"] for i in range(count)}
        return {item.id: item.caption for item in items}


def _check_unique_ids(items: Sequence[PairItem]) -> None:
    seen: dict[str, ImageRef] = {}
    for item in items:
        first = seen.setdefault(item.id, item.target)
        if first is not item.target:
            where = record_location(first.source, first.index)
            raise RecordError(
                item.target.source, item.target.index, "id", f"duplicate id {item.id!r}, first at {where}"
            )


def _check_dataset_references(items: Sequence[PairItem], fmt: str | None) -> None:
    if fmt in FOLDER_FORMATS:
        raise ValueError(f"reference_source='dataset_loser' needs reference images; format {fmt!r} has none")
    for item in items:
        if item.reference is None:
            raise RecordError(
                item.target.source,
                item.target.index,
                "reference",
                "missing: reference_source='dataset_loser' needs a reference image per item (or use model_samples)",
            )


class PromptDataModule(LightningDataModule):
    """Prompts for online PSO: the module samples pairs from the current model and ranks them with a reward.

    Training batches (:class:`PromptBatch`) are shuffled by ``(seed, epoch)`` and resumable mid-epoch
    (:func:`~ftmods.datamodules.samplers.epoch_loader`); validation batches are the ``val_prompts`` in order.

    Args:
        train_prompts: An inline list or a prompt file (:func:`read_prompts`), e.g. the official
            ``4k_training_prompts.json`` (``[{"caption": ..., "trainset_idx": ...}, ...]``, ids = ``trainset_idx``).
        val_prompts: Validation prompts, same forms; ``None`` = no validation.
        caption_column: Caption key of record files.
        batch_size: Training prompts per batch (per device).
        val_batch_size: Validation prompts per batch.
        num_workers: DataLoader worker processes.
        seed: Shuffling seed.
        max_prompts: Keep only the first ``max_prompts`` training prompts.

    Example::

        dm = PromptDataModule("assets/4k_training_prompts.json", "prompts/pickapic_test_unique.txt")
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # {"ids": [...], "captions": [...]}
    """

    def __init__(
        self,
        train_prompts: str | list[str],
        val_prompts: str | list[str] | None = None,
        *,
        caption_column: str = "caption",
        batch_size: int = 4,
        val_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        max_prompts: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size, val_batch_size=val_batch_size, max_prompts=max_prompts)
        self.save_hyperparameters()
        self.train_items: list[PromptItem] | None = None  # built in setup("fit")
        self.val_items: list[PromptItem] | None = None  # built in setup("fit" / "validate")

    def setup(self, stage: str) -> None:
        """Read the training (``fit``) and validation prompts."""
        hp = self.hparams
        if stage == "fit" and self.train_items is None:
            items = read_prompts(hp["train_prompts"], hp["caption_column"])[: hp["max_prompts"]]
            if not items:
                raise ValueError(f"no training prompts in {hp['train_prompts']!r:.200}")
            repeated = len(items) - len({item.caption for item in items})
            rank_zero_info(
                f"{type(self).__name__} train: {len(items)} prompts ({repeated} repeat an earlier caption; kept)"
            )
            self.train_items = items
        if stage in ("fit", "validate") and self.val_items is None and hp["val_prompts"] is not None:
            self.val_items = read_prompts(hp["val_prompts"], hp["caption_column"])
            rank_zero_info(f"{type(self).__name__} val: {len(self.val_items)} prompts")

    def train_dataloader(self) -> Any:
        """Shuffled by ``(seed, epoch)``, resumable mid-epoch."""
        if self.train_items is None:
            raise ValueError("call setup('fit') before train_dataloader()")
        return epoch_loader(
            PromptDataset(self.train_items),
            trainer=self.trainer,
            seed=self.hparams["seed"],
            shuffle=True,
            batch_size=self.hparams["batch_size"],
            collate_fn=collate_prompts,
            num_workers=self.hparams["num_workers"],
        )

    def val_dataloader(self) -> Any:
        """The validation prompts in order; empty without ``val_prompts``."""
        return _val_loader(self.val_items, self.hparams["val_batch_size"], self.hparams["num_workers"])
