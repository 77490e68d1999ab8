"""Callbacks (installed as ``ftmods.callbacks``) that work with any LightningModule."""

from ftmods.callbacks.export import PretrainedExport
from ftmods.callbacks.freezing import HalfFineTuning, ParameterFreezing

__all__ = ["HalfFineTuning", "ParameterFreezing", "PretrainedExport"]
