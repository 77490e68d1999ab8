"""``PretrainedExport``: write the trained model in Hugging Face format (peft adapter or safetensors weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ftmods.models.sharding import fsdp1_root, is_sharded


class PretrainedExport(Callback):
    """Export the fine-tuned model with ``save_pretrained`` at the end of fit (and every N epochs if asked).

    Works with any LightningModule that either has a ``save_pretrained(path, state_dict=None)`` method (every ftmods
    module) or holds a Hugging Face / peft / diffusers model in attribute ``attribute``. A LoRA model is written as a
    peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``), a full model as ``model.safetensors``.
    Sharded runs (FSDP2 / ``ModelParallelStrategy``, FSDP) gather a full state dict, offloaded to CPU, and rank 0
    writes it.

    Args:
        dirpath: Output folder; default ``<log_dir or default_root_dir>/pretrained``. The final export goes to
            ``dirpath`` itself, periodic ones to ``dirpath/epoch=N``.
        attribute: Name of the module attribute holding the model when the module has no ``save_pretrained``.
        every_n_epochs: Also export after every N-th training epoch (0 = only at the end of fit).

    Example::

        trainer = Trainer(callbacks=[PretrainedExport("out/model")])
        trainer.fit(MyModule(), datamodule=dm)   # out/model loads with AutoModelForCausalLM.from_pretrained
    """

    def __init__(self, dirpath: str | None = None, *, attribute: str = "model", every_n_epochs: int = 0) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.dirpath, self.attribute, self.every_n_epochs = dirpath, attribute, every_n_epochs
        self.last_export: Path | None = None  # folder of the most recent export

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(pl_module, "save_pretrained"):
            self._model(pl_module)  # fail before training, not after it

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.export(trainer, pl_module, self._root(trainer) / f"epoch={trainer.current_epoch}")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, self._root(trainer))

    def _root(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir) / (
            "" if self.dirpath else "pretrained"
        )

    def _model(self, pl_module: LightningModule) -> Any:
        model = getattr(pl_module, self.attribute, None)
        if model is None or not hasattr(model, "save_pretrained"):
            raise AttributeError(
                f"PretrainedExport: {type(pl_module).__name__} has no save_pretrained() and its attribute "
                f"{self.attribute!r} is not a model with save_pretrained (set attribute= to the right name)"
            )
        return model

    def export(self, trainer: Trainer, pl_module: LightningModule, path: Path) -> None:
        """Write the model to ``path`` (collective on sharded runs: every rank must call it)."""
        target: Any = pl_module if hasattr(pl_module, "save_pretrained") else self._model(pl_module)
        inner = target if target is not pl_module else self._inner(pl_module)
        root = fsdp1_root(trainer)
        state_dict: dict[str, torch.Tensor] | None
        if isinstance(inner, torch.nn.Module) and root is not None:
            prefix = next(f"{name}." for name, m in pl_module.named_modules() if m is inner)  # e.g. PSO: "unet."
            state_dict = fsdp1_full_state_dict(root, prefix, inner)  # collective
        else:
            state_dict = full_state_dict(inner)
        if trainer.is_global_zero:
            path.mkdir(parents=True, exist_ok=True)
            extra = {} if target is pl_module else {"safe_serialization": True}
            target.save_pretrained(path, state_dict=state_dict, **extra)
            rank_zero_info(f"PretrainedExport: wrote {path}")
        self.last_export = path
        trainer.strategy.barrier("pretrained_export")

    def _inner(self, pl_module: LightningModule) -> Any:
        return getattr(pl_module, self.attribute, None)


def fsdp1_full_state_dict(root: torch.nn.Module, prefix: str, inner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered CPU state dict of the submodule at ``prefix`` of an FSDP1 ``root`` (every rank must call this).

    Under FSDP1 the root unit (the whole LightningModule) owns the parameters outside the wrapped blocks (embeddings,
    head, norms), so the submodule alone cannot be gathered: the root's full state dict is taken and cut to the keys
    under ``prefix`` (the submodule's name in the LightningModule, ``"model."``), prefix removed; tied duplicates are
    dropped as in :func:`full_state_dict`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = dict(get_model_state_dict(root, options=options))
    tied = {n for n, _ in inner.named_parameters(remove_duplicate=False)} - {n for n, _ in inner.named_parameters()}
    cut = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in cut.items() if k not in tied}


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """A gathered CPU state dict when ``model`` has sharded (DTensor) parameters, else ``None`` (use live weights)."""
    if not isinstance(model, torch.nn.Module):
        return None
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = dict(get_model_state_dict(model, options=options))
    # Tied weights (e.g. lm_head = embed_tokens) are one parameter under several names; keep the first name only, as
    # save_pretrained does for a live model, instead of writing the tensor twice.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in tied}
