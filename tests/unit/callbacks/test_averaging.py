"""Weight averaging callbacks on one process: ShardedEMA's values by hand, validation swap, resume, FSDP2 (1 rank)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from support.callbacks import KillAt
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ftmods.callbacks.averaging import (
    EMAShadow,
    EMAWeightAveraging,
    ShardedEMA,
    WeightAveraging,
    ema_state_dict,
)

REPO = Path(__file__).resolve().parents[3]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class Regression(LightningModule):
    """A 2-layer MLP on fixed data; ``lazy`` builds it in ``configure_model`` and ``shard`` applies FSDP2 there."""

    def __init__(self, *, lazy: bool = False, shard: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.lazy, self.shard, self.lr = lazy, shard, lr
        self.net: torch.nn.Module | None = None if lazy else self._build()
        self.seen_in_validation: list[torch.Tensor] = []

    @staticmethod
    def _build() -> torch.nn.Module:
        generator = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        return net

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self._build()
        if self.shard and self.device_mesh is not None and not hasattr(self.net, "reshard"):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def _data(self, seed: int, n: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=generator)
        return StatefulDataLoader(TensorDataset(x, x.sum(-1, keepdim=True).sin()), batch_size=4)  # resumes mid-epoch

    def train_dataloader(self) -> DataLoader:
        return self._data(0, 64)

    def val_dataloader(self) -> DataLoader:
        return self._data(1, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen_in_validation.append(_full(self.first_weight()))
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def first_weight(self) -> torch.Tensor:
        return self.net[0].weight

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class Recorder(Callback):
    """Records every parameter after each optimizer step (full tensors)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.steps):
            self.steps.append({n: _full(p) for n, p in pl_module.named_parameters()})


def _trainer(root: Path, callbacks: list, max_steps: int = 8, **kwargs) -> Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def _shadow(module: LightningModule) -> dict[str, torch.Tensor]:
    return {n: _full(b) for n, b in module.ema_shadow.named_buffers()}


def _hand_ema(steps: list[dict[str, torch.Tensor]], updated: list[int], decay: float, warmup: bool) -> dict:
    """EMA over the weights after the given 0-based optimizer steps: the first copies, later ones mix with d_n."""
    ema: dict[str, torch.Tensor] = {}
    for n, step in enumerate(updated):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = dict(steps[step]) if n == 0 else {k: d * ema[k] + (1 - d) * steps[step][k] for k in ema}
    return ema


