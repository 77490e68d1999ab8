r"""Grafting math (arXiv 2302.06600) on plain state dicts: the graft, the top-|Δ| patch, the sigmoid-relaxed mask.

θ(γ) = θ_pre + γ ⊙ (θ_ft − θ_pre). Everything here is a pure function of tensors (or, for :class:`GraftMask`, a
parameter-holding ``nn.Module`` with the authors' chain rule), usable offline on consolidated checkpoints; the
callback :class:`ftmods.callbacks.grafting.WeightGrafting` decides when to call them. See that module's docstring for
the algorithm and where ftmods departs from the authors' code.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = [
    "GRAFT_FORMAT",
    "GraftMask",
    "SparseGraft",
    "apply_graft",
    "apply_sparse_graft",
    "expected_calibration_error",
    "global_topk_mask",
    "graft_budget",
    "load_graft",
    "save_graft",
    "sparse_graft",
    "state_fingerprint",
    "top_delta_mask",
]

GRAFT_FORMAT = "ftmods.graft/1"
"""``format`` entry of the safetensors metadata written by :func:`save_graft`."""

# ------------------------------------------------------------------------------------------------------ pure functions


def apply_graft(
    pretrained_state: Mapping[str, Tensor], finetuned_state: Mapping[str, Tensor], mask: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The grafted state θ_pre + mask ⊙ (θ_ft − θ_pre), for every key of ``pretrained_state``.

    Keys without a mask keep their pre-trained value (γ = 0). A boolean mask selects values exactly
    (``torch.where``: grafted entries are bit-identical to the fine-tuned ones); a float mask (a relaxed γ in [0, 1])
    interpolates with ``torch.lerp``.

    Args:
        pretrained_state: θ_pre by name.
        finetuned_state: θ_ft by name; needs every masked key, with the same shape.
        mask: γ by name, ``bool`` or floating point, shaped like the tensor.

    Example:
        >>> pre, ft = {"w": torch.zeros(3), "b": torch.zeros(1)}, {"w": torch.ones(3), "b": torch.ones(1)}
        >>> apply_graft(pre, ft, {"w": torch.tensor([True, False, True])})
        {'w': tensor([1., 0., 1.]), 'b': tensor([0.])}
    """
    unknown = set(mask) - set(pretrained_state)
    if unknown:
        raise KeyError(f"mask names not in the pre-trained state: {sorted(unknown)[:5]}")
    out = {}
    for name, pre in pretrained_state.items():
        if name not in mask:
            out[name] = pre
            continue
        ft, gamma = finetuned_state[name], mask[name]
        if ft.shape != pre.shape or gamma.shape != pre.shape:
            raise ValueError(
                f"{name}: shapes differ (pre {tuple(pre.shape)}, ft {tuple(ft.shape)}, mask {tuple(gamma.shape)})"
            )
        if gamma.dtype == torch.bool:
            out[name] = torch.where(gamma, ft, pre)
        else:
            out[name] = torch.lerp(pre, ft.to(pre.dtype), gamma.to(pre.dtype))
    return out


def graft_budget(numel: int, sparsity: float) -> int:
    """Budget k = ⌊sparsity · numel⌋ entries (the authors' ``int(sparsity_level * num_params)``).

    The graft never exceeds the sparsity. Robust to float noise: 0.29 · 100 gives 29, not 28.

    Example:
        >>> graft_budget(100, 0.29), graft_budget(14496, 0.01), graft_budget(10, 0.05)
        (29, 144, 0)
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    exact = sparsity * numel
    nearest = round(exact)
    return int(nearest) if abs(exact - nearest) < 1e-6 * max(1.0, exact) else math.floor(exact)


def global_topk_mask(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Boolean masks selecting exactly the ``k`` largest entries over all tensors of ``scores`` (one global cut).

    Each tensor contributes its own top-min(k, numel) candidates, so memory stays at about k entries per tensor
    rather than a concatenation of everything. Ties at the cut are broken by ``torch.topk`` (deterministic for equal
    inputs on one device).

    Example:
        >>> masks = global_topk_mask({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([[0.5, 0.05]])}, 2)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([False, True], [[True, False]])
    """
    total = sum(s.numel() for s in scores.values())
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    masks = {name: torch.zeros(s.shape, dtype=torch.bool, device=s.device) for name, s in scores.items()}
    if k == 0:
        return masks
    values, owners, positions = [], [], []
    for owner, s in enumerate(scores.values()):
        flat = s.detach().flatten().float()  # (numel,)
        top = flat.topk(min(k, flat.numel()))
        values.append(top.values)
        positions.append(top.indices)
        owners.append(torch.full_like(top.indices, owner))
    winners = torch.cat(values).topk(k).indices  # (k,) positions among the candidates
    owner_of, position_of = torch.cat(owners)[winners], torch.cat(positions)[winners]  # (k,), (k,)
    for owner, mask in enumerate(masks.values()):
        mask.view(-1)[position_of[owner_of == owner].to(mask.device)] = True
    return masks


