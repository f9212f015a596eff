"""Which rows of a micro-batch carry which images, whether neighbouring rows carry the same ones, and the image
inputs of chosen rows alone: what the shared-prompt forward (``policy_logprobs``) needs to run a vision-language
group's prompt, images included, once.

``per_token_logps`` receives the images as a Qwen2-VL-style forward takes them: ``pixel_values`` holds every row's
images' patches, row after row and image after image (``t * h * w`` patch rows each), and ``image_grid_thw`` one
(t, h, w) per image in the same order; nothing says which row an image belongs to. The token ids say it: an
image of grid (t, h, w) fills ``t * h * w / merge**2`` placeholder tokens (``merge``: the vision config's
``spatial_merge_size``), and a row's images come in the order of its placeholders, so walking the rows'
placeholder counts over the images' token counts gives each row its images. No new model input is needed, so
the mapping ``Rollout.model_inputs`` builds stays what the model's own forward takes.

Choices, and why:
- A prompt is its token ids and its images: two rows with the same text and different pictures must not share.
  Identity is decided on the values (the grids, then the patches), not on where the rows' images came from;
  comparing is one pass over the patches of rows whose ids already match, far less than the vision tower.
- A LLaVA-style forward takes ``pixel_values`` alone, one (3, H, W) row per image, and every image fills the
  same number of ``image_token_id`` placeholders: a row's placeholder count over that number is its images.
- Only these two layouts are recognised; any other input (videos, tiles with pixel masks, another family's
  tensors) or counts that do not add up leave the micro-batch to the per-completion forward, which takes the
  inputs as they are and reports what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

SHAREABLE_INPUTS = frozenset({"pixel_values", "image_grid_thw", "mm_token_type_ids"})


class RowImages(NamedTuple):
    spans: list[tuple[int, int]]  # for each row, its images as (first, end) in the order of the image inputs
    patch_offsets: list[int]  # where each image's rows start in pixel_values, and (last) their total
    grid: bool = True  # Qwen2-VL-style (patches + image_grid_thw); False: one pixel_values row per image


def row_images(config, inputs: Mapping[str, torch.Tensor], input_ids: torch.Tensor) -> RowImages | None:
    """Each row's images in ``inputs`` (the extra model inputs: ``mm_token_type_ids`` (B, T), ``pixel_values``,
    ``image_grid_thw``; or ``pixel_values`` alone for a LLaVA-style model) given the rows' ``input_ids`` (B, T),
    or None when they are not a layout recognised here or their counts do not add up."""
    if set(inputs) == {"pixel_values"}:
        return _fixed_token_images(config, inputs["pixel_values"], input_ids)
    if not set(inputs) <= SHAREABLE_INPUTS or "mm_token_type_ids" not in inputs:
        return None
    per_row = (inputs["mm_token_type_ids"] == 1).sum(1).tolist()  # image placeholders of each row
    grid, pixels = inputs.get("image_grid_thw"), inputs.get("pixel_values")
    if grid is None or pixels is None:  # text-only rows (3-D positions, no image): nothing to tell apart
        text_only = grid is None and pixels is None and not any(per_row)
        return RowImages([(0, 0)] * len(per_row), [0]) if text_only else None
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
    if not merge:
        return None
    sizes = grid.prod(-1).tolist()
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + int(s))
    spans, image = [], 0
    for tokens in per_row:
        start = image
        while tokens > 0 and image < len(sizes):
            tokens -= int(sizes[image]) // merge**2
            image += 1
        if tokens != 0:  # a row's placeholders end inside an image, or images run out
            return None
        spans.append((start, image))
    if image != len(sizes) or offsets[-1] != pixels.shape[0]:
        return None
    return RowImages(spans, offsets)


def _fixed_token_images(config, pixels: torch.Tensor, input_ids: torch.Tensor) -> RowImages | None:
    """A LLaVA-style layout: one ``pixels`` row per image, each filling the same number of placeholders."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None or pixels.dim() != 4 or pixels.shape[0] == 0:
        return None
    per_row = (input_ids == token).sum(1).tolist()
    total = sum(per_row)
    if total % pixels.shape[0]:
        return None
    each = total // pixels.shape[0]
    if any(n % each for n in per_row):
        return None
    spans, image = [], 0
    for n in per_row:
        spans.append((image, image + n // each))
        image += n // each
    return RowImages(spans, list(range(pixels.shape[0] + 1)), grid=False)


def same_images(
    rows: RowImages, inputs: Mapping[str, torch.Tensor], candidates: torch.Tensor
) -> torch.Tensor:
    """(B - 1,) bool: row i + 1 carries the same images as row i (same grids, equal patches), checked only where
    ``candidates`` (B - 1,) bool is True (neighbours whose prompt ids already match); False elsewhere."""
    out = [False] * (len(rows.spans) - 1)
    grid, pixels, at = inputs.get("image_grid_thw"), inputs.get("pixel_values"), rows.patch_offsets
    for i in candidates.nonzero().flatten().tolist():
        (a, a_end), (b, b_end) = rows.spans[i], rows.spans[i + 1]
        if a_end - a != b_end - b:
            continue
        if a == a_end:  # neither has an image
            out[i] = True
            continue
        same_grid = not rows.grid or torch.equal(grid[a:a_end], grid[b:b_end])
        out[i] = same_grid and torch.equal(pixels[at[a] : at[a_end]], pixels[at[b] : at[b_end]])
    return candidates.new_tensor(out, dtype=torch.bool)


def images_of(
    rows: RowImages, inputs: Mapping[str, torch.Tensor], picked: list[int]
) -> dict[str, torch.Tensor]:
    """``pixel_values`` and (grid layout) ``image_grid_thw`` of the ``picked`` rows alone, in their order ({} when
    they have no image). One row's images are a view of the patches; several rows' are joined (the rows a forward runs)."""
    spans = [rows.spans[i] for i in picked if rows.spans[i][0] < rows.spans[i][1]]
    if not spans:
        return {}
    at = rows.patch_offsets
    pixels = [inputs["pixel_values"][at[a] : at[b]] for a, b in spans]
    if not rows.grid:
        return {"pixel_values": pixels[0] if len(pixels) == 1 else torch.cat(pixels)}
    grids = [inputs["image_grid_thw"][a:b] for a, b in spans]
    return {
        "pixel_values": pixels[0] if len(pixels) == 1 else torch.cat(pixels),
        "image_grid_thw": grids[0] if len(grids) == 1 else torch.cat(grids),
    }