@pytest.mark.parametrize(
    ("warmup", "every", "start", "accumulate"),
    [(False, 1, 0, 1), (True, 2, 1, 2)],
    ids=["plain", "warmup-every2-from1-accumulate2"],
)
def test_shadow_equals_a_hand_computed_ema(tmp_path, warmup, every, start, accumulate):
    """8 optimizer steps (0..7). Updates follow Lightning's step_idx convention: step_idx >= start and
    step_idx % every == 0, i.e. all steps for the plain case and steps 2, 4, 6 for the other; with 2 accumulated
    micro-batches per step the update must still run once per optimizer step, not once per micro-batch."""
    recorder = Recorder()
    ema = ShardedEMA(0.8, warmup=warmup, update_every_n_steps=every, update_starting_at_step=start, swap_at_end=False)
    module = Regression()
    _trainer(tmp_path, [recorder, ema], accumulate_grad_batches=accumulate).fit(module)
    updated = [s for s in range(8) if s >= start and s % every == 0]
    assert ema.num_updates == len(updated)
    expected = _hand_ema(recorder.steps, updated, 0.8, warmup)
    shadow = _shadow(module)
    assert shadow.keys() == {f"net.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    for name, value in expected.items():
        assert_close(shadow[name], value, rtol=1e-6, atol=1e-7, msg=name)
    for name, param in module.named_parameters():  # swap_at_end=False: the model keeps its trained weights
        assert torch.equal(param, recorder.steps[-1][name]), name


def test_validation_sees_the_ema_and_training_is_unaffected(tmp_path):
    """Validation after steps 3 and 6 (val_check_interval=3) evaluates the EMA of that moment; swapping it in and out
    leaves training bit-exact (same weights as a run without the callback); the end of fit copies the EMA in."""
    recorder = Recorder()
    ema = ShardedEMA(0.5)
    module = Regression()
    kwargs = {"limit_val_batches": 1, "val_check_interval": 3}
    _trainer(tmp_path / "a", [recorder, ema], max_steps=6, **kwargs).fit(module)
    plain = Regression()
    _trainer(tmp_path / "b", [], max_steps=6, **kwargs).fit(plain)
    assert len(module.seen_in_validation) == 2
    for seen, step in zip(module.seen_in_validation, (3, 6), strict=True):
        expected = _hand_ema(recorder.steps, list(range(step)), 0.5, False)["net.0.weight"]
        assert_close(seen, expected, rtol=1e-6, atol=1e-7)
    assert_close(plain.seen_in_validation[-1], recorder.steps[-1]["net.0.weight"], rtol=0, atol=0)
    assert torch.equal(recorder.steps[-1]["net.0.weight"], plain.net[0].weight)  # raw training path unchanged
    assert torch.equal(module.net[0].weight, module.ema_shadow.get_buffer("net.0.weight"))  # swap_at_end copied it


def test_matches_lightning_ema(tmp_path):
    """Same update rule as Lightning's AveragedModel-based EMA (first update copies, then decay): same final model."""
    ours, theirs = Regression(), Regression()
    _trainer(tmp_path / "a", [ShardedEMA(0.7)]).fit(ours)
    _trainer(tmp_path / "b", [EMAWeightAveraging(decay=0.7)]).fit(theirs)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _LockedFactory:
    """Like the optimizer factories LightningCLI builds under DDP: callable, and holding something uncopyable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, params):
        return torch.optim.SGD(params, lr=0.05)


def test_lightning_averaging_shares_uncopyable_callables(tmp_path):
    """Lightning's AveragedModel deep-copies the module: an optimizer factory holding a lock breaks it; ftmods'
    subclass shares such callables (the copy only serves for parameters and checkpoints)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA

    module = Regression()
    module.factory = _LockedFactory()
    with pytest.raises(TypeError, match="pickle"):
        _trainer(tmp_path, [LightningEMA()], max_steps=1).fit(module)
    module = Regression()
    module.factory = factory = _LockedFactory()
    ema = EMAWeightAveraging(decay=0.5)
    _trainer(tmp_path, [ema], max_steps=2).fit(module)
    assert module.factory is factory
    assert ema._average_model.module.factory is factory


def test_lazy_user_module_and_frozen_parameters(tmp_path):
    """A plain module that builds its layers in configure_model: the shadow is made after it (single device calls the
    idempotent hook in setup); frozen parameters are not tracked unless asked."""
    module = Regression(lazy=True)
    module.configure_model()
    module.net[2].requires_grad_(False)
    frozen = module.net[2].weight.detach().clone()
    _trainer(tmp_path, [ShardedEMA(0.9)], max_steps=3).fit(module)
    assert {n for n, _ in module.ema_shadow.named_buffers()} == {"net.0.weight", "net.0.bias"}
    assert torch.equal(module.net[2].weight, frozen)
    assert all("ema_shadow" not in n for n, _ in module.named_parameters())  # buffers: optimizers never see them

    lazy = Regression(lazy=True)
    _trainer(tmp_path, [ShardedEMA(0.9, include_frozen=True)], max_steps=1).fit(lazy)
    assert len(list(lazy.ema_shadow.buffers())) == 4


class _UnfreezeAtEpoch1(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            pl_module.net[2].requires_grad_(True)


def test_parameters_unfrozen_later_are_reported(tmp_path):
    module = Regression()
    module.net[2].requires_grad_(False)
    with pytest.warns(UserWarning, match="became trainable after the EMA was set up"):
        _trainer(tmp_path, [ShardedEMA(), _UnfreezeAtEpoch1()], max_steps=4, limit_train_batches=2).fit(module)


def test_shadow_stays_float32_under_bf16_true(tmp_path):
    """With precision='bf16-true' the weights are cast to bfloat16, the shadow is not (an update of 1e-3 of the gap
    would vanish below bfloat16's resolution)."""
    module = Regression()
    ema = ShardedEMA(0.999, swap_at_end=False)
    _trainer(tmp_path, [ema], max_steps=3, precision="bf16-true").fit(module)
    assert module.net[0].weight.dtype == torch.bfloat16
    shadow = module.ema_shadow.get_buffer("net.0.weight")
    assert shadow.dtype == torch.float32
    assert not torch.equal(shadow, shadow.to(torch.bfloat16).float())  # it keeps float32 information

    holder = torch.nn.Module()
    holder.shadow = EMAShadow([("w", torch.ones(2))])
    holder.half()
    assert holder.shadow.w.dtype == torch.float32
    holder.double()
    assert holder.shadow.w.dtype == torch.float64


def _fit_resumable(root: Path, callback: Callback, strategy=None, *, kill_at=None, ckpt=None) -> Regression:
    module = Regression(shard=strategy is not None)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [callback, checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    kwargs = {"strategy": strategy} if strategy is not None else {}
    trainer = _trainer(root, callbacks, max_steps=10, enable_checkpointing=True, **kwargs)
    trainer.fit(module, ckpt_path=ckpt)
    return module


def _model_parallel() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)


@pytest.mark.parametrize(
    ("make_callback", "sharded"),
    [
        (lambda: EMAWeightAveraging(decay=0.8), False),
        (lambda: ShardedEMA(0.8, warmup=True), False),
        (lambda: ShardedEMA(0.8, warmup=True), True),
    ],
    ids=["lightning-ema", "sharded-ema", "sharded-ema-fsdp2-1rank"],
)
def test_kill_and_resume_equals_uninterrupted(tmp_path, make_callback, sharded):
    """A crash after step 6 resumes from the step-5 checkpoint (written after the other callbacks ran, so it holds
    the EMA of steps 1..5 and the update counter); the resumed run ends with the same weights and EMA. The FSDP2
    variant (ModelParallelStrategy on one rank: DTensor parameters, a DCP checkpoint folder) checks the shadow is a
    DTensor saved and restored by the strategy."""
    strategy = _model_parallel if sharded else (lambda: None)
    straight = _fit_resumable(tmp_path / "a", make_callback(), strategy())
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_resumable(tmp_path / "b", make_callback(), strategy(), kill_at=6)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert last.is_dir() == sharded
    resumed = _fit_resumable(tmp_path / "b", make_callback(), strategy(), ckpt=str(last))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(_full(a), _full(b)), name
    if hasattr(straight, "ema_shadow"):
        assert type(straight.ema_shadow.get_buffer("net.0.weight")).__name__ == ("DTensor" if sharded else "Tensor")
        for (name, a), b in zip(straight.ema_shadow.named_buffers(), resumed.ema_shadow.buffers(), strict=True):
            assert torch.equal(_full(a), _full(b)), name


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "fsdp2-dcp-folder"])
def test_evaluating_a_checkpoint_uses_its_ema(tmp_path, sharded):
    """validate(ckpt_path=...) in a fresh module with the callback evaluates the EMA: a checkpoint file goes through
    the load_state_dict pre-hook, a DCP folder (FSDP2) through a direct load of its ema_shadow entries."""
    strategy = _model_parallel() if sharded else "auto"
    module = Regression(shard=sharded)
    trainer = _trainer(tmp_path, [ShardedEMA(0.6, swap_at_end=False)], max_steps=4, strategy=strategy)
    trainer.fit(module)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    ema_weight = _full(module.ema_shadow.get_buffer("net.0.weight"))
    raw_weight = _full(module.net[0].weight)
    assert not torch.equal(ema_weight, raw_weight)

    for evaluate_ema, expected in ((True, ema_weight), (False, raw_weight)):
        fresh = Regression(shard=sharded)
        callbacks = [ShardedEMA(evaluate_ema=evaluate_ema)]
        strategy = _model_parallel() if sharded else "auto"
        evaluation = _trainer(tmp_path, callbacks, strategy=strategy, limit_val_batches=1)
        evaluation.validate(fresh, ckpt_path=path, verbose=False)
        assert torch.equal(fresh.seen_in_validation[-1], expected)

    if not sharded:
        state = torch.load(path, weights_only=True)["state_dict"]
        with pytest.raises(RuntimeError, match="ema_shadow"):
            Regression().load_state_dict(state)  # without the callback, strict loading refuses the shadow keys
        plain = Regression()
        plain.load_state_dict(ema_state_dict(state))
        assert torch.equal(plain.net[0].weight, ema_weight)
        plain.load_state_dict(ema_state_dict(state, "live"))
        assert torch.equal(plain.net[0].weight, raw_weight)


