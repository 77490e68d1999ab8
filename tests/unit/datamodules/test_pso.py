"""PSO data: every source format end to end, ties and winners, references (dataset images and the latents cache),
DreamBooth pairing, resumable order, SDXL micro-conditioning, prompt files, error messages, the tiny data generator.

End-to-end tests read the committed tiny data under ``configs/data/pso_tiny`` (checked against
``configs/data/make_pso_tiny.py``); targeted tests build small files whose images are solid colours, so a batch's
pixels tell which image was chosen.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

import ftmods.datamodules.pso as pso_module
from ftmods.datamodules import ImageError, RecordError
from ftmods.datamodules.pso import (
    MissingReferenceError,
    PromptDataModule,
    PSODataModule,
    PSOImageError,
    collate_pso,
    load_reference_latents,
    read_prompts,
    reference_cache_file,
    reference_seed,
    resize_and_crop,
    save_reference_latents,
)
from ftmods.datamodules.samplers import EpochShuffleSampler

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "data" / "pso_tiny"
GENERATOR = REPO / "configs" / "data" / "make_pso_tiny.py"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _colour(pixels: torch.Tensor) -> tuple[int, int, int]:
    """The solid colour of a ``(3, R, R)`` image in [-1, 1]."""
    rgb = ((pixels.mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist()
    return tuple(rgb)  # type: ignore[return-value]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _write_parquet(path: Path, columns: dict[str, list[Any]]) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _batches(dm: PSODataModule | PromptDataModule) -> list[dict[str, Any]]:
    return list(dm.train_dataloader())


def _fit_dm(*args: Any, **kwargs: Any) -> PSODataModule:
    kwargs.setdefault("resolution", 16)
    dm = PSODataModule(*args, **kwargs)
    dm.setup("fit")
    return dm


def _pair_columns(labels: list[tuple[Any, Any]], **extra: list[Any]) -> dict[str, list[Any]]:
    """Rows whose jpg_0 is red and jpg_1 blue, with the given labels."""
    n = len(labels)
    return {
        "caption": [f"caption {i}" for i in range(n)],
        "jpg_0": [_png(RED)] * n,
        "jpg_1": [_png(BLUE)] * n,
        "label_0": [a for a, _ in labels],
        "label_1": [b for _, b in labels],
        **extra,
    }


# ------------------------------------------------------------------------------------------------- end to end


def test_pickapic_parquet_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(pso_module, "rank_zero_info", logged.append)
    dm = _fit_dm(str(TINY / "pickapic.parquet"), reference_source="dataset_loser", resolution=32, batch_size=4)
    assert dm.format == "pickapic"
    assert dm.ties_dropped == 2
    assert len(dm.train_dataset or []) == 14
    assert any("14 pairs" in m and "2 ties dropped" in m for m in logged)
    batches = _batches(dm)
    assert [len(b["ids"]) for b in batches] == [4, 4, 4, 2]
    batch = batches[0]
    assert set(batch) == {"ids", "captions", "target", "original_sizes", "crop_top_lefts", "reference"}
    assert batch["target"].shape == batch["reference"].shape == (4, 3, 32, 32)
    assert batch["target"].dtype == batch["reference"].dtype == torch.float32
    assert batch["original_sizes"].dtype == batch["crop_top_lefts"].dtype == torch.long
    assert batch["original_sizes"].tolist() == [[64, 64]] * 4
    assert batch["crop_top_lefts"].tolist() == [[0, 0]] * 4
    for images in (batch["target"], batch["reference"]):
        assert images.min() >= -1
        assert images.max() <= 1
        assert images.min() < 0 < images.max()  # light background, saturated shape
    ids = sorted(i for b in batches for i in b["ids"])
    assert ids == sorted(str(1000 + row) for row in range(16) if row not in (5, 11))  # ranking_id, ties dropped
    assert all(c.endswith("on a light background") for b in batches for c in b["captions"])


def test_manifest_imagefolder_dreambooth_end_to_end(tmp_path: Path) -> None:
    manifest = _fit_dm(str(TINY / "manifest.jsonl"), reference_source="dataset_loser")
    batch = next(iter(manifest.train_dataloader()))
    assert manifest.format == "manifest"
    assert set(batch["ids"]) <= {f"m{i:03d}" for i in range(8)}
    assert batch["reference"].shape == batch["target"].shape == (4, 3, 16, 16)

    folder = _fit_dm(str(TINY / "imagefolder"), reference_cache=str(tmp_path / "a"))
    assert folder.format == "imagefolder"
    assert [(r.key, r.prompt) for r in folder.reference_requests()][:2] == [
        ("000.png", "a red circle on a light background"),
        ("001.png", "a yellow star on a light background"),
    ]

    dreambooth = _fit_dm(
        str(TINY / "dreambooth"),
        format="dreambooth",
        instance_prompt="a photo of sks star",
        class_prompt="a photo of star",
        reference_cache=str(tmp_path / "b"),
    )
    assert [item.caption for item in dreambooth.train_dataset.items] == ["a photo of sks star"] * 4  # type: ignore[union-attr]
    assert [r.key for r in dreambooth.reference_requests()] == [f"class:{i}" for i in range(20)]  # paper default


def test_winner_selection_ties_and_row_ids(tmp_path: Path) -> None:
    """label_0 > label_1 → jpg_0 (red) wins; label_0 < label_1 → jpg_1 (blue); equal labels are ties."""
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.7, 0.3), (0.2, 0.8), (0.5, 0.5), (1, 0)]
    file = _write_parquet(tmp_path / "picks.parquet", _pair_columns(labels))
    dm = _fit_dm(file, reference_source="dataset_loser", batch_size=8)
    assert dm.ties_dropped == 2
    dataset = dm.train_dataset
    assert dataset is not None
    assert [item.id for item in dataset.items] == ["picks:0", "picks:1", "picks:3", "picks:4", "picks:6"]
    winners = [(_colour(dataset[i]["target"]), _colour(dataset[i]["reference"])) for i in range(len(dataset))]
    assert winners == [(RED, BLUE), (BLUE, RED), (RED, BLUE), (BLUE, RED), (RED, BLUE)]


def test_pickapic_jsonl_with_paths_and_base64(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "green.png").write_bytes(_png(GREEN))
    encoded = base64.b64encode(_png(RED)).decode()
    rows = [
        {"caption": "a", "jpg_0": "img/green.png", "jpg_1": encoded, "label_0": 1, "label_1": 0},
        {
            "caption": "b",
            "jpg_0": "data:image/png;base64," + encoded,
            "jpg_1": "img/green.png",
            "label_0": 0,
            "label_1": 1,
        },
    ]
    dm = _fit_dm(_write_jsonl(tmp_path / "picks.jsonl", rows), reference_source="dataset_loser")
    dataset = dm.train_dataset
    assert dataset is not None
    assert dm.format == "pickapic"
    assert [(_colour(dataset[i]["target"]), _colour(dataset[i]["reference"])) for i in range(2)] == [
        (GREEN, RED),
        (GREEN, RED),
    ]


def test_dataset_loser_needs_references(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_bytes(_png(RED))
    file = _write_jsonl(tmp_path / "m.jsonl", [{"caption": "a", "target": "t.png", "reference": "t.png"}] * 2)
    assert _fit_dm(file, reference_source="dataset_loser").train_dataset is not None
    file = _write_jsonl(
        tmp_path / "m2.jsonl",
        [{"caption": "a", "target": "t.png", "reference": "t.png"}, {"caption": "b", "target": "t.png"}],
    )
    with pytest.raises(RecordError, match=r"m2.jsonl:2: field 'reference': missing: reference_source='dataset_loser'"):
        _fit_dm(file, reference_source="dataset_loser")
    with pytest.raises(ValueError, match="format 'imagefolder' has none"):
        _fit_dm(str(TINY / "imagefolder"), reference_source="dataset_loser")


# ------------------------------------------------------------------------------------------ latents cache


def test_reference_cache_round_trip(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dm = _fit_dm(str(TINY / "manifest.jsonl"), reference_cache=str(cache), seed=3, batch_size=8)
    requests = dm.reference_requests()
    assert [r.key for r in requests] == [f"m{i:03d}" for i in range(8)]
    assert all(r.seed == reference_seed(r.key, 3) != reference_seed(r.key, 0) for r in requests)
    with pytest.raises(
        MissingReferenceError, match=r"8 reference latents are missing .*'m000', 'm001', 'm002', \.\.\."
    ):
        dm.train_dataloader()

    stored = {r.key: torch.randn(4, 2, 2, dtype=torch.bfloat16) for r in requests}
    for request in requests[:5]:
        save_reference_latents(cache, request.key, stored[request.key], {"prompt": request.prompt})
    assert [r.key for r in dm.reference_requests()] == ["m005", "m006", "m007"]
    for request in requests[5:]:
        save_reference_latents(cache, request.key, stored[request.key], {"prompt": request.prompt, "seed": "1"})
    assert dm.reference_requests() == []
    assert sorted(p.name for p in cache.iterdir()) == sorted(reference_cache_file(cache, k).name for k in stored)

    (batch,) = _batches(dm)
    assert set(batch) == {"ids", "captions", "target", "original_sizes", "crop_top_lefts", "reference_latents"}
    assert batch["reference_latents"].shape == (8, 4, 2, 2)
    assert batch["reference_latents"].dtype == torch.bfloat16
    for key, latents in zip(batch["ids"], batch["reference_latents"], strict=True):
        assert torch.equal(latents.view(torch.int16), stored[key].view(torch.int16))  # bit-exact


def test_cache_file_format(tmp_path: Path) -> None:
    from safetensors import safe_open

    latents = torch.randn(4, 3, 2)
    path = save_reference_latents(tmp_path, "pickapic:7", latents, {"prompt": "a red circle"})
    assert path == reference_cache_file(tmp_path, "pickapic:7")
    assert path.name.startswith("pickapic_7-")
    assert path.name.endswith(".safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["latents"]
        assert handle.metadata() == {"prompt": "a red circle", "key": "pickapic:7"}
    assert torch.equal(load_reference_latents(tmp_path, "pickapic:7"), latents)
    # Unsafe characters and case: distinct, safe file names inside the cache folder.
    names = {reference_cache_file(tmp_path, key) for key in ("A", "a", "../x", "a/b", "a_b", "a b", "é")}
    assert len({p.name.lower() for p in names}) == 7
    assert all(p.parent == tmp_path and not p.name.startswith(".") for p in names)
    long = reference_cache_file(tmp_path, "x" * 1000).name
    assert len(long) < 120
    with pytest.raises(ValueError, match=r"must be \(C, h, w\)"):
        save_reference_latents(tmp_path, "k", torch.zeros(1, 4, 2, 2), {})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_reference_latents(tmp_path, "k", latents, {"seed": 1})  # type: ignore[dict-item]
    with pytest.raises(MissingReferenceError, match="'nope' are not in reference_cache"):
        load_reference_latents(tmp_path, "nope")
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable reference cache entry for key 'pickapic:7'"):
        load_reference_latents(tmp_path, "pickapic:7")


def test_missing_and_stale_cache_entries_at_getitem(tmp_path: Path) -> None:
    dm = _fit_dm(str(TINY / "manifest.jsonl"), reference_cache=str(tmp_path))
    dataset = dm.train_dataset
    assert dataset is not None
    with pytest.raises(MissingReferenceError, match=r"key 'm000' .*let the PSO module generate"):
        dataset[0]
    save_reference_latents(tmp_path, "m000", torch.zeros(4, 2, 2), {"prompt": "an old caption"})
    with pytest.raises(ValueError, match=r"'m000' was sampled for prompt 'an old caption'.*delete the stale entry"):
        dataset[0]
    save_reference_latents(tmp_path, "m000", torch.zeros(4, 2, 2), {})  # no prompt recorded: not checked
    assert dataset[0]["reference_latents"].shape == (4, 2, 2)


def test_dreambooth_pairing_is_seeded_and_uses_only_num_references(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "format": "dreambooth",
        "instance_prompt": "a photo of sks star",
        "class_prompt": "a photo of star",
        "num_references": 3,
        "reference_cache": str(tmp_path),
        "batch_size": 4,
    }
    dm = _fit_dm(str(TINY / "dreambooth"), **kwargs)
    requests = dm.reference_requests()
    assert [(r.key, r.prompt) for r in requests] == [(f"class:{j}", "a photo of star") for j in range(3)]
    for request in requests:
        j = float(request.key.split(":")[1])
        save_reference_latents(tmp_path, request.key, torch.full((4, 2, 2), j), {"prompt": request.prompt})
    dataset = dm.train_dataset
    assert dataset is not None
    pairing = {epoch: [dataset.reference_key(i, epoch) for i in range(4)] for epoch in range(6)}
    assert {key for keys in pairing.values() for key in keys} <= {"class:0", "class:1", "class:2"}
    assert len({tuple(keys) for keys in pairing.values()}) > 1  # redrawn per epoch
    other = _fit_dm(str(TINY / "dreambooth"), **kwargs).train_dataset
    assert other is not None
    assert pairing == {epoch: [other.reference_key(i, epoch) for i in range(4)] for epoch in range(6)}
    reseeded = _fit_dm(str(TINY / "dreambooth"), **{**kwargs, "seed": 1}).train_dataset
    assert reseeded is not None
    assert pairing != {epoch: [reseeded.reference_key(i, epoch) for i in range(4)] for epoch in range(6)}
    for epoch in (0, 3):
        sample = dataset[(epoch, 2)]
        assert f"class:{int(sample['reference_latents'][0, 0, 0])}" == pairing[epoch][2]


class _Recorder(LightningModule):
    """Records, per epoch, the item ids and (DreamBooth) which reference latents came with them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str, int]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        refs = batch["reference_latents"][:, 0, 0, 0].int().tolist()
        self.seen += [(self.current_epoch, i, r) for i, r in zip(batch["ids"], refs, strict=True)]
        return (self.weight * batch["target"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_passes_the_epoch_to_the_pairing(tmp_path: Path) -> None:
    dm = PSODataModule(
        str(TINY / "dreambooth"),
        format="dreambooth",
        instance_prompt="a photo of sks star",
        class_prompt="a photo of star",
        num_references=4,
        reference_cache=str(tmp_path),
        resolution=8,
        batch_size=2,
    )
    for j in range(4):
        save_reference_latents(tmp_path, f"class:{j}", torch.full((4, 1, 1), float(j)), {})
    module = _Recorder()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    dataset = dm.train_dataset
    assert dataset is not None
    names = [item.id for item in dataset.items]
    assert len(module.seen) == 12
    for epoch, item_id, j in module.seen:
        assert f"class:{j}" == dataset.reference_key(names.index(item_id), epoch)
    orders = [[i for e, i, _ in module.seen if e == epoch] for epoch in range(3)]
    assert orders == [[names[k] for k in EpochShuffleSampler(names, seed=0, epoch=e)] for e in range(3)]


# --------------------------------------------------------------------------------------- order and resuming


def test_train_order_is_seeded_and_resumable() -> None:
    def loader(seed: int = 0, epoch: int = 0) -> Any:
        dm = PSODataModule(str(TINY / "pickapic.parquet"), reference_source="dataset_loser", resolution=8, seed=seed)
        dm.trainer = SimpleNamespace(current_epoch=epoch, world_size=1, global_rank=0)  # type: ignore[assignment]
        dm.setup("fit")
        return dm.train_dataloader()

    full = [batch["ids"] for batch in loader()]
    assert len(full) == 4
    ids = [item.id for item in loader().dataset.items]
    assert sum(full, []) == [ids[i] for i in EpochShuffleSampler(ids, seed=0)]  # the shared (seed, epoch) order
    assert [b["ids"] for b in loader(epoch=1)] != full
    assert [b["ids"] for b in loader(seed=1)] != full

    first = loader()
    iterator = iter(first)
    assert [next(iterator)["ids"] for _ in range(2)] == full[:2]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["ids"] for b in rest] == full[2:]
    assert torch.equal(rest[0]["target"], list(loader())[2]["target"])


def test_prompt_datamodule(tmp_path: Path) -> None:
    dm = PromptDataModule(str(TINY / "prompts.json"), str(TINY / "val_prompts.txt"), batch_size=5)
    dm.setup("fit")
    assert dm.train_items is not None
    assert len(dm.train_items) == 16  # repeated captions are kept
    assert dm.train_items[0].id == "500"  # trainset_idx
    batches = _batches(dm)
    assert [len(b["ids"]) for b in batches] == [5, 5, 5, 1]
    assert set(batches[0]) == {"ids", "captions"}
    ids = [item.id for item in dm.train_items]
    assert sum((b["ids"] for b in batches), []) == [ids[i] for i in EpochShuffleSampler(ids, seed=0)]
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert [b["ids"] for b in resumed] == [b["ids"] for b in batches[1:]]
    (val,) = list(dm.val_dataloader())
    assert val["ids"] == ["val_prompts:1", "val_prompts:2", "val_prompts:3", "val_prompts:4"]
    assert val["captions"][0] == "a red square on a white background"
    small = PromptDataModule(["x", "y", "z"], max_prompts=2)
    small.setup("fit")
    assert [(p.id, p.caption) for p in small.train_items or []] == [("0", "x"), ("1", "y")]
    assert small.val_dataloader() == []


def test_val_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert [(p.id, p.caption) for p in read_prompts(str(tmp_path / "p.txt"))] == [("p:1", "first"), ("p:3", "second")]
    (tmp_path / "s.json").write_text(json.dumps(["a", "b"]))
    assert [(p.id, p.caption) for p in read_prompts(str(tmp_path / "s.json"))] == [("s:0", "a"), ("s:1", "b")]
    (tmp_path / "d.json").write_text(
        json.dumps([{"caption": "a", "trainset_idx": 9}, {"caption": "b", "id": "x"}, {"caption": "c"}])
    )
    assert [(p.id, p.caption) for p in read_prompts(str(tmp_path / "d.json"))] == [("9", "a"), ("x", "b"), ("d:2", "c")]
    _write_jsonl(tmp_path / "l.jsonl", [{"text": "a"}, {"text": "b"}])
    assert [p.caption for p in read_prompts(str(tmp_path / "l.jsonl"), caption_column="text")] == ["a", "b"]
    assert [p.caption for p in read_prompts(["u", "v"])] == ["u", "v"]
    dm = PSODataModule(
        str(TINY / "manifest.jsonl"), str(tmp_path / "d.json"), reference_source="dataset_loser", val_batch_size=2
    )
    dm.setup("validate")
    assert dm.train_dataset is None  # validate reads only the prompts
    assert [b["captions"] for b in dm.val_dataloader()] == [["a", "b"], ["c"]]


# --------------------------------------------------------------------------------------------------- images


def test_micro_conditioning_of_non_square_images(tmp_path: Path) -> None:
    """A 80x40 (w x h) image at R=20: resized to 40x20, centre crop at left (40-20)/2 = 10."""
    wide = Image.new("RGB", (80, 40), RED)
    wide.paste(Image.new("RGB", (40, 40), BLUE), (40, 0))  # right half blue
    pixels, size, top_left = resize_and_crop(wide, 20)
    assert (size, top_left) == ((40, 80), (0, 10))
    assert _colour(pixels[:, :, :8]) == RED  # columns 10..17 of the resized image
    assert _colour(pixels[:, :, 12:]) == BLUE
    flipped, _, flipped_top_left = resize_and_crop(wide, 20, crop=(0.0, 0.0), flip=True)
    assert flipped_top_left == (0, 20)  # crop at left 0, reported in the mirrored image: 40 - 0 - 20
    assert _colour(flipped[:, :, 2:]) == RED  # the mirrored left half; column 0 blends with blue
    tall = Image.new("RGB", (30, 90), GREEN)
    assert resize_and_crop(tall, 10)[1:] == ((90, 30), (10, 0))
    assert resize_and_crop(tall, 10, crop=(0.999, 0.5))[2] == (20, 0)  # last position

    wide.save(tmp_path / "wide.png")
    _write_jsonl(tmp_path / "m.jsonl", [{"caption": "wide", "target": "wide.png", "reference": "wide.png"}])
    dm = _fit_dm(str(tmp_path / "m.jsonl"), reference_source="dataset_loser", resolution=20)
    (batch,) = _batches(dm)
    assert batch["original_sizes"].tolist() == [[40, 80]]
    assert batch["crop_top_lefts"].tolist() == [[0, 10]]
    assert torch.equal(batch["target"], batch["reference"])


def test_random_crop_and_flip_are_seeded_per_epoch_and_item(tmp_path: Path) -> None:
    Image.new("RGB", (64, 16), RED).save(tmp_path / "wide.png")
    _write_jsonl(
        tmp_path / "m.jsonl",
        [{"caption": "w", "target": "wide.png", "reference": "wide.png", "id": f"i{n}"} for n in range(4)],
    )
    dm = _fit_dm(str(tmp_path / "m.jsonl"), reference_source="dataset_loser", random_crop=True, random_flip=True)
    dataset = dm.train_dataset
    assert dataset is not None
    draws = {(e, i): tuple(dataset[(e, i)]["crop_top_left"].tolist()) for e in range(4) for i in range(4)}
    assert draws == {(e, i): tuple(dataset[(e, i)]["crop_top_left"].tolist()) for e in range(4) for i in range(4)}
    assert len(set(draws.values())) > 4
    assert all(top == 0 and 0 <= left <= 48 for top, left in draws.values())
    assert {draws[(0, i)] for i in range(4)} != {draws[(1, i)] for i in range(4)}
    assert dataset[2]["crop_top_left"].tolist() == list(draws[(0, 2)])  # a plain index uses dataset.epoch (0)
    centre = _fit_dm(str(tmp_path / "m.jsonl"), reference_source="dataset_loser").train_dataset
    assert centre is not None
    assert {tuple(centre[(e, 0)]["crop_top_left"].tolist()) for e in range(4)} == {(0, 24)}


# --------------------------------------------------------------------------------------------------- errors


def test_record_errors_name_file_row_and_column(tmp_path: Path) -> None:
    picks = _pair_columns([(1.0, 0.0)] * 3)
    del picks["label_1"]
    with pytest.raises(RecordError, match=r"p1.parquet: record 0: field 'label_1': missing column"):
        _fit_dm(_write_parquet(tmp_path / "p1.parquet", picks), reference_source="dataset_loser")

    rows = [{"caption": "a", "jpg_0": "x.png", "jpg_1": "x.png", "label_0": 1, "label_1": 0} for _ in range(3)]
    (tmp_path / "x.png").write_bytes(_png(RED))
    rows[2]["label_0"] = "high"
    with pytest.raises(RecordError, match=r"p2.jsonl:3: field 'label_0': must be a finite number, got 'high'"):
        _fit_dm(_write_jsonl(tmp_path / "p2.jsonl", rows), reference_source="dataset_loser")
    rows[2]["label_0"], rows[1]["jpg_1"] = 1, "missing.png"
    with pytest.raises(RecordError, match=r"p3.jsonl:2: field 'jpg_1': image file not found: .*missing.png"):
        _fit_dm(_write_jsonl(tmp_path / "p3.jsonl", rows), reference_source="dataset_loser")
    rows[1]["jpg_1"], rows[0]["caption"] = "x.png", "  "
    with pytest.raises(RecordError, match=r"p4.jsonl:1: field 'caption': must be a non-empty string"):
        _fit_dm(_write_jsonl(tmp_path / "p4.jsonl", rows), reference_source="dataset_loser")

    picks = _pair_columns([(1.0, 0.0)] * 3)
    picks["jpg_0"] = [_png(RED), None, _png(RED)]
    with pytest.raises(RecordError, match=r"p5.parquet: record 1: field 'jpg_0': missing$"):
        _fit_dm(_write_parquet(tmp_path / "p5.parquet", picks), reference_source="dataset_loser")

    _write_jsonl(tmp_path / "m.jsonl", [{"caption": "a", "target": "x.png"}, {"caption": "b", "target": 5}])
    with pytest.raises(RecordError, match=r"m.jsonl:2: field 'target': must be image bytes, a path or base64, got 5"):
        _fit_dm(str(tmp_path / "m.jsonl"), reference_source="dataset_loser")
    _write_jsonl(tmp_path / "d.jsonl", [{"caption": "a", "target": "x.png", "id": "k"}] * 2)
    with pytest.raises(RecordError, match=r"d.jsonl:2: field 'id': duplicate id 'k', first at .*d.jsonl:1"):
        _fit_dm(str(tmp_path / "d.jsonl"), reference_source="dataset_loser")


def test_undecodable_images_name_the_record(tmp_path: Path) -> None:
    picks = _pair_columns([(1.0, 0.0), (0.0, 1.0)])
    picks["jpg_1"] = [_png(BLUE), b"not an image"]
    dm = _fit_dm(_write_parquet(tmp_path / "bad.parquet", picks), reference_source="dataset_loser")
    dataset = dm.train_dataset
    assert dataset is not None
    dataset[0]
    with pytest.raises(PSOImageError, match=r"bad.parquet: record 1: field 'jpg_1': cannot read image") as info:
        dataset[1]
    assert isinstance(info.value, ImageError)
    assert isinstance(info.value, RecordError)

    rows = [{"caption": "a", "target": "A" * 80, "reference": "A" * 80}]  # base64-looking text that is no image
    dm = _fit_dm(_write_jsonl(tmp_path / "b.jsonl", rows), reference_source="dataset_loser", format="manifest")
    with pytest.raises(PSOImageError, match=r"b.jsonl:1: field 'target': cannot read image"):
        dm.train_dataset[0]  # type: ignore[index]

    folder = tmp_path / "style"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"broken")
    (folder / "a.txt").write_text("a caption")
    dm = _fit_dm(str(folder), reference_cache=str(tmp_path / "cache"))
    with pytest.raises(PSOImageError, match=r"a.png: cannot read image \(of the image folder .*style\)"):
        dm.train_dataset[0]  # type: ignore[index]


