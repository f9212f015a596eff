"""The tiny local model: a Qwen2-architecture causal LM with a character-level Qwen2 tokenizer; and a tiny reward
model (the same body with a one-label classification head) for tests of reward models.

Tests and the CPU demo need a model without a hub. It is written to a Hugging Face directory (config,
safetensors, tokenizer files) and loaded with ``from_pretrained``, so it takes the path a real model takes.
The tokenizer is a real ``Qwen2Tokenizer`` (byte-level BPE with no merges), because transformers maps the
``qwen2`` model type to that class whatever the directory says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


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


def build_char_tokenizer(vocab: str, add_bos: bool = False):
    """A character-level Qwen2 tokenizer: byte-level BPE with no merges, so every character is one token.

    Being a real ``Qwen2Tokenizer``, it loads through ``AutoTokenizer`` exactly as Qwen checkpoints do. With
    ``add_bos`` it starts every encoding with ``<bos>``, as Llama's and Gemma's tokenizers do.
    """
    from transformers import Qwen2Tokenizer

    specials = list(SPECIAL.values())
    tokens = specials + [_byte_level(c) for c in VOCABS[vocab]]
    vocab_ids = {t: i for i, t in enumerate(tokens)}
    tok = Qwen2Tokenizer(vocab=vocab_ids, merges=[], unk_token=None, add_bos_token=add_bos, **SPECIAL)
    tok.padding_side = "left"
    if vocab == "ascii":
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(path: str | Path, vocab: str = "digits", **overrides: Any) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to ``path`` as a Hugging Face directory.

    The directory is reused when it already holds a model built with the same settings.
    """
    from transformers import Qwen2ForCausalLM

    path = Path(path)
    settings = {**TINY_DEFAULTS, **overrides, "vocab": vocab}
    stamp = path / "lightning_gspo_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    tokenizer = build_char_tokenizer(vocab, add_bos=settings.get("add_bos", False))
    _write(Qwen2ForCausalLM, path, tokenizer, settings, {})
    return path


def build_tiny_reward_model(
    path: str | Path, vocab: str = "digits", num_labels: int = 1, **overrides: Any
) -> Path:
    """Write a randomly initialised tiny Qwen2 reward model (``Qwen2ForSequenceClassification``, one score per
    text with ``num_labels=1``) and its tokenizer to ``path``, as ``build_tiny_model`` writes the policy.

    Its config carries the tokenizer's pad token id: a sequence classifier reads its score at the last token that
    is not padding, and finds it through that id.
    """
    from transformers import Qwen2ForSequenceClassification

    path = Path(path)
    settings = {**TINY_DEFAULTS, **overrides, "vocab": vocab, "num_labels": num_labels, "head": "reward"}
    stamp = path / "lightning_gspo_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    tokenizer = build_char_tokenizer(vocab, add_bos=settings.get("add_bos", False))
    tokenizer.padding_side = "right"
    _write(Qwen2ForSequenceClassification, path, tokenizer, settings, {"num_labels": num_labels})
    return path


def _write(model_class, path: Path, tokenizer, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    """Build ``model_class`` from the tiny settings with the tokenizer's special tokens, seeded, and save it with
    its tokenizer and the settings' stamp."""
    from transformers import Qwen2Config

    arch = {k: v for k, v in settings.items() if k not in ("seed", "vocab", "add_bos", "num_labels", "head")}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = model_class(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "lightning_gspo_tiny.json").write_text(json.dumps(settings))
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote the tiny %s (%d parameters) to %s", model_class.__name__, n, path)
