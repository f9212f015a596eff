"""Position ids for a policy forward: 1-D from the attention mask for a text model, the model's own 3-D
(temporal, height, width) rotary positions for a Qwen2-VL-style vision-language model.

A text model's positions are the running count of real tokens, so left-padded rows see the positions they were
generated with. A Qwen2-VL / Qwen2.5-VL model gives the image tokens 2-D grid positions and lets the text after
an image continue from the grid's extent (``get_rope_index``), so positions from the mask would be wrong after the
first image. Here the model's own ``get_rope_index`` computes them from the token ids, the modality of each token
(``mm_token_type_ids``) and the image grids, once for the whole sequence: the fused and the materialised path
then run with the same positions, and the shared-prompt forward slices them, the prompt's for the one prompt run
and the completion's for the completions that attend to it (both sliced from the whole sequences' positions, so
the completions continue from the grid's extent as they would in one forward).
"""

from __future__ import annotations

import torch


def position_ids_for(
    model,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    extra: dict[str, torch.Tensor],  # the other model inputs: image tensors, mm_token_type_ids (B, T), ...
) -> torch.Tensor:
    """(B, T) positions from the mask, or (3, B, T) when ``extra`` holds ``mm_token_type_ids`` (a VLM)."""
    if "mm_token_type_ids" not in extra:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    rope_index = _rope_index(model)
    if rope_index is None:
        raise ValueError(
            f"{type(model).__name__} has no get_rope_index, so the 3-D positions of its image tokens cannot be "
            "computed; only Qwen2-VL-style models take mm_token_type_ids."
        )
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    positions, _ = rope_index(
        input_ids=input_ids,
        mm_token_type_ids=extra["mm_token_type_ids"],
        attention_mask=attention_mask,
        **{k: extra[k] for k in keys if k in extra},
    )
    return positions


def _rope_index(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (lm, getattr(lm, getattr(lm, "base_model_prefix", ""), None)):
        if owner is not None and hasattr(owner, "get_rope_index"):
            return owner.get_rope_index
    return None