def test_imagefolder_captions_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.png"):
        (folder / name).write_bytes(_png(RED))
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    dm = _fit_dm(str(folder), reference_cache=str(tmp_path / "c"))
    assert [(i.id, i.caption) for i in dm.train_dataset.items] == [  # type: ignore[union-attr]
        ("b.png", "caption of b.png"),
        ("sub/a.png", "caption of sub/a.png"),
    ]
    (folder / "c.png").write_bytes(_png(RED))
    with pytest.raises(ValueError, match=r"c.png: no caption: .*c.txt is missing"):
        _fit_dm(str(folder), reference_cache=str(tmp_path / "c"))

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "x.png").write_bytes(_png(BLUE))
    _write_jsonl(meta / "metadata.jsonl", [{"file_name": "x.png", "text": "t", "caption": "c"}])
    dm = _fit_dm(str(meta), reference_cache=str(tmp_path / "c"))
    assert dm.train_dataset.items[0].caption == "c"  # type: ignore[union-attr]  # caption_column first, then text
    dm = _fit_dm(str(meta), reference_cache=str(tmp_path / "c"), caption_column="text")
    assert dm.train_dataset.items[0].caption == "t"  # type: ignore[union-attr]
    _write_jsonl(meta / "metadata.jsonl", [{"file_name": "x.png", "text": "t"}, {"file_name": "y.png", "text": "u"}])
    with pytest.raises(RecordError, match=r"metadata.jsonl:2: field 'file_name': image file not found"):
        _fit_dm(str(meta), reference_cache=str(tmp_path / "c"))
    _write_jsonl(meta / "metadata.jsonl", [{"file_name": "x.png", "text": "t"}, {"file_name": "x.png"}])
    with pytest.raises(RecordError, match=r"metadata.jsonl:2: field 'caption': missing \(imagefolder metadata needs"):
        _fit_dm(str(meta), reference_cache=str(tmp_path / "c"))


