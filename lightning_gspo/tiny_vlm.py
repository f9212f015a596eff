"""The tiny local vision-language model: a randomly initialised Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)
with a small vision tower, a character-level tokenizer that knows Qwen2.5-VL's vision tokens, a chat template that
renders image placeholders, and a PIL image-processor config that keeps images small.

Tests and the CPU demo need a VLM without a hub. Like ``tiny.py``'s model, it is written to a Hugging Face
directory with ``save_pretrained`` and loaded with ``from_pretrained``, so it takes the path a real checkpoint takes
(``lightning_gspo.vision`` loads its processor).

Choices, and why:
- The architecture is the real Qwen2.5-VL's: its 3-D rotary positions (``get_rope_index``), its windowed vision
  attention and its patch merger are exactly what the training code must get right, so a look-alike would test
  nothing. Only the sizes shrink: 2 vision blocks 32 wide, 14-pixel patches merged 2 x 2, images resized to at
  most ``max_pixels`` = 112 x 112 (16 image tokens), 2 language layers 64 wide.
- The rotary sections of the 3-D positions (``mrope_section``: temporal, height, width) must add up to half the
  language model's head size; they are derived from it.
- The video tokens are in the vocabulary too: the model's config names their ids, and the sampler masks them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lightning_gspo.tiny import SPECIAL, VOCABS, _byte_level, vision_settings

log = logging.getLogger(__name__)

VISION_TOKENS = {
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}
TINY_VLM_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_num_heads=2,
    patch_size=14,
    min_pixels=28 * 28,
    max_pixels=112 * 112,
    seed=0,
)

# Images render as Qwen2.5-VL's placeholder run (the processor widens <|image_pad|> to one token per merged patch).
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}S: {% elif m['role'] == 'user' %}Q: {% else %}A: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def build_vlm_tokenizer(vocab: str):
    """A character-level Qwen2 tokenizer (as ``tiny.build_char_tokenizer``) whose vocabulary ends with Qwen2.5-VL's
    vision tokens, each one token, with the chat template above."""
    from transformers import Qwen2Tokenizer

    specials = list(SPECIAL.values()) + list(VISION_TOKENS.values())
    tokens = specials + [_byte_level(c) for c in VOCABS[vocab]]
    tok = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        unk_token=None,
        additional_special_tokens=list(VISION_TOKENS.values()),
        **SPECIAL,
    )
    tok.padding_side = "left"
    tok.chat_template = VLM_CHAT_TEMPLATE
    return tok


def build_tiny_vlm(path: str | Path, vocab: str = "digits", **overrides: Any) -> Path:
    """Write a randomly initialised tiny Qwen2.5-VL, its tokenizer, chat template and image-processor config to
    ``path`` as a Hugging Face directory; reused when it already holds one built with the same settings."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    s, built = vision_settings(path, TINY_VLM_DEFAULTS, overrides, vocab, "tiny VLM")
    if built:
        return path
    tok = build_vlm_tokenizer(vocab)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in VISION_TOKENS.items()}
    half_head = s["hidden_size"] // s["num_attention_heads"] // 2
    t = half_head // 4  # Qwen2.5-VL splits 64 as 16/24/24: the temporal section is the smallest
    mrope = [t, (half_head - t) // 2, half_head - t - (half_head - t) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"],
            num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"],
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=s["vision_depth"],
            hidden_size=s["vision_hidden_size"],
            intermediate_size=s["vision_intermediate_size"],
            num_heads=s["vision_num_heads"],
            patch_size=s["patch_size"],
            out_hidden_size=s["hidden_size"],
            window_size=s["patch_size"] * 2 * 2,  # two merged tokens a side
            fullatt_block_indexes=[s["vision_depth"] - 1],
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=s["min_pixels"], max_pixels=s["max_pixels"], patch_size=s["patch_size"], merge_size=2
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "lightning_gspo_tiny.json").write_text(json.dumps(s))
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote the tiny Qwen2.5-VL (%d parameters) to %s", n, path)
    return path
