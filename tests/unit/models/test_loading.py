"""The one loading path (from_pretrained on a hub id / folder / tiny id) and its options."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ftmods.models.loading import (
    LoadOptions,
    LoRASpec,
    coerce_spec,
    load_causal_lm,
    load_diffusion_parts,
    load_processor,
    load_tokenizer,
    load_vlm,
    resolve_dtype,
    spec_to_hparam,
)
from ftmods.models.tiny import resolve_pretrained


def test_trust_remote_code_is_off_by_default():
    assert LoadOptions().hf_kwargs()["trust_remote_code"] is False


def test_dtype_none_follows_the_default_dtype_as_under_bf16_true():
    """Lightning's bf16-true sets the default dtype to bfloat16 around configure_model()."""
    assert resolve_dtype(None) == torch.float32
    torch.set_default_dtype(torch.bfloat16)
    model = load_causal_lm("tiny/causal-lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_explicit_options_reach_the_model():
    options = LoadOptions(dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True)
    model = load_causal_lm("tiny/causal-lm", options)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False


def test_lora_freezes_the_base_and_targets_all_linear_layers():
    model = load_causal_lm("tiny/causal-lm", lora=LoRASpec(r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    assert frozen
    assert not any("lora_" in n for n in frozen)
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def test_specs_round_trip_through_checkpoint_dicts():
    spec = LoRASpec(r=4, target_modules=["q_proj"])
    assert coerce_spec(LoRASpec, spec_to_hparam(spec)) == spec
    assert coerce_spec(LoadOptions, None) is None
    with pytest.raises(ValueError, match="dropout"):
        LoRASpec(dropout=1.0)


def test_tokenizer_without_pad_falls_back_to_eos_with_a_warning(tmp_path):
    tok = load_tokenizer("tiny/causal-lm")
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no pad token"):
        reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token_id == reloaded.eos_token_id
    assert load_tokenizer("tiny/causal-lm", padding_side="left").padding_side == "left"


def test_vlm_and_processor_with_lora_run_on_an_image():
    processor = load_processor("tiny/qwen2-vl")
    model = load_vlm("tiny/qwen2-vl", lora=LoRASpec(r=2, target_modules=r".*language_model.*\.(q|v)_proj"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits  # (1, P, V)
        with model.disable_adapter():
            base = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.equal(logits, base)  # LoRA B starts at zero: the adapted model starts equal to the reference
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= {
        n for n, _ in model.named_parameters() if "lora_" in n
    }


@pytest.mark.parametrize(("name", "encoders"), [("tiny/sd", 1), ("tiny/sdxl", 2)])
def test_diffusion_parts_and_unet_lora(name, encoders):
    parts = load_diffusion_parts(name, unet_lora=LoRASpec(r=2, alpha=2, target_modules=["to_q", "to_v"]))
    assert len(parts.text_encoders) == len(parts.tokenizers) == encoders
    assert type(parts.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for e in parts.text_encoders for p in e.parameters())
    trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora" in n for n in trainable)
    assert resolve_pretrained(name) != name  # went through the tiny cache folder
