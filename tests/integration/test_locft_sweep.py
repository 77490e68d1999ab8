"""``benchmarks/locft_sweep.py``: anchored location patterns, the per-location records on the toy, the capability
proxy and the paper's selection rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "locft_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("locft_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["locft_sweep"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("locft_sweep", None)


def _layer_names(layer: int) -> list[str]:
    """The parameters of one Qwen2 decoder layer (q/k/v carry biases)."""
    p = f"model.layers.{layer}."
    attn = [f"{p}self_attn.{m}_proj.{t}" for m in "qkv" for t in ("weight", "bias")] + [f"{p}self_attn.o_proj.weight"]
    mlp = [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    return [f"{p}input_layernorm.weight", *attn, f"{p}post_attention_layernorm.weight", *mlp]


SYNTHETIC = [
    "model.embed_tokens.weight",
    *(n for layer in (1, 10, 11, 12) for n in _layer_names(layer)),
    "model.norm.weight",
    "lm_head.weight",
]
CONFIG = {"model_type": "qwen2", "num_hidden_layers": 13}

EXPECTED_LAYER_1 = {
    "layer": _layer_names(1),
    "attn": [n for n in _layer_names(1) if ".self_attn." in n],
    "mlp": [n for n in _layer_names(1) if ".mlp." in n],
    "mlp.up": ["model.layers.1.mlp.up_proj.weight"],
    "mlp.down": ["model.layers.1.mlp.down_proj.weight"],
}


@pytest.mark.parametrize("kind", ["layer", "attn", "mlp", "mlp.up", "mlp.down"])
def test_patterns_are_anchored_and_select_exactly_the_location(sweep, kind):
    selected = sweep.resolve_location(SYNTHETIC, CONFIG, 1, kind)
    assert selected == EXPECTED_LAYER_1[kind]  # nothing from layers 10-12, no final norm / embeddings
    assert len(selected) == {"layer": 12, "attn": 7, "mlp": 3, "mlp.up": 1, "mlp.down": 1}[kind]
    for layer in (10, 11, 12):
        others = sweep.resolve_location(SYNTHETIC, CONFIG, layer, kind)
        assert others == [n.replace("layers.1.", f"layers.{layer}.") for n in EXPECTED_LAYER_1[kind]]


def test_pattern_errors_fail_loudly(sweep):
    with pytest.raises(ValueError, match="matches no parameter"):
        sweep.resolve_location(SYNTHETIC, CONFIG, 2, "mlp.down")  # layer 2 absent from the synthetic names
    with pytest.raises(ValueError, match="kind"):
        sweep.location_patterns(CONFIG, 1, "mlp.gate")
    with pytest.raises(ValueError, match="layer"):
        sweep.location_patterns(CONFIG, 13, "layer")
    with pytest.raises(ValueError, match="model_type"):
        sweep.location_patterns({"model_type": "gpt2", "num_hidden_layers": 12}, 1, "layer")


def test_patterns_on_the_toy_model(sweep):
    from ftmods.models.tiny import resolve_pretrained

    config, names = sweep.parameter_names(resolve_pretrained("tiny/locft-toy"))
    assert config.num_hidden_layers == 4
    layer = sweep.resolve_location(names, config, 1, "layer")
    assert len(layer) == 4 + 3 + 2  # q/k/v/o, gate/up/down, two norms (Llama: no biases)
    assert all(n.startswith("model.layers.1.") for n in layer)
    assert sweep.resolve_location(names, config, 3, "mlp.down") == ["model.layers.3.mlp.down_proj.weight"]


def test_sweep_records_on_the_toy(sweep, tmp_path):
    result = sweep.run_sweep(layers=[1], kinds=["mlp.down", "layer"], epochs=4, max_edits=20, root_dir=str(tmp_path))
    records = result["records"]
    assert [(r["layer"], r["kind"]) for r in records] == [(1, "mlp.down"), (1, "layer")]
    fields = {"trainable_params", "seconds", "reliability", "generalization", "capability_before", "capability_after",
              "capability_delta", "tensors", "patterns", "tf_reliability", "tf_generalization"}  # fmt: skip
    for r in records:
        assert fields <= set(r)
        assert r["opt_steps"] > 0
        assert 0.0 <= r["reliability"] <= 1.0
        assert 0.0 <= r["generalization"] <= 1.0
        assert r["capability_before"] == 1.0  # the toy knows every trained fact
        assert r["capability_delta"] == pytest.approx(r["capability_after"] - r["capability_before"], abs=1e-3)
    assert records[0]["tensors"] == ["model.layers.1.mlp.down_proj.weight"]
    assert records[0]["trainable_params"] == 64 * 256
    assert len(records[1]["tensors"]) == 9
    assert records[1]["trainable_params"] > records[0]["trainable_params"]
    assert result["num_edits"] == 20
    assert result["best"] is not None
    assert (result["best"]["layer"], result["best"]["kind"]) in {(1, "mlp.down"), (1, "layer")}
    assert sweep.table(result).count("\n") == 3  # header, two rows, best


def test_capability_unchanged_when_nothing_trains(sweep, tmp_path):
    result = sweep.run_sweep(layers=[2], kinds=["mlp.up"], epochs=3, max_edits=10, loss_tol=1e9, root_dir=str(tmp_path))
    (r,) = result["records"]
    assert r["opt_steps"] == 0
    assert r["capability_before"] == r["capability_after"]
    assert r["capability_delta"] == 0.0


def test_best_location_prioritises_capability_then_reliability_then_generalization(sweep):
    def rec(kind, cap, rel, gen):
        return {"layer": 0, "kind": kind, "patterns": [], "capability_delta": cap, "reliability": rel,
                "generalization": gen}  # fmt: skip

    records = [
        rec("no_edit", 0.0, 0.1, 0.0),  # keeps capability because it learns nothing: below min_reliability
        rec("coarse", -0.5, 1.0, 1.0),
        rec("fine_a", -0.1, 0.95, 0.6),
        rec("fine_b", -0.105, 1.0, 0.5),  # same capability within tol, higher reliability
        rec("fine_c", -0.1, 1.0, 0.7),  # ... and higher generalization
    ]
    assert sweep.best_location(records)["kind"] == "fine_c"
    assert sweep.best_location(records[:4])["kind"] == "fine_b"
    assert sweep.best_location(records, min_reliability=0.0)["kind"] == "no_edit"
    assert sweep.best_location([]) is None
