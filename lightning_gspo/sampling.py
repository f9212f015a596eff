"""One next token per row from a language model's last-position logits, as transformers' ``generate`` picks it.

``SamplingSettings`` holds what ``HFGenerate`` passes to ``generate`` (temperature, top-k, top-p, min-p,
repetition penalty, or greedy decoding); ``process_logits`` applies them in the order transformers' logits-processor
chain does (``GenerationMixin._get_logits_processor``: repetition penalty, then temperature, top-k, top-p, min-p),
with the same arithmetic, so the distribution each step samples from is the one ``generate`` samples from.

Choices, and why:
- The draw is inverse-CDF sampling with one uniform number per row and step, ``token = #{i : cdf_i <= u * total}``
  over the float64 running sum of the row's probabilities. It is an exact sample of the float32 probabilities
  (a token of probability 0 is never drawn), and a row's token depends only on its own probabilities and its own
  number: a decode loop that drops finished rows, or shares a prompt's prefill among its group, draws the same
  tokens as one that does neither. Drawing every row's numbers up front costs one call, not one per step.
- float64 for the running sum: in float32 the sum of a 50k-token vocabulary rounds each step by up to ~6e-8,
  which would move a rare token's share by a visible fraction.
- The repetition penalty reads a (rows, vocab) table of the tokens seen so far (the prompt without its left
  padding, then each generated token), which is what transformers' processor builds from ``input_ids`` and the
  prompt's padding length at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FILTER_VALUE = -float("inf")
# generation_kwargs keys this sampler honours (they override the config's fields, as they do for generate).
SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen; each setting at its neutral value is left out of the chain, as in
    transformers (temperature 1, top_k 0, top_p 1, min_p None, repetition_penalty 1)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    greedy: bool = False
    min_tokens_to_keep: int = 1

    @classmethod
    def from_config(cls, config: Any, greedy: bool = False) -> SamplingSettings:
        """The settings ``HFGenerate`` gives ``generate`` for ``config``: greedy applies none of them."""
        if greedy:
            return cls(greedy=True)
        values = {k: getattr(config, k) for k in SAMPLING_KWARGS}
        values.update({k: v for k, v in (config.generation_kwargs or {}).items() if k in SAMPLING_KWARGS})
        return cls(**values)

    @property
    def penalises_repeats(self) -> bool:
        return not self.greedy and self.repetition_penalty != 1.0


def seen_tokens(
    ids: torch.Tensor,  # (B, P) left-padded
    mask: torch.Tensor,  # (B, P)
    vocab_size: int,
) -> torch.Tensor:
    """(B, V) bool: the tokens each row holds after its left padding. As transformers does, the padding length is
    the position of the first unmasked token, and ids beyond the vocabulary are ignored."""
    padding = (mask != 0).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    ids = ids.masked_fill(positions[None, :] < padding[:, None], vocab_size).clamp(max=vocab_size)
    seen = torch.zeros((ids.shape[0], vocab_size + 1), dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def repetition_penalty(
    scores: torch.Tensor,  # (B, V)
    seen: torch.Tensor,  # (B, V) bool
    penalty: float,
) -> torch.Tensor:
    """Seen tokens' logits divided by ``penalty`` where positive, multiplied where negative (CTRL's rule)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the logits at least as large as the k-th largest (ties at the k-th all stay)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], FILTER_VALUE)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop the least likely tokens whose cumulated probability stays within ``1 - top_p``."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = 0
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), FILTER_VALUE)


def min_p_filter(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    return scores.masked_fill(remove.scatter_(-1, keep, False), FILTER_VALUE)


def process_logits(
    logits: torch.Tensor,  # (B, V) float32
    settings: SamplingSettings,
    seen: torch.Tensor | None = None,  # (B, V) bool, when the repetition penalty applies
) -> torch.Tensor:
    """The scores transformers' processor chain makes of ``logits`` (filtered tokens at -inf)."""
    s, scores = settings, logits
    if s.greedy:
        return scores
    if s.penalises_repeats:
        scores = repetition_penalty(scores, seen, s.repetition_penalty)
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
    if s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    if s.min_p is not None:
        scores = min_p_filter(scores, s.min_p, s.min_tokens_to_keep)
    return scores


def inverse_cdf_sample(
    probs: torch.Tensor,  # (B, V)
    uniforms: torch.Tensor,  # (B,) in [0, 1)
) -> torch.Tensor:
    """(B,) token ids: for each row the first token whose float64 running sum exceeds ``u * total``."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # u * total can round up to total when u is within 2^-53 of 1; below it a token of positive mass always follows.
    x = torch.minimum(uniforms.double().unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def next_tokens(
    logits: torch.Tensor,  # (B, V)
    settings: SamplingSettings,
    uniforms: torch.Tensor | None,  # (B,) when sampling
    seen: torch.Tensor | None = None,  # (B, V) bool
) -> torch.Tensor:
    """(B,) the next token of each row: the argmax when greedy, else a draw from the processed distribution."""
    scores = process_logits(logits.float(), settings, seen)
    if settings.greedy:
        return scores.argmax(dim=-1)
    return inverse_cdf_sample(torch.softmax(scores, dim=-1), uniforms)
