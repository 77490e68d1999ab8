r"""Few-shot image classification prompts for CLS-RL / No-Thinking CLS-RL (arXiv 2503.16188): image, choice list, label.

Every item is one image with its ground-truth class name and a multiple-choice question built as in the paper's
``few-shot-data.ipynb`` and ``grpo.py`` / ``grpo_direct.py``:

- ``problem = "{prefix}\nPlease choose one from list [ {c1}, {c2}, ..., {cK}]."`` with a per-dataset question
  ``prefix`` (:data:`QUESTION_PREFIXES`);
- the choice list holds K class names of the item's class subset, K = :func:`num_choices_for` (the paper's rule:
  ``int(0.4·C)``, all classes if that is below 30, at most 100). The K names are a random subset; if the label is
  missing it replaces the last one; then the list is shuffled (:func:`choice_list`). The paper sets no seed; here the
  draw is seeded per item by ``(seed, stage, class subset, item id)``, so it is fixed for the item across epochs and
  runs (the paper froze its prompts in files too);
- the user turn is an image part followed by the text ``prompt_template.format(problem=...)``: the training
  templates of :data:`TRAIN_PROMPTS` and the evaluation templates of :data:`EVAL_PROMPTS` (spec §1.2, §1.6, §3).

Batches are raw (:class:`FewShotImageBatch`: chat messages, PIL images, labels, choices); the module tokenizes them
with its processor through :func:`encode_prompts`, so images and chat templates are handled in one place.

Sources (``train_root_or_file`` etc.):

- an **ImageFolder tree** ``root/<class folder>/**/*.png|jpg|...``;
- **records** (``.jsonl``, ``.json`` or ``.parquet``; globs or lists allowed) of ``{"image": path, "label": str}``
  with the image path relative to the record file's folder (or absolute). Field names are configurable.

Classes and their order come from ``class_names`` (a file or an inline list / mapping, see :func:`read_class_names`),
else from the sorted union of class folders / labels over all given sources, with ``_`` shown as a space. A folder
or label matches a class by key, by display name, or by display name after replacing ``_`` with a space. Base-to-new
(CoOp convention): base = the first ⌈C/2⌉ classes, new = the rest (:func:`class_subset`).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ftmods.datamodules.records import RecordError, as_file_list, check_record, load_records
from ftmods.datamodules.samplers import RepeatGroupSampler, epoch_sampler, resumable_loader

ClassSplit = Literal["all", "base", "new"]
Mode = Literal["think", "no_think"]
ClassNamesSpec = str | list[str] | dict[str, str]

QUESTION_PREFIXES: dict[str, str] = {
    "default": "What type of object is in the photo?",
    "eurosat": "What type of object is in the centered satellite photo?",
    "ucf101": "What actions is the person performing in the photo?",
    "dtd": "What type of texture is in the photo?",
    "fgvc_aircraft": "What type of aircraft is in the photo?",
}
"""The paper's question prefix per dataset; every dataset not listed uses ``default``."""

PROBLEM_TEMPLATE = "{prefix}\nPlease choose one from list [ {choices}]."
"""The ``problem`` text; ``{choices}`` is the choice list joined with ``", "``."""

_THINK_INSTRUCTION = "output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
TRAIN_PROMPTS: dict[str, str] = {
    "think": "{problem}\n Please " + _THINK_INSTRUCTION,
    "no_think": "{problem}\n Please directly output the answer.",
}
"""Training user text per mode (``grpo.py`` / ``grpo_direct.py``); the second line starts with a space."""

EVAL_PROMPTS: dict[tuple[str, str], str] = {
    ("think", "few_shot"): "{problem} First " + _THINK_INSTRUCTION,
    ("think", "base_to_new"): "{problem} Please " + _THINK_INSTRUCTION,
    ("no_think", "few_shot"): "{problem} Please directly output the answer name.",
    ("no_think", "base_to_new"): "{problem} Please directly output the answer name.",
}
"""Evaluation user text per (mode, setting) from the paper's test scripts; ``all`` classes is the few-shot setting,
``base`` / ``new`` the base-to-new one."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File suffixes (any case) that count as images in an ImageFolder tree."""

