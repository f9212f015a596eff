"""Sampling: prompts in, completions and their masks out, as a ``Rollout``.

``sample_completions(policy, tokenizer, records, config)`` is the one entry point; generation itself sits behind
``GenerationEngine``, which ``HFGenerate`` (transformers' ``generate``) implements, so a faster engine is a new
class with one method.

Choices, and why:
- Prompts are left-padded and truncated from the left, so the end of a prompt (where the question usually sits
  and where generation continues) is kept; a counted warning says how many were cut.
- Prompts are tokenized without the tokenizer's special tokens (an EOS appended to a prompt would end it), but
  a model whose tokenizer starts every text with BOS gets exactly one BOS per prompt, plain or chat, whether or
  not the chat template writes it, and a cut prompt keeps it.
- An engine receives each distinct prompt once with the group size, so an engine may run a prompt's prefill
  once for its whole group; the rollout holds the prompts repeated, group after group.
- The completion mask keeps the first EOS (the model chose to stop: that choice is scored) and nothing after it.
  It is computed from the first EOS position, so it stays right when the pad token is the EOS token.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lightning_gspo.chat_templates import CHAT_TEMPLATES
from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.vision import is_vision_processor
from lightning_gspo.vision_prompts import record_images


@dataclass
class Rollout:
    """One rank's generation batch: B = prompts x num_generations completions, group after group."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) bool: up to and including the first EOS
    is_truncated: torch.Tensor  # (B,) bool: no EOS within max_completion_length
    advantages: torch.Tensor | None = None  # (B,)
    old_logps: torch.Tensor | None = None  # (B, C) when off-policy
    ref_logps: torch.Tensor | None = None  # (B, C) when beta > 0
    routes: torch.Tensor | None = None  # (B, W, L, k) int16 experts per real token and router (routing.py)
    num_items: torch.Tensor | None = None  # () scored tokens of the generation batch over all ranks
    images: ImageBatch | None = None  # each row's image tensors (a vision-language policy), sliced per row
    texts: dict[str, list[Any]] = field(default_factory=dict)  # prompts, completions: for rewards and logs

    def micro_batch(self, index: int, size: int) -> Rollout:
        """Rows ``index * size`` to ``(index + 1) * size``. Its tensors are views of this rollout's, so rows
        written into the micro-batch's ``old_logps`` land in the rollout."""
        return self.rows(slice(index * size, (index + 1) * size))

    def rows(self, rows: slice | torch.Tensor) -> Rollout:
        """The rollout of the given rows (a slice gives views; an index tensor gives copies)."""
        picked = rows.tolist() if isinstance(rows, torch.Tensor) and self.texts else None
        kw = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value = value[rows]
            elif isinstance(value, ImageBatch):  # patches go by image, not by row (image_batch.py)
                value = value.rows(rows)
            elif f.name == "texts":
                value = {k: v[rows] if picked is None else [v[i] for i in picked] for k, v in value.items()}
            kw[f.name] = value
        return Rollout(**kw)

    @classmethod
    def cat(cls, parts: list[Rollout], pad_token_id: int) -> Rollout:
        """The rows of freshly sampled rollouts (no advantages or log-probs yet) as one, prompts left-padded and
        completions right-padded to the widest part."""
        if any(r.advantages is not None or r.old_logps is not None or r.ref_logps is not None for r in parts):
            raise ValueError("Rollout.cat joins freshly sampled rollouts, before advantages and log-probs.")
        p = max(r.prompt_ids.shape[1] for r in parts)
        c = max(r.completion_ids.shape[1] for r in parts)
        return cls(
            torch.cat([_pad(r.prompt_ids, p, pad_token_id, left=True) for r in parts]),
            torch.cat([_pad(r.prompt_mask, p, 0, left=True) for r in parts]),
            torch.cat([_pad(r.completion_ids, c, pad_token_id, left=False) for r in parts]),
            torch.cat([_pad(r.completion_mask, c, False, left=False) for r in parts]),
            torch.cat([r.is_truncated for r in parts]),
            texts={k: [x for r in parts for x in r.texts[k]] for k in parts[0].texts},
            images=_cat_images(parts),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The whole sequences as the model's forward takes them (prompt, then completion)."""
        inputs = {
            "input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1),
            "attention_mask": torch.cat([self.prompt_mask, self.completion_mask.long()], 1),
        }
        if self.images is not None:  # pixel_values, image_grid_thw, mm_token_type_ids
            inputs.update(self.images.model_inputs(inputs["input_ids"]))
        return inputs

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


def _cat_images(parts: list[Rollout]) -> ImageBatch | None:
    if all(r.images is None for r in parts):
        return None
    if any(r.images is None for r in parts):
        raise ValueError("Rollout.cat joins rollouts that all carry images or none do.")
    return ImageBatch.cat([r.images for r in parts])


def _pad(t: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    fill = t.new_full((t.shape[0], width - t.shape[1]), value)
    return torch.cat([fill, t] if left else [t, fill], 1)


def prompt_text(prompt: Any, tokenizer, chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Plain text stays as it is; a list of chat messages goes through the chat template with the generation
    prompt and ``chat_template_kwargs`` (the config's: gpt-oss's reasoning_effort, Qwen3's enable_thinking)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the prompts are chat messages but the tokenizer has no chat_template (a base model?). Set "
                f"model.chat_template to a Jinja template or one of {', '.join(map(repr, CHAT_TEMPLATES))} "
                "(e.g. model.chat_template=chatml), or give plain-text prompts."
            )
        return tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    raise ValueError(
        f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}: {prompt!r}"
    )


def tokenize_prompts(
    texts: list[str], tokenizer, max_prompt_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids (B, P) and mask (B, P), keeping the last ``max_prompt_length`` tokens; and how many prompts
    were cut. When the tokenizer starts its encodings with BOS, every prompt starts with exactly one: added to
    text that lacks it, not added again where a chat template wrote it, and kept when the prompt is cut."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    if bos is not None:
        encoded = [ids if ids[:1] == [bos] else [bos, *ids] for ids in encoded]
    cut = 0
    if max_prompt_length is not None:
        cut = sum(len(ids) > max_prompt_length for ids in encoded)
        head = [] if bos is None else [bos]
        keep = max_prompt_length - len(head)  # tokens after the BOS
        encoded = [ids if len(ids) <= max_prompt_length else head + ids[len(ids) - keep :] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    if width == 0:
        raise ValueError("every prompt in the batch tokenized to nothing; check the prompt column.")
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask, cut


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts it first in its encodings by default (Llama, Gemma: the model was
    trained that way and degenerates without it), else None (Qwen, SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def completion_mask(
    completion_ids: torch.Tensor,  # (B, C)
    eos_token_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, C) of the tokens up to and including the first EOS, and which rows have no EOS (truncated)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    width = completion_ids.shape[1]
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, width, dtype=torch.long)
    )
    positions = torch.arange(width, device=completion_ids.device)
    return positions.unsqueeze(0) <= first_eos.unsqueeze(1), ~has_eos


def eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token.")
    return sorted(ids)


class GenerationEngine(ABC):
    """Samples completions for prompts. Implementations keep the sampling settings they are built with."""

    @abstractmethod
    def generate(
        self,
        model,
        prompt_ids: torch.Tensor,  # (U, P) left-padded, each distinct prompt once
        prompt_mask: torch.Tensor,  # (U, P)
        num_generations: int,
        images: ImageBatch | None = None,  # each prompt row's images (a vision-language policy), else None
    ) -> torch.Tensor:
        """(U * num_generations, C) completion ids, right-padded, the completions of each prompt together."""


class HFGenerate(GenerationEngine):
    """transformers' ``generate`` with TRL's sampling settings (temperature, top-p/k, min-p, repetition
    penalty, ``generation_kwargs``), or greedy decoding (``greedy=True``: no sampling setting applies, so none
    is passed)."""

    def __init__(self, tokenizer, config, eos: list[int], greedy: bool = False):
        self.kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
        )
        if placeholders := getattr(tokenizer, "placeholder_ids", None):  # a sampled one has no image features
            self.kwargs["suppress_tokens"] = list(placeholders)
        if greedy:
            # Named explicitly, so a model's generation_config cannot switch sampling (or its settings) on.
            self.kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
            return
        self.kwargs.update(
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            repetition_penalty=config.repetition_penalty,
        )
        if config.min_p is not None:
            self.kwargs["min_p"] = config.min_p
        self.kwargs.update(config.generation_kwargs or {})

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, num_generations, images: ImageBatch | None = None):
        prompt_ids = prompt_ids.repeat_interleave(num_generations, 0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, 0)
        extra = {}
        if images is not None:  # each prompt's images, once per completion (image_batch.py)
            rows = torch.arange(len(images)).repeat_interleave(num_generations)
            extra = images.rows(rows).model_inputs(prompt_ids)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **extra, **self.kwargs)
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :]


