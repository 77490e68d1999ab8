r"""Model soups: averaged fine-tunes of one pre-trained model (Wortsman et al., ICML 2022; arXiv:2203.05482).

Implemented (recipes of the paper and its code, https://github.com/mlfoundations/model-soups):

- :func:`uniform_soup`: the plain average, built streaming (two state dicts in memory at once).
- :func:`greedy_soup`: ingredients sorted by a held-out score, each added if the soup's held-out score does not drop
  (``accept="ge"``, the paper's rule; the released code's strict rule is ``"gt"``). The soup starts as the best
  ingredient and changes only when it is not worse, so its held-out score is never below the best ingredient's.
- :class:`LearnedSoupModule`: softmax mixing weights, one per model or one per (parameter tensor, model), trained on
  held-out data through a functional forward (``torch.func.functional_call``), plus a learned logit scale for
  classifiers.
- :func:`load_ingredient`: Lightning checkpoint files (``torch.load(weights_only=True)``), sharded DCP checkpoint
  folders (FSDP2 / ``ModelParallelStrategy``), Hugging Face ``save_pretrained`` folders (safetensors); ``ShardedEMA``
  checkpoints give their raw or EMA weights.
- A command line that scores with the method's own validation (:class:`ftmods.cli.FtmodsCLI` from a method YAML) and
  writes ``soup.safetensors`` (the module's state dict: ``module.load_state_dict(load_file(...))``), ``metrics.json``
  (every ingredient's score, what was kept) and, for modules with ``save_pretrained``, a Hugging Face folder
  ``pretrained/``. Ingredients may mix formats (tied weights, which Hugging Face files hold once, are compared
  once)::

      python -m ftmods.soup --method greedy --ingredients run1/last.ckpt run2/last.ckpt run3/last.ckpt \
          --eval-config configs/sft/tiny.yaml --metric val/loss --mode min --output soups/greedy

  Options after the known ones go to the CLI that builds the evaluation, e.g. ``--trainer.limit_val_batches 8``.

Not implemented: BatchNorm statistics recomputation after averaging (``torch.optim.swa_utils.update_bn``), souping
peft adapter folders (averaging A and B separately is not averaging the update BA; soup the Lightning checkpoints of
LoRA runs with that caveat in mind, or merged weights), multi-device evaluation (``greedy_soup`` takes a
``broadcast`` for it, the command line is tested on one device). Soups only work for models fine-tuned from the same
initialisation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ftmods.callbacks.averaging import ema_state_dict
from ftmods.optim import build_optimizers

__all__ = [
    "GreedySoup",
    "LearnedSoupModule",
    "greedy_soup",
    "load_ingredient",
    "load_into",
    "main",
    "save_state_dict",
    "tied_aliases",
    "uniform_soup",
]

StateDict = dict[str, Tensor]
Ingredient = Mapping[str, Tensor] | str | Path
Loader = Callable[[str | Path], StateDict]

# ------------------------------------------------------------------------------------------------------- loading


def load_ingredient(
    path: str | Path,
    *,
    key: str = "state_dict",
    weights: Literal["live", "ema", "all"] = "live",
    hf_prefix: str = "",
) -> StateDict:
    """The weights of one fine-tuned model, as a LightningModule state dict on the CPU.

    Args:
        path: A Lightning checkpoint file, a sharded checkpoint folder (DCP: FSDP2 / ``ModelParallelStrategy``), a
            ``.safetensors`` file or a Hugging Face ``save_pretrained`` folder (``model.safetensors`` or its shards).
        key: Checkpoint entry to read: ``state_dict``, or ``current_model_state`` for the raw weights of a run made
            with Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` (whose ``state_dict`` is the average).
        weights: For checkpoints of :class:`ftmods.callbacks.averaging.ShardedEMA` (``ema_shadow.*`` keys): ``live``
            (the trained weights), ``ema`` (the EMA in their place) or ``all`` (both, unchanged).
        hf_prefix: Prepended to the keys of Hugging Face files: the attribute holding the model in the
            LightningModule followed by a dot (``"model."`` for ftmods modules), so they match its state dict.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        state = _load_distributed(path, key)
    elif path.is_dir() or path.suffix == ".safetensors":
        state = {hf_prefix + k: v for k, v in _load_safetensors(path).items()}
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if key not in checkpoint:
            raise KeyError(f"{path} has no entry {key!r} (entries: {sorted(checkpoint)})")
        state = dict(checkpoint[key])
    return state if weights == "all" else ema_state_dict(state, weights)


def _load_distributed(path: Path, key: str) -> StateDict:
    """The ``key`` tensors of a DCP folder, read on one process (optimizer states are not loaded)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    head = key + "."
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        name[len(head) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for name, entry in metadata.items()
        if name.startswith(head) and isinstance(entry, TensorStorageMetadata)
    }
    if not state:
        raise KeyError(f"{path} holds no tensors under {key!r}")
    load({key: state}, checkpoint_id=str(path), no_dist=True)
    return state


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(path)
    if (path / "adapter_model.safetensors").is_file():
        raise ValueError(
            f"{path} is a peft adapter: averaging LoRA factors is not averaging their updates; soup the Lightning "
            "checkpoints (or merged weights) instead"
        )
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no model*.safetensors (nor a DCP checkpoint)")
    return {k: v for f in files for k, v in load_file(f).items()}


def _resolve(ingredient: Ingredient, loader: Loader) -> StateDict:
    return dict(ingredient) if isinstance(ingredient, Mapping) else loader(ingredient)


def tied_aliases(module: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied weights: ``lm_head.weight`` = the embeddings)."""
    first = {n for n, _ in module.named_parameters()}
    return {n for n, _ in module.named_parameters(remove_duplicate=False)} - first


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a (souped) state dict; keys may be missing only for tied weights whose twin is present.

    Hugging Face files hold a tied ``lm_head.weight`` once, under the embedding's name.
    """
    missing, unexpected = module.load_state_dict(dict(state_dict), strict=False)
    if unexpected:
        raise KeyError(f"unexpected keys for {type(module).__name__}: {unexpected[:5]} ...")
    aliases: dict[int, set[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(name)
    loaded_twin = {n for names in aliases.values() if names & state_dict.keys() for n in names}
    really_missing = [k for k in missing if k not in loaded_twin]
    if really_missing:
        raise KeyError(f"missing keys for {type(module).__name__}: {really_missing[:5]} ...")


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors (tensors sharing storage, e.g. tied weights, are written as copies)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        where = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        out[name] = tensor.clone() if where in seen else tensor
        seen.add(where)
    save_file(out, str(path), metadata=metadata)


# -------------------------------------------------------------------------------------------------- averaging


def _start(state: StateDict, dtype: torch.dtype) -> StateDict:
    """A private accumulator: floating tensors copied in ``dtype``, others kept as they are."""
    return {k: v.to(dtype=dtype, copy=True) if v.is_floating_point() else v for k, v in state.items()}


def _check_compatible(reference: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    if reference.keys() != state.keys():
        diff = sorted(reference.keys() ^ state.keys())
        raise ValueError(f"ingredients have different keys (e.g. {diff[:5]}): not the same architecture")
    shapes = [k for k, v in state.items() if v.shape != reference[k].shape]
    if shapes:
        raise ValueError(f"ingredients have different shapes for {shapes[:5]}")


def _add(mean: StateDict, state: StateDict, count: int, *, inplace: bool) -> StateDict:
    """``mean + (θ − mean) / count`` for floating tensors (the running mean of ``count`` ingredients)."""
    out = mean if inplace else {}
    for k, m in mean.items():
        if m.is_floating_point():
            v = state[k].to(m.dtype)
            out[k] = m.lerp_(v, 1.0 / count) if inplace else m.lerp(v, 1.0 / count)
        else:
            out[k] = m  # integer buffers (num_batches_tracked): from the first ingredient
    return out


def _finish(mean: StateDict, dtypes: Mapping[str, torch.dtype]) -> StateDict:
    return {k: v.to(dtypes[k]) for k, v in mean.items()}


def uniform_soup(
    ingredients: Iterable[Ingredient], *, loader: Loader = load_ingredient, dtype: torch.dtype = torch.float32
) -> StateDict:
    """The average of the ingredients' floating-point tensors; other tensors come from the first ingredient.

    Streaming (``m_k = m_{k−1} + (θ_k − m_{k−1}) / k``, accumulated in ``dtype``), so paths are loaded one at a
    time. Refuses ingredients whose keys or shapes differ. The result has the first ingredient's dtypes.

    Args:
        ingredients: State dicts or paths (read with ``loader``).
        loader: Reads a path; bind options with ``functools.partial(load_ingredient, key=..., weights=...)``.
        dtype: Accumulation dtype.

    Example:
        >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
        >>> uniform_soup([a, b])["w"]
        tensor([2., 4.])
    """
    mean: StateDict | None = None
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for ingredient in ingredients:
        state = _resolve(ingredient, loader)
        count += 1
        if mean is None:
            mean, dtypes = _start(state, dtype), {k: v.dtype for k, v in state.items()}
            continue
        _check_compatible(mean, state)
        _add(mean, state, count, inplace=True)
        del state
    if mean is None:
        raise ValueError("uniform_soup needs at least one ingredient")
    return _finish(mean, dtypes)


class GreedySoup(NamedTuple):
    """What :func:`greedy_soup` found."""

    state_dict: StateDict  # the average of the kept ingredients
    kept: list[int]  # indices into the candidates, in the order they were added (the best first)
    scores: list[float]  # held-out score of each candidate on its own
    soup_score: float  # held-out score of the soup (never worse than the best candidate's, by construction)
    history: list[tuple[int, float, bool]]  # (candidate, score of the soup with it, accepted) for every trial


def _not_worse(score: float, current: float, mode: str, accept: str) -> bool:
    if mode == "max":
        return score >= current if accept == "ge" else score > current
    return score <= current if accept == "ge" else score < current


def greedy_soup(
    candidates: Sequence[Ingredient],
    evaluate: Callable[[StateDict], float],
    *,
    mode: Literal["max", "min"] = "max",
    accept: Literal["ge", "gt"] = "ge",
    scores: Sequence[float] | None = None,
    loader: Loader = load_ingredient,
    broadcast: Callable[[Any], Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> GreedySoup:
    """Greedy soup: add ingredients in order of their held-out score while the soup's score does not get worse.

    Cost: one evaluation per candidate (skipped with ``scores``) plus one per candidate after the best. A NaN score
    is never accepted. The soup that is returned is exactly the state dict whose score is ``soup_score``.

    Args:
        candidates: State dicts or paths, all fine-tuned from the same initialisation.
        evaluate: Held-out score of a state dict, e.g. ``trainer.validate(module, datamodule=dm)[0]["val/acc"]``
            after loading it (not the test set).
        mode: ``max`` for accuracies, ``min`` for losses.
        accept: ``ge`` adds an ingredient when the score is not worse (the paper), ``gt`` only when it is strictly
            better (the authors' code).
        scores: The candidates' own held-out scores, if already known.
        loader: Reads a path (see :func:`uniform_soup`).
        broadcast: Distributed runs: ``trainer.strategy.broadcast``, so every rank takes rank 0's decisions.
        dtype: Averaging dtype.

    Example:
        >>> sds = [{"w": torch.tensor([x])} for x in (0.0, 1.0, 4.0)]
        >>> soup = greedy_soup(sds, lambda sd: -abs(float(sd["w"]) - 0.6))  # best single: 1.0, then 0.0 helps
        >>> soup.kept, soup.state_dict["w"]
        ([1, 0], tensor([0.5000]))
    """
    share = broadcast or (lambda x: x)
    own = list(scores) if scores is not None else [float(evaluate(_resolve(c, loader))) for c in candidates]
    if len(own) != len(candidates) or not own:
        raise ValueError("greedy_soup needs one score per candidate and at least one candidate")
    order = share(sorted(range(len(own)), key=lambda i: own[i], reverse=mode == "max"))
    first = _resolve(candidates[order[0]], loader)
    dtypes = {k: v.dtype for k, v in first.items()}
    mean = _start(first, dtype)
    soup, soup_score, kept = _finish(mean, dtypes), own[order[0]], [order[0]]
    history: list[tuple[int, float, bool]] = []
    for i in order[1:]:
        state = _resolve(candidates[i], loader)
        _check_compatible(mean, state)
        trial_mean = _add(mean, state, len(kept) + 1, inplace=False)
        del state
        trial = _finish(trial_mean, dtypes)
        score = float(evaluate(trial))
        accepted = bool(share(_not_worse(score, soup_score, mode, accept)))
        history.append((i, score, accepted))
        if accepted:
            mean, soup, soup_score = trial_mean, trial, score
            kept.append(i)
    return GreedySoup(soup, kept, own, soup_score, history)


# ------------------------------------------------------------------------------------------------ learned soup


class _Objective(nn.Module):
    """Makes ``fn(module, batch)`` the forward of a wrapper, so ``functional_call`` can run it with other weights."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.module, batch)


class LearnedSoupModule(LightningModule):
    """Learned soup: softmax mixing weights over K fine-tuned models, trained on held-out data.

    ``θ_t = Σ_k softmax(α)_{t,k} θ_{k,t}`` with one row of α for all tensors (``granularity="model"``) or one per
    parameter tensor (``"layer"``), starting uniform. The wrapped module runs functionally with the mixed weights; its
    own weights never train. The held-out objective is the module's ``compute_loss(batch).loss`` when it has one
    (ftmods' SFT-style modules), else the cross-entropy of ``β · module(x)`` for ``(x, y)`` batches with a learned
    logit scale β (starting at 1, as in the paper's code). Override :meth:`heldout_loss` for anything else. All K
    models are held in memory in float32 (non-persistent: checkpoints hold α, β and the wrapped module).

    Args:
        module: The architecture (e.g. an ``SFTModule``); its ``configure_model`` builds it.
        ingredients: Paths of the fine-tuned models (see :func:`load_ingredient`).
        granularity: ``model`` (K weights) or ``layer`` (one set of K weights per parameter tensor).
        key: Checkpoint entry of the ingredients (see :func:`load_ingredient`).
        weights: ``live`` or ``ema`` weights of ``ShardedEMA`` checkpoints.
        hf_prefix: Key prefix for Hugging Face folders.
        optimizer: Optimizer factory for α (and β); default AdamW(lr=0.05, weight_decay=0) as in the paper's code.
        lr_scheduler: Optional scheduler factory, stepped every step.

    Example::

        soup = LearnedSoupModule(SFTModule("tiny/causal-lm"), ["a.ckpt", "b.ckpt", "c.ckpt"], granularity="layer")
        Trainer(max_epochs=5).fit(soup, train_dataloaders=heldout_loader)
        module.load_state_dict(soup.souped_state_dict())
    """

    def __init__(
        self,
        module: LightningModule,
        ingredients: list[str],
        *,
        granularity: Literal["model", "layer"] = "model",
        key: str = "state_dict",
        weights: Literal["live", "ema"] = "live",
        hf_prefix: str = "",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if len(ingredients) < 2:
            raise ValueError("a learned soup needs at least two ingredients")
        self.save_hyperparameters(ignore=["module", "optimizer", "lr_scheduler"])
        self.module = module
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.names: list[str] = []  # mixed parameter names, set in configure_model
        self.alpha: nn.Parameter | None = None
        self.uses_compute_loss = hasattr(module, "compute_loss")
        self.logit_scale = None if self.uses_compute_loss else nn.Parameter(torch.ones(()))

    def configure_model(self) -> None:
        """Build the wrapped module, load the K models as stacks ``(K, *shape)`` and start α uniform (once)."""
        if self.alpha is not None:
            return
        if hasattr(self.module, "configure_model"):
            self.module.configure_model()
        loader = partial(load_ingredient, key=self.hparams["key"], weights=self.hparams["weights"],
                         hf_prefix=self.hparams["hf_prefix"])  # fmt: skip
        states = [loader(path) for path in self.hparams["ingredients"]]
        for state in states[1:]:
            _check_compatible(states[0], state)
        self.names = [n for n, p in self.module.named_parameters() if p.is_floating_point() and n in states[0]]
        for i, name in enumerate(self.names):
            self.register_buffer(f"stack_{i}", torch.stack([s.pop(name).float() for s in states]), persistent=False)
        if states[0]:  # buffers and anything not mixed: their plain average
            load_into(self.module, {**uniform_soup(states), **self.mixed_parameters()})
        self.module.requires_grad_(False)
        rows = len(self.names) if self.hparams["granularity"] == "layer" else 1
        self.alpha = nn.Parameter(torch.zeros(rows, len(states)))

    def mixing_weights(self) -> Tensor:
        """Softmax of α: ``(1, K)`` or ``(T, K)``, each row summing to 1."""
        assert self.alpha is not None, "call configure_model() first"
        return self.alpha.softmax(dim=-1)

    def mixed_parameters(self) -> dict[str, Tensor]:
        """The souped parameters (differentiable in α), cast to the wrapped module's dtypes."""
        params = dict(self.module.named_parameters())
        k = len(self.hparams["ingredients"])
        weights = self.mixing_weights() if self.alpha is not None else torch.full((1, k), 1.0 / k)
        out = {}
        for i, name in enumerate(self.names):
            stack = self.get_buffer(f"stack_{i}")  # (K, *shape)
            row = weights[i if weights.shape[0] > 1 else 0].to(stack.device)  # (K,)
            out[name] = torch.tensordot(row, stack, dims=1).to(params[name].dtype)  # (*shape)
        return out

    def heldout_loss(self, batch: Any) -> Tensor:
        """The objective of one held-out batch, with the mixed weights."""
        return torch.func.functional_call(_Objective(self.module, self._objective), self._prefixed(), (batch,))

    def _prefixed(self) -> dict[str, Tensor]:
        return {f"module.{k}": v for k, v in self.mixed_parameters().items()}

    def _objective(self, module: nn.Module, batch: Any) -> Tensor:
        if self.uses_compute_loss:
            return module.compute_loss(batch).loss  # type: ignore[operator]
        inputs, targets = batch
        assert self.logit_scale is not None
        return F.cross_entropy(self.logit_scale * module(inputs), targets)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Held-out loss with the current mixing weights; logs ``train/loss``."""
        loss = self.heldout_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val/loss`` of the learned soup."""
        self.log("val/loss", self.heldout_loss(batch), prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimizer) over α and β only."""
        params = [p for p in (self.alpha, self.logit_scale) if p is not None]
        return build_optimizers(params, self.optimizer_factory, self.scheduler_factory, default_lr=0.05)

    def souped_state_dict(self) -> StateDict:
        """The wrapped module's state dict with the learned soup's weights (tied names included), detached."""
        mixed = {k: v.detach().cpu() for k, v in self.mixed_parameters().items()}
        canonical = {id(p): n for n, p in self.module.named_parameters()}
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if canonical[id(param)] in mixed:
                state[name] = mixed[canonical[id(param)]]
        return state


# ---------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ftmods.soup",
        description="Soup fine-tuned checkpoints and score them with a method config's validation. Unknown options "
        "(e.g. --trainer.limit_val_batches 8) go to the CLI that builds the module, data and trainer.",
    )
    parser.add_argument("--method", choices=["uniform", "greedy", "learned"], required=True)
    parser.add_argument("--ingredients", nargs="+", required=True, help="checkpoint files, DCP or HF folders")
    parser.add_argument("--eval-config", nargs="+", required=True, help="method YAML(s), as for `cli.py validate -c`")
    parser.add_argument("--output", required=True, help="folder for soup.safetensors, metrics.json, pretrained/")
    parser.add_argument("--metric", default="val/loss", help="logged validation metric to score with")
    parser.add_argument("--mode", choices=["min", "max"], default="min", help="min for losses, max for accuracies")
    parser.add_argument("--accept", choices=["ge", "gt"], default="ge", help="greedy: keep if not worse / better")
    parser.add_argument("--key", default="state_dict", help="checkpoint entry (current_model_state: raw weights)")
    parser.add_argument("--weights", choices=["live", "ema"], default="live", help="ShardedEMA checkpoints")
    parser.add_argument("--hf-prefix", default="model.", help="module attribute + '.' for Hugging Face folders")
    parser.add_argument("--granularity", choices=["model", "layer"], default="model", help="learned soup")
    parser.add_argument("--learned-epochs", type=int, default=5, help="learned soup: epochs over the held-out set")
    parser.add_argument("--learned-lr", type=float, default=0.05, help="learned soup: AdamW learning rate")
    return parser


def _learn(args: argparse.Namespace, module: LightningModule, datamodule: Any) -> tuple[StateDict, list[Any]]:
    """Fit a :class:`LearnedSoupModule` on the shuffled held-out (validation) set."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    optimizer = partial(torch.optim.AdamW, lr=args.learned_lr, weight_decay=0.0)
    soup = LearnedSoupModule(module, list(args.ingredients), granularity=args.granularity, key=args.key,
                             weights=args.weights, hf_prefix=args.hf_prefix, optimizer=optimizer)  # fmt: skip
    heldout = datamodule.val_dataloader()
    loader = DataLoader(heldout.dataset, batch_size=heldout.batch_size, shuffle=True, collate_fn=heldout.collate_fn)
    trainer = Trainer(devices=1, max_epochs=args.learned_epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.output)  # fmt: skip
    trainer.fit(soup, train_dataloaders=loader)
    return soup.souped_state_dict(), soup.mixing_weights().detach().cpu().tolist()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m ftmods.soup``; returns what it writes to ``metrics.json``."""
    from ftmods.cli import FtmodsCLI

    args, overrides = _parser().parse_known_args(argv)
    configs = [arg for path in args.eval_config for arg in ("-c", path)]
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"]  # fmt: skip
    cli = FtmodsCLI(args=[*configs, *quiet, *overrides], run=False, save_config_callback=None)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if hasattr(module, "configure_model"):
        module.configure_model()
    aliases = tied_aliases(module)  # Hugging Face files hold tied weights once: drop the twins everywhere

    def loader(path: str | Path) -> StateDict:
        state = load_ingredient(path, key=args.key, weights=args.weights, hf_prefix=args.hf_prefix)
        return {k: v for k, v in state.items() if k not in aliases}

    def evaluate(state_dict: StateDict) -> float:
        load_into(module, state_dict)
        return float(trainer.validate(module, datamodule=datamodule, verbose=False)[0][args.metric])

    scores = [evaluate(loader(path)) for path in args.ingredients]
    record: dict[str, Any] = {"method": args.method, "metric": args.metric, "mode": args.mode}
    kept = list(range(len(scores)))
    if args.method == "greedy":
        found = greedy_soup(args.ingredients, evaluate, mode=args.mode, accept=args.accept, scores=scores,
                            loader=loader, broadcast=trainer.strategy.broadcast)  # fmt: skip
        state, soup_score, kept = found.state_dict, found.soup_score, found.kept
        record["accept"] = args.accept
        record["history"] = [{"candidate": args.ingredients[i], "score": s, "accepted": a} for i, s, a in found.history]
    else:
        if args.method == "uniform":
            state = uniform_soup(args.ingredients, loader=loader)
        else:
            state, record["mixing_weights"] = _learn(args, module, datamodule)
        soup_score = evaluate(state)
    best = min(range(len(scores)), key=lambda i: scores[i] if args.mode == "min" else -scores[i])
    pairs = enumerate(zip(args.ingredients, scores, strict=True))
    record["ingredients"] = [{"path": path, "score": score, "kept": i in kept} for i, (path, score) in pairs]
    record["best_ingredient"] = {"path": args.ingredients[best], "score": scores[best]}
    record["soup"] = {"score": soup_score, "ingredients": [args.ingredients[i] for i in kept]}
    _write(Path(args.output), state, record, module, trainer)
    return record


def _write(output: Path, state: StateDict, record: dict[str, Any], module: LightningModule, trainer: Any) -> None:
    if not trainer.is_global_zero:
        return
    output.mkdir(parents=True, exist_ok=True)
    load_into(module, state)
    save_state_dict(module.state_dict(), output / "soup.safetensors", metadata={"method": record["method"]})
    (output / "metrics.json").write_text(json.dumps(record, indent=2))
    save_pretrained = getattr(module, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(output / "pretrained")
    print(f"soup: {record['method']} {record['metric']}={record['soup']['score']:.6g} "
          f"(best ingredient {record['best_ingredient']['score']:.6g}) -> {output}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
