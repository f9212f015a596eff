"""The tiny local LLaVA: a randomly initialised ``LlavaForConditionalGeneration`` (a small CLIP vision tower, a
2-layer Llama language model), a character-level tokenizer with LLaVA's ``<image>`` token, a chat template that
renders image blocks as ``<image>``, and a PIL image-processor config that keeps images small.

It is the second image layout the trainer supports, beside the tiny Qwen2.5-VL (``tiny_vlm.py``): every image is
resized and cropped to one fixed size, so ``pixel_values`` has one (3, H, W) row per image, the placeholder widens
to a fixed number of image tokens (one per vision patch), and positions are the plain 1-D ones of a text model.
Like the other tiny models it is written with ``save_pretrained`` and loaded with ``from_pretrained``, so it takes
the path a real checkpoint takes.

Choices, and why:
- The architecture is the real LLaVA's (CLIP tower, two-layer projector, Llama), only small: 2 vision layers 32
  wide, 14-pixel patches on 56 x 56 images (16 image tokens after the CLS token is dropped, LLaVA's 'default'
  feature selection), 2 language layers 64 wide.
- The image features come from the tower's last layer (``vision_feature_layer=-1``; real LLaVA takes the
  second to last): with two layers, every tower parameter then reaches the loss, so training the tower is tested
  on all of it, except CLIP's final norm (``post_layernorm``), which LLaVA never uses (it takes the hidden
  states before it).
- The processor settings LLaVA's own processor reads (patch size, one extra CLS token, the feature selection) are
  saved with the image processor, so ``AutoProcessor`` builds it; ``vision.py`` expands the placeholder the same
  way where it cannot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lightning_gspo.tiny import SPECIAL, VOCABS, _byte_level, vision_settings

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
TINY_LLAVA_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_layers=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_num_heads=2,
    patch_size=14,
    image_size=56,
    seed=0,
)

LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}S: {% elif m['role'] == 'user' %}Q: {% else %}A: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def build_llava_tokenizer(vocab: str):
    """A character-level Qwen2 tokenizer (as ``tiny.build_char_tokenizer``) whose vocabulary ends with ``<image>``,
    one token, with the chat template above."""
    from transformers import Qwen2Tokenizer

    tokens = list(SPECIAL.values()) + [IMAGE_TOKEN] + [_byte_level(c) for c in VOCABS[vocab]]
    tok = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        unk_token=None,
        additional_special_tokens=[IMAGE_TOKEN],
        **SPECIAL,
    )
    tok.padding_side = "left"
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    return tok


def build_tiny_llava(path: str | Path, vocab: str = "digits", **overrides: Any) -> Path:
    """Write a randomly initialised tiny LLaVA, its tokenizer, chat template and image-processor config to ``path``
    as a Hugging Face directory; reused when it already holds one built with the same settings."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    path = Path(path)
    s, built = vision_settings(path, TINY_LLAVA_DEFAULTS, overrides, vocab, "tiny LLaVA")
    if built:
        return path
    if s["image_size"] % s["patch_size"]:
        raise ValueError(
            f"model.tiny.image_size={s['image_size']} is not a multiple of patch_size={s['patch_size']}."
        )
    tok = build_llava_tokenizer(vocab)
    tokens = (s["image_size"] // s["patch_size"]) ** 2  # one per patch; the CLS token is dropped
    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"],
            num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"],
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            num_hidden_layers=s["vision_layers"],
            hidden_size=s["vision_hidden_size"],
            intermediate_size=s["vision_intermediate_size"],
            num_attention_heads=s["vision_num_heads"],
            patch_size=s["patch_size"],
            image_size=s["image_size"],
            projection_dim=s["vision_hidden_size"],
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    side = s["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    # What LLaVA's processor reads to widen <image> (patch size, the CLS token, the feature selection).
    processor_config = dict(
        processor_class="LlavaProcessor",
        patch_size=s["patch_size"],
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
    )
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (path / "lightning_gspo_tiny.json").write_text(json.dumps(s))
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote the tiny LLaVA (%d parameters) to %s", n, path)
    return path
