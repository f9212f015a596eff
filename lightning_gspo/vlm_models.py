"""Loading a vision-language policy: the model class, the frozen vision tower, LoRA on the language model only,
and the tiny local VLMs' names (``tiny-vlm:<vocab>``, a Qwen2.5-VL; ``tiny-llava:<vocab>``, a LLaVA).

Choices, and why:
- A directory is a VLM when its config has a ``vision_config``; it loads through ``AutoModelForImageTextToText``
  (``AutoModelForCausalLM`` does not map Qwen2.5-VL).
- The vision tower is frozen by default (``ModelConfig.train_vision_tower=False``), as in most RL fine-tuning of
  VLMs: the reward speaks about text, the tower's gradient is costly, and a frozen tower keeps the image
  features the model was trained on. Frozen, it is outside the optimizer, and LoRA leaves it alone too (its
  MLP layers share their names with the language model's, so 'all-linear' or ['gate_proj', ...] would
  otherwise adapt it). The tower is the module named ``visual`` (Qwen2-VL), ``vision_tower`` (LLaVA) or
  ``vision_model``; LLaVA's projector (``multi_modal_projector``) stays with the language model, trained or
  adapted as it is, as LLaVA's own fine-tuning does.
"""

from __future__ import annotations

import re
from pathlib import Path

TINY_VLM_PREFIX = "tiny-vlm:"
TINY_LLAVA_PREFIX = "tiny-llava:"
TINY_VLM_PREFIXES = (TINY_VLM_PREFIX, TINY_LLAVA_PREFIX)
TOWER_NAMES = ("visual", "vision_tower", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector",)


def is_vlm_path(path: str, trust_remote_code: bool = False, revision: str | None = None) -> bool:
    """Whether the model at ``path`` (a directory or hub name) is a vision-language model."""
    from transformers import AutoConfig

    from lightning_gspo.vision import is_vision_config

    kwargs = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError):  # the model loader reports it, with its own advice
        return False
    return is_vision_config(config)


def tiny_vlm_path(name_or_path: str, tiny_dir: str, overrides: dict) -> str:
    """Build (or reuse) the tiny VLM a 'tiny-vlm:<vocab>' or 'tiny-llava:<vocab>' name asks for; its directory."""
    from lightning_gspo.tiny import VOCABS
    from lightning_gspo.tiny_llava import build_tiny_llava
    from lightning_gspo.tiny_vlm import build_tiny_vlm

    prefix = next(p for p in TINY_VLM_PREFIXES if name_or_path.startswith(p))
    vocab = name_or_path[len(prefix) :]
    if vocab not in VOCABS:
        raise ValueError(
            f"model.name_or_path={name_or_path!r}: the tiny VLM's vocabularies are "
            f"{', '.join(prefix + v for v in VOCABS)}."
        )
    if prefix == TINY_LLAVA_PREFIX:
        return str(build_tiny_llava(Path(tiny_dir) / f"llava-{vocab}", vocab, **overrides))
    return str(build_tiny_vlm(Path(tiny_dir) / f"vlm-{vocab}", vocab, **overrides))


def vision_tower(model):
    """(dotted name, module) of the model's vision tower, or (None, None)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TOWER_NAMES:
            return name, module
    return None, None


def image_only_parameters(model) -> list:
    """The trainable parameters that only image inputs reach: the vision tower's (when it trains) and a LLaVA
    projector's (``multi_modal_projector``, which trains with the language model). A forward without images
    leaves them without a gradient."""
    _, tower = vision_tower(model)
    modules = [] if tower is None else [tower]
    modules += [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def load_vlm(path: str, kwargs: dict, train_vision_tower: bool):
    """The VLM at ``path`` (``from_pretrained`` keyword arguments ``kwargs``) with its vision tower frozen unless
    ``train_vision_tower``."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    name, tower = vision_tower(model)
    if tower is None:
        raise ValueError(
            f"{type(model).__name__} has a vision config but no vision tower named one of {', '.join(TOWER_NAMES)}."
        )
    if not train_vision_tower:
        tower.requires_grad_(False)
    return model


def lora_exclude(model, train_vision_tower: bool) -> str | None:
    """A PEFT ``exclude_modules`` expression that keeps LoRA out of the frozen vision tower, or None."""
    name, tower = vision_tower(model)
    if tower is None or train_vision_tower:
        return None
    return re.escape(name) + r"\..*"