def test_prompt_errors_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "a"}, {"caption": 3}]))
    with pytest.raises(RecordError, match=r"p.json: record 1: field 'caption': must be a non-empty string, got 3"):
        read_prompts(str(tmp_path / "p.json"))
    (tmp_path / "q.json").write_text(json.dumps(["a", ["b"]]))
    with pytest.raises(RecordError, match=r"q.json: record 1: expected a caption string or an object"):
        read_prompts(str(tmp_path / "q.json"))
    _write_jsonl(tmp_path / "p.jsonl", [{"caption": "a"}, {"caption": "b"}, {"caption": ""}])
    with pytest.raises(RecordError, match=r"p.jsonl:3: field 'caption': must be a non-empty string"):
        PromptDataModule(str(tmp_path / "p.jsonl")).setup("fit")
    _write_jsonl(tmp_path / "r.jsonl", [{"caption": "a"}, {"prompt": "b"}])
    with pytest.raises(RecordError, match=r"r.jsonl:2: field 'caption': missing"):
        read_prompts(str(tmp_path / "r.jsonl"))
    with pytest.raises(ValueError, match="inline prompt 1: must be a non-empty string"):
        read_prompts(["a", ""])
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(str(tmp_path / "none.txt"))
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON"):
        read_prompts(str(tmp_path / "bad.json"))


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs reference_cache"):
        PSODataModule(str(TINY / "manifest.jsonl"))
    with pytest.raises(ValueError, match="format 'dreambooth' needs instance_prompt and class_prompt"):
        PSODataModule(str(TINY / "dreambooth"), format="dreambooth", reference_cache=str(tmp_path))
    with pytest.raises(ValueError, match="instance_prompt only apply to format 'dreambooth', not 'manifest'"):
        _fit_dm(str(TINY / "manifest.jsonl"), instance_prompt="x", reference_cache=str(tmp_path))
    with pytest.raises(ValueError, match="for DreamBooth instance images set format: dreambooth"):
        _fit_dm(str(TINY / "dreambooth"), reference_cache=str(tmp_path))
    with pytest.raises(ValueError, match="needs a folder as train_source"):
        _fit_dm(str(TINY / "manifest.jsonl"), format="imagefolder", reference_cache=str(tmp_path))
    with pytest.raises(ValueError, match="reads record files"):
        _fit_dm(str(TINY / "imagefolder"), format="manifest", reference_cache=str(tmp_path))
    with pytest.raises(ValueError, match="resolution must be >= 1"):
        PSODataModule(str(TINY / "manifest.jsonl"), resolution=0, reference_source="dataset_loser")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        _fit_dm(str(tmp_path / "none.parquet"), reference_source="dataset_loser")
    with pytest.raises(ValueError, match="call setup"):
        PSODataModule(str(TINY / "manifest.jsonl"), reference_source="dataset_loser").train_dataloader()
    dm = _fit_dm([str(TINY / "manifest.jsonl")] * 2, reference_source="dataset_loser", max_items=8)
    assert len(dm.train_dataset or []) == 8  # the second file is not read once max_items is reached
    with pytest.raises(ValueError, match="reference_latents of different shapes"):
        collate_pso(
            [
                {**dm.train_dataset[i], "reference_latents": torch.zeros(4, i + 1, 2)}  # type: ignore[index, typeddict-item]
                for i in range(2)
            ]
        )