_WNID_LINE = re.compile(r"^(n\d{8})\s+(\S.*)$")  # CoOp's ImageNet classnames.txt: "n01440764 tench"


# ------------------------------------------------------------------------------------------------------ prompts


def num_choices_for(num_classes: int) -> int:
    """The paper's choice-list length K for C classes: ``int(0.4·C)``, C if that is below 30, capped at 100.

    Example:
        >>> [num_choices_for(c) for c in (10, 37, 47, 100, 101, 196, 397, 1000)]
        [10, 37, 47, 40, 40, 78, 100, 100]
    """
    k = int(num_classes * 0.4)
    if k < 30:
        k = num_classes
    return min(k, 100)


def choice_list(label: str, class_names: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """K of ``class_names`` in random order, always including ``label`` (``few-shot-data.ipynb``'s ``choice_list``).

    A uniformly random K-subset (the notebook shuffles all names and keeps the first K); if ``label`` is not among
    them it replaces the last one; the list is then shuffled.

    Example:
        >>> choices = choice_list("cat", ["cat", "dog", "bird", "fish"], 2, random.Random(0))
        >>> len(choices), "cat" in choices
        (2, True)
    """
    if k < 1:
        raise ValueError(f"the choice list needs at least 1 name, got k={k}")
    choices = rng.sample(list(class_names), min(k, len(class_names)))
    if label not in choices:
        choices[-1] = label
    rng.shuffle(choices)
    return choices


def build_problem(
    choices: Sequence[str], *, prefix: str = QUESTION_PREFIXES["default"], template: str = PROBLEM_TEMPLATE
) -> str:
    r"""The ``problem`` text: ``template`` with ``{prefix}`` and ``{choices}`` (joined with ``", "``).

    Example:
        >>> build_problem(["dog", "cat"])
        'What type of object is in the photo?\nPlease choose one from list [ dog, cat].'
    """
    return template.format(prefix=prefix, choices=", ".join(choices))


def build_messages(text: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """One user turn with an image part and a text part (plus a system turn if ``system_prompt`` is given).

    Without a system turn, Qwen2-VL's chat template inserts its default one, as in the paper.
    """
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return [user] if system_prompt is None else [{"role": "system", "content": system_prompt}, user]


def default_eval_template(mode: Mode, class_split: ClassSplit) -> str:
    """The paper's evaluation template: few-shot wording for ``all`` classes, base-to-new wording otherwise."""
    return EVAL_PROMPTS[(mode, "few_shot" if class_split == "all" else "base_to_new")]


def _check_template(name: str, template: str, **fields: str) -> None:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{name}={template!r} is not a format string with {sorted(fields)}: {error!r}") from None
    missing = [key for key in fields if "{" + key + "}" not in template]
    if missing:
        raise ValueError(f"{name}={template!r} does not use {missing}")


# ------------------------------------------------------------------------------------------------------ classes


class ClassList:
    """Ordered classes: display ``names`` and the ``keys`` (folder names / labels) that select them.

    Args:
        keys: One key per class (unique).
        names: One display name per class (shown in the choice list and used as the label).
        source: Where the classes came from, for error messages.
    """

    def __init__(self, keys: Sequence[str], names: Sequence[str], source: str) -> None:
        if len(keys) != len(names) or not keys:
            raise ValueError(f"{source}: need the same, non-zero number of class keys and names")
        duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
        if duplicates:
            raise ValueError(f"{source}: duplicate classes {duplicates[:5]}")
        self.keys, self.names, self.source = list(keys), list(names), source
        self._by_key = {key: i for i, key in enumerate(self.keys)}
        self._by_name: dict[str, int] = {}
        for i, name in enumerate(self.names):
            self._by_name.setdefault(name, i)

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self, key: str) -> int | None:
        """The class a folder name or label selects: by key, by name, or by name with ``_`` read as a space."""
        for lookup, value in ((self._by_key, key), (self._by_name, key), (self._by_name, key.replace("_", " "))):
            if value in lookup:
                return lookup[value]
        return None


def read_class_names(spec: ClassNamesSpec) -> list[tuple[str, str]]:
    """``(key, display name)`` per class, in class order, from a file or an inline list / mapping.

    Files: ``.json`` holds a list of names or a mapping key → name (e.g. ``{"n01440764": "tench"}``). Any other
    suffix is text with one class per line: ``name``, ``key<TAB>name``, or CoOp's ImageNet form ``n01440764 tench``.
    Blank lines are skipped. Without a key, the key is the name.
    """
    if isinstance(spec, Mapping):
        return [(str(key), str(name)) for key, name in spec.items()]
    if not isinstance(spec, str):
        return [(str(name), str(name)) for name in spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class-names file not found: {spec}")
    if path.suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, (list, dict)):
            raise ValueError(f"{path}: expected a JSON list of names or an object key -> name")
        return read_class_names(content)
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if "\t" in line:
            key, name = (part.strip() for part in line.split("\t", 1))
        elif match := _WNID_LINE.match(line):
            key, name = match.group(1), match.group(2).strip()
        else:
            key = name = line
        entries.append((key, name))
    return entries


def build_class_list(
    class_names: ClassNamesSpec | None, observed: Iterable[str], *, underscores_to_spaces: bool = True
) -> ClassList:
    """The classes: from ``class_names`` if given, else the sorted ``observed`` folder names / labels.

    Names derived from ``observed`` show ``_`` as a space when ``underscores_to_spaces``; names from ``class_names``
    are taken verbatim.
    """
    if class_names is not None:
        entries = read_class_names(class_names)
        source = class_names if isinstance(class_names, str) else "class_names"
        return ClassList([key for key, _ in entries], [name for _, name in entries], source)
    keys = sorted(set(observed))
    if not keys:
        raise ValueError("no classes found: the sources hold no class folders / labels and class_names is not set")
    names = [key.replace("_", " ") if underscores_to_spaces else key for key in keys]
    return ClassList(keys, names, "the class folders / labels of the sources")


def class_subset(num_classes: int, class_split: ClassSplit) -> range:
    """Class indices of a split: ``all``; ``base`` = the first ⌈C/2⌉; ``new`` = the rest (CoOp base-to-new).

    Example:
        >>> class_subset(5, "base"), class_subset(5, "new")
        (range(0, 3), range(3, 5))
    """
    half = math.ceil(num_classes / 2)
    return {"all": range(num_classes), "base": range(half), "new": range(half, num_classes)}[class_split]


# -------------------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class ImageItem:
    """One image and its class; ``source`` / ``index`` / ``field`` locate its record for error messages."""

    id: str
    """Image path relative to the ImageFolder root, or as written in the record."""
    path: Path
    """Resolved image file."""
    key: str
    """Class folder name or raw label."""
    source: str
    """ImageFolder root or records file."""
    index: int = -1
    """Record index in ``source`` (-1 for an ImageFolder)."""
    field: str | None = None
    """Image field of the record (``None`` for an ImageFolder)."""
    label_field: str | None = None
    """Label field of the record (``None`` for an ImageFolder)."""
    class_index: int = -1
    """Index into the class list (-1 until resolved)."""


class ImageError(RecordError):
    """An image cannot be read; the message names the image file and the record (or class folder) behind it."""

    def __init__(self, item: ImageItem, reason: str) -> None:
        self.image = str(item.path)
        if item.field is not None:
            super().__init__(item.source, item.index, item.field, f"cannot read image {item.path}: {reason}")
            return
        self.file, self.index, self.field = str(item.path), item.index, None
        ValueError.__init__(
            self, f"{item.path}: cannot read image (class folder {item.key!r} of ImageFolder {item.source}): {reason}"
        )


def scan_image_folder(root: str | Path) -> tuple[list[str], list[ImageItem]]:
    """Class folder names (sorted, empty ones included) and the images below them (sorted by path)."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [ImageItem(p.relative_to(root).as_posix(), p, folder.name, str(root)) for p in files]
    return [folder.name for folder in folders], items


def read_image_records(file: str, *, image_field: str = "image", label_field: str = "label") -> list[ImageItem]:
    """Items of a ``.jsonl`` / ``.json`` / ``.parquet`` file; a missing field or image file raises RecordError."""

    def validate(record: dict[str, Any]) -> None:
        for field in (image_field, label_field):
            if record.get(field) is None:
                raise KeyError((field, "missing"))
            if not isinstance(record[field], str) or not record[field]:
                raise TypeError((field, f"must be a non-empty string, got {record[field]!r:.60}"))

    folder = Path(file).parent
    items = []
    for index, record in enumerate(load_records(file, validate).to_list()):
        check_record(file, index, record, validate)
        path = Path(record[image_field]).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise RecordError(file, index, image_field, f"image file not found: {path}")
        items.append(ImageItem(record[image_field], path, record[label_field], file, index, image_field, label_field))
    return items


def read_source(
    spec: str | list[str], *, image_field: str = "image", label_field: str = "label"
) -> tuple[list[str], list[ImageItem]]:
    """Class keys seen and items of an ImageFolder root (a directory) or of record files (paths, globs or a list).

    The keys of an ImageFolder include its empty class folders; those of record files are their labels.
    """
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        return scan_image_folder(Path(spec).expanduser())
    items = []
    for file in as_file_list(spec):
        items += read_image_records(file, image_field=image_field, label_field=label_field)
    return [item.key for item in items], items


def resolve_classes(items: Sequence[ImageItem], classes: ClassList) -> list[ImageItem]:
    """Items with ``class_index`` set; an unknown folder or label raises (RecordError naming the label field)."""
    resolved = []
    for item in items:
        index = classes.index_of(item.key)
        if index is None:
            problem = f"{item.key!r} is not one of the {len(classes)} class names (from {classes.source})"
            if item.label_field is None:
                raise ValueError(f"{item.source}: class folder {problem}")
            raise RecordError(item.source, item.index, item.label_field, problem)
        resolved.append(replace(item, class_index=index))
    return resolved


def sample_shots(items: Sequence[ImageItem], shots: int, seed: int, keys: Sequence[str]) -> list[ImageItem]:
    """Up to ``shots`` items per class, a seeded random choice per class (seeded by ``(seed, class key)``).

    The draw for a class does not depend on the other classes, so base-to-new and few-shot runs with the same seed
    train on the same images of the shared classes. Items keep their source order.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_class: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        by_class.setdefault(item.class_index, []).append(position)
    chosen: list[int] = []
    for class_index, positions in by_class.items():
        rng = random.Random(f"{seed}:shots:{keys[class_index]}")
        chosen += rng.sample(positions, min(shots, len(positions)))
    return [items[position] for position in sorted(chosen)]


def load_image(item: ImageItem, image_size: int | None = None) -> Image.Image:
    """The item's image as RGB, resized to ``image_size``² with LANCZOS when given; unreadable → ImageError."""
    try:
        with Image.open(item.path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(item, f"{type(error).__name__}: {error}") from error
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return image


# ------------------------------------------------------------------------------------------------ dataset, batch


class FewShotImageSample(TypedDict):
    """One prompt: the spec's item (image, label, class names, problem, solution) plus the chat messages."""

    id: str
    image: Image.Image
    label: str  # display name of the true class
    class_id: int  # index into the full class list
    choices: list[str]  # the choice list shown in the problem (contains label)
    problem: str
    solution: str  # "<answer> {label} </answer>"
    prompt: list[dict[str, Any]]  # chat messages: [system?], user = [image part, text part]
    subset: str  # class subset: "all" | "base" | "new"


class FewShotImageBatch(TypedDict):
    """A collated batch of B raw prompts (not tokenized; see :func:`encode_prompts`)."""

    prompts: list[list[dict[str, Any]]]  # B chat conversations, each with one image part
    images: list[Image.Image]  # B RGB images, in prompt order
    labels: list[str]  # B true class names
    choices: list[list[str]]  # B choice lists
    ids: list[str]  # B item ids (image paths)
    problems: list[str]  # B problem texts
    solutions: list[str]  # B "<answer> label </answer>"
    subsets: list[str]  # B class subsets ("all" | "base" | "new")
    class_ids: Tensor  # (B,) long, index into the full class list (also lets Lightning infer the batch size)


@dataclass(frozen=True)
class PromptConfig:
    """How an item becomes a prompt."""

    template: str
    """User text with ``{problem}``."""
    prefix: str = QUESTION_PREFIXES["default"]
    """Question prefix."""
    problem_template: str = PROBLEM_TEMPLATE
    """Problem text with ``{prefix}`` and ``{choices}``."""
    num_choices: int | None = None
    """Choice-list length; ``None`` = :func:`num_choices_for` of the subset's class count."""
    system_prompt: str | None = None
    """Optional system turn."""


class FewShotImageDataset(Dataset[FewShotImageSample]):
    """Items of one class subset with their (lazily built, seeded) choice lists and prompts; images load lazily.

    Args:
        items: Items with ``class_index`` resolved, all in the subset.
        classes: The full class list.
        subset: The class subset the choice lists are drawn from.
        prompt: Prompt settings.
        seed: Seed of the choice lists.
        stage: Mixed into the choice-list seed (``train`` / ``val`` / ``test``).
        image_size: Resize images to this square size (LANCZOS); ``None`` keeps them.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        classes: ClassList,
        subset: ClassSplit,
        prompt: PromptConfig,
        *,
        seed: int = 0,
        stage: str = "train",
        image_size: int | None = None,
    ) -> None:
        self.items, self.classes, self.subset, self.prompt = list(items), classes, subset, prompt
        self.seed, self.stage, self.image_size = seed, stage, image_size
        self.subset_names = [classes.names[i] for i in class_subset(len(classes), subset)]
        self.num_choices = prompt.num_choices or num_choices_for(len(self.subset_names))

    def __len__(self) -> int:
        return len(self.items)

    def choices(self, index: int) -> list[str]:
        """The item's choice list (same for the same seed, stage, subset and item id)."""
        item = self.items[index]
        rng = random.Random(f"{self.seed}:{self.stage}:{self.subset}:{item.id}")
        return choice_list(self.classes.names[item.class_index], self.subset_names, self.num_choices, rng)

    def __getitem__(self, index: int) -> FewShotImageSample:
        item = self.items[index]
        label, choices = self.classes.names[item.class_index], self.choices(index)
        problem = build_problem(choices, prefix=self.prompt.prefix, template=self.prompt.problem_template)
        text = self.prompt.template.format(problem=problem)
        return FewShotImageSample(
            id=item.id,
            image=load_image(item, self.image_size),
            label=label,
            class_id=item.class_index,
            choices=choices,
            problem=problem,
            solution=f"<answer> {label} </answer>",
            prompt=build_messages(text, self.prompt.system_prompt),
            subset=self.subset,
        )


def collate_fewshot_images(samples: Sequence[FewShotImageSample]) -> FewShotImageBatch:
    """Gather samples into a :class:`FewShotImageBatch` (lists, plus the ``(B,)`` ``class_ids`` tensor)."""
    return FewShotImageBatch(
        prompts=[s["prompt"] for s in samples],
        images=[s["image"] for s in samples],
        labels=[s["label"] for s in samples],
        choices=[s["choices"] for s in samples],
        ids=[s["id"] for s in samples],
        problems=[s["problem"] for s in samples],
        solutions=[s["solution"] for s in samples],
        subsets=[s["subset"] for s in samples],
        class_ids=torch.tensor([s["class_id"] for s in samples], dtype=torch.long),  # (B,)
    )


def encode_prompts(processor: Any, batch: Mapping[str, Any], **processor_kwargs: Any) -> dict[str, Tensor]:
    """Tokenize a batch's prompts and images with a VLM processor, left-padded for generation.

    Renders each conversation with ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` and calls
    ``processor(text=..., images=..., padding=True, padding_side="left", return_tensors="pt")``. For Qwen2-VL this
    gives ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``(B, P)``, ``pixel_values`` ``(Σ patches, D)``
    and ``image_grid_thw`` ``(B, 3)``.

    Args:
        processor: A processor with a chat template (e.g. ``Qwen2VLProcessor``).
        batch: A :class:`FewShotImageBatch` (only ``prompts`` and ``images`` are used).
        processor_kwargs: Extra arguments for the processor call.
    """
    prompts, images = list(batch["prompts"]), list(batch["images"])
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images; each prompt has exactly one image")
    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    kwargs = {"padding": True, "padding_side": "left", "return_tensors": "pt", **processor_kwargs}
    return dict(processor(text=texts, images=images, **kwargs))


# ---------------------------------------------------------------------------------------------------- DataModule


class FewShotImageDataModule(LightningDataModule):
    """Few-shot / base-to-new image classification prompts for CLS-RL and No-Thinking CLS-RL.

    Training yields :class:`FewShotImageBatch` es of ``shots`` images per class of the ``split`` classes, shuffled
    by ``(seed, epoch)`` and resumable mid-epoch. Validation and test yield every image of each ``eval_splits``
    subset in source order (one loader per subset), with the evaluation prompt of the paper's test scripts.

    Args:
        train_root_or_file: Training ImageFolder root, or record file(s) (``.jsonl`` / ``.json`` / ``.parquet``,
            globs allowed) of ``{image_field: path relative to the file, label_field: class}``.
        val_root_or_file: Validation data, same forms; none = no validation.
        test_root_or_file: Test data, same forms.
        class_names: Class-names file (``.txt`` one per line, ``key<TAB>name`` or ``n01440764 tench``; ``.json``
            list or key → name mapping) or an inline list / mapping. Fixes the class order (and so base / new).
            ``None``: the sorted folder names / labels of all sources.
        image_field: Record key of the image path.
        label_field: Record key of the class (a key or display name of ``class_names``).
        shots: Training images per class (seeded draw); ``None`` = all (the paper uses 4).
        split: Training classes: ``all`` (few-shot), ``base`` (base-to-new training) or ``new``.
        eval_splits: Class subsets to evaluate, one val / test loader each. ``None``: ``["all"]`` when
            ``split="all"``, else ``["base", "new"]``.
        mode: ``think`` (CLS-RL) or ``no_think`` (No-Thinking CLS-RL); selects the default prompt templates.
        num_choices: Choice-list length; ``None`` = the paper's rule (:func:`num_choices_for`) per class subset.
        question_prefix: First line of the problem (see :data:`QUESTION_PREFIXES`).
        problem_template: Problem text with ``{prefix}`` and ``{choices}``.
        prompt_template: Training user text with ``{problem}``; ``None`` = :data:`TRAIN_PROMPTS` ``[mode]``.
        eval_prompt_template: Evaluation user text with ``{problem}``; ``None`` = :data:`EVAL_PROMPTS` (few-shot
            wording for ``all``, base-to-new wording for ``base`` / ``new``).
        system_prompt: System turn; ``None`` leaves the chat template's default (as the paper does).
        image_size: Resize images to this square size with LANCZOS before the processor (paper: 384; tiny: 56);
            ``None`` keeps them.
        underscores_to_spaces: Show ``_`` in folder names / labels as spaces (names from ``class_names`` are
            verbatim).
        batch_size: Training prompts per batch (per device).
        eval_batch_size: Validation / test prompts per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the shots, the choice lists and the shuffling.
        verify_images: Decode every image of the stage's datasets in ``setup`` (errors name file and record);
            otherwise images are checked when loaded.
        num_iterations: GRPO's mu: yield every optimizer step's ``accumulate_grad_batches`` training batches this many
            times in a row, so :class:`ftmods.cls_rl.CLSRLModule` (same ``num_iterations``) reuses their rollouts.

    Example::

        dm = FewShotImageDataModule("data/dtd/train", test_root_or_file="data/dtd/test", class_names="dtd.txt",
                                    shots=4, split="base", mode="no_think", image_size=384,
                                    question_prefix=QUESTION_PREFIXES["dtd"])
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # FewShotImageBatch
        inputs = encode_prompts(processor, batch)  # input_ids, pixel_values, image_grid_thw, ...
    """

    def __init__(
        self,
        train_root_or_file: str | list[str],
        val_root_or_file: str | list[str] | None = None,
        test_root_or_file: str | list[str] | None = None,
        *,
        class_names: ClassNamesSpec | None = None,
        image_field: str = "image",
        label_field: str = "label",
        shots: int | None = None,
        split: ClassSplit = "all",
        eval_splits: list[ClassSplit] | None = None,
        mode: Mode = "think",
        num_choices: int | None = None,
        question_prefix: str = QUESTION_PREFIXES["default"],
        problem_template: str = PROBLEM_TEMPLATE,
        prompt_template: str | None = None,
        eval_prompt_template: str | None = None,
        system_prompt: str | None = None,
        image_size: int | None = None,
        underscores_to_spaces: bool = True,
        batch_size: int = 2,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        verify_images: bool = False,
        num_iterations: int = 1,
    ) -> None:
        super().__init__()
        _check_arguments(shots, num_choices, image_size, batch_size, eval_batch_size)
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        _check_template("problem_template", problem_template, prefix="", choices="")
        for name, template in (("prompt_template", prompt_template), ("eval_prompt_template", eval_prompt_template)):
            if template is not None:
                _check_template(name, template, problem="")
        self.save_hyperparameters()
        self.eval_splits: list[ClassSplit] = eval_splits or (["all"] if split == "all" else ["base", "new"])
        self.classes: ClassList | None = None  # built in setup()
        self._items: dict[str, list[ImageItem]] = {}  # stage -> resolved items of its source, built in setup()
        self.datasets: dict[str, list[FewShotImageDataset]] = {}  # stage -> one dataset per class subset

    def setup(self, stage: str) -> None:
        """Read the sources and classes (once), then build the datasets ``stage`` needs."""
        self._read_sources()
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}.get(stage, [])
        for name in wanted:
            if name in self.datasets or name not in self._items:
                continue
            self.datasets[name] = self._train_datasets() if name == "train" else self._eval_datasets(name)
            if self.hparams["verify_images"]:
                for dataset in self.datasets[name]:
                    for item in dataset.items:
                        load_image(item)
            sizes = ", ".join(f"{d.subset}: {len(d)}" for d in self.datasets[name])
            rank_zero_info(f"{type(self).__name__} {name}: {sizes} images ({len(self.classes or [])} classes)")

    def class_names_for(self, split: ClassSplit = "all") -> list[str]:
        """Display names of the ``all`` / ``base`` / ``new`` classes, in class order."""
        classes = self._read_sources()
        return [classes.names[i] for i in class_subset(len(classes), split)]

    def train_dataloader(self) -> Any:
        """Shuffled by ``(seed, epoch)``, resumable mid-epoch (``StatefulDataLoader`` state in checkpoints).

        With ``num_iterations`` > 1 each group of ``accumulate_grad_batches`` batches comes ``num_iterations`` times
        (:class:`ftmods.datamodules.samplers.RepeatGroupSampler`, which also splits the data over ranks).
        """
        dataset, seed, hp = self._datasets("train")[0], self.hparams["seed"], self.hparams
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        sampler: Any = epoch_sampler(dataset, trainer=trainer, seed=seed, shuffle=True)
        if hp["num_iterations"] > 1:
            sampler = RepeatGroupSampler(
                dataset,
                group_size=hp["batch_size"] * (trainer.accumulate_grad_batches if trainer is not None else 1),
                repeats=hp["num_iterations"],
                seed=seed,
                epoch=epoch,
                num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0,
            )
        return resumable_loader(
            dataset,
            batch_size=hp["batch_size"],
            sampler=sampler,
            collate_fn=collate_fewshot_images,
            num_workers=self.hparams["num_workers"],
        )

    def val_dataloader(self) -> Any:
        """One loader per ``eval_splits`` subset (a single loader for one), in source order; empty without data."""
        return self._eval_loaders("val") if "val" in self.datasets else []

    def test_dataloader(self) -> Any:
        """One loader per ``eval_splits`` subset (a single loader for one), in source order."""
        return self._eval_loaders("test")

    def predict_dataloader(self) -> Any:
        """The test loaders (``predict`` answers every test image: :meth:`ftmods.cls_rl.CLSRLModule.predict_step`)."""
        return self._eval_loaders("test")

    # ---------------------------------------------------------------------------------------------------- helpers

    def _read_sources(self) -> ClassList:
        if self.classes is not None:
            return self.classes
        hp = self.hparams
        specs = {"train": hp["train_root_or_file"], "val": hp["val_root_or_file"], "test": hp["test_root_or_file"]}
        raw = {
            name: read_source(spec, image_field=hp["image_field"], label_field=hp["label_field"])
            for name, spec in specs.items()
            if spec is not None
        }
        observed = [key for keys, _ in raw.values() for key in keys]
        classes = build_class_list(hp["class_names"], observed, underscores_to_spaces=hp["underscores_to_spaces"])
        for name, (_, items) in raw.items():
            self._items[name] = resolve_classes(items, classes)
        self.classes = classes
        return classes

    def _prompt(self, template: str) -> PromptConfig:
        hp = self.hparams
        return PromptConfig(
            template=template,
            prefix=hp["question_prefix"],
            problem_template=hp["problem_template"],
            num_choices=hp["num_choices"],
            system_prompt=hp["system_prompt"],
        )

    def _subset_items(self, stage: str, subset: ClassSplit) -> list[ImageItem]:
        wanted = set(class_subset(len(self.classes or []), subset))
        return [item for item in self._items[stage] if item.class_index in wanted]

    def _train_datasets(self) -> list[FewShotImageDataset]:
        hp, classes = self.hparams, self._read_sources()
        split: ClassSplit = hp["split"]
        items = self._subset_items("train", split)
        if hp["shots"] is not None:
            items = sample_shots(items, hp["shots"], hp["seed"], classes.keys)
            _warn_short_classes(items, class_subset(len(classes), split), hp["shots"], classes)
        if not items:
            raise ValueError(f"no training images of the {split!r} classes in {hp['train_root_or_file']}")
        template = hp["prompt_template"] or TRAIN_PROMPTS[hp["mode"]]
        dataset = FewShotImageDataset(
            items, classes, split, self._prompt(template), seed=hp["seed"], image_size=hp["image_size"]
        )
        return [dataset]

    def _eval_datasets(self, stage: str) -> list[FewShotImageDataset]:
        hp, classes = self.hparams, self._read_sources()
        datasets = []
        for subset in self.eval_splits:
            template = hp["eval_prompt_template"] or default_eval_template(hp["mode"], subset)
            items = self._subset_items(stage, subset)
            if not items:
                rank_zero_warn(f"{stage}: no images of the {subset!r} classes")
            datasets.append(
                FewShotImageDataset(
                    items,
                    classes,
                    subset,
                    self._prompt(template),
                    seed=hp["seed"],
                    stage=stage,
                    image_size=hp["image_size"],
                )
            )
        return datasets

    def _datasets(self, stage: str) -> list[FewShotImageDataset]:
        if stage not in self.datasets:
            option = {"train": "train_root_or_file", "val": "val_root_or_file", "test": "test_root_or_file"}[stage]
            raise ValueError(f"no {stage} data: set {option} and call setup() for the stage first")
        return self.datasets[stage]

    def _eval_loaders(self, stage: str) -> Any:
        loaders = [
            resumable_loader(
                dataset,
                batch_size=self.hparams["eval_batch_size"],
                shuffle=False,
                collate_fn=collate_fewshot_images,
                num_workers=self.hparams["num_workers"],
            )
            for dataset in self._datasets(stage)
        ]
        return loaders[0] if len(loaders) == 1 else loaders


def _check_arguments(
    shots: int | None, num_choices: int | None, image_size: int | None, batch_size: int, eval_batch_size: int
) -> None:
    for name, value in (("shots", shots), ("num_choices", num_choices), ("image_size", image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _warn_short_classes(items: Sequence[ImageItem], subset: range, shots: int, classes: ClassList) -> None:
    counts = dict.fromkeys(subset, 0)
    for item in items:
        counts[item.class_index] += 1
    short = [f"{classes.names[i]!r} ({n})" for i, n in counts.items() if n < shots]
    if short:
        rank_zero_warn(f"{len(short)} training classes have fewer than shots={shots} images: {', '.join(short[:10])}")
