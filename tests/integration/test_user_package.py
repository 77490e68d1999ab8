"""ftmods used from a user's own package: subclass a module and run it through the CLI; attach ftmods callbacks to a
LightningModule that has nothing to do with ftmods."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from ftmods.callbacks import PretrainedExport
from ftmods.models.tiny import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]

USER_PACKAGE = textwrap.dedent(
    '''
    """A user's package: SFT with label smoothing, written against ftmods' public API only."""
    import torch.nn.functional as F

    from ftmods.ops import next_token_targets
    from ftmods.sft import SFTLossOutput, SFTModule


    class SmoothedSFT(SFTModule):
        """SFTModule with label-smoothed cross-entropy (a loss variant)."""

        def __init__(self, *args, label_smoothing: float = 0.1, **kwargs):
            super().__init__(*args, **kwargs)
            self.label_smoothing = label_smoothing
            self.calls = 0

        def compute_loss(self, batch, *, denominator=None):
            self.calls += 1
            targets = next_token_targets(batch["labels"])
            logits = self(batch)
            flat = logits.flatten(0, 1).float()
            loss = F.cross_entropy(flat, targets.flatten(), label_smoothing=self.label_smoothing)
            n = (targets != -100).sum()
            return SFTLossOutput(loss, loss.detach() * n, n, (targets != -100).any(-1).sum())

        def on_train_end(self):
            assert self.calls > 0
            print(f"SMOOTHED_CALLS={self.calls} LABEL_SMOOTHING={self.label_smoothing}")
    '''
)


def test_subclass_in_user_package_runs_through_the_cli(tmp_path):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text(USER_PACKAGE)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = [
        sys.executable, str(REPO / "cli.py"), "fit", "-c", "configs/sft/tiny.yaml",
        "--model", "my_pkg.SmoothedSFT", "--model.init_args.label_smoothing", "0.2",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = re.search(r"SMOOTHED_CALLS=(\d+) LABEL_SMOOTHING=0.2", result.stdout)
    assert calls
    assert int(calls.group(1)) >= 3
    config = yaml.safe_load(next((tmp_path / "runs/sft_tiny").rglob("config.yaml")).read_text())
    assert config["model"]["class_path"] == "my_pkg.SmoothedSFT"
    assert config["model"]["init_args"]["pretrained"] == "tiny/causal-lm"  # inherited arguments kept from the YAML
    checkpoint = torch.load(tmp_path / "runs/sft_tiny/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["_class_path"] == "my_pkg.SmoothedSFT"


class OwnModule(LightningModule):
    """Somebody's own module: a Hugging Face LM in attribute ``lm``, plain next-token loss, no ftmods base."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).train()

    def training_step(self, batch, batch_idx):
        return self.lm(input_ids=batch, labels=batch, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_ftmods_callback_on_a_users_own_module(tmp_path):
    path = resolve_pretrained("tiny/causal-lm")
    module = OwnModule(path)
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    data = DataLoader(torch.randint(3, 300, (8, 12)), batch_size=4)
    export = PretrainedExport(str(tmp_path / "export"), attribute="lm")
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[export])
    trainer.fit(module, data)
    assert export.last_export == tmp_path / "export"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    module.lm.eval()
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.lm(ids).logits)
    assert not torch.equal(before["model.embed_tokens.weight"], reloaded.model.embed_tokens.weight)  # trained


def test_export_refuses_a_module_without_a_model_before_training(tmp_path):
    import pytest

    class NoModel(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[PretrainedExport(str(tmp_path))])
    with pytest.raises(AttributeError, match="attribute 'model' is not a model with save_pretrained"):
        trainer.fit(module := NoModel(), DataLoader(torch.zeros(2, 2)))
    assert module.steps == 0  # refused in setup, before any training
