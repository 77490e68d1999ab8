import pytest
import torch
from torch import nn

from ftmods.ops.params import (
    LOCFT_PRESETS,
    default_locft_patterns,
    freeze_all_but,
    match_parameters,
    proportional_layer,
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
