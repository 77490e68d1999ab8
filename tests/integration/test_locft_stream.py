"""Lifelong LocFT-BF: cumulative re-training vs buffered batches on the pre-trained toy; rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from ftmods.datamodules.edits import load_edits
from ftmods.locft import EditStream, LocFTModule
from ftmods.locft.stream import request_to_record

REPO = Path(__file__).resolve().parents[2]
EDITS = list(load_edits(str(REPO / "configs/data/locft_tiny_edits.jsonl")))[:12]
TARGET = r"model\.layers\.2\.mlp\.down_proj\.weight"


def _stream(mode: str) -> EditStream:
    module = LocFTModule("tiny/locft-toy", target_modules=[TARGET], optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))

    def trainer() -> Trainer:
        return Trainer(accelerator="cpu", max_epochs=60, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)  # fmt: skip

    return EditStream(module, trainer, mode=mode, datamodule_kwargs={"batch_size": 6, "max_length": 32})


@pytest.mark.parametrize(("mode", "trained"), [("cumulative", [4, 8, 12]), ("buffered", [4, 4, 4])])
def test_commits_train_on_the_right_edits(mode, trained):
    stream = _stream(mode)
    for start in range(0, 12, 4):
        stream.add(EDITS[start : start + 4])
        stream.commit()
    assert [h["trained_edits"] for h in stream.history] == trained
    assert len(stream.committed) == 12
    assert stream.pending == []
    reliability = _teacher_forced_reliability(stream)
    assert reliability["last"] >= 0.9  # the newest edits are always in


def _teacher_forced_reliability(stream: EditStream) -> dict[str, float]:
    evaluator = stream.module.evaluator
    scores = evaluator.evaluate(stream.module.model, stream.committed)["teacher_forced_token/reliability"]
    return {"first": float(scores[:4].mean()), "last": float(scores[-4:].mean())}


def test_rollback_restores_the_original_tensor_bit_exactly():
    stream = _stream("buffered")
    stream.add(EDITS[:4])
    stream.commit()
    name = stream.module.tuned_names[0]
    assert not torch.equal(dict(stream.module.model.named_parameters())[name].detach(), stream.module.original[name])
    stream.rollback()
    assert torch.equal(dict(stream.module.model.named_parameters())[name].detach(), stream.module.original[name])
    assert stream.committed == []


def test_commit_without_requests_is_an_error():
    with pytest.raises(ValueError, match="no pending"):
        _stream("cumulative").commit()


def test_request_record_round_trip(tmp_path):
    import json

    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(request_to_record(r)) + "\n" for r in EDITS[:3]))
    again = list(load_edits(str(path)))
    for a, b in zip(EDITS[:3], again, strict=True):
        assert (a.prompt, a.target_new, a.ground_truth, a.rephrase, a.locality) == (
            b.prompt, b.target_new, b.ground_truth, b.rephrase, b.locality)  # fmt: skip
