"""Tiny offline builders: save -> from_pretrained round trips, determinism, chat template, and the tiny-id cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ftmods.models.tiny import (
    BUILDER_VERSION,
    DEFAULT_SYSTEM_PROMPT,
    TINY_MODELS,
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_clip,
    is_tiny_id,
    resolve_pretrained,
    tiny_cache_dir,
    tiny_model_dir,
)

CONVERSATION = [
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "And 12 + 7?"},
    {"role": "assistant", "content": "19"},
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of the runs of ones in a 0/1 list."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ----------------------------------------------------------------------------------------------------------------------
# causal-lm / qwen2-lm
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["causal-lm", "qwen2-lm"])
def lm_dir(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, resolve_pretrained(f"tiny/{request.param}")


def test_causal_lm_round_trip_forward_and_generate(lm_dir: tuple[str, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

    name, path = lm_dir
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert isinstance(model, {"causal-lm": LlamaForCausalLM, "qwen2-lm": Qwen2ForCausalLM}[name])
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, tok.eos_token_id, tok.pad_token_id)
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert 90_000 < sum(p.numel() for p in model.parameters()) < 110_000

    batch = tok(["12 + 7 = 19", "The answer is"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, -1] == 0  # right padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    prompt = tok(["The answer is"], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_chat_tokenizer_special_tokens_and_round_trip() -> None:
    tok = build_tiny_chat_tokenizer()
    assert 300 <= len(tok) <= 400
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None
    assert tok.padding_side == "right"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    for text in ["12 + 7 = 19", "The answer is positive.\n", "def f(x):\n    return x", "héllo wörld ✓ 🙂"]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
    # special tokens are single, unsplit tokens; the BPE merges learnt something (fewer tokens than bytes)
    assert tok("<|im_start|>user\n")["input_ids"][0] == 1
    assert len(tok("The answer is positive")["input_ids"]) < len("The answer is positive") // 2
    assert build_tiny_chat_tokenizer().get_vocab() == tok.get_vocab()


def test_chat_template_renders_chatml_and_masks_assistant_content(lm_dir: tuple[str, str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir[1], local_files_only=True)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 7.<|im_end|>\n"
        "<|im_start|>user\nAnd 12 + 7?<|im_end|>\n"
        "<|im_start|>assistant\n19<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )

    as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    assert tok.apply_chat_template(as_parts, tokenize=False) == text  # list-of-parts content renders the same

    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode(ids) == text
    spans = _spans(mask)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["The answer is 7.<|im_end|>", "19<|im_end|>"]
    for a, _ in spans:  # the role header is right before, and outside, each span
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------------------------------
# qwen2-vl
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_dir() -> str:
    return resolve_pretrained("tiny/qwen2-vl")


def test_vlm_round_trip_processor_forward_and_generate(vlm_dir: str) -> None:
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    processor = AutoProcessor.from_pretrained(vlm_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, local_files_only=True).eval()
    assert isinstance(processor, Qwen2VLProcessor)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.text_config.vocab_size == len(tok)
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)

    def user(question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    prompts = [
        processor.apply_chat_template(user(q), tokenize=False, add_generation_prompt=True)
        for q in ["What is in the image?", "Classify the image. Please directly output the answer."]
    ]
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>" in prompts[0]
    assert prompts[0].endswith("<|im_start|>assistant\n")

    images = [Image.new("RGB", (56, 56), color) for color in ["red", "blue"]]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    image_pad = model.config.image_token_id
    assert (inputs["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 4]
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert inputs["pixel_values"].shape == (2 * 16, 3 * 2 * 14 * 14)  # (images * patches, C * T * P * P)
    assert inputs["input_ids"][0, 0] == tok.pad_token_id  # the shorter prompt is left-padded
    assert "mm_token_type_ids" in inputs

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


# ----------------------------------------------------------------------------------------------------------------------
# sd / sdxl
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_sd_pipeline_round_trip_and_one_step_sample(name: str) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_pretrained(f"tiny/{name}")
    pipeline_cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(path, local_files_only=True)
    assert type(pipe) is pipeline_cls
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    assert torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert len(tokenizer) == 514
    assert tokenizer.model_max_length == text_encoder.config.max_position_embeddings == 16
    vocab = tokenizer.get_vocab()
    assert tokenizer("ab")["input_ids"] == [512, vocab["a"], vocab["b</w>"], 513]  # one token per character
    if name == "sdxl":
        enc2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", local_files_only=True)
        assert enc2.config.projection_dim == 32
        assert unet.config.cross_attention_dim == 64
    assert 0.9e6 < sum(p.numel() for p in unet.parameters()) < 1.1e6

    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # 8x downsampling, like real SD

    images = pipe(
        "a photo of a dog",
        num_inference_steps=1,
        guidance_scale=0.0,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()


# ----------------------------------------------------------------------------------------------------------------------
# clip
# ----------------------------------------------------------------------------------------------------------------------


def test_clip_round_trip_and_scores() -> None:
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_pretrained("tiny/clip")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    assert model.config.vision_config.image_size == 32
    assert model.config.projection_dim == 16

    texts = ["a photo of a dog", "cat", "a very long caption that is far longer than sixteen characters"]
    images = [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (32, 32), "green")]
    inputs = processor(text=texts, images=images, padding=True, truncation=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs["input_ids"].shape == (3, 16)  # truncated to the 16 text positions
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 3)
    assert torch.isfinite(out.logits_per_image).all()
    assert out.text_embeds.shape == (3, 16)
    assert out.image_embeds.shape == (2, 16)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------------


TRAINED_TOYS = {"locft-toy", "s3ft-toy", "qwen2-vl-shapes"}  # builds that train: compared with the session's cache


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_builds_are_deterministic_and_leave_the_global_rng_alone(name: str, tmp_path: Path) -> None:
    """Two builds are byte-identical, whatever the global seed. The trained toys (10-80 s each) are built once here
    and compared with the session cache's build, which other tests need anyway."""
    builder = TINY_MODELS[name]
    torch.manual_seed(1234)  # a different global seed from the cache build must not change the weights
    rng_before = torch.get_rng_state()
    assert builder(tmp_path / "a") == tmp_path / "a"
    assert torch.equal(torch.get_rng_state(), rng_before)
    if name in TRAINED_TOYS:
        other = Path(resolve_pretrained(f"tiny/{name}"))
    else:
        torch.manual_seed(4321)
        other = builder(tmp_path / "b")

    files_a, files_b = _files(tmp_path / "a"), _files(other)
    weights = [f for f in files_a if f.endswith(".safetensors")]
    assert weights
    assert files_a.keys() == files_b.keys()
    for f in weights:
        state_a, state_b = load_file(tmp_path / "a" / f), load_file(other / f)
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert files_a == files_b  # byte-identical, configs and tokenizers included


