"""Lifelong editing with LocFT-BF: requests arrive over time, each ``commit`` re-runs breadth-first fine-tuning.

LocFT-BF is not an online editor: the paper (§2.5) absorbs arriving edits either by re-training on the **cumulative**
set of all edits so far (strict real-time, cost grows with the total) or on a **buffered** batch of new requests
(relaxed latency, earlier edits are not revisited). Both are one ``Trainer.fit`` of the same :class:`LocFTModule`,
whose model, tuned tensors and pre-edit originals persist between commits.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer

from ftmods.datamodules.edits import EditDataModule, EditRequest
from ftmods.locft.module import LocFTModule


def request_to_record(request: EditRequest) -> dict[str, Any]:
    """An :class:`EditRequest` in the LocFT processed JSON format that :class:`EditDataModule` reads back."""
    record: dict[str, Any] = {"prompt": request.prompt, "target_new": request.target_new}
    if request.subject is not None:
        record["subject"] = request.subject
    if request.ground_truth is not None:
        record["ground_truth"] = request.ground_truth
    if request.rephrase:
        record["rephrase_prompt"] = request.rephrase[0] if len(request.rephrase) == 1 else list(request.rephrase)
    if request.locality:
        prompts, answers = zip(*request.locality, strict=True)
        record["locality_prompt"] = prompts[0] if len(prompts) == 1 else list(prompts)
        record["locality_ground_truth"] = answers[0] if len(answers) == 1 else list(answers)
    return record


class EditStream:
    """Accumulate edit requests and commit them to a model with LocFT-BF.

    Args:
        module: The editing module (its model is loaded on the first commit and kept).
        trainer_factory: Builds the ``Trainer`` of one commit (e.g. ``lambda: Trainer(max_epochs=25)``).
        mode: ``cumulative`` trains on every edit committed so far plus the new ones; ``buffered`` only on the new ones.
        datamodule_kwargs: Extra :class:`EditDataModule` arguments (``batch_size``, ``max_length``, ...).

    Example::

        stream = EditStream(LocFTModule("Qwen/Qwen2.5-7B-Instruct", preset="qwen2.5-7b"),
                            lambda: Trainer(max_epochs=25), mode="cumulative")
        stream.add(first_requests); stream.commit()
        stream.add(later_requests); stream.commit()      # re-trains on all edits so far
        stream.module.save_delta("out/delta")
    """

    def __init__(
        self,
        module: LocFTModule,
        trainer_factory: Callable[[], Trainer],
        *,
        mode: Literal["cumulative", "buffered"] = "cumulative",
        datamodule_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("cumulative", "buffered"):
            raise ValueError(f"mode must be 'cumulative' or 'buffered', got {mode!r}")
        self.module, self.trainer_factory, self.mode = module, trainer_factory, mode
        self.datamodule_kwargs = {"order": "shuffle", **(datamodule_kwargs or {})}
        self.committed: list[EditRequest] = []  # every request applied so far, in arrival order
        self.pending: list[EditRequest] = []  # added since the last commit
        self.history: list[dict[str, Any]] = []  # one record per commit: sizes, optimizer steps, seconds per edit

    def add(self, requests: Sequence[EditRequest]) -> None:
        """Queue requests for the next commit."""
        self.pending.extend(dataclasses.replace(r) for r in requests)

    def training_set(self) -> list[EditRequest]:
        """What the next commit trains on."""
        return self.committed + self.pending if self.mode == "cumulative" else list(self.pending)

    def commit(self) -> dict[str, Any]:
        """Fine-tune on :meth:`training_set` (one ``fit``), then move the pending requests to ``committed``."""
        requests = self.training_set()
        if not self.pending:
            raise ValueError("EditStream.commit: no pending requests")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "edits.jsonl"
            path.write_text("".join(json.dumps(request_to_record(r)) + "\n" for r in requests))
            datamodule = EditDataModule(str(path), format="locft", **self.datamodule_kwargs)
            datamodule.connect(self.module.tokenizer)
            steps_before = self.module.stats["opt_steps"]
            self.module.stats["epoch"] = -1  # a new fit starts at epoch 0 again
            self.trainer_factory().fit(self.module, datamodule=datamodule)
        record = {
            "commit": len(self.history),
            "mode": self.mode,
            "new_edits": len(self.pending),
            "trained_edits": len(requests),
            "opt_steps": self.module.stats["opt_steps"] - steps_before,
            "seconds_per_edit": self.module.seconds_per_edit,
        }
        self.committed.extend(self.pending)
        self.pending = []
        self.history.append(record)
        return record

    @torch.no_grad()
    def rollback(self) -> None:
        """Restore the pre-stream weights of the tuned tensors and forget every committed edit."""
        self.module.restore_original()
        self.committed, self.pending = [], []
