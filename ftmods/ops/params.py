r"""Select parameters by exact name, anchored regular expression or whole-name glob (never by substring).

Substring matching, as in the LocFT and EasyEdit scripts, makes ``model.layers.2`` also select layers 20-29 and picks
norm weights along with a "layer". Here a pattern is either an exact parameter name or a regex that must match the
whole name (``re.fullmatch``), so ``model\.layers\.2\..*`` selects layer 2 only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from torch import nn

# Paper presets (arXiv:2509.22072, Table 2 and the official yaml files): anchored patterns relative to the model's
# own parameter names (transformers Llama/Qwen2/Mistral layout), the Adam learning rate, and the number of layers the
# location was chosen for (used by `proportional_layer` for other sizes).
LOCFT_PRESETS: dict[str, dict[str, object]] = {
    "llama3-8b": {"patterns": [r"model\.layers\.22\.mlp\.down_proj\.weight"], "lr": 5e-4, "layer": 22, "depth": 32},
    "qwen2.5-7b": {"patterns": [r"model\.layers\.6\.mlp\.down_proj\.weight"], "lr": 5e-4, "layer": 6, "depth": 28},
    "mistral-7b-v0.1": {"patterns": [r"model\.layers\.23\..+"], "lr": 5e-5, "layer": 23, "depth": 32},
    "qwen1.5-moe": {
        "patterns": [r"model\.layers\.20\.mlp\.shared_expert\.down_proj\.weight"],
        "lr": 5e-4,  # not stated in the paper; the dense presets' value
        "layer": 20,
        "depth": 24,
    },
}


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts that FSDP1, activation checkpointing and ``torch.compile`` insert into parameter names."""


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' name parts (what the unwrapped model calls it).

    Example:
        >>> clean_name("model.layers.2._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.down_proj.weight")
        'model.layers.2.mlp.down_proj.weight'
    """
    for part in WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name


def _is_regex(pattern: str) -> bool:
    return any(c in pattern for c in "\\^$*+?[]()|{}")


def match_parameters(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    r"""The names that equal a pattern or that a regex pattern matches in full, in the order of ``names``.

    Args:
        names: Parameter names, e.g. ``[n for n, _ in model.named_parameters()]``.
        patterns: Exact names or regexes matched with ``re.fullmatch`` (a leading ``^`` / trailing ``$`` is allowed).

    Raises:
        ValueError: If a pattern matches nothing (a typo must not silently train nothing).

    Example:
        >>> names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (2, 20, 21)]
        >>> match_parameters(names, [r"model\.layers\.2\.mlp\..*"])
        ['model.layers.2.mlp.down_proj.weight']
    """
    names = list(names)
    selected: set[str] = set()
    for pattern in patterns:
        if _is_regex(pattern):
            regex = re.compile(pattern.removeprefix("^").removesuffix("$"))
            hits = {n for n in names if regex.fullmatch(n)}
        else:
            hits = {pattern} & set(names)
        if not hits:
            close = [n for n in names if pattern.split(".")[-1] in n][:5]
            raise ValueError(f"parameter pattern {pattern!r} matches no parameter; e.g. {close or names[:5]}")
        selected |= hits
    return [n for n in names if n in selected]


def match_names(names: Sequence[str], patterns: Sequence[str], syntax: Literal["regex", "glob"] = "regex") -> set[str]:
    r"""The names matched in full by any of the patterns.

    Args:
        names: Parameter names, e.g. ``[n for n, _ in module.named_parameters()]``.
        patterns: With ``syntax="regex"``, exact names or regexes matched with ``re.fullmatch``
            (:func:`match_parameters`); with ``"glob"``, shell patterns matched with
            ``fnmatch.fnmatchcase`` against the whole name (``*`` also crosses dots).
        syntax: ``regex`` or ``glob``.

    Raises:
        ValueError: If a pattern matches no name (a typo must not silently freeze or train nothing).

    Example:
        >>> names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
        >>> sorted(match_names(names, ["*.mlp.*", "lm_head.*"], "glob"))
        ['lm_head.weight', 'model.layers.0.mlp.up_proj.weight']
        >>> sorted(match_names(names, [r"model\.layers\.\d+\..*"]))
        ['model.layers.0.mlp.up_proj.weight']
    """
    if syntax not in ("regex", "glob"):
        raise ValueError(f"syntax must be one of ['regex', 'glob'], got {syntax!r}")
    if syntax == "regex":
        return set(match_parameters(names, patterns)) if patterns else set()
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(f"glob pattern {pattern!r} matches no parameter; e.g. {list(names)[:5]}")
        matched |= hits
    return matched


def select_by_patterns(
    names: Sequence[str],
    *,
    freeze: Sequence[str] = (),
    train: Sequence[str] = (),
    syntax: Literal["regex", "glob"] = "regex",
    precedence: Literal["train", "freeze"] = "train",
    other: Literal["trainable", "frozen"] | None = None,
) -> list[str]:
    """The trainable names (in the order of ``names``) under freeze / train patterns.

    Rules: a name matched by ``train`` only is trainable, by ``freeze`` only frozen; a name matched by both follows
    ``precedence`` (default ``train``: exceptions carve out of a broad freeze, e.g. ``freeze=["*"]``,
    ``train=["*lm_head*"]``); a name matched by neither follows ``other``, whose default (``None``) is ``frozen``
    when only ``train`` patterns are given ("train only these") and ``trainable`` otherwise.

    Example:
        >>> names = ["emb.weight", "block.0.weight", "block.1.weight", "head.weight"]
        >>> select_by_patterns(names, freeze=["*"], train=["head.*"], syntax="glob")
        ['head.weight']
        >>> select_by_patterns(names, freeze=["block.*"], train=["block.1.*"], syntax="glob", precedence="freeze")
        ['emb.weight', 'head.weight']
        >>> select_by_patterns(names, train=["block.*"], syntax="glob")
        ['block.0.weight', 'block.1.weight']
    """
    if precedence not in ("train", "freeze"):
        raise ValueError(f"precedence must be one of ['train', 'freeze'], got {precedence!r}")
    if other not in ("trainable", "frozen", None):
        raise ValueError(f"other must be one of ['trainable', 'frozen', None], got {other!r}")
    frozen, trained = match_names(names, freeze, syntax), match_names(names, train, syntax)
    rest_trainable = (other or ("frozen" if train and not freeze else "trainable")) == "trainable"

    def trainable(name: str) -> bool:
        if name in trained and (name not in frozen or precedence == "train"):
            return True
        return name not in frozen and rest_trainable

    return [n for n in names if trainable(n)]


def selection_hash(trainable: Iterable[str]) -> str:
    """SHA-1 of the sorted trainable names, one per line: what the checkpoint stores and resume compares.

    Example:
        >>> selection_hash(["b", "a"]) == selection_hash(["a", "b"])
        True
    """
    return hashlib.sha1("\n".join(sorted(trainable)).encode(), usedforsecurity=False).hexdigest()


def freeze_all_but(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` True exactly on the matched parameters and False on every other one; return the names."""
    names = match_parameters((n for n, _ in model.named_parameters()), patterns)
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return names


