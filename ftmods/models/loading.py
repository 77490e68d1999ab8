"""Load models from a hub id or a local folder: the one loading path for real and tiny models.

Every loader takes ``pretrained`` (a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``, a local folder, or a reserved
``tiny/<name>`` id that :func:`ftmods.models.tiny.resolve_pretrained` builds offline) plus :class:`LoadOptions`, and
goes through ``from_pretrained``. Modules call these from ``configure_model()`` so that config parsing never touches
weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from ftmods.models.tiny import resolve_pretrained

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


@dataclass
class LoadOptions:
    """How to load pretrained weights (shared by every ftmods module)."""

    dtype: DType | None = None
    """Weight dtype. ``None`` follows the Trainer's precision (``bf16-true`` → bfloat16, otherwise float32);
    ``auto`` takes the checkpoint's own dtype."""
    attn_implementation: AttnImplementation | None = None
    """Attention kernel; ``None`` lets transformers choose (sdpa when available)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its source."""
    revision: str | None = None
    """Hub branch, tag or commit to load."""
    local_files_only: bool = False
    """Never contact the hub; only the local cache or folder."""

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``from_pretrained``."""
        kwargs: dict[str, Any] = {
            "dtype": resolve_dtype(self.dtype),
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": self.local_files_only,
        }
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


@dataclass
class LoRASpec:
    """A LoRA adapter to add with peft; the base weights are frozen, only adapter weights train."""

    r: int = 16
    """Rank of the update."""
    alpha: float = 32.0
    """Scaling numerator (update scaled by ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names (suffixes), a regex string, or ``all-linear`` (every linear layer except the output head)."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. ``["lm_head"]``)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)``."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = True
    """peft's initialisation; ``True`` makes B zero so the adapted model starts equal to the base."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRASpec.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRASpec.dropout must be in [0, 1), got {self.dropout}")

    def to_peft(self, task_type: str | None = None) -> Any:
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            bias=self.bias,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=self.init_lora_weights,
            task_type=task_type,
        )


_Spec = TypeVar("_Spec", "LoadOptions", "LoRASpec")


def coerce_spec(cls: type[_Spec], value: _Spec | dict[str, Any] | None) -> _Spec | None:
    """Accept a spec dataclass or its ``asdict`` form (as stored in checkpoint hyperparameters)."""
    return cls(**value) if isinstance(value, dict) else value


def spec_to_hparam(value: LoadOptions | LoRASpec | dict[str, Any] | None) -> dict[str, Any] | None:
    """Plain-dict form of a spec for ``hparams``, so checkpoints load with ``torch.load(weights_only=True)``."""
    return asdict(value) if value is not None and not isinstance(value, dict) else value


def resolve_dtype(dtype: DType | None) -> torch.dtype | str:
    """Map a config dtype to what ``from_pretrained`` takes; ``None`` is the current default dtype.

    Lightning sets the default dtype to bfloat16 inside ``configure_model`` under ``precision="bf16-true"``, so
    ``None`` loads weights in the precision the Trainer will run.
    """
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype)


def apply_lora(model: nn.Module, spec: LoRASpec, task_type: str | None = None) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter (peft); base weights end frozen, adapter weights trainable."""
    from peft import get_peft_model

    return get_peft_model(model, spec.to_peft(task_type))


def _finish(model: Any, options: LoadOptions, lora: LoRASpec | None, task_type: str | None) -> nn.Module:
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora, task_type)
    return model


def load_causal_lm(pretrained: str, options: LoadOptions | None = None, lora: LoRASpec | None = None) -> nn.Module:
    """A causal LM (``AutoModelForCausalLM``), optionally with a LoRA adapter."""
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(pretrained), **options.hf_kwargs())
    return _finish(model, options, lora, "CAUSAL_LM")


def load_tokenizer(pretrained: str, options: LoadOptions | None = None, *, padding_side: str | None = None) -> Any:
    """The tokenizer saved with a model (``AutoTokenizer``); a missing pad token falls back to eos with a warning."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    kwargs: dict[str, Any] = {
        "trust_remote_code": options.trust_remote_code,
        "local_files_only": options.local_files_only,
    }
    if options.revision is not None:
        kwargs["revision"] = options.revision
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(pretrained), **kwargs)
    if tokenizer.pad_token_id is None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{pretrained}: tokenizer has no pad token; using eos {tokenizer.eos_token!r} for padding.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_vlm(pretrained: str, options: LoadOptions | None = None, lora: LoRASpec | None = None) -> nn.Module:
    """A vision-language model (``AutoModelForImageTextToText``), optionally with a LoRA adapter."""
    from transformers import AutoModelForImageTextToText

    options = options or LoadOptions()
    model = AutoModelForImageTextToText.from_pretrained(resolve_pretrained(pretrained), **options.hf_kwargs())
    return _finish(model, options, lora, None)


def load_processor(pretrained: str, options: LoadOptions | None = None, **kwargs: Any) -> Any:
    """The processor saved with a VLM or CLIP model (``AutoProcessor``); extra kwargs go to ``from_pretrained``."""
    from transformers import AutoProcessor

    options = options or LoadOptions()
    kwargs.setdefault("trust_remote_code", options.trust_remote_code)
    kwargs.setdefault("local_files_only", options.local_files_only)
    if options.revision is not None:
        kwargs.setdefault("revision", options.revision)
    return AutoProcessor.from_pretrained(resolve_pretrained(pretrained), **kwargs)


@dataclass
class DiffusionParts:
    """The parts of a diffusers text-to-image pipeline that training needs."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)


def load_diffusion_parts(
    pretrained: str, options: LoadOptions | None = None, *, unet_lora: LoRASpec | None = None
) -> DiffusionParts:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler of an SD / SDXL pipeline folder or hub id.

    SDXL repos have ``text_encoder_2`` / ``tokenizer_2``; they are loaded when present. A LoRA adapter, if given, is
    added to the UNet with ``unet.add_adapter`` (diffusers' peft integration), so ``disable_adapters()`` gives the
    reference UNet.
    """
    import transformers
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    options = options or LoadOptions()
    path = resolve_pretrained(pretrained)
    dtype = resolve_dtype(options.dtype)
    common: dict[str, Any] = {"local_files_only": options.local_files_only}
    if options.revision is not None:
        common["revision"] = options.revision
    model_kwargs = {**common, "torch_dtype": None if dtype == "auto" else dtype}
    config = DiffusionPipeline.load_config(path, **common)
    encoders, tokenizers = [], []
    for suffix in ("", "_2"):
        if f"text_encoder{suffix}" not in config:
            continue
        # the class the pipeline names (CLIPTextModelWithProjection for SDXL's second encoder: AutoModel would drop
        # the projection and with it the pooled embedding)
        library, class_name = config[f"text_encoder{suffix}"]
        encoder_cls = getattr(transformers, class_name, AutoModel) if library == "transformers" else AutoModel
        encoder = encoder_cls.from_pretrained(path, subfolder=f"text_encoder{suffix}", dtype=dtype, **common)
        encoders.append(encoder.requires_grad_(False))
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{suffix}", **common))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **model_kwargs)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **model_kwargs).requires_grad_(False)
    scheduler_cls = _scheduler_class(config["scheduler"][1])
    scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler", **common)
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if unet_lora is not None:
        unet.requires_grad_(False)
        unet.add_adapter(unet_lora.to_peft())
    return DiffusionParts(unet, vae, encoders, tokenizers, scheduler)


def _scheduler_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)
