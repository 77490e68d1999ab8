"""The WeightGrafting callback (arXiv 2302.06600): its batch helpers, the callback in a fit on plain and manual-
optimization modules, resume, DDP, and recovery of the fine-tuned accuracy on the shapes toy at 1 % sparsity. The
math (graft, budget, top-|Δ|, ECE, relaxed mask, export) is tested by hand in tests/unit/ops/test_grafting.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from safetensors.torch import save_file
from support.callbacks import KillAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftmods.callbacks.grafting import (
    WeightGrafting,
    apply_sparse_graft,
    batch_logits,
    graft_budget,
    load_graft,
    training_step_loss,
)
from ftmods.models.graft_toy import build_toy_classifier, pretrain, shape_images

REPO = Path(__file__).resolve().parents[3]

# --------------------------------------------------------------------------- callback helpers (math: tests/unit/ops)


def test_batch_logits_reads_tuples_and_labelled_mappings():
    class TokenTagger(LightningModule):  # returns a Hugging Face style output with .logits of shape (B, T, C)
        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=F.one_hot(input_ids, 5).float())

    ids = torch.tensor([[1, 2, 3], [4, 0, 1]])
    logits, targets = batch_logits(TokenTagger(), {"input_ids": ids, "labels": ids})
    assert logits.shape == (6, 5)
    assert torch.equal(targets, ids.flatten())
    logits, targets = batch_logits(TokenTagger(), (ids, ids))
    assert logits.shape == (6, 5)
    with pytest.raises(TypeError, match="logits_fn"):
        batch_logits(TokenTagger(), ids)


def test_settings_are_checked_early():
    with pytest.raises(ValueError, match="sparsity"):
        WeightGrafting(sparsity=2.0)
    with pytest.raises(ValueError, match="loss_fn or logits_fn"):
        WeightGrafting(logits_fn=None)
    with pytest.raises(ValueError, match="binarize"):
        WeightGrafting(binarize="floor")  # type: ignore[arg-type]


def test_sharded_strategies_are_refused():
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed needed: only the type is checked
    with pytest.raises(NotImplementedError, match="DeepSpeedStrategy"):
        WeightGrafting().setup(SimpleNamespace(strategy=strategy), None, "fit")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- a plain LightningModule


class Classifier(LightningModule):
    """A user's module: ``net`` on ``(x, y)`` batches; ``freeze`` names parameters left out of the optimiser."""

    def __init__(self, net: nn.Module, *, lr: float = 0.05, freeze: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        for name, param in self.net.named_parameters():
            param.requires_grad_(not name.startswith(freeze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class SeededClassifier(Classifier):
    """Deterministic construction from hyperparameters, so ``pretrained="rebuild"`` recreates θ_pre."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), lr=lr)
        self.save_hyperparameters()


def _blobs(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=generator) * 0.7
    x[torch.arange(n), y] += 2.0  # class c: feature c raised
    return TensorDataset(x, y)


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(_blobs(64, 1), batch_size=16), DataLoader(_blobs(48, 2), batch_size=16)


def _trainer(root: Path, callbacks: list, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_fit_on_a_plain_module_exports_logs_and_restores_weights(tmp_path):
    module = SeededClassifier()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    grafting = WeightGrafting(sparsity=0.1, steps=3, mask_lr=1e5, dirpath=str(tmp_path / "graft"))
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [grafting], max_epochs=3, logger=logger, enable_checkpointing=False)
    train, val = _loaders()
    trainer.fit(module, train, val)
    finetuned = {n: p.detach().clone() for n, p in module.named_parameters()}
    result = grafting.result
    assert result is not None
    assert grafting.done
    assert result.graftable == 6 * 16 + 16 + 16 * 3 + 3
    assert result.budget == graft_budget(result.graftable, 0.1)
    assert result.grafted == result.budget
    assert result.sparsity <= 0.1
    assert {"finetuned/accuracy", "pretrained/ece", "grafted/accuracy", "grafted/ece"} <= set(result.metrics)
    assert len(result.history) == 4  # the base patch and three steps

    # the module holds the fine-tuned weights again (apply=False); the export rebuilds the chosen graft exactly
    assert not all(torch.equal(before[n], finetuned[n]) for n in before)
    graft = load_graft(tmp_path / "graft" / "graft.safetensors")
    assert sum(g.indices.numel() for g in graft.values()) == result.grafted
    module.load_state_dict(apply_sparse_graft(before, graft))
    acc = _accuracy(module, val)
    assert acc == pytest.approx(result.metrics["grafted/accuracy"])
    saved = json.loads((tmp_path / "graft" / "graft.json").read_text())
    assert saved["grafted"] == result.grafted
    assert saved["settings"]["sparsity"] == 0.1

    logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"graft/sparsity", "graft/accuracy", "graft/ece", "graft/finetuned/accuracy"} <= set(logged)


def test_loss_only_modules_use_training_step_loss(tmp_path):
    """Without logits (e.g. a language model), the mask is selected by the loss of ``training_step``."""
    module = SeededClassifier()
    grafting = WeightGrafting(sparsity=0.1, steps=2, mask_lr=1e5, loss_fn=training_step_loss, logits_fn=None,
                              dirpath=str(tmp_path / "graft"))  # fmt: skip
    _trainer(tmp_path, [grafting], max_epochs=2, enable_checkpointing=False).fit(module, *_loaders())
    assert grafting.result is not None
    assert set(grafting.result.metrics) == {"finetuned/loss", "pretrained/loss", "grafted/loss"}


class _Recording(SeededClassifier):
    """Records the batch sizes ``training_step`` sees while grafting; batches arrive as dicts that
    ``on_before_batch_transfer`` turns into ``(x, y)``, as Lightning's loops do."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__(seed, lr)
        self.seen: list[int] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return (batch["x"], batch["y"]) if isinstance(batch, dict) else batch

    def training_step(self, batch, batch_idx):
        if not self.training:  # grafting evaluates in eval mode; the fit loop trains in train mode
            self.seen.append(len(batch[1]))
        return super().training_step(batch, batch_idx)


def _dict_loader(data: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader([{"x": x, "y": y} for x, y in data], batch_size=batch_size)


@pytest.mark.parametrize(("validation", "val_used"), [(None, False), (True, True)])
def test_loss_only_grafting_uses_validation_only_when_asked(tmp_path, validation, val_used):
    """Loss-only modules validate on other batches than they train on (PSO: prompts), so by default grafting uses
    the training batches alone (size 16 here); ``validation=True`` adds the validation batches (size 12)."""
    module = _Recording()
    grafting = WeightGrafting(sparsity=0.1, steps=1, mask_lr=1e5, loss_fn=training_step_loss, logits_fn=None,
                              validation=validation, dirpath=str(tmp_path / "graft"))  # fmt: skip
    trainer = _trainer(tmp_path, [grafting], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, _dict_loader(_blobs(64, 1), 16), _dict_loader(_blobs(48, 2), 12))
    assert module.seen  # dict batches reached training_step as (x, y): the batch hooks ran
    assert set(module.seen) == ({16, 12} if val_used else {16})


class _Manual(SeededClassifier):
    """Manual optimization: ``training_step`` steps the optimizer, which grafting must never call."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__(seed, lr)
        self.automatic_optimization = False
        self.steps = 0

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()
        self.steps += 1


class _ManualWithLoss(_Manual):
    def training_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1])


def test_manual_optimization_needs_a_training_loss(tmp_path):
    train, val = _loaders()
    grafting = WeightGrafting(sparsity=0.1, steps=1, loss_fn=training_step_loss, logits_fn=None)
    with pytest.raises(TypeError, match=r"_Manual optimizes manually .* training_loss\(batch\)"):
        _trainer(tmp_path, [grafting], max_epochs=1, enable_checkpointing=False).fit(_Manual(), train)
    module = _ManualWithLoss()
    grafting = WeightGrafting(sparsity=0.1, steps=2, mask_lr=1e5, loss_fn=training_step_loss, logits_fn=None,
                              dirpath=str(tmp_path / "graft"))  # fmt: skip
    _trainer(tmp_path, [grafting], max_epochs=1, enable_checkpointing=False).fit(module, train, val)
    assert module.steps == len(train)  # the fit's own steps only: grafting called training_loss instead
    assert grafting.result is not None
    assert grafting.result.grafted == grafting.result.budget


def test_keep_copies_whole_tensors_and_exclude_reverts_them(tmp_path):
    """net.2 (the output layer) is kept whole, outside the budget; net.0.bias is excluded, so it reverts to its
    pre-trained value; the budget is over net.0.weight only (6 · 16 = 96 entries)."""
    module = SeededClassifier()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    grafting = WeightGrafting(sparsity=0.1, steps=1, mask_lr=1e5, keep=["net.2.*"], exclude=["net.0.bias"],
                              syntax="glob", apply=True, dirpath=str(tmp_path / "graft"))  # fmt: skip
    _trainer(tmp_path, [grafting], max_epochs=2, enable_checkpointing=False).fit(module, *_loaders())
    result = grafting.result
    assert result is not None
    assert (result.graftable, result.kept, result.budget) == (96, 16 * 3 + 3, 9)
    after = dict(module.named_parameters())
    assert torch.equal(after["net.0.bias"], before["net.0.bias"])
    assert int((after["net.0.weight"] != before["net.0.weight"]).sum()) <= 9
    graft = load_graft(tmp_path / "graft" / "graft.safetensors")
    assert set(graft) == {"net.0.weight", "net.2.weight", "net.2.bias"}
    assert graft["net.2.weight"].indices.numel() == 48
    assert all(torch.equal(t, after[n].detach()) for n, t in apply_sparse_graft(before, graft).items())


def test_graft_by_hand_after_fit_with_other_loaders(tmp_path):
    module = SeededClassifier()
    grafting = WeightGrafting(sparsity=0.1, steps=1, mask_lr=1e5, at_train_end=False, dirpath=str(tmp_path / "g"))
    trainer = _trainer(tmp_path, [grafting], max_epochs=2, enable_checkpointing=False)
    train, val = _loaders()
    trainer.fit(module, train, val)
    assert grafting.result is None
    assert not (tmp_path / "g").exists()
    held_out = DataLoader(_blobs(30, 3), batch_size=10)
    result = grafting.graft(trainer, module, val, held_out)  # mask from val, report on the held-out set
    assert grafting.result is result
    assert result.metrics["finetuned/accuracy"] == pytest.approx(_accuracy(module, held_out))
    assert (tmp_path / "g" / "graft.safetensors").is_file()


def _accuracy(module: LightningModule, loader: DataLoader) -> float:
    module.eval()
    with torch.no_grad():
        correct = sum(int((module(x).argmax(-1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)


# ----------------------------------------------------------------------------------------------------------- resume


def test_resume_keeps_the_pretrained_snapshot_and_grafts_like_an_uninterrupted_run(tmp_path):
    """4 batches per epoch, checkpoint at each epoch end (step 4, 8); the crash at step 10 resumes from step 8.
    The resumed callback gets θ_pre from the checkpoint (not the resumed weights), so the graft is the same."""
    train, val = _loaders()

    def run(root: Path, crash: bool, ckpt_path: str | None = None) -> WeightGrafting:
        grafting = WeightGrafting(sparsity=0.1, steps=2, mask_lr=1e5, dirpath=str(root / "graft"))
        callbacks = [grafting, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1)] + ([KillAt(10)] if crash else [])
        trainer = _trainer(root, callbacks, max_epochs=3)
        if crash:
            with pytest.raises(RuntimeError, match="simulated crash"):
                trainer.fit(SeededClassifier(), train, val)
        else:
            trainer.fit(SeededClassifier(), train, val, ckpt_path=ckpt_path)
        return grafting

    whole = run(tmp_path / "whole", crash=False)
    crashed = run(tmp_path / "resumed", crash=True)
    assert crashed.result is None
    state = torch.load(tmp_path / "resumed" / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)["callbacks"]
    saved = state[crashed.state_key]
    assert saved["fingerprint"] == whole.state_dict()["fingerprint"]
    assert not saved["done"]
    resumed = run(
        tmp_path / "resumed", crash=False, ckpt_path=str(tmp_path / "resumed" / "ckpt" / "epoch=1-step=8.ckpt")
    )
    assert resumed.state_dict()["fingerprint"] == whole.state_dict()["fingerprint"]
    assert resumed.result == whole.result
    a = load_graft(tmp_path / "whole" / "graft" / "graft.safetensors")
    b = load_graft(tmp_path / "resumed" / "graft" / "graft.safetensors")
    assert all(torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values) for n in a)


def test_rebuild_and_file_sources_are_checked_against_the_fit_start_fingerprint(tmp_path):
    train, val = _loaders()
    reference = SeededClassifier()
    snapshot = WeightGrafting(sparsity=0.1, steps=1, mask_lr=1e5, dirpath=str(tmp_path / "a"))
    _trainer(tmp_path, [snapshot], max_epochs=2, enable_checkpointing=False).fit(reference, train, val)

    rebuilt = WeightGrafting(sparsity=0.1, steps=1, mask_lr=1e5, pretrained="rebuild", dirpath=str(tmp_path / "b"))
    _trainer(tmp_path, [rebuilt], max_epochs=2, enable_checkpointing=False).fit(SeededClassifier(), train, val)
    assert rebuilt.state_dict()["snapshot"] is None  # nothing stored in checkpoints
    assert rebuilt.result == snapshot.result

    wrong = tmp_path / "wrong.safetensors"
    save_file({n: p.detach() + 1 for n, p in SeededClassifier().named_parameters()}, str(wrong))
    from_file = WeightGrafting(sparsity=0.1, steps=1, pretrained=str(wrong), dirpath=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        _trainer(tmp_path, [from_file], max_epochs=1, enable_checkpointing=False).fit(SeededClassifier(), train, val)


# ------------------------------------------------------------------------------------------ recovery on the shapes toy


@pytest.fixture(scope="module")
def shapes_toy():
    """The classifier pre-trained on red / blue shapes (task A) and the green / yellow data of task B."""
    torch.manual_seed(0)
    net = build_toy_classifier(width=16, seed=0)
    pretrain(net, *shape_images(("red", "blue"), 500, seed="A0"), steps=300, seed=0)
    task_b = {
        split: shape_images(("green", "yellow"), n, seed=f"{split}0")
        for split, n in (("train", 24), ("val", 12), ("test", 50))
    }
    return net, task_b


def test_grafting_recovers_the_finetuned_accuracy_at_one_percent_sparsity(shapes_toy, tmp_path):
    """SGD fine-tuning of everything but the head (the authors freeze the head), then grafting 1 % of the
    parameters onto the pre-trained classifier keeps ≥ 90 % of the fine-tuned test accuracy, on test images used
    neither for fine-tuning nor for choosing the mask.

    Measured here (seed 0): pre-trained 0.527, fine-tuned 0.975, grafted 0.988 with 144 / 14,496 entries (0.99 %),
    val ECE 0.180 → 0.043. The same pipeline over seeds 0-5: recovery ≥ 0.99 for 5 of 6 (seed 2, whose pre-trained
    model already scores 0.70, recovers 0.80); the top-|Δ| base patch alone recovers 0.47-1.01; the authors' mask
    lr 1e7 recovers 0.79-1.05 (4 of 6 ≥ 0.9), hence mask_lr=1e6 for this toy's smaller Δ and gradients."""
    net, data = shapes_toy
    pretrained = {n: p.detach().clone() for n, p in net.named_parameters()}
    module = Classifier(copy.deepcopy(net).train(), lr=0.03, freeze=("13.",))  # 13 = the Linear head
    grafting = WeightGrafting(sparsity=0.01, steps=10, mask_lr=1e6, dirpath=str(tmp_path / "graft"))
    train = DataLoader(TensorDataset(*data["train"]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    val = DataLoader(TensorDataset(*data["val"]), batch_size=96)
    trainer = _trainer(tmp_path, [grafting], max_steps=99, enable_checkpointing=False)  # 33 epochs of 3 batches
    trainer.fit(module, train, val)

    test = DataLoader(TensorDataset(*data["test"]), batch_size=400)
    finetuned_acc = _accuracy(module, test)
    graft = load_graft(tmp_path / "graft" / "graft.safetensors")
    module.net.load_state_dict(apply_sparse_graft(pretrained, {n.removeprefix("net."): g for n, g in graft.items()}))
    grafted_acc = _accuracy(module, test)
    module.net.load_state_dict(pretrained)
    pretrained_acc = _accuracy(module, test)

    result = grafting.result
    assert result is not None
    summary = (
        f"pretrained {pretrained_acc:.3f}, fine-tuned {finetuned_acc:.3f}, grafted {grafted_acc:.3f} with "
        f"{result.grafted}/{result.graftable} = {result.sparsity:.4%} (best step {result.best_step}); val ECE "
        f"fine-tuned {result.metrics['finetuned/ece']:.3f}, grafted {result.metrics['grafted/ece']:.3f}"
    )
    print(summary)
    assert result.sparsity <= 0.01
    assert result.grafted == graft_budget(result.graftable, 0.01)
    assert finetuned_acc >= 0.95, summary
    assert pretrained_acc <= 0.7 * finetuned_acc, summary  # the task is not solved before fine-tuning
    assert grafted_acc >= 0.9 * finetuned_acc, summary
    assert result.best_step > 0, summary  # the learnt mask beat the top-|Δ| base patch on train + val accuracy


# --------------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_learn_the_same_mask_from_their_own_shards(tmp_path):
    """Two CPU ranks (gloo) through the CLI: SFT tiny + the grafting snippet (loss from training_step), applied at
    the end; each rank sees half of the data, gradients and losses are reduced, so the grafted weights agree."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "-c", "configs/sft/tiny.yaml", "-c", "configs/strategy/ddp.yaml", "-c", "configs/callbacks/grafting.yaml",
        "--trainer.callbacks.init_args.sparsity", "1.0e-3", "--trainer.callbacks.init_args.steps", "2",
        "--trainer.callbacks.init_args.max_batches", "2", "--trainer.callbacks.init_args.apply", "true",
        "--trainer.callbacks.init_args.dirpath", "graft",
        "--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "4", "--model.init_args.sample_completions", "0",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    summary = json.loads((tmp_path / "graft" / "graft.json").read_text())
    assert summary["grafted"] == summary["budget"] == graft_budget(summary["graftable"], 1e-3)
    assert set(summary["metrics"]) == {"finetuned/loss", "pretrained/loss", "grafted/loss"}
