"""Callbacks (installed as ``ftmods.callbacks``) that work with any LightningModule."""

from ftmods.callbacks.averaging import EMAWeightAveraging, ShardedEMA, WeightAveraging, ema_state_dict
from ftmods.callbacks.export import PretrainedExport
from ftmods.callbacks.freezing import HalfFineTuning, ParameterFreezing

__all__ = [
    "EMAWeightAveraging",
    "HalfFineTuning",
    "ParameterFreezing",
    "PretrainedExport",
    "ShardedEMA",
    "WeightAveraging",
    "ema_state_dict",
]
