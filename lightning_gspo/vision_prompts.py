"""Prompts with images: reading a record's images, placing them in its chat messages, checking a dataset before
training, and encoding a batch of prompts into left-padded ids and an ``ImageBatch``.

A record's images come from an ``images`` column (a list per row, possibly empty) or an ``image`` column (one per
row, possibly None), as TRL reads them. Each image may be a PIL image, a file path, raw bytes, or what a
``datasets`` ``Image`` feature stores (``{'bytes': ..., 'path': ...}``).

Choices, and why:
- Placement follows TRL 1.16 (``prepare_multimodal_messages``): when every message's content is a string, the
  images go before the text of the first user message; when the messages already hold ``{'type': 'image'}``
  blocks, those blocks take the images in order, and their number must equal the images'. Rendering then relies
  on the chat template turning each image block into the model's placeholder.
- Images need chat messages: a plain-text prompt says nothing about where an image goes (TRL refuses it too).
- Bad input is refused before the first step, naming the row: images for a text-only model, an image that cannot
  be opened, image blocks without images, more images than image blocks.
- A prompt longer than ``max_prompt_length`` is cut from the left as a text prompt is, unless the cut would
  remove image placeholder tokens: the model would then receive features it has no place for, so that is an
  error saying how long the prompt is.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.vision import is_vision_processor

IMAGE_COLUMNS = ("images", "image")


def record_images(record: dict[str, Any]) -> list:
    """The images of one dataset row, as given (not opened), [] when it has none."""
    if "images" in record:
        value = record["images"]
        return [] if value is None else list(value)
    value = record.get("image")
    return [] if value is None else [value]


def open_image(value: Any, where: str):
    """A PIL image (RGB) from a PIL image, a path, bytes or a ``datasets`` Image dict; ``where`` names the row."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            source = value.get("bytes")
            image = Image.open(io.BytesIO(source) if source else value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        else:
            raise TypeError(
                f"expected a PIL image, a file path, bytes or an Image feature, got {type(value).__name__}"
            )
        return image.convert("RGB")
    except (OSError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: the image cannot be opened ({err}).") from err


def has_image_blocks(messages: list[dict[str, Any]]) -> int:
    """How many ``{'type': 'image'}`` blocks the messages hold."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def place_images(messages: list[dict[str, Any]], count: int, where: str) -> list[dict[str, Any]]:
    """The messages with ``count`` image blocks in place (see the module notes); the input is not modified."""
    blocks = has_image_blocks(messages)
    if blocks == 0 and count > 0:
        for i, m in enumerate(messages):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                content = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": m["content"]}]
                return [*messages[:i], {**m, "content": content}, *messages[i + 1 :]]
        raise ValueError(f"{where}: {count} image(s) but no user message with text content to put them in.")
    if blocks != count:
        raise ValueError(
            f"{where}: the prompt has {blocks} image block(s) ({{'type': 'image'}}) for {count} image(s); give "
            "one image per block, or string contents and the images are put before the first user message."
        )
    return messages


def check_records(records, processor, placeholder: str | None = None, limit: int | None = None) -> None:
    """Refuse, before training, the bad inputs of the module notes; ``records`` is a dataset or a list of rows;
    ``processor`` is the policy's tokenizer or ``VisionProcessor``. Opens every image (headers only)."""
    vision = is_vision_processor(processor)
    placeholder = placeholder or getattr(processor, "image_token", "<|image_pad|>")
    for i, record in enumerate(records):
        if limit is not None and i >= limit:
            break
        where = f"row {i} of the prompt dataset"
        images = record_images(record)
        prompt = record.get("prompt")
        if images and not vision:
            raise ValueError(
                f"{where} has images (the 'image'/'images' column) but the policy is a text-only model; use a "
                "vision-language model (e.g. model=tiny-vlm) or drop the image column."
            )
        if images and not isinstance(prompt, list):
            raise ValueError(
                f"{where} has images but a plain-text prompt; images need conversational prompts (a list of "
                "{'role': ..., 'content': ...} messages) so the chat template can place them."
            )
        if isinstance(prompt, list):
            if has_image_blocks(prompt) and not images:
                raise ValueError(f"{where}: the prompt has image blocks but the row has no image.")
            if images:
                place_images(prompt, len(images), where)
        elif isinstance(prompt, str) and placeholder in prompt:
            raise ValueError(
                f"{where}: the prompt text holds the image placeholder {placeholder} but no image."
            )
        for image in images:
            open_image(image, where)


def check_image_rows(dataset, processor) -> None:
    """``check_records`` over a ``datasets.Dataset`` when images can be involved: it has an image column, or the
    policy takes images (whose prompts may name placeholders). A text dataset for a text model is not read."""
    columns = getattr(dataset, "column_names", None) or []
    if is_vision_processor(processor) or any(c in columns for c in IMAGE_COLUMNS):
        check_records(dataset, processor)


def encode_prompts(
    processor, prompts: list[Any], records: list[dict[str, Any]], max_prompt_length: int | None, render
) -> tuple[torch.Tensor, torch.Tensor, ImageBatch | None, int]:
    """Left-padded prompt ids (U, P), mask (U, P), the prompts' ``ImageBatch`` (one row per prompt; None when
    no prompt has an image) and how many prompts were cut. ``render(messages)`` applies the chat template."""
    from lightning_gspo.rollout import leading_bos

    encoded, pixels, grids, row_images = [], [], [], []
    stored = 0
    for i, (prompt, record) in enumerate(zip(prompts, records)):
        where = f"prompt {i} of the batch ({str(prompt)[:80]!r})"
        raw = record_images(record)
        if raw and not isinstance(prompt, list):
            raise ValueError(f"{where} has images but is plain text; images need conversational prompts.")
        images = [open_image(x, where) for x in raw]
        text = render(place_images(prompt, len(images), where) if images else prompt)
        ids, pv, grid = processor.encode(text, images)
        if pv is not None:
            pixels.append(pv)
            if grid is not None:  # the grid layout; the fixed one has a pixel_values row per image
                grids.append(grid.long())
            row_images.append(list(range(stored, stored + len(images))))
            stored += len(images)
        else:
            row_images.append([])
        encoded.append(ids)
    bos = leading_bos(processor)
    if bos is not None:
        encoded = [ids if ids[:1] == [bos] else [bos, *ids] for ids in encoded]
    cut = 0
    if max_prompt_length is not None:
        special = set(processor.placeholder_ids)
        for i, ids in enumerate(encoded):
            if len(ids) <= max_prompt_length:
                continue
            head = [] if bos is None else [bos]
            dropped = ids[len(head) : len(ids) - (max_prompt_length - len(head))]
            if special.intersection(dropped):
                raise ValueError(
                    f"prompt {i} of the batch is {len(ids)} tokens with its images, over max_prompt_length="
                    f"{max_prompt_length}, and cutting it would remove image tokens. Raise max_prompt_length "
                    "or lower model.max_pixels (fewer tokens per image)."
                )
            encoded[i] = head + ids[len(ids) - (max_prompt_length - len(head)) :]
            cut += 1
    width = max(len(ids) for ids in encoded)
    ids_t = torch.full((len(encoded), width), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids_t[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    batch = None
    if pixels:
        batch = ImageBatch(
            torch.cat(pixels),
            torch.cat(grids) if grids else None,
            row_images,
            processor.image_token_id,
            processor.video_token_id,
        )
    return ids_t, mask, batch, cut