def test_resuming_a_run_without_ema_starts_the_ema_from_its_weights(tmp_path):
    module = Regression()
    trainer = _trainer(tmp_path, [], max_steps=2)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    resumed = Regression()
    ema = ShardedEMA(0.9, swap_at_end=False)
    seen: dict[int, torch.Tensor] = {}

    def record(trainer, module, *_) -> None:
        seen[trainer.global_step] = _full(module.first_weight())

    weights = LambdaCallback(on_train_batch_end=record)
    with pytest.warns(UserWarning, match="holds no EMA"):
        _trainer(tmp_path, [ema, weights], max_steps=4).fit(resumed, ckpt_path=tmp_path / "plain.ckpt")
    assert ema.num_updates == 2  # after steps 3 and 4: the first copies the weights
    assert_close(resumed.ema_shadow.get_buffer("net.0.weight"), 0.9 * seen[3] + 0.1 * seen[4])


def test_sharded_and_lightning_averaging_refuse_what_they_cannot_do():
    module = Regression()
    lightning_ema = EMAWeightAveraging()
    fake = SimpleNamespace(strategy=_model_parallel(), callbacks=[lightning_ema])
    with pytest.raises(NotImplementedError, match="ShardedEMA"):
        lightning_ema.setup(fake, module, "fit")
    with pytest.raises(NotImplementedError, match="FSDP2"):
        WeightAveraging().setup(SimpleNamespace(strategy=FSDPStrategy(), callbacks=[]), module, "fit")
    with pytest.raises(NotImplementedError, match="FSDP2"):
        ShardedEMA().setup(SimpleNamespace(strategy=FSDPStrategy(), callbacks=[]), module, "fit")
    sharded = ShardedEMA()
    with pytest.raises(ValueError, match="cannot run together"):
        sharded.setup(SimpleNamespace(strategy=None, callbacks=[sharded, EMAWeightAveraging()]), module, "fit")
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(decay=1.5)
    with pytest.raises(ValueError, match="which"):
        ema_state_dict({}, "both")


def test_lora_sft_module_tracks_only_the_adapter(tmp_path):
    """With an ftmods module: the shadow follows trainable (LoRA) tensors only and the export after fit is the EMA."""
    from ftmods.datamodules import ChatDataModule
    from ftmods.models.loading import LoRASpec
    from ftmods.sft import SFTModule

    data = REPO / "configs" / "data"
    dm = ChatDataModule([str(data / "sft_tiny_chat.jsonl")], str(data / "sft_tiny_val.jsonl"),
                        tokenizer="tiny/causal-lm", batch_size=8, max_length=96)  # fmt: skip
    module = SFTModule("tiny/causal-lm", lora=LoRASpec(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    ema = ShardedEMA(0.5)
    _trainer(tmp_path, [ema], max_steps=3).fit(module, datamodule=dm)
    names = [n for n, _ in module.ema_shadow.named_buffers()]
    assert names
    assert all("lora_" in n for n in names)
    assert names == [n for n, p in module.named_parameters() if p.requires_grad]
    for name, buffer in module.ema_shadow.named_buffers():
        assert torch.equal(module.get_parameter(name), buffer), name
