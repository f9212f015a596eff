"""The tiny local models: a Qwen2-architecture causal LM with a character-level Qwen2 tokenizer; a tiny reward
model (the same body with a one-label classification head) for tests of reward models; and tiny
mixture-of-experts models (Qwen3-MoE and gpt-oss architectures) for the MoE paths.

Tests and the CPU demo need a model without a hub. It is written to a Hugging Face directory (config,
safetensors, tokenizer files) and loaded with ``from_pretrained``, so it takes the path a real model takes.
The tokenizer is a real ``Qwen2Tokenizer`` (byte-level BPE with no merges), because transformers maps the
``qwen2`` model type to that class whatever the directory says.

The MoE models keep what makes their families different from a dense model and from each other, at a size that
trains in seconds: experts stored as fused 3-D parameters (transformers 5), top-2 routing over 4 experts, a
router and a load-balancing loss; gpt-oss adds its attention sinks, biased experts, alternating sliding-window
layers and a chat template in its "harmony" layout with a ``reasoning_effort`` setting. Neither ties its output
head to the embeddings, as neither real family does. Hidden and expert sizes are multiples of 32, the MXFP4 block
size, so a gpt-oss checkpoint can be written in MXFP4 as the real one is.
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


# The MoE families' tiny shapes: 2 layers, 4 experts, top-2 routing, 64 wide. Anything here can be overridden.
MOE_FAMILIES = ("qwen3_moe", "gpt_oss")
MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=128,  # the dense MLP's, used only by layers listed in mlp_only_layers
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # as Qwen3-30B-A3B: the top-k routing weights sum to 1
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        seed=0,
    ),
    "gpt_oss": dict(
        hidden_size=64,
        intermediate_size=64,  # each expert's
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,  # layers alternate sliding-window and full attention, as in gpt-oss
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        seed=0,
    ),
}
# gpt-oss's harmony layout: each message is <|start|>role<|message|>content<|end|>, an assistant answer goes to the
# 'final' channel, and generation ends with <|return|>. The role and channel names and the reasoning settings are
# single special tokens here, so the layout tokenizes with any tiny vocabulary (the digits one has no letters) and
# decoding a completion drops them, as it drops the markers.
HARMONY_MARKERS = ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"]
HARMONY_WORDS = ["system", "developer", "user", "assistant", "final"]
REASONING_EFFORTS = ("low", "medium", "high")
HARMONY_TEMPLATE = (
    "{%- set effort = reasoning_effort | default('medium') -%}"
    "<|start|>system<|message|>Reasoning: {{ effort }}<|end|>"
    "{%- for m in messages -%}"
    "{%- if m['role'] in ('system', 'developer') -%}<|start|>developer<|message|>{{ m['content'] }}<|end|>"
    "{%- elif m['role'] == 'user' -%}<|start|>user<|message|>{{ m['content'] }}<|end|>"
    "{%- else -%}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
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


def vision_settings(path: Path, defaults: dict, overrides: dict, vocab: str, name: str) -> tuple[dict, bool]:
    """A tiny vision-language model's settings (``defaults`` with ``overrides``; unknown names refused, naming
    ``name``), and whether ``path`` already holds a model built with them."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(
            f"model.tiny has {', '.join(sorted(unknown))}, which the {name} does not know; its settings are "
            f"{', '.join(defaults)}."
        )
    settings = {**defaults, **overrides, "vocab": vocab}
    stamp = path / "lightning_gspo_tiny.json"
    return settings, stamp.exists() and json.loads(stamp.read_text()) == settings


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


def build_tiny_moe(
    path: str | Path, family: str = "qwen3_moe", vocab: str = "digits", **overrides: Any
) -> Path:
    """Write a randomly initialised tiny mixture-of-experts causal LM (``family``: 'qwen3_moe' or 'gpt_oss') and its
    character tokenizer to ``path`` as a Hugging Face directory, as ``build_tiny_model`` writes the dense one.

    A gpt-oss tokenizer also carries the harmony chat template (``harmony_tokenizer``), whatever the vocabulary.
    The directory is reused when it already holds a model built with the same settings.
    """
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if family not in MOE_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(map(repr, MOE_FAMILIES))}.")
    if vocab not in VOCABS:
        raise ValueError(f"vocab={vocab!r} is not one of {', '.join(map(repr, VOCABS))}.")
    path = Path(path)
    settings = {**MOE_DEFAULTS[family], **overrides, "vocab": vocab, "family": family}
    stamp = path / "lightning_gspo_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    tokenizer = build_char_tokenizer(vocab, add_bos=settings.get("add_bos", False))
    if family == "gpt_oss":
        tokenizer = harmony_tokenizer(tokenizer)
    classes = {
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "gpt_oss": (GptOssConfig, GptOssForCausalLM),
    }
    config_class, model_class = classes[family]
    _write(model_class, path, tokenizer, settings, {}, config_class)
    return path


def harmony_tokenizer(tokenizer):
    """``tokenizer`` with gpt-oss's harmony markers, role and channel names and reasoning settings as special
    tokens, ``<|return|>`` as its end of sequence (what ends a gpt-oss answer), and ``HARMONY_TEMPLATE``."""
    words = HARMONY_MARKERS + HARMONY_WORDS + [f"Reasoning: {e}" for e in REASONING_EFFORTS]
    tokenizer.add_special_tokens({"additional_special_tokens": words})
    tokenizer.eos_token = "<|return|>"
    tokenizer.chat_template = HARMONY_TEMPLATE
    return tokenizer


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


def _write(
    model_class, path: Path, tokenizer, settings: dict[str, Any], extra: dict[str, Any], config_class=None
) -> None:
    """Build ``model_class`` from the tiny settings with the tokenizer's special tokens, seeded, and save it with
    its tokenizer and the settings' stamp. ``config_class``: Qwen2's unless given."""
    from transformers import Qwen2Config

    config_class = config_class or Qwen2Config
    own = ("seed", "vocab", "add_bos", "num_labels", "head", "family")
    arch = {k: v for k, v in settings.items() if k not in own}
    config = config_class(
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
