"""Callbacks (installed as ``ftmods.callbacks``) that work with any LightningModule."""

from ftmods.callbacks.export import PretrainedExport

__all__ = ["PretrainedExport"]
