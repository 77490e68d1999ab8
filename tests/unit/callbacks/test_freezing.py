"""ParameterFreezing / HalfFineTuning: selection rules without a Trainer, then single-process fits and resume."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
from support.callbacks import KillAt
from torch import nn

from ftmods.callbacks.freezing import (
    UNET_CATEGORIES,
    HalfFineTuning,
    ParameterFreezing,
    find_blocks,
    half_fine_tuning_selection,
    resolve_mode,
)
from ftmods.datamodules import ChatDataModule
from ftmods.models.loading import LoRASpec, load_causal_lm
from ftmods.sft import SFTModule

REPO = Path(__file__).resolve().parents[3]
TINY = "tiny/causal-lm"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


# ---------------------------------------------------------------------------------------------------- HFT draws


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return load_causal_lm(TINY)


def _params(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]


def _trainable_members(trainable: set[str], layer: int, members: tuple[str, ...]) -> set[str]:
    return {m for m in members if any(f"layers.{layer}." in n and f".{m}." in n for n in trainable)}


def test_hft_category_rule_on_tiny_llama(llama):
    """ratio 0.5 on 2 Llama blocks: per block 2 of 4 attention projections and 1 of 2 norms; 2 of 3 MLP
    projections in one block and 1 of 3 in the other; embeddings (tied with lm_head) and the final norm train."""
    blocks = find_blocks(llama)
    assert set(blocks.values()) == {"model.layers.0", "model.layers.1"}  # LlamaDecoderLayer via _no_split_modules
    for seed in range(5):
        trainable = set(half_fine_tuning_selection(_params(llama), blocks, key=[seed, 0]).trainable)
        mlp_counts = []
        for layer in (0, 1):
            assert len(_trainable_members(trainable, layer, ATTN)) == 2
            assert len(_trainable_members(trainable, layer, NORMS)) == 1
            mlp_counts.append(len(_trainable_members(trainable, layer, MLP)))
        assert sorted(mlp_counts) == [1, 2]
        assert {"model.embed_tokens.weight", "model.norm.weight"} <= trainable


def test_hft_on_qwen2_moves_bias_with_its_weight():
    qwen = load_causal_lm("tiny/qwen2-lm")
    params = _params(qwen)
    assert any(n.endswith("q_proj.bias") for n, _ in params)
    for seed in range(4):
        trainable = set(half_fine_tuning_selection(params, find_blocks(qwen), key=[seed]).trainable)
        for name, _ in params:
            if name.endswith(".bias"):
                assert (name in trainable) == (name.replace(".bias", ".weight") in trainable), name


def _synthetic(layers: int, size: int = 8) -> tuple[list[tuple[str, int]], dict[str, str]]:
    names = [f"layers.{i}.{m}.weight" for i in range(layers) for m in (*ATTN, *MLP, *NORMS)]
    return [(n, size) for n in names], {n: n.rsplit(".", 2)[0] for n in names}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_hft_ratio_holds_per_category(ratio):
    """Equal-size members: every category is `ratio` trainable over the blocks, up to one member."""
    params, blocks = _synthetic(8)
    trainable = set(half_fine_tuning_selection(params, blocks, key=[3], ratio=ratio).trainable)
    for members in (ATTN, MLP, NORMS):
        count = sum(len(_trainable_members(trainable, i, members)) for i in range(8))
        assert abs(count - ratio * 8 * len(members)) <= 1, members


def test_hft_odd_block_count_gives_the_extra_block_to_one_side():
    """3 blocks x 1.5 MLP projections = 4.5: blocks keep 1 or 2, 4 or 5 in total, and every block 2 attention."""
    params, blocks = _synthetic(3)
    totals = set()
    for seed in range(6):
        trainable = set(half_fine_tuning_selection(params, blocks, key=[seed]).trainable)
        per_block = [len(_trainable_members(trainable, i, MLP)) for i in range(3)]
        assert set(per_block) <= {1, 2}
        totals.add(sum(per_block))
        assert all(len(_trainable_members(trainable, i, ATTN)) == 2 for i in range(3))
    assert totals <= {4, 5}


def test_balance_numel_hits_the_ratio_with_grouped_query_attention(llama):
    """k/v (32 x 64) are half the size of q/o (64 x 64): 'count' may keep {k, v} or {q, o}; 'numel' keeps one big and
    one small projection per block, so exactly half of the drawn parameters train."""
    params, blocks = _params(llama), find_blocks(llama)
    fractions = set()
    for seed in range(8):
        draw = half_fine_tuning_selection(params, blocks, key=[seed], balance="numel")
        assert draw.drawn_trainable_numel * 2 == draw.drawn_numel
        trainable = set(draw.trainable)
        for layer in (0, 1):
            assert len(_trainable_members(trainable, layer, ("q_proj", "o_proj"))) == 1
        counted = half_fine_tuning_selection(params, blocks, key=[seed], balance="count")
        fractions.add(counted.drawn_trainable_numel / counted.drawn_numel)
    assert len(fractions) > 1  # the count rule's numel fraction depends on the draw


def test_hft_is_deterministic_and_epoch_draws_differ(llama):
    """Fresh callbacks with the same (seed, stage, epoch) agree; other epochs, stages or seeds give other sets."""

    def trainable(**kwargs) -> frozenset[str]:
        epoch = kwargs.pop("epoch", 0)
        hft = HalfFineTuning(reselect="epoch", **kwargs)
        hft._params, hft._blocks = _params(llama), find_blocks(llama)
        return hft.selection(epoch)

    assert trainable(seed=1, stage_index=2, epoch=3) == trainable(seed=1, stage_index=2, epoch=3)
    by_epoch = {trainable(seed=1, stage_index=2, epoch=e) for e in range(4)}
    assert len(by_epoch) >= 3
    assert trainable(seed=1, stage_index=0) != trainable(seed=1, stage_index=1)
    assert trainable(seed=0) != trainable(seed=1)


def test_draw_key_by_reselect():
    assert HalfFineTuning(seed=4, stage_index=2, reselect="never").draw_key(7) == [4]
    assert HalfFineTuning(seed=4, stage_index=2, reselect="stage").draw_key(7) == [4, 2]
    assert HalfFineTuning(seed=4, stage_index=2, reselect="epoch").draw_key(7) == [4, 2, 7]


@pytest.mark.parametrize(("granularity", "whole_blocks"), [("layer", True), ("model", False)])
def test_layer_and_model_granularity(granularity, whole_blocks):
    params, blocks = _synthetic(4)
    drawn_names = {n for n, _ in params}
    draw = half_fine_tuning_selection(params, blocks, key=[0], granularity=granularity)
    assert draw.drawn_trainable_numel * 2 == draw.drawn_numel  # 2 of 4 blocks / 18 of 36 groups
    per_block = Counter(blocks[n] for n in draw.trainable if n in drawn_names)
    assert (sorted(per_block.values()) == [9, 9]) == whole_blocks


def test_embeddings_and_head_always_train_and_other_is_configurable(llama):
    params, blocks = _params(llama), find_blocks(llama)
    always = set(half_fine_tuning_selection(params, blocks, key=[0], other="frozen").trainable)
    assert "model.embed_tokens.weight" in always
    assert "model.norm.weight" not in always  # outside the categories -> other
    none = set(half_fine_tuning_selection(params, blocks, key=[0], always_trainable=[], other="frozen").trainable)
    assert "model.embed_tokens.weight" not in none
    assert none == always - {"model.embed_tokens.weight"}


def test_lora_adapters_are_drawn_per_projection():
    """With LoRA only adapters are candidates; A and B of one projection share their fate."""
    module = SFTModule(TINY, lora=LoRASpec(r=2, alpha=4))
    module.configure_model()
    params = _params(module)
    assert all("lora_" in n for n, _ in params)
    blocks = find_blocks(module)  # through the peft wrapper
    assert len(set(blocks.values())) == 2
    trainable = set(half_fine_tuning_selection(params, blocks, key=[0]).trainable)
    for name, _ in params:
        if "lora_A" in name:
            assert (name in trainable) == (name.replace("lora_A", "lora_B") in trainable), name
    assert 0 < len(trainable) < len(params)


def test_find_blocks_falls_back_to_a_layers_regex_and_accepts_one():
    net = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]), "head": nn.Linear(2, 1)})
    assert set(find_blocks(net).values()) == {"layers.0", "layers.1", "layers.2"}
    assert set(find_blocks(net, r"head\.").values()) == {"head"}


# ------------------------------------------------------------------------------------------------ strategy checks


def _deepspeed() -> DeepSpeedStrategy:
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # DeepSpeed itself is not installed; only the type matters


def test_deepspeed_allows_only_a_selection_fixed_at_setup():
    assert resolve_mode(_deepspeed(), "auto", per_epoch=False) == "requires_grad"
    with pytest.raises(ValueError, match="per-epoch re-selection is not supported"):
        resolve_mode(_deepspeed(), "auto", per_epoch=True)
    with pytest.raises(ValueError, match="grad_mask.*cannot work"):
        resolve_mode(_deepspeed(), "grad_mask", per_epoch=False)


def test_mode_resolution_by_strategy():
    single, ddp = SingleDeviceStrategy("cpu"), DDPStrategy()
    fsdp2 = ModelParallelStrategy.__new__(ModelParallelStrategy)
    assert resolve_mode(ddp, "auto", per_epoch=False) == "requires_grad"
    assert resolve_mode(ddp, "auto", per_epoch=True) == "grad_mask"
    assert resolve_mode(single, "auto", per_epoch=True) == "requires_grad"
    assert resolve_mode(fsdp2, "auto", per_epoch=True) == "requires_grad"
    assert resolve_mode(ddp, "grad_mask", per_epoch=False) == "grad_mask"
    with pytest.raises(ValueError, match="desynchronises"):
        resolve_mode(ddp, "requires_grad", per_epoch=True)


def test_constructor_validation_and_state_keys():
    with pytest.raises(ValueError, match="ratio"):
        HalfFineTuning(ratio=0.0)
    with pytest.raises(ValueError, match="reselect"):
        HalfFineTuning(reselect="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        ParameterFreezing(train=["a"], mode="mask")  # type: ignore[arg-type]
    keys = {HalfFineTuning().state_key, HalfFineTuning(stage_index=1).state_key, HalfFineTuning(seed=1).state_key}
    keys |= {ParameterFreezing(train=["a"]).state_key, ParameterFreezing(train=["b"]).state_key}
    assert len(keys) == 5


# -------------------------------------------------------------------------------------------------- fits: SFTModule


def _datamodule(batch_size: int = 8) -> ChatDataModule:
    data = REPO / "configs" / "data"
    return ChatDataModule(str(data / "sft_tiny_chat.jsonl"), tokenizer=TINY, max_length=96, batch_size=batch_size)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _sft() -> SFTModule:
    module = SFTModule(TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1))
    module.configure_model()
    return module


class _RequiresGradProbe(Callback):
    """Records which parameters require grad once training runs (after setup and the strategy's wrapping)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requires_grad = {n for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["requires_grad", "grad_mask"])
def test_sft_fit_keeps_frozen_weights_bit_exact(tmp_path, mode):
    """AdamW with weight decay: a frozen weight would move even with a zero gradient, so bit-exactness shows that the
    optimizer skipped it."""
    module = _sft()
    before = _snapshot(module)
    hft, probe = HalfFineTuning(mode=mode), _RequiresGradProbe()
    _trainer(tmp_path, [hft, probe], max_steps=3).fit(module, datamodule=_datamodule())
    trainable = hft.selection(0)
    assert trainable == hft._trainable
    after = _snapshot(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    assert probe.requires_grad == (trainable if mode == "requires_grad" else set(before))
    assert all(p.requires_grad for p in module.parameters())  # restored at teardown
    assert 0.5 < hft.trainable_fraction < 0.75  # embeddings are always trainable
    assert hft.trainable_fraction == pytest.approx(
        float(module.trainer.callback_metrics["freezing/trainable_fraction"])
    )


class _EpochRecorder(Callback):
    """Snapshots the weights at every epoch start and end (runs after the freezing callback's epoch start)."""

    def __init__(self, freezing: ParameterFreezing) -> None:
        self.freezing, self.epochs = freezing, []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = _snapshot(pl_module)
        self.trainable = self.freezing._trainable
        state = trainer.optimizers[0].state
        self.with_state = {n for n, p in pl_module.named_parameters() if p in state}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        end = _snapshot(pl_module)
        changed = frozenset(n for n in end if not torch.equal(self.start[n], end[n]))
        self.epochs.append((self.trainable, changed, self.with_state))


@pytest.mark.parametrize("mode", ["grad_mask", "auto"])
def test_per_epoch_reselection(tmp_path, mode):
    """Each epoch trains exactly its own draw; draws differ between epochs. 'auto' on one device toggles
    requires_grad. With reset_optimizer_state_on_unfreeze, parameters frozen in the previous epoch start the new one
    without Adam moments."""
    module = _sft()
    hft = HalfFineTuning(reselect="epoch", mode=mode, seed=3, reset_optimizer_state_on_unfreeze=True)
    recorder = _EpochRecorder(hft)
    _trainer(tmp_path, [hft, recorder], max_epochs=3, limit_train_batches=2).fit(module, datamodule=_datamodule())
    assert hft._applied == ("grad_mask" if mode == "grad_mask" else "requires_grad")
    selections = [trainable for trainable, _, _ in recorder.epochs]
    assert len(set(selections)) == 3
    for epoch, (trainable, changed, with_state) in enumerate(recorder.epochs):
        assert trainable == hft.selection(epoch)
        assert changed == trainable, epoch
        if epoch:
            assert not with_state & (trainable - selections[epoch - 1])  # newly unfrozen: state dropped
            assert with_state & trainable  # the others kept theirs


def _fit_resumable(tmp_path: Path, hft: HalfFineTuning, kill_at: int | None = None, ckpt: str | None = None):
    module = SFTModule(TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [hft, checkpoint] + ([KillAt(kill_at)] if kill_at else [])
    trainer = _trainer(tmp_path, callbacks, max_steps=9, enable_checkpointing=True)
    trainer.fit(module, datamodule=_datamodule(), ckpt_path=ckpt)
    return module


def _hft_epochs() -> HalfFineTuning:
    return HalfFineTuning(reselect="epoch", mode="grad_mask", seed=5, reset_optimizer_state_on_unfreeze=True)


@pytest.mark.parametrize("kill_at", [4, 7])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, kill_at):
    """48 examples in batches of 8 = 6 steps per epoch, 9 steps in all. The crash at step 4 resumes mid-epoch 0; the
    crash at step 7 resumes from step 6, epoch 0's last batch, so the resumed run must re-draw for epoch 1 and drop
    the stale optimizer state exactly as the uninterrupted run did."""
    straight = _fit_resumable(tmp_path / "a", _hft_epochs())
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_resumable(tmp_path / "b", _hft_epochs(), kill_at=kill_at)
    resumed = _fit_resumable(tmp_path / "b", _hft_epochs(), ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def two_step_checkpoint(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("resume")
    module = SFTModule(TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = _trainer(tmp_path, [HalfFineTuning(seed=0)], max_steps=2)
    trainer.fit(module, datamodule=_datamodule())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    state = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert set(state["HalfFineTuning{'seed': 0, 'stage_index': 0}"]) >= {"selection_sha1", "trainable_names"}
    return tmp_path / "two.ckpt"


@pytest.mark.parametrize(
    ("changed", "key"),
    [({"ratio": 0.25}, "'seed': 0"), ({"categories": {"attn": list(ATTN)}}, "'seed': 0"), ({"seed": 1}, "'seed': 1")],
    ids=["ratio", "categories", "seed"],
)
def test_resume_with_changed_settings_raises(tmp_path, two_step_checkpoint, changed, key):
    """Same state_key (ratio, categories): load_state_dict compares; another seed changes the state_key, and
    on_load_checkpoint compares with the single HalfFineTuning entry of the checkpoint."""
    module = SFTModule(TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    hft = HalfFineTuning(**changed)
    assert key in hft.state_key
    with pytest.raises(ValueError, match="selection hash mismatch"):
        _trainer(tmp_path, [hft], max_steps=4).fit(module, datamodule=_datamodule(), ckpt_path=two_step_checkpoint)


def test_resume_with_same_settings_continues(tmp_path, two_step_checkpoint):
    module = SFTModule(TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = _trainer(tmp_path, [HalfFineTuning(seed=0)], max_steps=3)
    trainer.fit(module, datamodule=_datamodule(), ckpt_path=two_step_checkpoint)
    assert trainer.global_step == 3


# -------------------------------------------------------------------------------------------- a plain LightningModule


class _Stack(LightningModule):
    """A user module with no transformers model: an embedding-like input layer, 3 blocks of two linears, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)}) for _ in range(3))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = torch.tanh(layer["b"](torch.tanh(layer["a"](h))))
        return self.head(h)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)  # all parameters: frozen ones have no grad and are skipped


@pytest.mark.parametrize(
    "freezing",
    [
        ParameterFreezing(freeze=["layers.*", "inp.*"], train=["layers.2.*"], syntax="glob"),
        ParameterFreezing(train=[r"layers\.2\..*", r"head\..*"], mode="grad_mask"),
        HalfFineTuning(categories={"linear": [r"\.a\.", r"\.b\."]}, always_trainable=[r"^head\."]),
    ],
    ids=["glob-requires_grad", "regex-grad_mask", "hft"],
)
def test_plain_lightning_module(tmp_path, freezing):
    module = _Stack()
    before = _snapshot(module)
    _trainer(tmp_path, [freezing], max_steps=4).fit(module)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert changed == freezing._trainable
    if isinstance(freezing, HalfFineTuning):  # 1 of 2 linears per block (weight and bias together)
        assert changed == set(freezing.selection(0))
        assert Counter(n.split(".")[1] for n in changed if n.startswith("layers.")) == {"0": 2, "1": 2, "2": 2}
        assert {"head.weight", "head.bias", "inp.weight", "inp.bias"} <= changed
    else:
        assert changed == {n for n in before if n.startswith(("layers.2.", "head."))}


def test_a_selection_that_trains_nothing_is_refused(tmp_path):
    module = _Stack()
    before = _snapshot(module)
    with pytest.raises(ValueError, match=r"leaves none of the 16 trainable parameter tensors trainable"):
        _trainer(tmp_path, [ParameterFreezing(freeze=["*"], syntax="glob")], max_steps=1).fit(module)
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


def test_unet_category_preset_draws_the_transformer_blocks_of_a_diffusers_unet():
    """``categories="unet"``: per BasicTransformerBlock, half of self-attention, cross-attention, feed-forward and
    norms; resnets and the rest follow ``other``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)  # fmt: skip
    hft = HalfFineTuning(categories="unet")
    assert hft.categories == UNET_CATEGORIES
    params = [(n, p.numel()) for n, p in unet.named_parameters()]
    draw = half_fine_tuning_selection(params, find_blocks(unet), key=[0, 0], categories=hft.categories)
    blocks = sorted({n.split(".transformer_blocks.")[0] for n, _ in params if ".transformer_blocks." in n})
    assert len(blocks) == 4  # one down, the mid block, two up (layers_per_block + 1)
    for block in blocks:
        inside = {n for n, _ in params if n.startswith(block + ".transformer_blocks.0.")}
        kept = {n for n in draw.trainable if n in inside}
        for members in UNET_CATEGORIES.values():
            weights = [n for n in inside if any(re.search(m, n) for m in members) and n.endswith("weight")]
            assert 0 < sum(n in kept for n in weights) < len(weights)  # part of every category trains
    assert all(n in draw.trainable for n, _ in params if ".resnets." in n)  # outside the blocks: other=trainable
    with pytest.raises(ValueError, match="categories must be one of"):
        HalfFineTuning(categories="vit")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("snippet", ["freezing", "hft"])
def test_config_snippets_append_to_the_method_callbacks(snippet, monkeypatch):
    from ftmods.cli import FtmodsCLI

    monkeypatch.setattr(sys, "argv", ["ftmods"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        FtmodsCLI(args=["fit", "-c", str(REPO / "configs/sft/tiny.yaml"), "-c",
                        str(REPO / f"configs/callbacks/{snippet}.yaml"), "--print_config"])  # fmt: skip
    callbacks = [c["class_path"] for c in yaml.safe_load(out.getvalue())["trainer"]["callbacks"]]
    assert callbacks[:2] == ["lightning.pytorch.callbacks.ModelCheckpoint", "ftmods.callbacks.PretrainedExport"]
    assert callbacks[2].rsplit(".", 1)[-1] == {"freezing": "ParameterFreezing", "hft": "HalfFineTuning"}[snippet]