# ------------------------------------------------------------------------------------------------- generator


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_pso_tiny", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(data: bytes | Path) -> tuple[bytes, tuple[int, int]]:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB").tobytes(), image.size


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    return [{k: _pixels(v) if isinstance(v, bytes) else v for k, v in row.items()} for row in rows]


def test_tiny_data_generator_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    files = _load_generator().make_pso_tiny(tmp_path / "fresh")
    rel = [p.relative_to(tmp_path / "fresh") for p in files]
    committed = sorted(p for p in TINY.rglob("*") if p.is_file())
    assert [p.relative_to(TINY) for p in committed] == rel, "run python configs/data/make_pso_tiny.py"
    for ours, theirs in zip(files, committed, strict=True):
        if ours.suffix == ".png":
            assert _pixels(ours) == _pixels(theirs), f"{theirs} differs; run python configs/data/make_pso_tiny.py"
            assert _pixels(theirs)[1] == (64, 64)
        elif ours.suffix == ".parquet":
            assert _parquet_rows(ours) == _parquet_rows(theirs), f"{theirs} differs"
        else:
            assert ours.read_text() == theirs.read_text(), f"{theirs} differs"
    assert sum(p.stat().st_size for p in committed) < 300 * 1024
    rows = _parquet_rows(TINY / "pickapic.parquet")
    assert len(rows) == 16
    assert sum(r["label_0"] == r["label_1"] == 0.5 for r in rows) == 2
    prompts = json.loads((TINY / "prompts.json").read_text())
    assert len(prompts) == 16
    assert set(prompts[0]) == {"caption", "trainset_idx"}
    assert len((TINY / "val_prompts.txt").read_text().splitlines()) == 4
