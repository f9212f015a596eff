"""TRL's metrics of a policy-loss call, named as TRL names them, from quantities both implementations produce.

- The clipped surrogate's loss types log ``clip_ratio/*``: the share of tokens (token level) or sequences
  (sequence levels) whose ratio was clipped low (below 1 - epsilon_low with A < 0), high (above
  1 + epsilon_high with A > 0), or either, and the smallest low and largest high share of any one sequence.
- cispo logs ``cispo_clip_ratio``, the share whose weight was clipped (above epsilon_high with A > 0); vespo
  logs ``vespo/phi_seq_mean``, the mean of its per-sequence weights; sapo logs no ratio metric.
- ``kl``, when beta > 0, is the mean of the per-token KL term (ratio-weighted when bias-corrected) over scored
  tokens at every level.

Per-row minima and maxima skip rows with no scored token at token level (0/0) and count them, unclipped, at
sequence levels, as TRL's NaN-aware reductions do; all without a host synchronisation.
"""

from __future__ import annotations

import torch


def finish_metrics(
    low: torch.Tensor,  # (B,) clipped-low count per row (tokens; 0/1 at sequence levels)
    high: torch.Tensor,  # (B,)
    region: torch.Tensor,  # (B,)
    kl_sum: torch.Tensor | None,  # (B,) masked sum of the per-token KL term, or None when beta = 0
    lengths: torch.Tensor,  # (B,) scored tokens per row
    level: str,
) -> dict[str, torch.Tensor]:
    """TRL's clip metrics from per-row counts: token level counts tokens, sequence levels count sequences."""
    lengths = lengths.to(low.dtype)
    if level == "token":
        count = lengths.sum().clamp(min=1)
        per_row = lambda x: x / lengths  # NaN for empty rows, skipped by the nan-min/max below
    else:
        count = torch.tensor(float(max(low.shape[0], 1)), dtype=low.dtype, device=low.device)
        per_row = lambda x: x
    metrics = {
        "clip_ratio/low_mean": low.sum() / count,
        "clip_ratio/high_mean": high.sum() / count,
        "clip_ratio/region_mean": region.sum() / count,
        "clip_ratio/low_min": _nan_reduce(per_row(low), torch.min),
        "clip_ratio/high_max": _nan_reduce(per_row(high), torch.max),
    }
    if kl_sum is not None:
        metrics["kl"] = kl_sum.sum() / lengths.sum().clamp(min=1)
    return {k: v.detach().float() for k, v in metrics.items()}


def _nan_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """min or max ignoring NaN, NaN when nothing is left; no host synchronisation."""
    fill = float("inf") if op is torch.min else float("-inf")
    out = op(torch.where(torch.isnan(x), torch.full_like(x, fill), x)) if x.numel() else x.new_tensor(fill)
    return torch.where(torch.isinf(out) & (out == fill), torch.full_like(out, float("nan")), out)


def _kl_sums(kl: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """(B,) masked row sums of the per-token KL term ((B, T)), or None without one."""
    if kl is None:
        return None
    return torch.where(mask, kl.expand_as(mask), torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)


@torch.no_grad()
def clip_metrics(
    coef_1: torch.Tensor,  # (B, T), or (B, 1) at sequence level: the importance ratios
    adv: torch.Tensor,  # (B, 1)
    mask: torch.Tensor,  # (B, T) bool
    lengths: torch.Tensor,  # (B,)
    kl: torch.Tensor | None,  # (B, T) per-token KL term, or None
    spec,
) -> dict[str, torch.Tensor]:
    """``clip_ratio/*`` (and ``kl``) of the clipped surrogate."""
    is_low = (coef_1 < 1 - spec.epsilon_low) & (adv < 0)
    is_high = (coef_1 > 1 + spec.epsilon_high) & (adv > 0)
    if spec.level == "token":
        counts = [(x & mask).sum(-1) for x in (is_low, is_high, is_low | is_high)]
    else:  # one decision per sequence; every token of a row carries the same ratio
        counts = [x[:, 0] for x in (is_low, is_high, is_low | is_high)]
    counts = [c.to(coef_1.dtype) for c in counts]
    return finish_metrics(*counts, _kl_sums(kl, mask), lengths, spec.level)


@torch.no_grad()
def loss_type_metrics(
    coef_1: torch.Tensor,  # (B, T), or (B, 1) at sequence level
    adv: torch.Tensor,  # (B, 1)
    mask: torch.Tensor,  # (B, T) bool
    lengths: torch.Tensor,  # (B,)
    kl: torch.Tensor | None,  # (B, T) per-token KL term, or None
    phi: torch.Tensor | None,  # (B, 1) VESPO's weights, or None
    spec,
) -> dict[str, torch.Tensor]:
    """The metrics of the loss types without a clip ratio: ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, and
    ``kl``."""
    metrics = {}
    if spec.loss_type == "cispo":
        clipped = (coef_1 > spec.epsilon_high) & (adv > 0)
        metrics["cispo_clip_ratio"] = level_mean(clipped, mask, spec.level)
    elif spec.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = level_mean(phi, mask, "sequence")
    kl_sum = _kl_sums(kl, mask)
    if kl_sum is not None:
        metrics["kl"] = kl_sum.sum() / lengths.sum().clamp(min=1).to(kl_sum.dtype)
    return {k: v.detach().float() for k, v in metrics.items()}


def level_mean(
    x: torch.Tensor,  # (B, T) or (B, 1), bool or float
    mask: torch.Tensor,  # (B, T) bool
    level: str,
) -> torch.Tensor:
    """TRL's mean of a per-token or per-sequence quantity: over scored tokens at token level, over sequences
    (empty ones included) at the sequence levels, where every token of a row holds the row's value."""
    x = x.float()
    if level == "token":
        total = torch.where(mask, x.expand_as(mask), torch.zeros((), device=x.device)).sum()
        return total / mask.sum().clamp(min=1).float()
    return x[:, 0].sum() / max(x.shape[0], 1)