def top_delta_mask(
    pretrained_state: Mapping[str, Tensor],
    finetuned_state: Mapping[str, Tensor],
    sparsity: float,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """The base patch: True on the global top-⌊s·|P|⌋ entries of |θ_ft − θ_pre| over the tensors ``names``.

    Args:
        pretrained_state: θ_pre by name.
        finetuned_state: θ_ft by name.
        sparsity: Fraction s of the entries of the selected tensors to graft.
        names: The graftable tensors P (default: every key of ``pretrained_state``).

    Example:
        >>> pre = {"w": torch.zeros(4)}
        >>> top_delta_mask(pre, {"w": torch.tensor([0.1, -3.0, 2.0, 0.0])}, 0.5)["w"].tolist()
        [False, True, True, False]
    """
    names = list(pretrained_state) if names is None else list(names)
    deltas = {n: (finetuned_state[n].float() - pretrained_state[n].float()).abs() for n in names}
    return global_topk_mask(deltas, graft_budget(sum(d.numel() for d in deltas.values()), sparsity))


def expected_calibration_error(
    probs: Tensor, targets: Tensor, *, n_bins: int = 10, ignore_index: int | None = None
) -> Tensor:
    """ECE = Σ_b (n_b / n) · |acc_b − conf_b| over ``n_bins`` equal-width confidence bins (torchmetrics' L1 ECE).

    The confidence of a prediction is its top-class probability, its accuracy whether that class is the target.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to 1).
        targets: ``(N,)`` class indices.
        n_bins: Number of equal-width bins on [0, 1].
        ignore_index: Targets to leave out.
    """
    return multiclass_calibration_error(
        probs, targets, num_classes=probs.shape[-1], n_bins=n_bins, norm="l1", ignore_index=ignore_index
    )


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """SHA-1 over the sorted names, shapes, dtypes and raw bytes: equal exactly when the tensors are bit-identical."""
    digest = hashlib.sha1()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SparseGraft(NamedTuple):
    """One tensor's graft: θ_graft.flatten()[indices] = values, everything else pre-trained."""

    indices: Tensor  # (K,) int64 flat indices
    values: Tensor  # (K,) fine-tuned values at those indices
    shape: tuple[int, ...]  # the tensor's shape


def sparse_graft(finetuned_state: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> dict[str, SparseGraft]:
    """The fine-tuned values selected by a boolean ``mask``, as flat (indices, values) per tensor (CPU)."""
    out = {}
    for name, gamma in mask.items():
        if gamma.dtype != torch.bool:
            raise TypeError(f"{name}: sparse_graft needs a boolean mask, got {gamma.dtype}")
        indices = gamma.flatten().nonzero().squeeze(1)  # (K,)
        values = finetuned_state[name].detach().flatten()[indices]  # (K,)
        out[name] = SparseGraft(indices.cpu(), values.cpu(), tuple(gamma.shape))
    return out


def save_graft(path: str | Path, graft: Mapping[str, SparseGraft], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a sparse graft to safetensors: ``<name>.indices`` (int64) and ``<name>.values`` per tensor.

    The safetensors header metadata holds ``format`` (:data:`GRAFT_FORMAT`), the tensor ``shapes`` and ``metadata``
    (all as JSON strings).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, piece in graft.items():
        tensors[f"{name}.indices"] = piece.indices.to(torch.int64).contiguous()
        tensors[f"{name}.values"] = piece.values.contiguous()
    header = {
        "format": GRAFT_FORMAT,
        "shapes": json.dumps({name: list(piece.shape) for name, piece in graft.items()}),
        "metadata": json.dumps(dict(metadata or {})),
    }
    save_file(tensors, str(path), metadata=header)
    return path


def load_graft(path: str | Path) -> dict[str, SparseGraft]:
    """Read a graft written by :func:`save_graft`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("format") != GRAFT_FORMAT:
        raise ValueError(f"{path}: not an ftmods graft (format {header.get('format')!r}, expected {GRAFT_FORMAT!r})")
    tensors = load_file(str(path))
    shapes = json.loads(header["shapes"])
    return {
        name: SparseGraft(tensors[f"{name}.indices"], tensors[f"{name}.values"], tuple(shape))
        for name, shape in shapes.items()
    }


def apply_sparse_graft(pretrained_state: Mapping[str, Tensor], graft: Mapping[str, SparseGraft]) -> dict[str, Tensor]:
    """θ_pre with the grafted entries written in (a new dict; tensors without a graft are shared, not copied)."""
    out = dict(pretrained_state)
    for name, piece in graft.items():
        base = pretrained_state[name]
        if tuple(base.shape) != tuple(piece.shape):
            raise ValueError(f"{name}: graft shape {piece.shape} != pre-trained shape {tuple(base.shape)}")
        grafted = base.detach().clone()
        grafted.view(-1)[piece.indices.to(base.device)] = piece.values.to(base.device, base.dtype)
        out[name] = grafted
    return out


# ------------------------------------------------------------------------------------------------------ batch adapters


# ---------------------------------------------------------------------------------------------------- the relaxed mask


class GraftMask(nn.Module):
    """The sigmoid-relaxed mask γ(S) = γ_base + (1 − 2γ_base) ⊙ σ(S − b) over named tensors (authors' parametrisation).

    Holds θ_pre, θ_ft and γ_base as buffers and the scores S (``U[0, 1)``, seeded) as parameters, all on the device of
    the given tensors. The callback computes ∂L/∂θ at θ(γ) by an ordinary backward pass and calls :meth:`step`.

    Args:
        pretrained: θ_pre by name.
        finetuned: θ_ft by name (same names and shapes).
        base: γ_base, a boolean mask by name (the top-|Δ| patch).
        sigmoid_bias: b; σ(S − b) starts at about 5e-5 to 1e-4 with b = 10.
        seed: Seed of the initial scores (identical on every rank).
    """

    def __init__(
        self,
        pretrained: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        base: Mapping[str, Tensor],
        *,
        sigmoid_bias: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.names = list(base)
        self.sigmoid_bias = sigmoid_bias
        generator = torch.Generator().manual_seed(seed)
        scores = []
        for i, name in enumerate(self.names):
            if base[name].dtype != torch.bool:
                raise TypeError(f"{name}: base mask must be boolean")
            self.register_buffer(f"pretrained_{i}", pretrained[name].detach(), persistent=False)
            self.register_buffer(f"finetuned_{i}", finetuned[name].detach(), persistent=False)
            self.register_buffer(f"base_{i}", base[name], persistent=False)
            init = torch.rand(base[name].shape, generator=generator)  # (shape,) U[0, 1) on CPU: same on every rank
            scores.append(nn.Parameter(init.to(base[name].device)))
        self.scores = nn.ParameterList(scores)

    def _buffer(self, kind: str, i: int) -> Tensor:
        tensor: Tensor = getattr(self, f"{kind}_{i}")
        return tensor

    @property
    def pretrained(self) -> dict[str, Tensor]:
        """θ_pre by name."""
        return {n: self._buffer("pretrained", i) for i, n in enumerate(self.names)}

    @property
    def finetuned(self) -> dict[str, Tensor]:
        """θ_ft by name."""
        return {n: self._buffer("finetuned", i) for i, n in enumerate(self.names)}

    @property
    def base(self) -> dict[str, Tensor]:
        """γ_base by name."""
        return {n: self._buffer("base", i) for i, n in enumerate(self.names)}

    def numel(self) -> int:
        """|P|: the number of graftable entries."""
        return sum(s.numel() for s in self.scores)

    def relaxed(self) -> dict[str, Tensor]:
        """γ in (0, 1) by name (differentiable in S)."""
        out = {}
        for i, (name, score) in enumerate(zip(self.names, self.scores, strict=True)):
            base = self._buffer("base", i).to(score.dtype)
            out[name] = base + (1 - 2 * base) * torch.sigmoid(score - self.sigmoid_bias)
        return out

    @torch.no_grad()
    def binary(self, budget: int | None) -> dict[str, Tensor]:
        """γ binarised: the global top-``budget`` entries of γ, or ``γ > 0.5`` (the authors' rounding) if None."""
        relaxed = self.relaxed()
        if budget is None:
            return {name: gamma > 0.5 for name, gamma in relaxed.items()}
        return global_topk_mask(relaxed, budget)

    def grafted(self, mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ(γ) for a binary or relaxed mask."""
        return apply_graft(self.pretrained, self.finetuned, mask)

    @torch.no_grad()
    def score_grads(self, param_grads: Mapping[str, Tensor]) -> list[Tensor]:
        """∂L/∂S = ∂L/∂θ ⊙ Δ ⊙ (1 − 2γ_base) ⊙ σ'(S − b), from ∂L/∂θ at θ(γ) (the authors' chain rule)."""
        grads = []
        for i, (name, score) in enumerate(zip(self.names, self.scores, strict=True)):
            delta = self._buffer("finetuned", i).float() - self._buffer("pretrained", i).float()
            sign = 1 - 2 * self._buffer("base", i).float()
            sig = torch.sigmoid(score - self.sigmoid_bias)
            grads.append(param_grads[name].float() * delta * sign * sig * (1 - sig))
        return grads

    @torch.no_grad()
    def step(self, param_grads: Mapping[str, Tensor], lr: float) -> None:
        """One plain gradient-descent step on S: ``S -= lr · ∂L/∂S``."""
        for score, grad in zip(self.scores, self.score_grads(param_grads), strict=True):
            score.sub_(lr * grad)
