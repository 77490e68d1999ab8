"""Few-shot image prompts for CLS-RL: sources, class names, k-shot draws, base/new, choice lists, prompts, errors.

The images come from ``configs/data/make_shapes.py`` (56x56 palette PNGs of coloured shapes, folder names with
``_``), generated into a temporary folder; the committed copy under ``configs/data/shapes`` is checked against the
generator. Prompt strings are compared with the paper's text (spec §1.1, §1.2, §1.6, §3) written out literally.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from ftmods.datamodules.fewshot_images import (
    EVAL_PROMPTS,
    QUESTION_PREFIXES,
    TRAIN_PROMPTS,
    FewShotImageDataModule,
    ImageError,
    build_class_list,
    build_problem,
    choice_list,
    class_subset,
    collate_fewshot_images,
    encode_prompts,
    num_choices_for,
    read_class_names,
)
from ftmods.datamodules.records import RecordError
from ftmods.datamodules.samplers import EpochShuffleSampler

REPO = Path(__file__).resolve().parents[3]
SHAPES_SCRIPT = REPO / "configs" / "data" / "make_shapes.py"
COMMITTED = REPO / "configs" / "data" / "shapes"
CLASSES = ["red circle", "blue square", "green triangle", "red square", "blue circle", "yellow star"]
THINK = "Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."


def _load_make_shapes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_shapes", SHAPES_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x (6 train, 3 test) images, ``classnames.txt`` in the paper-style class order."""
    root = tmp_path_factory.mktemp("shapes")
    _load_make_shapes().make_shapes(root, n_train=6, n_test=3)
    return root


def _dm(shapes: Path, **kwargs: Any) -> FewShotImageDataModule:
    kwargs.setdefault("class_names", str(shapes / "classnames.txt"))
    kwargs.setdefault("test_root_or_file", str(shapes / "test"))
    return FewShotImageDataModule(str(shapes / "train"), **kwargs)


def _train_ids(dm: FewShotImageDataModule) -> list[str]:
    dm.setup("fit")
    return [item.id for item in dm.datasets["train"][0].items]


def _write_jsonl(path: Path, records: list[dict[str, Any] | None]) -> str:
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in records))  # None: a blank line
    return str(path)


# ------------------------------------------------------------------------------------------ choice lists, prompts


@pytest.mark.parametrize(
    ("num_classes", "k"),
    [(1000, 100), (100, 40), (47, 47), (10, 10), (101, 40), (102, 40), (37, 37), (196, 78), (397, 100)],
)
def test_num_choices_follows_the_paper_rule(num_classes: int, k: int) -> None:
    """Spec §1.1: ImageNet 100, Caltech 40, DTD 47, EuroSAT 10, Food/UCF 40, Flowers 40, Pets 37, Cars 78, SUN 100."""
    assert num_choices_for(num_classes) == k


def test_choice_list_contains_label_distinct_names_and_is_seeded() -> None:
    names = [f"class {i}" for i in range(50)]
    positions = set()
    for seed in range(200):
        label = names[seed % 50]
        choices = choice_list(label, names, 20, random.Random(seed))
        assert len(choices) == len(set(choices)) == 20
        assert set(choices) <= set(names)
        assert label in choices
        positions.add(choices.index(label))
        assert choice_list(label, names, 20, random.Random(seed)) == choices  # same seed, same list
    assert len(positions) > 10  # the label is not stuck in one place (shuffled after the replacement)
    assert choice_list("class 0", names, 20, random.Random(0)) != choice_list("class 0", names, 20, random.Random(1))
    assert sorted(choice_list("b", ["a", "b", "c"], 3, random.Random(0))) == ["a", "b", "c"]  # K = C: all classes


def test_problem_text_is_the_notebook_format() -> None:
    """``[ `` opens the list, names are joined with ``", "``, ``].`` closes it, on the line after the prefix."""
    assert build_problem(["tench", "goldfish"]) == (
        "What type of object is in the photo?\nPlease choose one from list [ tench, goldfish]."
    )
    assert build_problem(["a"], prefix=QUESTION_PREFIXES["eurosat"]).startswith(
        "What type of object is in the centered satellite photo?\n"
    )
    assert QUESTION_PREFIXES["dtd"] == "What type of texture is in the photo?"
    assert QUESTION_PREFIXES["ucf101"] == "What actions is the person performing in the photo?"
    assert QUESTION_PREFIXES["fgvc_aircraft"] == "What type of aircraft is in the photo?"


