"""``ImageBatch``: the image tensors of a rollout's rows, sliced per row the way the model needs them.

An image is some rows of ``pixel_values``: a Qwen2-VL-style image is its ``t * h * w`` patch rows, described by a
row of ``image_grid_thw``; a LLaVA-style image (resized to one fixed size, a fixed number of image tokens) is one
(3, H, W) row, and there is no grid (``image_grid_thw`` is None).

A Qwen2-VL / Qwen2.5-VL processor returns ``pixel_values`` as every image's patches concatenated, image after
image ((sum_i t_i * h_i * w_i, D)), and ``image_grid_thw`` with one (t, h, w) row per image. Neither has a row per
sample, so taking "rows 4 to 8" of them by indexing the first dimension picks the wrong patches (the bug TRL
fixed in #6274). Here each distinct image's patches are stored once and every row keeps the list of its
images; a row selection keeps the lists of the chosen rows, and ``model_inputs`` concatenates exactly their
patches in row order, each image's ``t * h * w`` rows, with one grid row per image.

Choices, and why:
- A group's G completions share their prompt's images: the patches are stored once per prompt, not G times.
  ``model_inputs`` still lists each row's images (the model's forward takes one image list per row); the fused
  log-prob path then runs each distinct prompt's images once (``shared_images``, ``policy_logprobs``).
- ``mm_token_type_ids`` (text 0, image 1, video 2), which Qwen2.5-VL's ``get_rope_index`` reads to place its
  3-D positions, is derived from the token ids when the inputs are built, so it always matches the sequence it
  describes (prompt and completion), whatever padding or slicing came before. Only the grid layout's models take
  it: LLaVA-style models get ``pixel_values`` alone and 1-D positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # (N, D) the patches of every stored image, image after image; or (M, 3, H, W)
    image_grid_thw: torch.Tensor | None  # (M, 3) long: one (t, h, w) per stored image; None: a row per image
    row_images: list[list[int]]  # for each row, the indices (into the stored images) of its images, in order
    image_token_id: int
    video_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.image_grid_thw is None:
            return
        patches = int(self.image_grid_thw.prod(-1).sum()) if self.image_grid_thw.numel() else 0
        if patches != self.pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values has {self.pixel_values.shape[0]} patches but image_grid_thw describes {patches}."
            )

    @property
    def num_images(self) -> int:
        """How many images are stored."""
        grid = self.image_grid_thw
        return self.pixel_values.shape[0] if grid is None else grid.shape[0]

    @property
    def offsets(self) -> list[int]:
        """Where each stored image's rows start in ``pixel_values``, and (last) their total."""
        grid = self.image_grid_thw
        sizes = [1] * self.pixel_values.shape[0] if grid is None else grid.prod(-1).tolist()
        out = [0]
        for s in sizes:
            out.append(out[-1] + int(s))
        return out

    def __len__(self) -> int:
        return len(self.row_images)

    def rows(self, rows: slice | torch.Tensor | list[int]) -> ImageBatch:
        """The image batch of the given rows (the stored images are shared, not copied)."""
        if isinstance(rows, slice):
            picked = self.row_images[rows]
        else:
            index = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
            picked = [self.row_images[i] for i in index]
        return ImageBatch(
            self.pixel_values, self.image_grid_thw, picked, self.image_token_id, self.video_token_id
        )

    def to(self, device: torch.device) -> ImageBatch:
        grid = self.image_grid_thw
        return ImageBatch(
            self.pixel_values.to(device),
            None if grid is None else grid.to(device),
            self.row_images,
            self.image_token_id,
            self.video_token_id,
        )

    def model_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:  # input_ids (B, T)
        """``pixel_values`` (the rows of every row's images, row after row) and, for the grid layout,
        ``image_grid_thw`` (one per image, same order) and ``mm_token_type_ids`` (B, T) for the rows' token ids;
        rows without images give only the last (grid layout) or nothing."""
        if input_ids.shape[0] != len(self.row_images):
            raise ValueError(
                f"{input_ids.shape[0]} rows of token ids for {len(self.row_images)} rows of images."
            )
        order = [i for row in self.row_images for i in row]
        if self.image_grid_thw is None:  # one row per image: no grid, 1-D positions
            return {"pixel_values": self.pixel_values[order]} if order else {}
        starts = self.offsets
        pieces = [self.pixel_values[starts[i] : starts[i + 1]] for i in order]
        types = (input_ids == self.image_token_id).int()
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).int()
        if not order:  # rows without images: text positions only, no vision tower call
            return {"mm_token_type_ids": types}
        return {
            "pixel_values": torch.cat(pieces),
            "image_grid_thw": self.image_grid_thw[order],
            "mm_token_type_ids": types,
        }

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it (on the CPU); ``from_state`` rebuilds it."""
        return {
            "pixel_values": self.pixel_values.cpu(),
            "image_grid_thw": None if self.image_grid_thw is None else self.image_grid_thw.cpu(),
            "row_images": self.row_images,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
        }

    @classmethod
    def from_state(cls, state: dict) -> ImageBatch:
        return cls(**state)

    @classmethod
    def cat(cls, parts: list[ImageBatch]) -> ImageBatch:
        """The rows of several image batches, in order."""
        grids = [p.image_grid_thw for p in parts]
        if len({g is None for g in grids}) > 1:
            raise ValueError("ImageBatch.cat joins batches of one layout: all with image_grid_thw or none.")
        rows, base = [], 0
        for p in parts:
            rows += [[base + i for i in row] for row in p.row_images]
            base += p.num_images
        return cls(
            torch.cat([p.pixel_values for p in parts]),
            None if grids[0] is None else torch.cat(grids),
            rows,
            parts[0].image_token_id,
            parts[0].video_token_id,
        )
