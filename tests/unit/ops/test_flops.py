"""Model FLOPs (ftmods.ops.flops): counts worked by hand, the matrix-parameter count against real architectures'
parameter totals, and the sequence lengths read from padded and packed batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig, Qwen2Config, Qwen2VLConfig

from ftmods.models import architectures as arch
from ftmods.ops.flops import DecoderShape, forward_flops, matmul_params, mfu, sequence_lengths_of, train_flops

SMALL = DecoderShape(layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_matmul_params_by_hand():
    """q = heads * head_dim = 4, kv = 1 * 2 = 2.
    attention per layer = q proj 4*4 + k, v 2*(4*2) + o 4*4 = 16 + 16 + 16 = 48
    gated MLP per layer = 3 * 4 * 8 = 96  ->  144 per layer, 288 for 2 layers; head 4 * 10 = 40; N = 328.
    A plain (two-projection) MLP: 2 * 4 * 8 = 64 -> (48 + 64) * 2 + 40 = 264."""
    assert matmul_params(SMALL) == 328
    plain = DecoderShape(layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, gated_mlp=False)
    assert matmul_params(plain) == 264


def test_forward_and_train_flops_by_hand():
    """n = 3: 2 * 328 * 3 = 1968 plus attention 4 * L * Q * n^2 = 4 * 2 * 4 * 9 = 288 -> 2256.
    n = 1: 2 * 328 + 4 * 2 * 4 * 1 = 656 + 32 = 688.  Both: 2944; training is 3x: 8832."""
    assert forward_flops(SMALL, [3]) == 2256
    assert forward_flops(SMALL, [1]) == 688
    assert forward_flops(SMALL, torch.tensor([3, 1])) == 2944
    assert train_flops(SMALL, [3, 1]) == 8832
    assert train_flops(SMALL, []) == 0


def test_attention_term_grows_with_the_square_of_the_length():
    """Two sequences of 4 cost less than one of 8 (packed sequences attend only to themselves)."""
    linear = 6 * matmul_params(SMALL)
    assert train_flops(SMALL, [8]) - train_flops(SMALL, [4, 4]) == 12 * 2 * 4 * (64 - 32)
    assert train_flops(SMALL, [8]) - 8 * linear == 12 * 2 * 4 * 64


def test_mfu_by_hand():
    """1e12 FLOPs in 2 s = 0.5e12 FLOP/s; on 1 device of 1e12 peak = 0.5, on 2 devices = 0.25."""
    assert mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert mfu(1e12, 2.0, 1e12, devices=2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0, 1e12)


def _non_matmul_params(model: torch.nn.Module) -> int:
    """Norm weights and biases: the parameters that are not matrices of a product (embeddings tied to the head)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1)


@pytest.mark.parametrize(
    "config",
    [lambda: Qwen2Config(**arch.QWEN2_5_0_5B), lambda: LlamaConfig(**arch.LLAMA_3_2_1B)],
    ids=["qwen2.5-0.5b", "llama-3.2-1b"],
)
def test_matmul_params_equal_the_architectures_parameters_less_norms_and_biases(config):
    """With tied embeddings the parameters are exactly: the matrices of every product + norms and biases (1-D).
    (Qwen2.5-0.5B: 493,961,216 of 494,032,768; its q/k/v biases and RMSNorm weights are the other 71,552.)"""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config())
    total = sum(p.numel() for p in model.parameters())
    assert matmul_params(DecoderShape.from_config(config())) == total - _non_matmul_params(model)


def test_from_config_reads_the_text_model_of_a_vlm_and_refuses_encoders():
    vlm = Qwen2VLConfig(
        text_config={
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": 500,
        }
    )
    shape = DecoderShape.from_config(vlm)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (3, 64, 4, 2, 16)
    assert (shape.intermediate, shape.vocab, shape.gated_mlp) == (96, 500, True)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        DecoderShape.from_config(BertConfig())


def test_sequence_lengths_of_padded_and_packed_batches():
    ids = torch.ones(2, 6, dtype=torch.long)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])}
    assert sequence_lengths_of(padded).tolist() == [3, 6]
    # packed: row 0 holds sequences of 2 and 3 then one pad; row 1 holds 4 and 2
    packed = dict(
        padded,
        attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6]),
        position_ids=torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]),
    )
    assert sequence_lengths_of(packed).tolist() == [2, 3, 4, 2]
    assert sequence_lengths_of({"input_ids": ids}).tolist() == [6, 6]  # no mask: every position
    assert sequence_lengths_of({"pixel_values": torch.zeros(1, 3)}) is None
    assert sequence_lengths_of([ids]) is None
