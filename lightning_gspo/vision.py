"""A vision-language model's processor, with or without torchvision: ``load_processor`` and ``VisionProcessor``.

Two image layouts are supported: Qwen2-VL / Qwen2.5-VL (patch rows and a grid per image, a number of image tokens
that grows with the image) and LLaVA (every image resized and cropped to one size, a fixed number of image
tokens, ``pixel_values`` of shape (images, 3, H, W)). LLaVA's processor builds without torchvision; the
composition below covers it too, for a processor that cannot be built.

transformers' processors for Qwen2-VL / Qwen2.5-VL insist on a video processor, which needs torchvision; PyPI's
torchvision is a CUDA build that does not load beside the CPU build of torch, so on a CPU-only machine
``AutoProcessor`` cannot be built. The image processor has a PIL backend (``Qwen2VLImageProcessorPil``) that
needs nothing more. ``VisionProcessor`` therefore takes one of two paths, with the same results:
- the model's own processor when it can be built (torchvision installed, as on a GPU machine);
- otherwise the PIL image processor and the tokenizer, composed here: each image placeholder in the rendered
  prompt (``<|image_pad|>``) is widened to one token per merged patch, ``t * h * w / merge_size**2`` as the
  image processor's grid says, then the text is tokenized. That is what the processor does; the tests compare
  the two (``tests/test_vlm.py``). For the fixed layout each ``<image>`` placeholder is widened to the model
  config's ``image_seq_length`` tokens (``tests/test_vlm_llava.py`` compares it with LLaVA's processor).

Choices, and why:
- ``VisionProcessor`` stands in for the tokenizer everywhere the trainer uses one (pad and EOS ids, decoding,
  the chat template): the text-only code keeps working unchanged, and a ``VisionProcessor`` is how the rest of
  the code knows the policy takes images.
- Image size is bounded by the image processor's ``max_pixels`` (its ``size['longest_edge']``), which
  ``ModelConfig.max_pixels`` overrides: the number of image tokens grows with the pixel count, and a few large
  images would otherwise dominate a prompt's length.
- The image and video placeholder ids are reported (``placeholder_ids``) so sampling can forbid them: a sampled
  placeholder would ask the model for image features that do not exist.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def is_vision_config(config) -> bool:
    """Whether a model config describes a vision-language model (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_processor(tokenizer) -> bool:
    """Whether a policy's tokenizer is a ``VisionProcessor``: the one test of "this policy takes images"."""
    return isinstance(tokenizer, VisionProcessor)


class VisionProcessor:
    """The tokenizer (every attribute not defined here is the tokenizer's), plus ``encode`` for prompts with
    images.

    Args:
    tokenizer: the model's tokenizer, set up as ``models.load_tokenizer`` sets it (left padding, pad token).
    image_processor: the image processor (the processor's, or the PIL backend's).
    processor: the model's own processor when it could be built; None composes the two above.
    image_token: the placeholder token when the processor does not name it (default Qwen2-VL's).
    tokens_per_image: the fixed number of tokens an image takes when the image processor gives no grid (LLaVA's
        ``image_seq_length``); None for the grid layout.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        processor=None,
        image_token: str | None = None,
        tokens_per_image: int | None = None,
    ):
        self.__dict__.update(tokenizer=tokenizer, image_processor=image_processor, processor=processor)
        self.image_token = getattr(processor, "image_token", None) or image_token or IMAGE_TOKEN
        self.image_token_id = _token_id(tokenizer, self.image_token)
        if self.image_token_id is None:
            raise ValueError(
                f"the tokenizer has no {self.image_token!r} token, which the image processor's output is "
                "placed at; is this a Qwen2-VL- or LLaVA-style model?"
            )
        self.tokens_per_image = tokens_per_image
        self.video_token_id = _token_id(tokenizer, getattr(processor, "video_token", None) or VIDEO_TOKEN)
        self.merge_size = int(getattr(image_processor, "merge_size", 1))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Settings such as padding_side or chat_template belong to the tokenizer, as on a bare tokenizer.
        if name in self.__dict__ or name in (
            "image_token",
            "image_token_id",
            "video_token_id",
            "merge_size",
            "tokens_per_image",
        ):
            self.__dict__[name] = value
        else:
            setattr(self.tokenizer, name, value)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def save_pretrained(self, path, **kwargs):
        """Write what loads the processor back: the model's own processor's files where it was built (tokenizer,
        chat template, image and video processor configs); otherwise the tokenizer (with its chat template) and
        the image processor's config, the files a model directory holds, from which ``load_processor`` composes
        it again and ``AutoProcessor.from_pretrained`` builds it where torchvision is present. The image size
        cap (``max_pixels``) in use is saved with it. The image processor's own config is written either way, so a
        machine without torchvision composes the processor from what one with it exported."""
        owner = self.tokenizer if self.processor is None else self.processor
        files = owner.save_pretrained(path, **kwargs)
        self.image_processor.save_pretrained(path)
        return files

    @property
    def placeholder_ids(self) -> list[int]:
        """Token ids that stand for image or video features: never sampled."""
        return [i for i in (self.image_token_id, self.video_token_id) if i is not None]

    @property
    def max_pixels(self) -> int | None:
        size = getattr(self.image_processor, "size", None)
        return _size_get(size, "longest_edge")

    def encode(self, text: str, images: list) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """(token ids, pixel_values or None, image_grid_thw (M, 3) or None) of one rendered prompt whose
        ``len(images)`` image placeholders (one ``image_token`` each) take the images in order; pixel_values is
        (N, D) patch rows with a grid, or (M, 3, H, W) without (the fixed layout, ``image_batch.py``). No special
        tokens are added: the chat template wrote them."""
        found = text.count(self.image_token)
        if found != len(images):
            raise ValueError(
                f"the rendered prompt has {found} image placeholder(s) ({self.image_token}) for {len(images)} "
                f"image(s): {text[:200]!r}"
            )
        if not images:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], None, None
        if self.processor is not None:
            out = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
            return out["input_ids"][0].tolist(), out["pixel_values"], out.get("image_grid_thw")
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out.get("image_grid_thw")
        if grid is None and self.tokens_per_image is None:
            raise ValueError(
                "the image processor gives no image_grid_thw and the model config no image_seq_length: how many "
                "tokens an image takes is unknown; install torchvision so the model's own processor is used."
            )
        counts = [self.tokens_per_image] * len(images) if grid is None else grid.prod(-1).tolist()
        pieces = text.split(self.image_token)
        widened = pieces[0]
        for n, piece in zip(counts, pieces[1:]):
            widened += self.image_token * (int(n) // (1 if grid is None else self.merge_size**2)) + piece
        ids = self.tokenizer(widened, add_special_tokens=False)["input_ids"]
        return ids, out["pixel_values"], grid

    def encode_prompts(
        self, prompts: list, records: list[dict[str, Any]], max_prompt_length: int | None, render
    ):
        """Left-padded ids (U, P), mask (U, P), ``ImageBatch`` or None, prompts cut (``vision_prompts``)."""
        from lightning_gspo.vision_prompts import encode_prompts

        return encode_prompts(self, prompts, records, max_prompt_length, render)


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == getattr(tokenizer, "unk_token_id", None) else int(tid)


def _size_get(size, key: str):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def load_processor(path: str, tokenizer, max_pixels: int | None = None, trust_remote_code: bool = False):
    """The ``VisionProcessor`` of the model at ``path``: its own processor where it can be built (torchvision
    present, or a family whose processor does not need it: LLaVA), else its image processor's PIL backend composed
    with ``tokenizer``."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    processor = None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as err:
        log.info(
            "composing the image processor and tokenizer: the model's processor cannot be built (%s)", err
        )
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        processor.tokenizer = tokenizer  # the one the trainer set up (padding side, chat template)
        image_processor = processor.image_processor
    else:
        processor = None
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if max_pixels is not None:
        set_max_pixels(image_processor, max_pixels)
    # The fixed layout's placeholder and token count, for the composed path (the processor knows its own). An
    # exported adapter's directory has no model config: the grid layout's defaults apply (a LLaVA adapter's
    # directory holds LLaVA's own processor files, which AutoProcessor builds above).
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        config = None
    image_token_id = getattr(config, "image_token_id", None)
    image_token = None if image_token_id is None else tokenizer.convert_ids_to_tokens(int(image_token_id))
    seq_length = getattr(config, "image_seq_length", None)
    return VisionProcessor(tokenizer, image_processor, processor, image_token, seq_length)


def set_max_pixels(image_processor, max_pixels: int) -> None:
    """Cap the resized images at ``max_pixels`` pixels (both image-processor backends read ``size``)."""
    size = image_processor.size
    if _size_get(size, "longest_edge") is None and getattr(image_processor, "max_pixels", None) is None:
        raise ValueError(
            f"model.max_pixels={max_pixels}: this model's image processor resizes every image to one size "
            f"({type(image_processor).__name__}, size={size}), so the pixel count is fixed; leave "
            "model.max_pixels unset."
        )
    lowest = _size_get(size, "shortest_edge") or 0
    if max_pixels < lowest:
        raise ValueError(
            f"model.max_pixels={max_pixels} is below the image processor's minimum ({lowest} pixels); raise it."
        )
    if isinstance(size, dict):
        image_processor.size = {**size, "longest_edge": max_pixels}
    else:
        size.longest_edge = max_pixels
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = max_pixels
