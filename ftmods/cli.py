"""The ftmods command line: one LightningCLI for every method, strategy and config.

Run ``python cli.py fit -c configs/sft/tiny.yaml`` from a checkout, or ``ftmods fit -c ...`` once installed. Global
torch settings (float32 matmul precision, seeds) are set here and nowhere else.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Literal

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

# data.init_args.<key> left null is filled from model.init_args.<value>, when both exist (a conditional link: unlike
# jsonargparse's link_arguments it does not fail for modules or DataModules that lack one of the two keys).
SHARED_ARGUMENTS = {"tokenizer": "pretrained", "processor": "pretrained"}


class FtmodsCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for models and data, with ftmods' conventions.

    - ``--matmul_precision`` (default ``high``: TF32 on Ampere+) is applied before anything is built.
    - A DataModule's ``tokenizer`` / ``processor`` left null is taken from the model's ``pretrained``.
    - ``validate`` / ``test`` / ``predict`` without ``--ckpt_path`` warn that they evaluate the weights as loaded by
      ``configure_model`` (pretrained, not fine-tuned), and list checkpoints found for the run.
    - The resolved config is written next to the logs (overwriting a previous one).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"default_env": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--matmul_precision``."""
        parser.add_argument(
            "--matmul_precision",
            type=Literal["highest", "high", "medium"] | None,
            default="high",
            help="torch.set_float32_matmul_precision before building anything; null leaves torch's default.",
        )

    def _active_config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Apply global torch settings and fill shared arguments before classes are built."""
        config = self._active_config()
        if config.get("matmul_precision"):
            torch.set_float32_matmul_precision(config.matmul_precision)
        fill_shared_arguments(config)

    def before_validate(self) -> None:
        """Warn when validating un-fine-tuned weights."""
        self._warn_without_checkpoint("validate")

    def before_test(self) -> None:
        """Warn when testing un-fine-tuned weights."""
        self._warn_without_checkpoint("test")

    def before_predict(self) -> None:
        """Warn when predicting with un-fine-tuned weights."""
        self._warn_without_checkpoint("predict")

    def _warn_without_checkpoint(self, subcommand: str) -> None:
        if self._active_config().get("ckpt_path") is not None:
            return
        found = find_checkpoints(self.trainer)
        hint = f" Checkpoints of this run: {', '.join(found[:5])}." if found else ""
        rank_zero_warn(
            f"`{subcommand}` without --ckpt_path evaluates the model as configure_model() loads it (pretrained "
            f"weights, not your fine-tuned ones).{hint} Pass --ckpt_path <file> (or 'last') to evaluate a fit run."
        )


def fill_shared_arguments(config: Namespace) -> None:
    """Set ``data.init_args.<key>`` from ``model.init_args.<source>`` where the former is null (SHARED_ARGUMENTS)."""
    data_args = (config.get("data") or Namespace()).get("init_args")
    model_args = (config.get("model") or Namespace()).get("init_args")
    if data_args is None or model_args is None:
        return
    for key, source in SHARED_ARGUMENTS.items():
        if key in data_args and data_args[key] is None and model_args.get(source) is not None:
            data_args[key] = model_args[source]


def find_checkpoints(trainer: Any) -> list[str]:
    """Checkpoint files of this run: the ModelCheckpoint folder, else ``<root>/lightning_logs/*/checkpoints``."""
    folders = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    folders.append(os.path.join(trainer.default_root_dir, "lightning_logs", "*", "checkpoints"))
    files = {f for folder in folders for f in glob.glob(os.path.join(folder, "*.ckpt"))}
    return sorted(files, key=os.path.getmtime, reverse=True)


def main(args: Any = None) -> None:
    """Console entry point ``ftmods``; ``ftmods soup ...`` (``python cli.py soup ...``) runs :mod:`ftmods.soup`."""
    import sys

    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["soup"]:
        from ftmods.soup import main as soup_main

        soup_main(argv[1:])
        return
    FtmodsCLI(args=args)


if __name__ == "__main__":
    main()