def test_prompt_templates_match_the_spec_text() -> None:
    p = "PROBLEM"
    assert TRAIN_PROMPTS["think"].format(problem=p) == f"{p}\n {THINK}"
    assert TRAIN_PROMPTS["no_think"].format(problem=p) == f"{p}\n Please directly output the answer."
    first = THINK.replace("Please output", "First output")
    assert EVAL_PROMPTS[("think", "few_shot")].format(problem=p) == f"{p} {first}"
    assert EVAL_PROMPTS[("think", "base_to_new")].format(problem=p) == f"{p} {THINK}"
    for setting in ("few_shot", "base_to_new"):
        assert EVAL_PROMPTS[("no_think", setting)].format(problem=p) == f"{p} Please directly output the answer name."


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_datamodule_prompts_per_mode_and_stage(shapes: Path, mode: str) -> None:
    dm = _dm(shapes, mode=mode, split="base", image_size=56)
    dm.setup("fit")
    dm.setup("test")
    train = dm.datasets["train"][0][0]
    problem = train["problem"]
    assert (
        problem
        == f"What type of object is in the photo?\nPlease choose one from list [ {', '.join(train['choices'])}]."
    )
    expected_train = f"{problem}\n {THINK}" if mode == "think" else f"{problem}\n Please directly output the answer."
    assert train["prompt"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": expected_train}]}
    ]
    base_test = dm.datasets["test"][0][0]  # base-to-new evaluation wording
    expected_eval = THINK if mode == "think" else "Please directly output the answer name."
    assert base_test["prompt"][0]["content"][1]["text"] == f"{base_test['problem']} {expected_eval}"
    few_shot = _dm(shapes, mode=mode)
    few_shot.setup("test")
    text = few_shot.datasets["test"][0][0]["prompt"][0]["content"][1]["text"]
    assert text.endswith(
        "First output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    ) == (mode == "think")


def test_prompt_overrides_and_system_prompt(shapes: Path) -> None:
    dm = _dm(
        shapes,
        prompt_template="Q: {problem}",
        eval_prompt_template="T: {problem}",
        question_prefix="Which shape?",
        problem_template="{prefix} Options: {choices}",
        system_prompt="Be brief.",
        num_choices=2,
    )
    dm.setup("fit")
    dm.setup("test")
    sample = dm.datasets["train"][0][0]
    assert len(sample["choices"]) == 2
    assert sample["label"] in sample["choices"]
    assert sample["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert sample["prompt"][1]["content"][1]["text"] == f"Q: Which shape? Options: {', '.join(sample['choices'])}"
    assert dm.datasets["test"][0][0]["prompt"][1]["content"][1]["text"].startswith("T: Which shape? Options: ")
    with pytest.raises(ValueError, match="does not use"):
        _dm(shapes, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="not a format string"):
        _dm(shapes, problem_template="{prefix} {oops} {choices}")


def test_choice_lists_are_fixed_per_item_and_seed(shapes: Path) -> None:
    """Same seed: same choice list for an item in every epoch and run; another seed draws other lists."""

    def lists(seed: int) -> list[list[str]]:
        dm = _dm(shapes, seed=seed, num_choices=3)
        dm.setup("fit")
        return [dm.datasets["train"][0].choices(i) for i in range(len(dm.datasets["train"][0]))]

    assert lists(0) == lists(0)
    assert lists(0) != lists(1)


# -------------------------------------------------------------------------------------------- sources, classes


def test_imagefolder_source_with_class_names_file(shapes: Path) -> None:
    dm = _dm(shapes, image_size=56)
    assert dm.class_names_for("all") == CLASSES  # file order, not folder order; works before setup
    dm.setup("fit")
    dataset = dm.datasets["train"][0]
    assert len(dataset) == 36
    labels = {dataset[i]["label"] for i in range(len(dataset))}
    assert labels == set(CLASSES)
    sample = dataset[[item.id for item in dataset.items].index("red_circle/000.png")]
    assert (sample["label"], sample["class_id"]) == ("red circle", 0)
    assert sample["solution"] == "<answer> red circle </answer>"
    assert (sample["image"].mode, sample["image"].size) == ("RGB", (56, 56))
    assert len(sample["choices"]) == 6  # C = 6 < 30 choices: every class


def test_classes_from_folders_without_a_names_file(shapes: Path) -> None:
    dm = _dm(shapes, class_names=None)
    assert dm.class_names_for() == sorted(c for c in CLASSES)  # sorted folder names, "_" shown as a space
    keep = _dm(shapes, class_names=None, underscores_to_spaces=False)
    assert keep.class_names_for() == sorted(c.replace(" ", "_") for c in CLASSES)


def test_class_names_file_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("red circle\n\nblue square\n")
    (tmp_path / "b.txt").write_text("n01440764 tench\nn01443537 goldfish, Carassius auratus\n")
    (tmp_path / "c.txt").write_text("fold_a\tFirst one\nfold_b\tSecond\n")
    (tmp_path / "d.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    (tmp_path / "e.json").write_text(json.dumps(["x", "y"]))
    assert read_class_names(str(tmp_path / "a.txt")) == [("red circle", "red circle"), ("blue square", "blue square")]
    assert read_class_names(str(tmp_path / "b.txt")) == [
        ("n01440764", "tench"),
        ("n01443537", "goldfish, Carassius auratus"),
    ]
    assert read_class_names(str(tmp_path / "c.txt")) == [("fold_a", "First one"), ("fold_b", "Second")]
    assert read_class_names(str(tmp_path / "d.json")) == [("n01440764", "tench"), ("n01443537", "goldfish")]
    assert read_class_names(str(tmp_path / "e.json")) == [("x", "x"), ("y", "y")]
    classes = build_class_list(str(tmp_path / "d.json"), [])
    assert classes.names == ["tench", "goldfish"]
    assert [classes.index_of(k) for k in ("n01443537", "tench", "carp")] == [1, 0, None]
    assert build_class_list(["red circle"], []).index_of("red_circle") == 0  # "_" read as a space
    with pytest.raises(ValueError, match="duplicate"):
        build_class_list(["a", "a"], [])
    with pytest.raises(FileNotFoundError, match="class-names file"):
        read_class_names(str(tmp_path / "missing.txt"))


def test_folder_to_display_name_mapping(shapes: Path) -> None:
    """An inline mapping folder name -> display name (like ImageNet's wnid -> name)."""
    mapping = {f.replace(" ", "_"): f"{f} shape" for f in CLASSES}
    dm = _dm(shapes, class_names=mapping)
    dm.setup("fit")
    assert dm.class_names_for() == [f"{c} shape" for c in CLASSES]
    dataset = dm.datasets["train"][0]
    assert {dataset[i]["id"].split("/")[0]: dataset[i]["label"] for i in range(len(dataset))} == mapping
    with pytest.raises(ValueError, match="class folder 'yellow_star' is not one of the 5 class names"):
        _dm(shapes, class_names=dict(list(mapping.items())[:5])).setup("fit")


def _records(shapes: Path, image: str = "image", label: str = "label") -> list[dict[str, Any]]:
    out = []
    for name in CLASSES:
        for i in range(3):
            key = name.replace(" ", "_") if i % 2 else name  # folder key or display name
            out.append({image: f"../shapes_copy/{name.replace(' ', '_')}/{i:03d}.png", label: key, "extra": 1})
    return out


@pytest.fixture(scope="module")
def records_dir(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/shapes_copy/<class>/NNN.png`` and a ``<tmp>/lists/`` folder for record files (relative paths)."""
    root = tmp_path_factory.mktemp("records")
    _load_make_shapes().make_shapes(root / "tree", n_train=3, n_test=1)
    (root / "tree" / "train").rename(root / "shapes_copy")
    (root / "lists").mkdir()
    return root


def test_jsonl_source_with_custom_fields_and_relative_paths(shapes: Path, records_dir: Path) -> None:
    file = _write_jsonl(records_dir / "lists" / "train.jsonl", _records(shapes, "file", "cls"))
    dm = FewShotImageDataModule(
        file, class_names=str(shapes / "classnames.txt"), image_field="file", label_field="cls", image_size=56
    )
    dm.setup("fit")
    dataset = dm.datasets["train"][0]
    assert len(dataset) == 18
    assert [dataset[i]["label"] for i in range(3)] == ["red circle"] * 3  # key "red_circle" and name both resolve
    assert dataset[0]["id"] == "../shapes_copy/red_circle/000.png"
    assert dataset[0]["image"].size == (56, 56)


def test_parquet_source(shapes: Path, records_dir: Path) -> None:
    import datasets

    file = str(records_dir / "lists" / "train.parquet")
    datasets.Dataset.from_list(_records(shapes)).to_parquet(file)
    dm = FewShotImageDataModule(file, class_names=str(shapes / "classnames.txt"))
    dm.setup("fit")
    assert len(dm.datasets["train"][0]) == 18


def test_unknown_label_names_file_line_and_field(shapes: Path, records_dir: Path) -> None:
    records: list[dict[str, Any] | None] = [*_records(shapes)[:2], None]
    records.append({"image": "../shapes_copy/red_circle/000.png", "label": "purple hexagon"})
    file = _write_jsonl(records_dir / "lists" / "bad_label.jsonl", records)
    dm = FewShotImageDataModule(file, class_names=str(shapes / "classnames.txt"))
    with pytest.raises(RecordError, match=r"bad_label\.jsonl:4: field 'label': 'purple hexagon' is not one of") as info:
        dm.setup("fit")
    assert (info.value.field, info.value.index) == ("label", 2)


def test_missing_field_and_missing_image_file(shapes: Path, records_dir: Path) -> None:
    file = _write_jsonl(records_dir / "lists" / "no_label.jsonl", [{"image": "../shapes_copy/red_circle/000.png"}])
    with pytest.raises(RecordError, match=r"no_label\.jsonl:1: field 'label': missing"):
        FewShotImageDataModule(file, class_names=CLASSES).setup("fit")
    file = _write_jsonl(records_dir / "lists" / "gone.jsonl", [{"image": "nowhere.png", "label": "red circle"}])
    with pytest.raises(RecordError, match=r"gone\.jsonl:1: field 'image': image file not found: .*nowhere\.png"):
        FewShotImageDataModule(file, class_names=CLASSES).setup("fit")


def _broken_tree(tmp_path: Path) -> Path:
    """A copy of two classes with one non-image .png and one truncated .png."""
    root = tmp_path / "broken"
    _load_make_shapes().make_shapes(root, classes=("red circle", "blue square"), n_train=2, n_test=1)
    (root / "train" / "red_circle" / "001.png").write_bytes(b"this is not a png")
    good = (root / "train" / "blue_square" / "000.png").read_bytes()
    (root / "train" / "blue_square" / "001.png").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_images_fail_lazily_with_file_and_record(tmp_path: Path) -> None:
    root = _broken_tree(tmp_path)
    dm = FewShotImageDataModule(str(root / "train"), class_names=str(root / "classnames.txt"))
    dm.setup("fit")  # no eager check: setup succeeds
    dataset = dm.datasets["train"][0]
    by_id = {item.id: i for i, item in enumerate(dataset.items)}
    dataset[by_id["red_circle/000.png"]]  # a good image loads
    with pytest.raises(ImageError, match=r"red_circle/001\.png: cannot read image \(class folder 'red_circle'") as info:
        dataset[by_id["red_circle/001.png"]]
    assert info.value.image.endswith("red_circle/001.png")
    with pytest.raises(ImageError, match=r"blue_square/001\.png: cannot read image"):
        dataset[by_id["blue_square/001.png"]]


def test_corrupt_images_fail_eagerly_with_verify_images(tmp_path: Path) -> None:
    root = _broken_tree(tmp_path)
    dm = FewShotImageDataModule(str(root / "train"), class_names=str(root / "classnames.txt"), verify_images=True)
    with pytest.raises(ImageError, match=r"(red_circle|blue_square)/001\.png: cannot read image"):
        dm.setup("fit")
    lines = [
        {"image": "train/red_circle/000.png", "label": "red circle"},
        {"image": "train/red_circle/001.png", "label": "red circle"},
    ]
    file = _write_jsonl(root / "list.jsonl", lines)
    dm = FewShotImageDataModule(file, class_names=str(root / "classnames.txt"), verify_images=True)
    with pytest.raises(ImageError, match=r"list\.jsonl:2: field 'image': cannot read image .*red_circle/001\.png"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- shots, base / new


def test_k_shot_counts_per_class_and_determinism(shapes: Path) -> None:
    ids = _train_ids(_dm(shapes, shots=2))
    counts: dict[str, int] = {}
    for id_ in ids:
        counts[id_.split("/")[0]] = counts.get(id_.split("/")[0], 0) + 1
    assert counts == {c.replace(" ", "_"): 2 for c in CLASSES}
    assert _train_ids(_dm(shapes, shots=2)) == ids  # same seed, same shots
    assert _train_ids(_dm(shapes, shots=2, seed=1)) != ids
    assert len(_train_ids(_dm(shapes))) == 36  # shots=None: every image
    with pytest.warns(UserWarning, match="fewer than shots=8"):
        assert len(_train_ids(_dm(shapes, shots=8))) == 36  # only 6 per class: take them all


def test_base_new_split_is_disjoint_and_covering() -> None:
    for n in range(1, 12):
        base, new = set(class_subset(n, "base")), set(class_subset(n, "new"))
        assert not base & new
        assert base | new == set(class_subset(n, "all")) == set(range(n))
        assert base == set(range(math.ceil(n / 2)))  # the first ceil(C/2) classes


def test_base_to_new_datamodule(shapes: Path) -> None:
    dm = _dm(shapes, split="base", shots=2)
    assert (dm.class_names_for("base"), dm.class_names_for("new")) == (CLASSES[:3], CLASSES[3:])
    dm.setup("fit")
    train = dm.datasets["train"][0]
    assert {train[i]["label"] for i in range(len(train))} == set(CLASSES[:3])
    assert all(set(train.choices(i)) == set(CLASSES[:3]) for i in range(len(train)))  # choices from the base classes
    dm.setup("test")
    base_loader, new_loader = dm.test_dataloader()  # default eval_splits for base-to-new: base and new
    for loader, names, subset in ((base_loader, CLASSES[:3], "base"), (new_loader, CLASSES[3:], "new")):
        batches = list(loader)
        assert {label for b in batches for label in b["labels"]} == set(names)
        assert {s for b in batches for s in b["subsets"]} == {subset}
        assert all(set(c) == set(names) for b in batches for c in b["choices"])
        assert sum(len(b["ids"]) for b in batches) == 9  # the full test split of those classes, no shots
    # the shots of a class do not depend on the other classes: few-shot and base-to-new train on the same base images
    all_ids = _train_ids(_dm(shapes, split="all", shots=2))
    assert [i for i in all_ids if i.split("/")[0] in {"red_circle", "blue_square", "green_triangle"}] == _train_ids(dm)


# ----------------------------------------------------------------------------------------------- batches, loaders


def test_batch_structure(shapes: Path) -> None:
    dm = _dm(shapes, batch_size=3, image_size=56)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {
        "prompts",
        "images",
        "labels",
        "choices",
        "ids",
        "problems",
        "solutions",
        "subsets",
        "class_ids",
    }
    assert len(batch["prompts"]) == len(batch["images"]) == len(batch["labels"]) == len(batch["ids"]) == 3
    assert all(isinstance(image, Image.Image) for image in batch["images"])
    assert (batch["class_ids"].dtype, batch["class_ids"].shape) == (torch.long, (3,))
    assert [CLASSES[i] for i in batch["class_ids"].tolist()] == batch["labels"]
    assert batch["solutions"] == [f"<answer> {label} </answer>" for label in batch["labels"]]
    assert all(label in choices for label, choices in zip(batch["labels"], batch["choices"], strict=True))
    sample = dm.datasets["train"][0][0]
    assert collate_fewshot_images([sample])["ids"] == [sample["id"]]


def test_eval_loaders_are_deterministic_in_source_order(shapes: Path) -> None:
    dm = _dm(shapes, eval_batch_size=4, val_root_or_file=str(shapes / "test"))
    dm.setup("fit")
    loader = dm.val_dataloader()
    first = [id_ for b in loader for id_ in b["ids"]]
    assert first == [id_ for b in dm.val_dataloader() for id_ in b["ids"]]
    assert first == sorted(first)  # ImageFolder source order: by folder, then file
    assert [len(b["ids"]) for b in loader] == [4, 4, 4, 4, 2]
    assert _dm(shapes).val_dataloader() == []  # no validation data


def test_train_order_is_a_function_of_seed_and_epoch_and_resumes(shapes: Path) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        dm = _dm(shapes, seed=seed, shots=2)
        dm.trainer = SimpleNamespace(current_epoch=epoch)  # type: ignore[assignment]
        dm.setup("fit")
        return [id_ for b in dm.train_dataloader() for id_ in b["ids"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1) != order(0, 0)
    items = _train_ids(_dm(shapes, seed=0, shots=2))
    permutation = list(EpochShuffleSampler(items, seed=0, epoch=1))
    assert order(0, 1) == [items[i] for i in permutation]
    assert sorted(order(0, 1)) == sorted(items)

    dm = _dm(shapes, seed=0, shots=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iterator = iter(loader)
    seen = [id_ for _ in range(2) for id_ in next(iterator)["ids"]]
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert seen + [id_ for b in resumed for id_ in b["ids"]] == order(0, 0)


def test_train_loader_with_workers_matches_in_process(shapes: Path) -> None:
    ids = []
    for workers in (0, 2):
        dm = _dm(shapes, shots=1, num_workers=workers)
        dm.setup("fit")
        ids.append([id_ for b in dm.train_dataloader() for id_ in b["ids"]])
    assert ids[0] == ids[1]


def test_encode_prompts_on_tiny_qwen2_vl(shapes: Path) -> None:
    """56x56 images: a 4x4 grid of 14-px patches (16 rows of 3*2*14*14 = 1176), merged 2x2 into 4 image tokens."""
    from ftmods.models.loading import load_processor

    processor = load_processor("tiny/qwen2-vl")
    dm = _dm(shapes, image_size=56, batch_size=2)
    dm.setup("fit")
    batch = dict(next(iter(dm.train_dataloader())))
    batch["prompts"] = [
        batch["prompts"][0],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
    ]
    inputs = encode_prompts(processor, batch)
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    n, length = inputs["input_ids"].shape
    assert n == 2
    assert inputs["attention_mask"].shape == inputs["mm_token_type_ids"].shape == (2, length)
    assert inputs["pixel_values"].shape == (32, 1176)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["mm_token_type_ids"].sum(1).tolist() == [4, 4]
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == image_pad)
    mask = inputs["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1]  # left padding: the short prompt is padded in front
    assert mask[1, 0] == 0
    text = processor.tokenizer.decode(inputs["input_ids"][0][mask[0].bool()])
    assert text.endswith("tags.<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful assistant." in text
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        encode_prompts(processor, {"prompts": batch["prompts"], "images": batch["images"][:1]})


def test_invalid_arguments(shapes: Path) -> None:
    with pytest.raises(ValueError, match="shots must be >= 1"):
        _dm(shapes, shots=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _dm(shapes, batch_size=0)
    with pytest.raises(ValueError, match="no test data"):
        _dm(shapes).test_dataloader()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        FewShotImageDataModule(str(shapes / "nothing.jsonl")).setup("fit")


# ----------------------------------------------------------------------------------------------------- generator


def _pixels(path: Path) -> tuple[bytes, tuple[int, int], str]:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes(), image.size, image.mode


def test_shapes_generator_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    make_shapes = _load_make_shapes().make_shapes
    first = make_shapes(tmp_path / "a")
    second = make_shapes(tmp_path / "b")
    rel = [p.relative_to(tmp_path / "a") for p in first]
    assert rel == [p.relative_to(tmp_path / "b") for p in second]
    assert all(_pixels(a) == _pixels(b) for a, b in zip(first, second, strict=True) if a.suffix == ".png")
    assert len(rel) == 6 * (8 + 4) + 1
    committed = sorted(p for p in COMMITTED.rglob("*") if p.is_file())
    assert [p.relative_to(COMMITTED) for p in committed] == rel, "run python configs/data/make_shapes.py"
    for ours, theirs in zip(first, committed, strict=True):
        if ours.suffix == ".png":
            assert _pixels(ours) == _pixels(theirs), f"{theirs} differs; run python configs/data/make_shapes.py"
            assert _pixels(theirs)[1:] == ((56, 56), "P")
        else:
            assert ours.read_text() == theirs.read_text() == "".join(f"{c}\n" for c in CLASSES)
    assert sum(p.stat().st_size for p in committed) < 300 * 1024
    assert _pixels(first[1]) != _pixels(make_shapes(tmp_path / "c", seed=1)[1])


class _ClassCounter(LightningModule):
    """Consumes raw batches like CLS-RL would (no batch_size given to ``self.log``: inferred from ``class_ids``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(6))
        self.seen: dict[str, list[str]] = {"train": [], "val/base": [], "val/new": []}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen["train"] += batch["ids"]
        loss = self.weight[batch["class_ids"]].sum()
        self.log("train/loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.seen[f"val/{batch['subsets'][0]}"] += batch["labels"]
        self.log("val/n", float(len(batch["labels"])), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_base_and_new_validation(shapes: Path) -> None:
    dm = _dm(shapes, split="base", shots=2, val_root_or_file=str(shapes / "test"), image_size=56, batch_size=2)
    module = _ClassCounter()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    first, second = module.seen["train"][:6], module.seen["train"][6:]
    assert len(second) == 6
    assert sorted(first) == sorted(second)  # the same shots every epoch ...
    assert first != second  # ... in a new order
    for subset, names in (("base", CLASSES[:3]), ("new", CLASSES[3:])):
        assert sorted(module.seen[f"val/{subset}"]) == sorted(names * 3 * 2)  # 3 test images per class, 2 epochs