@torch.no_grad()
def sample_completions(
    policy,
    tokenizer,
    records: list[dict[str, Any]],
    config,
    engine: GenerationEngine,
    eos: list[int],
    device: torch.device | None = None,
    num_generations: int | None = None,
) -> Rollout:
    """``num_generations`` (default ``config.num_generations``) completions of each record's ``prompt``,
    decoded, masked, on the policy's device; ``texts`` holds the prompts and completions (chat messages where
    the prompt is a conversation)."""
    g = num_generations or config.num_generations
    device = device or next(policy.parameters()).device
    prompts = [r["prompt"] for r in records for _ in range(g)]
    images = None
    if is_vision_processor(tokenizer):
        prompt_ids, prompt_mask, images, cut = tokenizer.encode_prompts(
            [r["prompt"] for r in records],
            records,
            config.max_prompt_length,
            lambda p: prompt_text(p, tokenizer, config.chat_template_kwargs),
        )
    else:
        if any(record_images(r) for r in records):
            raise ValueError(
                "the prompt records have images (an 'image'/'images' column) but the policy is a text-only "
                "model; use a vision-language model or drop the image column."
            )
        prompt_ids, prompt_mask, cut = tokenize_prompts(
            [prompt_text(r["prompt"], tokenizer, config.chat_template_kwargs) for r in records],
            tokenizer,
            config.max_prompt_length,
        )
    if cut:
        warnings.warn(
            f"{cut} of {len(records)} prompts were longer than max_prompt_length="
            f"{config.max_prompt_length} tokens and lost their beginning.",
            UserWarning,
            stacklevel=3,
        )
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    if images is not None:
        images = images.to(device)
        completion_ids = engine.generate(policy, prompt_ids, prompt_mask, g, images=images)
    else:
        completion_ids = engine.generate(policy, prompt_ids, prompt_mask, g)
    mask, truncated = completion_mask(completion_ids, eos)
    if config.mask_truncated_completions:
        mask = mask & ~truncated.unsqueeze(1)
    texts = tokenizer.batch_decode(
        torch.where(mask, completion_ids, tokenizer.pad_token_id), skip_special_tokens=True
    )
    completions = [
        [{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)
    ]
    return Rollout(
        prompt_ids.repeat_interleave(g, 0),
        prompt_mask.repeat_interleave(g, 0),
        completion_ids,
        mask,
        truncated,
        texts={"prompts": prompts, "completions": completions},
        images=None if images is None else images.rows(torch.arange(len(records)).repeat_interleave(g)),
    )
