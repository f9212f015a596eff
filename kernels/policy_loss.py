"""The clipped policy-gradient loss of GRPO and GSPO, with TRL 1.16's exact numbers.

Choices this loss makes, and why:

- The importance ratio is taken per token (GRPO), per sequence (GSPO: ``s_i = exp(mean_t(logp - old))``, the
  length-normalised sequence likelihood ratio, so one clip decision covers the whole sequence, matching an
  advantage that belongs to the whole sequence), or as GSPO-token (``sequence_token``: the value of ``s_i`` on
  every token, with each token's own gradient path; equal to ``sequence`` unless the KL term is ratio-weighted).
- The aggregation over tokens follows TRL's ``loss_type``; only ``grpo`` (mean over sequences of each sequence's
  token mean) gives GSPO's per-sequence objective. The others weight each sequence by its length, and we say so
  once.
- Padded positions may hold anything: every input is selected with ``torch.where`` before it is used, never
  multiplied by a zero mask, so -inf or NaN in padding cannot reach the loss or the gradient.
- Arithmetic is float32 (float64 stays float64, for gradcheck), whatever the input dtype.
- The gradient flows to ``per_token_logps`` only: old and reference log-probs and advantages are constants of
  the step, as they are in every GRPO-family method.

Two implementations share this contract: the PyTorch one below (CPU, and the reference) and the Triton kernel
in ``policy_loss_triton.py`` (CUDA, or the Triton interpreter when ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from lightning_gspo.kernels.backend_and_precision import BACKENDS as BACKENDS  # public here too
from lightning_gspo.kernels.backend_and_precision import compute_dtype, resolve_backend

LEVELS = ("token", "sequence", "sequence_token")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

_warned_length_weighting = False


@dataclass(frozen=True)
class LossSpec:
    """The resolved, validated scalar settings of one policy-loss call, shared by both implementations."""

    level: str
    loss_type: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    use_bias_correction_kl: bool
    max_completion_length: int | None


def _check_spec(
    importance_sampling_level: str,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float | None,
    delta: float | None,
    beta: float,
    use_bias_correction_kl: bool,
    max_completion_length: int | None,
) -> LossSpec:
    if importance_sampling_level not in LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r} is not one of {LEVELS}: use 'token' for "
            "GRPO, 'sequence' for GSPO, 'sequence_token' for GSPO-token."
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(
            f"epsilon_low={epsilon_low} and epsilon_high={epsilon_high} must be >= 0 (they are clip widths)."
        )
    if delta is not None and delta <= 1 + epsilon_high:
        raise ValueError(
            f"delta={delta} must be greater than 1 + epsilon_high = {1 + epsilon_high}, or None."
        )
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0.")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError(
            "loss_type='dr_grpo' divides by batch size x max_completion_length: pass max_completion_length "
            f"(a positive int), got {max_completion_length!r}."
        )
    return LossSpec(
        importance_sampling_level,
        loss_type,
        float(epsilon_low),
        float(epsilon_high),
        None if delta is None else float(delta),
        float(beta),
        bool(use_bias_correction_kl),
        max_completion_length,
    )


def _check_tensors(
    per_token_logps, old_per_token_logps, advantages, completion_mask, ref_per_token_logps, beta
):
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be (B, T), got shape {tuple(per_token_logps.shape)}.")
    if not per_token_logps.is_floating_point():
        raise ValueError(f"per_token_logps must be a floating tensor, got {per_token_logps.dtype}.")
    shape = per_token_logps.shape
    for name, t in (
        ("old_per_token_logps", old_per_token_logps),
        ("ref_per_token_logps", ref_per_token_logps),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; it must match per_token_logps {tuple(shape)}."
            )
    if completion_mask.shape != shape:
        raise ValueError(
            f"completion_mask has shape {tuple(completion_mask.shape)}; it must match per_token_logps "
            f"{tuple(shape)}."
        )
    if advantages.shape != (shape[0],):
        raise ValueError(
            f"advantages must be (B,) = ({shape[0]},), one per sequence; got {tuple(advantages.shape)}."
        )
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError(
            "beta > 0 needs ref_per_token_logps (the reference model's log-probs); pass them or set beta=0."
        )


def policy_loss(
    per_token_logps: torch.Tensor,  # (B, T) carries the gradient
    old_per_token_logps: torch.Tensor | None,  # (B, T) or None -> per_token_logps.detach()
    advantages: torch.Tensor,  # (B,)
    completion_mask: torch.Tensor,  # (B, T) bool or 0/1
    ref_per_token_logps: torch.Tensor | None = None,  # (B, T); required when beta > 0
    *,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/GSPO clipped surrogate loss (plus ``beta`` x k3 KL), aggregated as TRL's ``loss_type``.

    ``num_items_in_batch`` is the dapo normaliser: the number of scored tokens the optimizer step averages over
    (all micro-batches, all ranks, divided by the number of ranks when gradients are averaged across them).
    It defaults to ``completion_mask.sum()``. Returns the scalar loss and detached metrics named as TRL names
    them (``clip_ratio/*``, ``kl`` when beta > 0).
    """
    spec = _check_spec(
        importance_sampling_level,
        loss_type,
        epsilon_low,
        epsilon_high,
        delta,
        beta,
        use_bias_correction_kl,
        max_completion_length,
    )
    _check_tensors(
        per_token_logps, old_per_token_logps, advantages, completion_mask, ref_per_token_logps, beta
    )
    which = resolve_backend(backend, per_token_logps.device)
    if spec.level != "token" and spec.loss_type != "grpo":
        _warn_length_weighting(spec.loss_type)
    mask = completion_mask.bool()
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if spec.beta == 0:
        ref_per_token_logps = None
    normaliser = _dapo_normaliser(spec, num_items_in_batch, mask, per_token_logps.device)
    return _implementation(which)(
        per_token_logps,
        old_per_token_logps.detach(),
        advantages.detach(),
        mask,
        None if ref_per_token_logps is None else ref_per_token_logps.detach(),
        spec,
        normaliser,
    )