def test_causal_lm_rejects_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama"):
        build_tiny_causal_lm(tmp_path, arch="gpt2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------------
# Reserved ids and the cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-0.5B-Instruct", "/models/llama", "tinyllama/x", "tiny", "./tiny/causal-lm", ""]
)
def test_resolve_passes_other_names_through(name: str) -> None:
    assert resolve_pretrained(name) == name
    assert not is_tiny_id(name)


def test_is_tiny_id() -> None:
    assert all(is_tiny_id(f"tiny/{name}") for name in TINY_MODELS)
    assert set(TINY_MODELS) == {
        "causal-lm", "qwen2-lm", "qwen2-vl", "qwen2.5-vl", "qwen2-vl-shapes", "sd", "sdxl", "clip", "open-clip",
        "locft-toy", "s3ft-toy",
    }  # fmt: skip
    for name in ["tiny/", "tiny/nope", "causal-lm", "TINY/causal-lm", "tiny/causal-lm/"]:
        assert not is_tiny_id(name)


def test_resolve_unknown_tiny_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="tiny/nope") as info:
        resolve_pretrained("tiny/nope")
    assert all(f"tiny/{name}" in str(info.value) for name in TINY_MODELS)


def test_cache_dir_from_env_or_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTMODS_CACHE", str(tmp_path / "cache"))
    assert tiny_cache_dir() == tmp_path / "cache"
    assert tiny_model_dir("sd") == tmp_path / "cache" / "tiny" / f"sd-v{BUILDER_VERSION}"
    monkeypatch.delenv("FTMODS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny_cache_dir() == tmp_path / "home" / ".cache" / "ftmods"


def test_resolve_builds_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel

    monkeypatch.setenv("FTMODS_CACHE", str(tmp_path))
    calls: list[Path] = []

    def counting_builder(folder: Path) -> Path:
        calls.append(folder)
        return build_tiny_clip(folder)

    monkeypatch.setitem(TINY_MODELS, "clip", counting_builder)
    first = resolve_pretrained("tiny/clip")
    assert first == str(tmp_path / "tiny" / f"clip-v{BUILDER_VERSION}")
    assert calls[0] != Path(first)  # built elsewhere, then renamed into place
    mtime = os.stat(first).st_mtime_ns
    assert resolve_pretrained("tiny/clip") == first
    assert len(calls) == 1
    assert os.stat(first).st_mtime_ns == mtime
    assert os.listdir(tmp_path / "tiny") == [f"clip-v{BUILDER_VERSION}"]  # no temp folder left
    assert isinstance(CLIPModel.from_pretrained(first, local_files_only=True), CLIPModel)


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTMODS_CACHE", str(tmp_path))

    def broken_builder(folder: Path) -> Path:
        (folder / "config.json").write_text("{}")  # half-built
        raise RuntimeError("boom")

    monkeypatch.setitem(TINY_MODELS, "sd", broken_builder)
    with pytest.raises(RuntimeError, match="boom"):
        resolve_pretrained("tiny/sd")
    assert os.listdir(tmp_path / "tiny") == []


def test_losing_the_race_uses_the_winners_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTMODS_CACHE", str(tmp_path))
    target = tiny_model_dir("sd")

    def builder_that_loses(folder: Path) -> Path:
        (folder / "config.json").write_text("{}")  # a complete (loser) build
        target.mkdir()  # meanwhile another process renamed its finished build into place
        (target / "theirs.txt").write_text("winner")
        return folder

    monkeypatch.setitem(TINY_MODELS, "sd", builder_that_loses)
    assert resolve_pretrained("tiny/sd") == str(target)
    assert os.listdir(target) == ["theirs.txt"]
    assert os.listdir(tmp_path / "tiny") == [target.name]


_RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from ftmods.models import tiny

    barrier, real_builder, built = Path(sys.argv[1]), tiny.TINY_MODELS["clip"], []

    def builder(folder):
        (barrier / "building-child").touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("building-*"))) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the other process never started building")
            time.sleep(0.01)
        built.append(str(folder))
        return real_builder(folder)

    tiny.TINY_MODELS["clip"] = builder
    print(json.dumps({"path": tiny.resolve_pretrained("tiny/clip"), "built": built}))
    """
)


def test_concurrent_resolution_from_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process and a child resolve ``tiny/clip`` at once; a barrier in the builder makes both really build."""
    from transformers import CLIPModel

    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("FTMODS_CACHE", str(cache))
    child = subprocess.Popen(
        [sys.executable, "-c", _RACER, str(barrier)],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    built: list[str] = []

    def builder(folder: Path) -> Path:
        (barrier / "building-parent").touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("building-*"))) < 2 and child.poll() is None:
            assert time.monotonic() < deadline, "the child never started building"
            time.sleep(0.01)
        built.append(str(folder))
        return build_tiny_clip(folder)

    monkeypatch.setitem(TINY_MODELS, "clip", builder)
    try:
        path = resolve_pretrained("tiny/clip")
    finally:
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])

    target = cache / "tiny" / f"clip-v{BUILDER_VERSION}"
    assert path == result["path"] == str(target)
    assert len(built) == len(result["built"]) == 1  # both really built, in different temp folders
    assert built != result["built"]
    assert os.listdir(target.parent) == [target.name]  # the loser's temp folder is gone
    loaded = CLIPModel.from_pretrained(target, local_files_only=True)
    expected = load_file(build_tiny_clip(tmp_path / "reference") / "model.safetensors")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_shapes_toy_is_partly_right_in_both_modes() -> None:
    """The warm start is short on purpose: formats learnt, classes partly (chance is 1/6), so GRPO has signal."""
    path = Path(resolve_pretrained("tiny/qwen2-vl-shapes"))
    sidecar = json.loads((path / "ftmods_shapes_toy.json").read_text())
    for mode in ("think", "no_think"):
        assert 0.2 <= sidecar["greedy_accuracy"][mode] <= 0.8, sidecar
    assert (path / "model.safetensors").is_file()
