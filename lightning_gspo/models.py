"""Policy and reference models: loading by name or path, and the tiny local model the demo and tests use.

Everything loads through ``from_pretrained``, the tiny model included: it is written to a Hugging Face directory
(config, safetensors, tokenizer files) first, so the path a real model takes is the path the tests take.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class ModelConfig:
    """How to load the policy (and, for beta > 0, the reference)."""

    name_or_path: str = "tiny:digits"
    """A hub name, a local directory, or 'tiny:<vocab>' for the built-in tiny model ('tiny:digits', 'tiny:ascii'),
    which is written to ``tiny_dir`` and then loaded like any other directory."""
    dtype: str = "float32"
    """Weights' dtype: 'float32', 'bfloat16', 'float16' or 'auto'."""
    attn_implementation: str | None = None
    """'eager', 'sdpa', 'flash_attention_2', ... None lets transformers choose."""
    trust_remote_code: bool = False
    revision: str | None = None
    tiny_dir: str = "outputs/tiny_model"
    """Where the tiny model is written (reused when it already exists with the same settings)."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """Overrides for the tiny model's architecture: hidden_size, num_hidden_layers, seed, ..."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if self.name_or_path.startswith(TINY_PREFIX) and self.name_or_path[len(TINY_PREFIX) :] not in VOCABS:
            raise ValueError(
                f"model.name_or_path={self.name_or_path!r}: the tiny model's vocabularies are "
                f"{', '.join(TINY_PREFIX + v for v in VOCABS)}."
            )


# ---------------------------------------------------------------------------------------------------------------
# The tiny model: a Qwen2-architecture causal LM with a character-level tokenizer.

VOCABS = {
    # Digits and the arithmetic operators: RL from random weights learns fast on a narrow vocabulary.
    "digits": list("0123456789+-*=") + [" "],
    # Printable ASCII and newline: enough for GSM8K-style text and reasoning tags, slower to learn from scratch.
    "ascii": [chr(c) for c in range(32, 127)] + ["\n"],
}
SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}
TINY_DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    seed=0,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}<eos>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def _byte_level(ch: str) -> str:
    """The byte-level alphabet symbol of an ASCII character (GPT-2/Qwen: printable bytes stand for themselves,
    the others, space and newline among them, are shifted past 255 in byte order)."""
    b = ord(ch)
    if 33 <= b <= 126:
        return ch
    return chr(256 + b) if b <= 32 else chr(256 + 33 + (b - 127))


def build_char_tokenizer(vocab: str):
    """A character-level Qwen2 tokenizer: byte-level BPE with no merges, so every character is one token.

    Being a real ``Qwen2Tokenizer``, it loads through ``AutoTokenizer`` exactly as Qwen checkpoints do.
    """
    from transformers import Qwen2Tokenizer

    specials = list(SPECIAL.values())
    tokens = specials + [_byte_level(c) for c in VOCABS[vocab]]
    tok = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=None, **SPECIAL)
    tok.padding_side = "left"
    if vocab == "ascii":
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(path: str | Path, vocab: str = "digits", **overrides: Any) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to ``path`` as a Hugging Face directory.

    The directory is reused when it already holds a model built with the same settings.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    settings = {**TINY_DEFAULTS, **overrides, "vocab": vocab}
    stamp = path / "lightning_gspo_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    tokenizer = build_char_tokenizer(vocab)
    arch = {k: v for k, v in settings.items() if k not in ("seed", "vocab")}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = Qwen2ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps(settings))
    log.info("wrote the tiny model (%d parameters) to %s", sum(p.numel() for p in model.parameters()), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def resolve_path(cfg: ModelConfig) -> str:
    """The directory or hub name ``from_pretrained`` gets; builds the tiny model first when asked for."""
    if cfg.name_or_path.startswith(TINY_PREFIX):
        vocab = cfg.name_or_path[len(TINY_PREFIX) :]
        return str(build_tiny_model(Path(cfg.tiny_dir) / vocab, vocab, **cfg.tiny))
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
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    path = resolve_path(cfg)
    kwargs: dict[str, Any] = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model.name_or_path={cfg.name_or_path!r}: {err}. On a machine without a model hub, "
            "give a local directory or 'tiny:digits'."
        ) from err


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A separate, frozen, eval-mode copy of ``model`` to serve as the reference policy."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