def _dapo_normaliser(spec: LossSpec, num_items_in_batch, mask, device) -> torch.Tensor | None:
    """dapo's divisor as a float32 tensor on the log-probs' device (the mask's token count unless given); None
    for the other loss types, which need none."""
    if spec.loss_type != "dapo":
        return None
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device)


def _implementation(backend: str):
    if backend == "triton":
        # Imported on use: the module needs triton, which the PyTorch path must not.
        from lightning_gspo.kernels.policy_loss_triton import triton_policy_loss

        return triton_policy_loss
    return torch_policy_loss


def _warn_length_weighting(loss_type: str) -> None:
    global _warned_length_weighting
    if not _warned_length_weighting:
        _warned_length_weighting = True
        warnings.warn(
            f"importance_sampling_level='sequence' with loss_type={loss_type!r} weights each sequence by its "
            "length; only loss_type='grpo' gives GSPO's per-sequence objective.",
            UserWarning,
            stacklevel=3,
        )


def aggregate(per_token_loss, mask, spec: LossSpec, normaliser):
    """Reduce a (B, T) per-token loss, already zero where ``mask`` is False, as ``spec.loss_type`` asks."""
    if mask.shape[0] == 0:  # no rows at all: a zero that still carries a (zero) gradient
        return per_token_loss.sum()
    if spec.loss_type == "grpo":
        lengths = mask.sum(-1).clamp(min=1).to(per_token_loss.dtype)
        return (per_token_loss.sum(-1) / lengths).mean()
    if spec.loss_type == "bnpo":
        return per_token_loss.sum() / mask.sum().clamp(min=1).to(per_token_loss.dtype)
    if spec.loss_type == "dr_grpo":
        return per_token_loss.sum() / (mask.shape[0] * spec.max_completion_length)
    return per_token_loss.sum() / normaliser.clamp(min=1.0).to(per_token_loss.dtype)


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


def torch_policy_loss(logps, old, advantages, mask, ref, spec: LossSpec, normaliser):
    """The PyTorch implementation; autograd differentiates it. Arguments as ``policy_loss`` after validation."""
    dtype = compute_dtype(logps.dtype)
    zero = torch.zeros((), dtype=dtype, device=logps.device)
    logp = torch.where(mask, logps.to(dtype), zero)  # (B, T)
    old = torch.where(mask, old.to(dtype), zero)  # (B, T)
    adv = advantages.to(dtype).unsqueeze(1)  # (B, 1)
    lengths = mask.sum(-1)  # (B,)
    log_ratio = logp - old
    if spec.level == "token":
        log_w = log_ratio
    else:
        log_s = log_ratio.sum(-1, keepdim=True) / lengths.clamp(min=1).unsqueeze(1).to(dtype)  # (B, 1)
        log_w = log_s if spec.level == "sequence" else log_s.detach() + logp - logp.detach()
    coef_1 = torch.exp(log_w)
    coef_2 = coef_1.clamp(1 - spec.epsilon_low, 1 + spec.epsilon_high)
    coef_1c = coef_1 if spec.delta is None else coef_1.clamp(max=spec.delta)
    per_token = -torch.minimum(coef_1c * adv, coef_2 * adv)
    kl = None
    if spec.beta != 0:
        ref = torch.where(mask, ref.to(dtype), zero)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if spec.use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + spec.beta * kl
    per_token = torch.where(mask, per_token.expand_as(logp), zero)
    loss = aggregate(per_token, mask, spec, normaliser)

    with torch.no_grad():
        is_low = (coef_1 < 1 - spec.epsilon_low) & (adv < 0)
        is_high = (coef_1 > 1 + spec.epsilon_high) & (adv > 0)
        if spec.level == "token":
            counts = [(x & mask).sum(-1) for x in (is_low, is_high, is_low | is_high)]
        else:  # one decision per sequence; every token of a row carries the same ratio
            counts = [x[:, 0] for x in (is_low, is_high, is_low | is_high)]
        kl_sum = None if kl is None else torch.where(mask, kl.expand_as(logp), zero).sum(-1)
        metrics = finish_metrics(*(c.to(dtype) for c in counts), kl_sum, lengths, spec.level)
    return loss, metrics
