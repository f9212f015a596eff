"""The per-token objectives of TRL 1.16's loss types, and the token masks and entropy bonus any of them can take.

Every function here is a piece of ``torch_policy_loss`` (``policy_loss.py``), which validates, masks padding
and aggregates; inputs arrive with padded positions already set to 0, ratios already formed. Choices, and why:

- ``clipped`` is PPO's clipped surrogate (grpo, bnpo, dr_grpo, dapo and luspo share it; they differ only in
  how per-token losses are summed). The others replace the clip:
  - ``cispo`` (MiniMax-M1) clips the importance weight itself at ``epsilon_high`` (the raw value, not
    ``1 + epsilon_high``: ScaleRL's recommended 5.0 means a ratio of 5) and stops its gradient, so the gradient
    is the REINFORCE one, ``-sg(min(r, eps_high)) A grad(log p)``, for every token, clipped or not.
  - ``sapo`` gates the ratio smoothly, ``sigmoid(tau (r - 1)) 4 / tau``, with a separate temperature for
    positive and for other advantages; the gate's slope at r = 1 is 1, as the unclipped surrogate's is.
  - ``vespo`` weights each sequence's REINFORCE gradient by ``phi(w) = e^lambda w^k e^(-lambda w)`` of the
    sequence's (summed, not averaged) importance ratio ``w``: 1 at w = 1, falling smoothly on both sides.
    ``phi`` is a constant of the step (no gradient), as TRL computes it, in log space with TRL's clamps.
- The masks only remove terms of the policy loss, never the KL term and never the denominators: the entropy
  mask keeps the top ``top_entropy_quantile`` of scored tokens by entropy ("Beyond the 80/20 rule"), the
  off-policy mask drops whole sequences with a negative advantage whose mean ``old - logp`` exceeds the
  threshold (DeepSeek-V3.2). Both are computed without gradient.
- The entropy bonus is the mean entropy over the tokens the policy loss acts on, whatever the loss type's
  normaliser, so ``entropy_coef`` means the same for every loss type.

Scalar settings travel as plain floats and tensors are built in the computation's dtype, so float64 inputs stay
float64 (for gradcheck) and float32 inputs give TRL's float32 numbers.
"""

from __future__ import annotations

import math

import torch

# TRL's clamps for VESPO's log-weights: log(1e-8) below, 20 above.
_VESPO_LOG_W_MIN = math.log(1e-8)
_VESPO_LOG_W_MAX = 20.0


def clipped(
    coef_1: torch.Tensor,  # (B, T) or (B, 1) importance ratios
    adv: torch.Tensor,  # (B, 1)
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
) -> torch.Tensor:
    """``-min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)``."""
    coef_2 = coef_1.clamp(1 - epsilon_low, 1 + epsilon_high)
    coef_1c = coef_1 if delta is None else coef_1.clamp(max=delta)
    return -torch.minimum(coef_1c * adv, coef_2 * adv)


def cispo(
    coef_1: torch.Tensor,  # (B, T) or (B, 1)
    adv: torch.Tensor,  # (B, 1)
    logp: torch.Tensor,  # (B, T) with gradient
    epsilon_high: float,
) -> torch.Tensor:
    """``-sg(min(r, eps_high)) A log p``: the weight carries no gradient, the log-prob does."""
    return -coef_1.clamp(max=epsilon_high).detach() * adv * logp


def sapo(
    coef_1: torch.Tensor,  # (B, T) or (B, 1)
    adv: torch.Tensor,  # (B, 1)
    temperature_pos: float,
    temperature_neg: float,
) -> torch.Tensor:
    """``-sigmoid(tau (r - 1)) 4 / tau A`` with ``tau`` = temperature_pos where A > 0, temperature_neg elsewhere."""
    tau = torch.where(adv > 0, adv.new_tensor(temperature_pos), adv.new_tensor(temperature_neg))
    return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv


@torch.no_grad()
def vespo_weights(
    log_ratio: torch.Tensor,  # (B, T) logp - old, 0 at padding
    mask: torch.Tensor,  # (B, T) bool
    adv: torch.Tensor,  # (B, 1)
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's per-sequence weight ``phi`` (B, 1): ``log phi = lambda + k log w - lambda w`` with
    ``log w = sum_t clamp(log_ratio, -20, 20)`` clamped to [log 1e-8, 20]; (k, lambda) by the sign of A (A >= 0
    takes the positive pair); lambda at least 1e-4; a non-finite phi becomes 0."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    per_token = torch.where(mask, log_ratio.clamp(-20.0, 20.0), zero)
    log_w = per_token.sum(-1, keepdim=True).clamp(_VESPO_LOG_W_MIN, _VESPO_LOG_W_MAX)
    w = torch.exp(log_w)
    nonneg = adv >= 0
    k = torch.where(nonneg, adv.new_tensor(k_pos), adv.new_tensor(k_neg))
    lam = torch.where(nonneg, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg)).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * w
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo(
    phi: torch.Tensor,  # (B, 1) no gradient
    adv: torch.Tensor,  # (B, 1)
    logp: torch.Tensor,  # (B, T) with gradient
) -> torch.Tensor:
    """``-phi A log p``."""
    return -phi * adv * logp


@torch.no_grad()
def high_entropy_mask(
    entropies: torch.Tensor,  # (B, T), 0 at padding
    mask: torch.Tensor,  # (B, T) bool
    top_entropy_quantile: float,
    pool: torch.Tensor | None = None,  # (N,) the entropies the quantile is taken over; None: entropies[mask]
) -> torch.Tensor:
    """(B, T) bool: scored tokens whose entropy is at least the ``1 - top_entropy_quantile`` quantile (linear
    interpolation) of ``pool``. Ties at the threshold are kept, so 0 keeps every token of the highest entropy.
    An empty pool keeps nothing."""
    pool = (entropies[mask] if pool is None else pool).detach().float()
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pool, 1 - top_entropy_quantile)
    return (entropies.detach() >= threshold) & mask


@torch.no_grad()
def off_policy_mask(
    adv: torch.Tensor,  # (B, 1)
    logp: torch.Tensor,  # (B, T), 0 at padding
    old: torch.Tensor,  # (B, T), 0 at padding: the log-probs the completions were sampled with
    mask: torch.Tensor,  # (B, T) bool
    threshold: float,
) -> torch.Tensor:
    """(B, 1) bool, DeepSeek-V3.2's off-policy sequence mask: keep a sequence when ``A >= 0`` or its mean
    ``old - logp`` over scored tokens (a KL estimate; NaN counts as 0) is at most ``threshold``."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = torch.where(mask, torch.nan_to_num(old - logp, nan=0.0), zero)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1).to(kl.dtype)
    return (adv >= 0) | (kl.sum(-1, keepdim=True) / lengths <= threshold)


def entropy_bonus(
    entropies: torch.Tensor,  # (B, T) with gradient, 0 at padding
    mask: torch.Tensor,  # (B, T) bool: the tokens the policy loss acts on
) -> torch.Tensor:
    """The mean entropy over ``mask`` (0 when it is empty); the loss subtracts ``entropy_coef`` times it."""
    zero = torch.zeros((), dtype=entropies.dtype, device=entropies.device)
    return torch.where(mask, entropies, zero).sum() / mask.sum().clamp(min=1).to(entropies.dtype)
