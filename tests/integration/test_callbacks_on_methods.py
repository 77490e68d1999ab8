"""Every callback snippet on every method's tiny config, as a user composes them on the command line.

Each method runs twice, with the snippets stacked as a user would stack them: (A) ``hft`` + ``ema`` + ``grafting``
and (B) ``freezing`` + ``sharded_ema``. A probe callback, listed before the snippets, records the weights at the
start of training (after the freezing callbacks' ``setup``) and at its end (before the averages are swapped in).
Per run: what a freezing callback froze is bit-exact and something else trained; the EMA is what the module holds
after fit and differs from the raw trained weights; the graft was learned on the method's own loss and exported.
"""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
from support.callbacks import ParameterProbe

from ftmods.callbacks.averaging import EMAWeightAveraging, ShardedEMA
from ftmods.callbacks.freezing import ParameterFreezing
from ftmods.callbacks.grafting import WeightGrafting
from ftmods.cli import FtmodsCLI

PROBE = ["--trainer.callbacks+", "support.callbacks.ParameterProbe"]
GRAFT = ["--trainer.callbacks.init_args.sparsity", "0.01", "--trainer.callbacks.init_args.steps", "2",
         "--trainer.callbacks.init_args.max_batches", "2"]  # fmt: skip
# Settings a user gives per architecture, applied to the snippet just before them (jsonargparse: the last callback).
HFT = {"pso/tiny_online": ["--trainer.callbacks.init_args.categories", "unet"]}
FREEZE = {"pso/tiny": ["--trainer.callbacks.init_args.freeze", "['*.down_blocks.*']"],
          "locft/tiny": ["--trainer.callbacks.init_args.freeze", "[]",
                         "--trainer.callbacks.init_args.train", "['*.layers.2.*']"]}  # fmt: skip
STEPS = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ftmods"])


def _fit(config: str, *args: str) -> FtmodsCLI:
    if config == "s3ft/tiny":  # fit trains on what predict selected
        FtmodsCLI(args=["predict", "-c", f"configs/{config}.yaml", "--trainer.limit_predict_batches", "1"])
    with contextlib.redirect_stdout(io.StringIO()):
        return FtmodsCLI(args=["fit", "-c", f"configs/{config}.yaml", *PROBE, *args, *STEPS])


def _one(cli: FtmodsCLI, kind: type) -> object:
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, kind)]
    return found


def _check_freezing(cli: FtmodsCLI) -> None:
    probe, freezing = _one(cli, ParameterProbe), _one(cli, ParameterFreezing)
    assert isinstance(probe, ParameterProbe)
    assert isinstance(freezing, ParameterFreezing)
    assert 0.0 < freezing.trainable_fraction < 1.0
    candidates = {n for n, _ in freezing._params}
    assert freezing._trainable is not None
    frozen_here = candidates - freezing._trainable
    assert frozen_here
    assert frozen_here.isdisjoint(probe.trainable)
    changed = probe.changed()
    assert changed
    assert changed <= probe.trainable


SLOW = pytest.mark.slow  # generation inside grafting's loss (GRPO rollouts) / a predict first: ~20-40 s each


@pytest.mark.parametrize(
    "config",
    ["sft/tiny", pytest.param("cls_rl/tiny", marks=SLOW), "pso/tiny_online", "many_icl/tiny",
     pytest.param("s3ft/tiny", marks=SLOW), "locft/tiny"],
)  # fmt: skip
def test_hft_ema_and_grafting(config, in_sandbox):
    snippets = ["-c", "configs/callbacks/hft.yaml", *HFT.get(config, []), "-c", "configs/callbacks/ema.yaml",
                "-c", "configs/callbacks/grafting.yaml", *GRAFT]  # fmt: skip
    if config == "locft/tiny":  # one trained tensor: half of it is nothing, and HFT says so
        with pytest.raises(ValueError, match="leaves none of the 1 trainable parameter tensors trainable"):
            _fit(config, *snippets)
        snippets = snippets[2:]
    cli = _fit(config, *snippets)
    assert cli.trainer.state.finished
    if config != "locft/tiny":
        _check_freezing(cli)
    probe = _one(cli, ParameterProbe)
    assert isinstance(probe, ParameterProbe)
    trained = probe.changed()
    assert trained
    final = dict(cli.model.named_parameters())
    assert _one(cli, EMAWeightAveraging)
    assert all(not torch.equal(final[n], probe.end[n]) for n in trained)  # the module holds the EMA, not the raw
    grafting = _one(cli, WeightGrafting)
    assert isinstance(grafting, WeightGrafting)
    assert grafting.result is not None
    assert 0 < grafting.result.grafted <= grafting.result.budget
    assert set(grafting.result.tensors) <= probe.trainable
    assert torch.isfinite(torch.tensor(grafting.result.metrics["grafted/loss"]))
    assert grafting.last_export is not None
    assert (grafting.last_export / "graft.safetensors").is_file()


@pytest.mark.parametrize("config", ["sft/tiny", "cls_rl/tiny", "pso/tiny", "many_icl/tiny", "s3ft/tiny", "locft/tiny"])
def test_parameter_freezing_and_sharded_ema(config, in_sandbox):
    cli = _fit(config, "-c", "configs/callbacks/freezing.yaml", *FREEZE.get(config, []),
               "-c", "configs/callbacks/sharded_ema.yaml")  # fmt: skip
    assert cli.trainer.state.finished
    if config == "locft/tiny":  # LocFT trains one tensor (layer 2's down_proj): keeping layer 2 keeps it
        freezing = _one(cli, ParameterFreezing)
        assert isinstance(freezing, ParameterFreezing)
        assert freezing.trainable_fraction == 1.0
    else:
        _check_freezing(cli)
    probe, ema = _one(cli, ParameterProbe), _one(cli, ShardedEMA)
    assert isinstance(probe, ParameterProbe)
    assert isinstance(ema, ShardedEMA)
    trained = probe.changed()
    shadow = dict(cli.model.ema_shadow.named_buffers())  # type: ignore[union-attr]
    assert len(shadow) == len(probe.trainable)  # one float32 copy per trainable tensor, nothing else
    final = dict(cli.model.named_parameters())
    assert trained
    assert all(not torch.equal(final[n], probe.end[n]) for n in trained)
