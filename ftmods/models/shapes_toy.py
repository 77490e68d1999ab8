"""Coloured-shapes images and a tiny Qwen2-VL warm-started on them: CLS-RL's offline toy (spec cls_rl §7).

- :func:`draw_shape` draws one ``"<colour> <shape>"`` image (56x56, one filled shape, seeded jitter of position, size,
  rotation and background); ``configs/data/make_shapes.py`` writes the committed ImageFolder set with it.
- :func:`build_tiny_shapes_vlm` (``tiny/qwen2-vl-shapes``) takes the random tiny Qwen2-VL of
  :func:`ftmods.models.tiny.build_tiny_vlm` and gives it a short supervised warm start on freshly drawn shapes (never
  the committed train / test images), with the paper's prompts in both modes: think prompts answer
  ``<think> {colour}, {shape} </think><answer> {label} </answer>``, direct prompts answer ``{label}``. The warm start
  is short on purpose: the model has learnt the answer formats and part of the classes, so sampled completions
  differ in reward and GRPO has something to improve (the point of the paper's comparison; the random model scores
  0 everywhere, which gives GRPO no signal). The measured greedy accuracies are recorded in :data:`SIDECAR_FILE`.

Example::

    path = build_tiny_shapes_vlm("/tmp/shapes-vlm")  # about 20 s on 2 CPU threads
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

CLASSES = ("red circle", "blue square", "green triangle", "red square", "blue circle", "yellow star")
"""Class order of the shapes set: the first half is the *base* split, the second half (recombining the base colours
and shapes) the *new* one."""
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 200, 30)}
BACKGROUNDS = ((245, 245, 245), (230, 236, 242), (242, 236, 226))
SIZE = 56
"""Image side: one 4x4 grid of 14-pixel patches, i.e. 4 image tokens for the tiny Qwen2-VL processor."""
SIDECAR_FILE = "ftmods_shapes_toy.json"
"""Written next to the weights: warm-start settings and measured accuracies."""
THINK_TARGET = "<think> {colour}, {shape} </think><answer> {label} </answer>"
"""Warm-start answer to a think prompt."""


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


@dataclass(frozen=True)
class WarmStart:
    """Supervised warm start of the tiny VLM on the shapes (full fine-tuning, AdamW)."""

    images_per_class: int = 24
    """Freshly drawn training images per class (seeded apart from the committed set)."""
    steps: int = 120
    """Optimizer steps."""
    batch_size: int = 12
    """Examples per step (each image is asked once in each mode over an epoch)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the images, choice lists and the order."""


DEFAULT_WARM_START = WarmStart()


def _examples(spec: WarmStart) -> list[dict[str, Any]]:
    """Each image once per mode, with the mode's training prompt and a choice list of all classes."""
    from ftmods.datamodules.fewshot_images import TRAIN_PROMPTS, build_messages, build_problem, choice_list

    rng = random.Random(f"shapes-toy:{spec.seed}")
    examples = []
    for label in CLASSES:
        colour, shape = label.split(" ")
        for number in range(spec.images_per_class):
            image = draw_shape(label, random.Random(f"warm:{spec.seed}:{label}:{number}")).convert("RGB")
            for mode in ("think", "no_think"):
                problem = build_problem(choice_list(label, CLASSES, len(CLASSES), rng))
                target = THINK_TARGET.format(colour=colour, shape=shape, label=label) if mode == "think" else label
                messages = build_messages(TRAIN_PROMPTS[mode].format(problem=problem))
                examples.append({"prompt": messages, "image": image, "target": target, "label": label, "mode": mode})
    rng.shuffle(examples)
    return examples


def _supervised_batch(processor: Any, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Prompt (left padded) + target + eos, with labels only on the target and eos."""
    from ftmods.datamodules.fewshot_images import encode_prompts

    inputs = encode_prompts(
        processor, {"prompts": [e["prompt"] for e in examples], "images": [e["image"] for e in examples]}
    )
    tokenizer = processor.tokenizer
    targets = [
        tokenizer(e["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for e in examples
    ]
    width = max(len(t) for t in targets)
    answer = torch.full((len(targets), width), tokenizer.pad_token_id)  # (B, A) right padded
    for row, ids in enumerate(targets):
        answer[row, : len(ids)] = torch.tensor(ids)
    answer_mask = answer != tokenizer.pad_token_id  # (B, A)
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), answer.masked_fill(~answer_mask, -100)], 1)
    return {
        "input_ids": torch.cat([inputs["input_ids"], answer], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], answer_mask.long()], 1),
        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
        "labels": labels,
    }


def warm_start(model: Any, processor: Any, spec: WarmStart = DEFAULT_WARM_START) -> None:
    """Supervised fine-tuning of ``model`` in place on freshly drawn shapes (both prompt modes)."""
    examples = _examples(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    model.train()
    for step in range(spec.steps):
        start = step * spec.batch_size % len(examples)
        chunk = (examples + examples)[start : start + spec.batch_size]
        loss = model(**_supervised_batch(processor, chunk)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def greedy_accuracy(model: Any, processor: Any, *, mode: str, per_class: int = 8, seed: int = 1) -> float:
    """Exact-match greedy accuracy on freshly drawn images (the mode's training reward: CLS-RL accuracy or equality)."""
    from ftmods.cls_rl.rewards import accuracy_reward, equality_reward
    from ftmods.datamodules.fewshot_images import (
        TRAIN_PROMPTS,
        build_messages,
        build_problem,
        choice_list,
        encode_prompts,
    )

    rng = random.Random(f"probe:{seed}")
    prompts, images, labels = [], [], []
    for label in CLASSES:
        for number in range(per_class):
            images.append(draw_shape(label, random.Random(f"probe:{seed}:{label}:{number}")).convert("RGB"))
            problem = build_problem(choice_list(label, CLASSES, len(CLASSES), rng))
            prompts.append(build_messages(TRAIN_PROMPTS[mode].format(problem=problem)))
            labels.append(label)
    inputs = encode_prompts(processor, {"prompts": prompts, "images": images})
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, do_sample=False, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    reward = accuracy_reward if mode == "think" else equality_reward
    return sum(reward(text, label) for text, label in zip(texts, labels, strict=True)) / len(labels)


def build_tiny_shapes_vlm(folder: str | Path, spec: WarmStart = DEFAULT_WARM_START) -> Path:
    """Build the tiny Qwen2-VL, warm-start it on the shapes and save it (with its processor) into ``folder``.

    Args:
        folder: Output folder (created if missing).
        spec: Warm-start settings.

    Returns:
        ``folder``, loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor``; :data:`SIDECAR_FILE` holds the
        settings and the greedy accuracies per mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ftmods.models.tiny import _as_dir, _save_model, _seeded, build_tiny_vlm
    from ftmods.models.toy_world import _one_thread

    path = _as_dir(folder)
    with tempfile.TemporaryDirectory() as scratch:
        build_tiny_vlm(scratch)
        model = AutoModelForImageTextToText.from_pretrained(scratch, local_files_only=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(scratch, local_files_only=True)
    with _one_thread(), _seeded(spec.seed):  # one reduction order whatever the caller's threads: identical builds
        warm_start(model, processor, spec)
        measured = {mode: greedy_accuracy(model, processor, mode=mode) for mode in ("think", "no_think")}
    _save_model(model, path)
    processor.save_pretrained(path)
    sidecar = {"warm_start": asdict(spec), "greedy_accuracy": measured, "classes": list(CLASSES)}
    (path / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
