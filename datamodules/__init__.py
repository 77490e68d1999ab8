"""DataModules (installed as ``ftmods.datamodules``): one per data family, each with its collate."""

from ftmods.datamodules.chat import ChatBatch, ChatCollator, ChatDataModule, encode_messages, encode_plain
from ftmods.datamodules.edits import (
    EditBatch,
    EditCollator,
    EditDataModule,
    EditItem,
    EditRequest,
    EditRequests,
    load_counterfact,
    load_edits,
    load_knowedit,
    load_locft,
    load_qaedit,
    load_wikibigedit,
)
from ftmods.datamodules.records import RecordError, load_records

__all__ = [
    "ChatBatch",
    "ChatCollator",
    "ChatDataModule",
    "EditBatch",
    "EditCollator",
    "EditDataModule",
    "EditItem",
    "EditRequest",
    "EditRequests",
    "RecordError",
    "encode_messages",
    "encode_plain",
    "load_counterfact",
    "load_edits",
    "load_knowedit",
    "load_locft",
    "load_qaedit",
    "load_records",
    "load_wikibigedit",
]
