"""DataModules (installed as ``ftmods.datamodules``): one per data family, each with its collate."""

from ftmods.datamodules.chat import ChatBatch, ChatCollator, ChatDataModule, encode_messages, encode_plain
from ftmods.datamodules.records import RecordError, load_records

__all__ = [
    "ChatBatch",
    "ChatCollator",
    "ChatDataModule",
    "RecordError",
    "encode_messages",
    "encode_plain",
    "load_records",
]
