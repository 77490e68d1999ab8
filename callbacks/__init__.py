"""Callbacks (installed as ``ftmods.callbacks``) that work with any LightningModule."""

from ftmods.callbacks.averaging import EMAWeightAveraging, ShardedEMA, WeightAveraging, ema_state_dict
from ftmods.callbacks.export import PretrainedExport
from ftmods.callbacks.freezing import HalfFineTuning, ParameterFreezing
from ftmods.callbacks.grafting import (
    GraftMask,
    GraftResult,
    WeightGrafting,
    apply_graft,
    apply_sparse_graft,
    expected_calibration_error,
    load_graft,
    top_delta_mask,
)
from ftmods.callbacks.throughput import ThroughputMeter, decoder_shape_of

__all__ = [
    "EMAWeightAveraging",
    "GraftMask",
    "GraftResult",
    "WeightGrafting",
    "apply_graft",
    "apply_sparse_graft",
    "expected_calibration_error",
    "load_graft",
    "top_delta_mask",
    "HalfFineTuning",
    "ParameterFreezing",
    "PretrainedExport",
    "ShardedEMA",
    "ThroughputMeter",
    "WeightAveraging",
    "decoder_shape_of",
    "ema_state_dict",
]
