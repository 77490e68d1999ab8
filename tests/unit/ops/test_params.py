import pytest
import torch
from torch import nn

from ftmods.ops.params import (
    LOCFT_PRESETS,
    default_locft_patterns,
    freeze_all_but,
    match_names,
    match_parameters,
    proportional_layer,
    select_by_patterns,
    selection_hash,
)

NAMES = [f"model.layers.{i}.{m}.weight" for i in (2, 20, 21, 23) for m in ("mlp.down_proj", "input_layernorm")]


def test_exact_name_selects_one_tensor():
    assert match_parameters(NAMES, ["model.layers.2.mlp.down_proj.weight"]) == ["model.layers.2.mlp.down_proj.weight"]


def test_anchored_regex_does_not_leak_into_layers_20_to_29():
    """The EasyEdit/LocFT substring rule would select layers 2, 20, 21, 23 for 'model.layers.2'."""
    assert match_parameters(NAMES, [r"model\.layers\.2\..+"]) == [
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
    ]
    assert match_parameters(NAMES, [r"^model\.layers\.2\..+$"]) == match_parameters(NAMES, [r"model\.layers\.2\..+"])


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matches no parameter"):
        match_parameters(NAMES, [r"layers\.2\.mlp"])  # a substring, not the full name


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="model.layers.99"):
        match_parameters(NAMES, ["model.layers.99.mlp.down_proj.weight"])


def test_whole_layer_preset_includes_norms_of_that_layer_only():
    names = match_parameters(NAMES, LOCFT_PRESETS["mistral-7b-v0.1"]["patterns"])  # type: ignore[arg-type]
    assert names == ["model.layers.23.mlp.down_proj.weight", "model.layers.23.input_layernorm.weight"]


def test_freeze_all_but():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert freeze_all_but(model, ["1.weight"]) == ["1.weight"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.weight"}
    assert freeze_all_but(model, [r"0\..+"]) == ["0.weight", "0.bias"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("ref", "depth", "new", "expected"),
    [(6, 28, 80, 19), (6, 28, 28, 6), (22, 32, 32, 22), (6, 28, 48, 11), (0, 28, 4, 0), (27, 28, 10, 9)],
)
def test_proportional_layer(ref, depth, new, expected):
    """round(new * (ref + 1) / depth) - 1: 80 * 7 / 28 = 20 -> 19; 48 * 7 / 28 = 12 -> 11; 4 / 28 -> 0; 10 -> 9."""
    assert proportional_layer(ref, depth, new) == expected


def test_default_location_is_at_seventy_percent_depth():
    assert default_locft_patterns(32) == [r"model\.layers\.21\.mlp\.down_proj\.weight"]
    assert default_locft_patterns(2) == [r"model\.layers\.0\.mlp\.down_proj\.weight"]


def test_presets_select_the_paper_tensors_on_a_tiny_llama():
    from ftmods.models.loading import load_causal_lm

    model = load_causal_lm("tiny/causal-lm")
    names = [n for n, _ in model.named_parameters()]
    chosen = match_parameters(names, [r"model\.layers\.1\.mlp\.down_proj\.weight"])
    assert chosen == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.Size([64, 128]) == dict(model.named_parameters())[chosen[0]].shape


# ------------------------------------------------------------------ regex / glob selection (freezing callbacks)

GLOB_NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{m}.weight" for i in (1, 10) for m in ("self_attn.q_proj", "mlp.up_proj")),
    "model.norm.weight",
    "lm_head.weight",
]


def test_regex_matches_whole_names_only():
    """Anchored: 'model\\.layers\\.1\\..*' must not also select layer 10 (the substring trap)."""
    assert match_names(GLOB_NAMES, [r"model\.layers\.1\..*"]) == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    }
    assert match_names(GLOB_NAMES, ["lm_head.weight"]) == {"lm_head.weight"}  # an exact name
    with pytest.raises(ValueError, match="matches no parameter"):
        match_names(GLOB_NAMES, ["q_proj"])  # not a substring search


def test_glob_matches_whole_names_and_crosses_dots():
    assert match_names(GLOB_NAMES, ["*.q_proj.*"], "glob") == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",
    }
    assert match_names(GLOB_NAMES, ["model.layers.1.*"], "glob") == match_names(GLOB_NAMES, [r"model\.layers\.1\..*"])
    with pytest.raises(ValueError, match="glob pattern 'q_proj' matches no parameter"):
        match_names(GLOB_NAMES, ["q_proj"], "glob")


def test_precedence_and_unmatched_names():
    both = {"freeze": ["*.layers.*"], "train": ["*.mlp.*"], "syntax": "glob"}
    train_wins = set(select_by_patterns(GLOB_NAMES, **both))
    freeze_wins = set(select_by_patterns(GLOB_NAMES, **both, precedence="freeze"))
    mlp = {n for n in GLOB_NAMES if ".mlp." in n}
    attn = {n for n in GLOB_NAMES if "q_proj" in n}
    assert mlp <= train_wins
    assert not attn & train_wins
    assert not (mlp | attn) & freeze_wins
    assert train_wins - mlp == freeze_wins == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    # only `train` given: everything else is frozen; only `freeze`: everything else trains; `other` overrides both
    assert select_by_patterns(GLOB_NAMES, train=["lm_head.weight"]) == ["lm_head.weight"]
    assert select_by_patterns(GLOB_NAMES, freeze=["lm_head.weight"]) == GLOB_NAMES[:-1]
    assert select_by_patterns(GLOB_NAMES, train=["lm_head.weight"], other="trainable") == GLOB_NAMES
    with pytest.raises(ValueError, match="precedence"):
        select_by_patterns(GLOB_NAMES, train=["lm_head.weight"], precedence="first")  # type: ignore[arg-type]


def test_selection_hash_is_order_free_and_content_sensitive():
    assert selection_hash(["a", "b"]) == selection_hash(("b", "a"))
    assert selection_hash(["a", "b"]) != selection_hash(["a"])