def proportional_layer(ref_layer: int, ref_depth: int, new_depth: int) -> int:
    """The paper's rule for other model sizes: the same relative depth, 0-based.

    ``round(new_depth * (ref_layer + 1) / ref_depth) - 1``: Qwen2.5-7B's layer 6 of 28 becomes layer 19 of 80 for
    Qwen2.5-72B.

    Example:
        >>> proportional_layer(6, 28, 80)
        19
    """
    if not 0 <= ref_layer < ref_depth or new_depth < 1:
        raise ValueError(
            f"need 0 <= ref_layer < ref_depth and new_depth >= 1, got {ref_layer}, {ref_depth}, {new_depth}"
        )
    return min(new_depth - 1, max(0, round(new_depth * (ref_layer + 1) / ref_depth) - 1))


def default_locft_patterns(num_layers: int, fraction: float = 0.7, module: str = "mlp.down_proj") -> list[str]:
    r"""Fallback location when no preset fits: ``module`` of the layer at ``fraction`` of the depth.

    Example:
        >>> default_locft_patterns(32)
        ['model\\.layers\\.21\\.mlp\\.down_proj\\.weight']
    """
    layer = min(num_layers - 1, max(0, round(fraction * num_layers) - 1))
    return [re.escape(f"model.layers.{layer}.{module}.weight")]
