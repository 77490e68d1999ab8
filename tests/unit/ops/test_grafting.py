"""Grafting math (ftmods.ops.grafting) by hand: the graft, the budget, the global top-|Δ| patch, ECE, the relaxed
mask's chain rule against autograd, and the sparse export round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ftmods.ops.grafting import (
    GraftMask,
    apply_graft,
    apply_sparse_graft,
    expected_calibration_error,
    global_topk_mask,
    graft_budget,
    load_graft,
    save_graft,
    sparse_graft,
    top_delta_mask,
)


def test_apply_graft_by_hand():
    """pre = 0, ft = [1, 2, 3]: a boolean mask copies the chosen fine-tuned entries exactly, a float mask
    interpolates (0.5 · 2 = 1), unmasked tensors stay pre-trained."""
    pre = {"w": torch.zeros(3), "b": torch.full((2,), 5.0)}
    ft = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.zeros(2)}
    hard = apply_graft(pre, ft, {"w": torch.tensor([True, False, True])})
    torch.testing.assert_close(hard["w"], torch.tensor([1.0, 0.0, 3.0]))
    assert hard["b"] is pre["b"]
    soft = apply_graft(pre, ft, {"w": torch.tensor([1.0, 0.5, 0.0])})
    torch.testing.assert_close(soft["w"], torch.tensor([1.0, 1.0, 0.0]))
    # exact at γ = 1 even where θ_pre + (θ_ft − θ_pre) would round: 0.1 + (0.3 − 0.1) != 0.3 in float32
    odd_pre, odd_ft = {"w": torch.tensor([0.1])}, {"w": torch.tensor([0.3])}
    assert torch.equal(apply_graft(odd_pre, odd_ft, {"w": torch.ones(1, dtype=torch.bool)})["w"], odd_ft["w"])
    assert torch.equal(apply_graft(odd_pre, odd_ft, {"w": torch.ones(1)})["w"], odd_ft["w"])
    with pytest.raises(KeyError):
        apply_graft(pre, ft, {"nope": torch.ones(1)})


def test_budget_is_a_floor_robust_to_float_noise():
    """The authors' int(sparsity · |P|): the graft never exceeds the sparsity."""
    assert graft_budget(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert graft_budget(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001
    assert graft_budget(14496, 0.01) == 144  # 144.96
    assert graft_budget(5, 0.0) == 0
    assert graft_budget(5, 1.0) == 5
    with pytest.raises(ValueError, match="sparsity"):
        graft_budget(5, 1.5)


def test_top_delta_mask_uses_one_global_threshold():
    """|Δ| = a: [0.5, 0.1, 0.9], b: [[0.2, 0.8], [0.05, 0.3]]; s = 3/7 → k = 3 → 0.9, 0.8, 0.5 (two from a, one
    from b: not three per tensor, not a per-tensor fraction)."""
    pre = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    ft = {"a": torch.tensor([-0.5, 0.1, 0.9]), "b": torch.tensor([[0.2, -0.8], [0.05, 0.3]])}
    mask = top_delta_mask(pre, ft, 3 / 7)
    assert mask["a"].tolist() == [True, False, True]
    assert mask["b"].tolist() == [[False, True], [False, False]]
    assert top_delta_mask(pre, ft, 3 / 7, names=["b"])["b"].tolist() == [[False, True], [False, False]]  # k = ⌊12/7⌋
    # exactly k entries even with ties, and k = 0
    tied = global_topk_mask({"x": torch.ones(4), "y": torch.ones(3)}, 5)
    assert sum(int(m.sum()) for m in tied.values()) == 5
    assert not any(m.any() for m in global_topk_mask({"x": torch.ones(4)}, 0).values())


def test_expected_calibration_error_by_hand():
    """5 bins of width 0.2. Confidences / correct: 0.9 ✓ → bin (0.8, 1]; 0.75 ✗ and 0.65 ✓ → bin (0.6, 0.8];
    0.55 ✓ → bin (0.4, 0.6].
    ECE = 1/4·|1 − 0.9| + 2/4·|0.5 − 0.7| + 1/4·|1 − 0.55| = 0.025 + 0.1 + 0.1125 = 0.2375."""
    probs = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.35, 0.65], [0.45, 0.55]])
    targets = torch.tensor([0, 1, 1, 1])
    torch.testing.assert_close(expected_calibration_error(probs, targets, n_bins=5), torch.tensor(0.2375))
    # a perfectly calibrated, always-right, fully confident model has ECE 0
    assert float(expected_calibration_error(torch.eye(3), torch.arange(3))) == 0.0


def test_graft_mask_starts_at_the_base_patch_and_its_chain_rule_matches_autograd():
    torch.manual_seed(0)
    pre = {"w": torch.randn(4, 3), "b": torch.randn(5)}
    ft = {n: t + 0.1 * torch.randn_like(t) for n, t in pre.items()}
    base = top_delta_mask(pre, ft, 0.3)  # k = ⌊5.1⌋ = 5 of 17
    mask = GraftMask(pre, ft, base, sigmoid_bias=10.0, seed=0)
    relaxed = mask.relaxed()
    for name in pre:  # σ(S − 10) with S in [0, 1): at most σ(−9) ≈ 1.2e-4 away from the base patch
        assert (relaxed[name] - base[name].float()).abs().max() < 1.3e-4
    assert all(torch.equal(mask.binary(5)[n], base[n]) for n in pre)
    assert all(torch.equal(mask.binary(None)[n], base[n]) for n in pre)  # the authors' rounding at 0.5

    # ∂L/∂S by the authors' hand-written chain rule == autograd through θ(γ(S)), for L = Σ c ⊙ θ
    coef = {n: torch.randn_like(t) for n, t in pre.items()}
    theta = mask.grafted(mask.relaxed())
    sum((coef[n] * theta[n]).sum() for n in pre).backward()
    manual = mask.score_grads(coef)  # ∂L/∂θ = c
    for score, grad in zip(mask.scores, manual, strict=True):
        torch.testing.assert_close(grad, score.grad)

    # gradient descent on L raises S where grafting an entry lowers L and the top-k keeps exactly k entries
    mask.step(coef, lr=1e6)
    assert sum(int(m.sum()) for m in mask.binary(5).values()) == 5


def test_sparse_export_reloads_to_identical_grafted_weights(tmp_path):
    torch.manual_seed(0)
    pre = {"layer.weight": torch.randn(8, 6), "layer.bias": torch.randn(8), "other": torch.randn(3).to(torch.bfloat16)}
    ft = {n: t + torch.randn_like(t) * 0.01 for n, t in pre.items()}
    mask = top_delta_mask(pre, ft, 0.1)
    path = save_graft(tmp_path / "g.safetensors", sparse_graft(ft, mask), {"note": "test"})
    graft = load_graft(path)
    assert {n: int(g.indices.numel()) for n, g in graft.items()} == {n: int(m.sum()) for n, m in mask.items()}
    reloaded = apply_sparse_graft(pre, graft)
    expected = apply_graft(pre, ft, mask)
    assert all(torch.equal(reloaded[n], expected[n]) and reloaded[n].dtype == pre[n].dtype for n in pre)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an ftmods graft"):
        load_graft(tmp_path / "plain.safetensors")
