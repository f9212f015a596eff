"""The policy-gradient loss of GRPO, GSPO and the rest of TRL 1.16's loss types, with TRL's exact numbers.

Choices this loss makes, and why:

- The importance ratio is taken per token (GRPO), per sequence (GSPO: ``s_i = exp(mean_t(logp - old))``, the
  length-normalised sequence likelihood ratio, so one clip decision covers the whole sequence, matching an
  advantage that belongs to the whole sequence), or as GSPO-token (``sequence_token``: the value of ``s_i`` on
  every token, with each token's own gradient path; equal to ``sequence`` unless the KL term is ratio-weighted
  or the entropy mask drops some of a sequence's tokens).
- ``loss_type`` picks the per-token objective and the aggregation, as TRL defines them. The objective is the
  clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo), CISPO's clipped, detached weight, SAPO's soft gate or
  VESPO's gamma weight (``loss_types.py`` holds that math). The aggregation: grpo and sapo average each
  sequence's token mean; bnpo divides the token sum by the micro-batch's tokens, dr_grpo by B x
  max_completion_length, dapo, cispo and vespo by the optimizer step's tokens; luspo averages each sequence's
  token sum, so a sequence weighs by its length (LUSPO's correction of GSPO's bias towards short sequences).
- Where TRL warns about a combination and still computes it (a sequence-level ratio under a loss type that sums
  tokens, luspo without a sequence-level ratio, vespo with one), we compute the same numbers and warn once, so
  a TRL config carries over unchanged.
- Two token masks and an entropy bonus apply to any loss type as TRL applies them: the top entropy quantile and
  the off-policy sequence mask remove policy-loss terms only (never KL terms or denominators); the bonus
  subtracts ``entropy_coef`` times the mean entropy of the tokens the policy loss acts on.
- Padded positions may hold anything: every input is selected with ``torch.where`` before it is used, never
  multiplied by a zero mask, so -inf or NaN in padding cannot reach the loss or the gradient.
- Arithmetic is float32 (float64 stays float64, for gradcheck), whatever the input dtype.
- The gradient flows to ``per_token_logps``, and to ``entropies`` only when an entropy bonus is asked for: old
  and reference log-probs and advantages are constants of the step, as they are in every GRPO-family method.

Two implementations share this contract: the PyTorch one below (CPU, and the reference) and the Triton kernel
in ``policy_loss_triton.py`` (CUDA, or the Triton interpreter when ``TRITON_INTERPRET=1``). The kernel covers
the clipped surrogate of grpo, bnpo, dr_grpo and dapo without masks or bonus; ``backend="auto"`` computes
anything else with PyTorch and says so once, ``backend="triton"`` refuses it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from lightning_gspo.kernels import loss_types
from lightning_gspo.kernels.backend_and_precision import BACKENDS as BACKENDS  # public here too
from lightning_gspo.kernels.backend_and_precision import compute_dtype, resolve_backend_covering
from lightning_gspo.kernels.policy_loss_metrics import clip_metrics, loss_type_metrics

LEVELS = ("token", "sequence", "sequence_token")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The clipped surrogate's loss types; TRL logs clip_ratio/* for these.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Divided by the optimizer step's token count (num_items_in_batch): the normaliser spans every micro-batch.
STEP_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
# What the Triton kernel computes, named here so that choosing a backend needs no triton import.
TRITON_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TRITON_COVERS = f"loss_type in {TRITON_LOSS_TYPES} without token masks or entropy bonus"
# Loss types that sum per-token terms, so a sequence-level ratio weights each sequence by its length.
_TOKEN_SUMMING = ("bnpo", "dr_grpo", "dapo", "cispo")

_warned: set[str] = set()  # the warnings given once per process, by key


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
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float | None = None
    """None: no entropy bonus; a number (0 included) subtracts that times the mean entropy and reports
    ``policy_loss``."""


def _check_spec(
    importance_sampling_level: str,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float | None,
    delta: float | None,
    beta: float,
    use_bias_correction_kl: bool,
    max_completion_length: int | None,
    **extras,
) -> LossSpec:
    """The validated ``LossSpec`` of ``policy_loss``'s settings; ``extras`` are the fields after
    max_completion_length (loss-type parameters, masks, entropy bonus), TRL's defaults when left out."""
    as_float = lambda x: None if x is None else float(x)
    spec = LossSpec(
        level=importance_sampling_level,
        loss_type=loss_type,
        epsilon_low=float(epsilon_low),
        epsilon_high=float(epsilon_low if epsilon_high is None else epsilon_high),
        delta=as_float(delta),
        beta=float(beta),
        use_bias_correction_kl=bool(use_bias_correction_kl),
        max_completion_length=max_completion_length,
        **{name: as_float(value) for name, value in extras.items()},
    )
    _validate(spec)
    return spec


def _validate(spec: LossSpec) -> None:
    if spec.level not in LEVELS:
        raise ValueError(
            f"importance_sampling_level={spec.level!r} is not one of {LEVELS}: use 'token' for GRPO, 'sequence' "
            "for GSPO, 'sequence_token' for GSPO-token."
        )
    if spec.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={spec.loss_type!r} is not one of {LOSS_TYPES}.")
    if spec.epsilon_low < 0 or spec.epsilon_high < 0:
        raise ValueError(
            f"epsilon_low={spec.epsilon_low} and epsilon_high={spec.epsilon_high} must be >= 0 (they are clip "
            "widths)."
        )
    # delta caps the clipped surrogate's unclipped ratio; the other loss types do not read it.
    if (
        spec.loss_type in CLIPPED_LOSS_TYPES
        and spec.delta is not None
        and spec.delta <= 1 + spec.epsilon_high
    ):
        raise ValueError(
            f"delta={spec.delta} must be greater than 1 + epsilon_high = {1 + spec.epsilon_high}, or None."
        )
    if spec.beta < 0:
        raise ValueError(f"beta={spec.beta} must be >= 0.")
    if spec.loss_type == "dr_grpo" and (
        spec.max_completion_length is None or spec.max_completion_length <= 0
    ):
        raise ValueError(
            "loss_type='dr_grpo' divides by batch size x max_completion_length: pass max_completion_length "
            f"(a positive int), got {spec.max_completion_length!r}."
        )
    check_objective_parameters(
        spec.sapo_temperature_pos, spec.sapo_temperature_neg, spec.top_entropy_quantile
    )


def check_objective_parameters(
    sapo_temperature_pos: float, sapo_temperature_neg: float, top_entropy_quantile: float
) -> None:
    """The loss-type and mask parameters' rules, named by field (the config checks them with these at
    construction, before any model loads)."""
    for name, value in (
        ("sapo_temperature_pos", sapo_temperature_pos),
        ("sapo_temperature_neg", sapo_temperature_neg),
    ):
        if not value > 0:
            raise ValueError(f"{name}={value} must be > 0 (SAPO's gate divides by it).")
    if not 0 <= top_entropy_quantile <= 1:
        raise ValueError(
            f"top_entropy_quantile={top_entropy_quantile} must be in [0, 1]: the share of tokens, by "
            "entropy, the policy loss keeps (1 keeps all)."
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


def _check_entropies(entropies: torch.Tensor | None, shape: torch.Size, spec: LossSpec) -> None:
    if entropies is None:
        if spec.top_entropy_quantile < 1 or spec.entropy_coef is not None:
            raise ValueError(
                "top_entropy_quantile < 1 and entropy_coef need the per-token entropies: pass entropies (B, T) "
                "(kernels.selective_logprobs(..., return_entropy=True) gives them)."
            )
        return
    if entropies.shape != shape or not entropies.is_floating_point():
        raise ValueError(
            f"entropies must be a floating tensor shaped like per_token_logps {tuple(shape)}, got "
            f"{entropies.dtype} {tuple(entropies.shape)}."
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
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    entropies: torch.Tensor | None = None,  # (B, T) per-token entropies; carries a gradient for the bonus
    top_entropy_quantile: float = 1.0,
    entropy_pool: torch.Tensor | None = None,  # (N,) entropies the quantile is taken over; None: this batch's
    entropy_coef: float | None = None,
    off_policy_mask_threshold: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's policy loss of ``loss_type`` (plus ``beta`` x k3 KL, minus ``entropy_coef`` x mean entropy).

    ``num_items_in_batch`` is the dapo/cispo/vespo normaliser: the number of scored tokens the optimizer step
    averages over (all micro-batches, all ranks, divided by the number of ranks when gradients are averaged
    across them). It defaults to ``completion_mask.sum()``. ``top_entropy_quantile < 1`` keeps that share of
    scored tokens, by entropy, in the policy loss; ``entropy_pool`` (all ranks' scored-token entropies) sets
    the threshold when given. ``off_policy_mask_threshold`` drops sequences with A < 0 whose mean ``old - logp``
    exceeds it. Returns the scalar loss and detached metrics named as TRL names them (``clip_ratio/*``,
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``kl`` when beta > 0, ``policy_loss`` with a bonus).
    """
    spec = _check_spec(
        importance_sampling_level, loss_type, epsilon_low, epsilon_high, delta, beta, use_bias_correction_kl,
        max_completion_length, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, entropy_coef=entropy_coef,
    )  # fmt: skip
    _check_tensors(
        per_token_logps, old_per_token_logps, advantages, completion_mask, ref_per_token_logps, beta
    )
    _check_entropies(entropies, per_token_logps.shape, spec)
    uncovered = triton_uncovered(
        spec.loss_type, spec.top_entropy_quantile, spec.off_policy_mask_threshold, spec.entropy_coef
    )
    which = resolve_backend_covering(backend, per_token_logps.device, uncovered, TRITON_COVERS)
    _warn_about_level(spec)
    mask = completion_mask.bool()
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    ref = None if spec.beta == 0 or ref_per_token_logps is None else ref_per_token_logps.detach()
    normaliser = _step_normaliser(spec, num_items_in_batch, mask, per_token_logps.device)
    args = (per_token_logps, old_per_token_logps.detach(), advantages.detach(), mask, ref, spec, normaliser)
    if which == "triton":
        # Imported on use: the module needs triton, which the PyTorch path must not.
        from lightning_gspo.kernels.policy_loss_triton import triton_policy_loss

        return triton_policy_loss(*args)
    if entropies is not None and spec.entropy_coef is None:
        entropies = entropies.detach()  # only the bonus differentiates the entropy
    return torch_policy_loss(*args, entropies=entropies, entropy_pool=entropy_pool)


def _step_normaliser(spec: LossSpec, num_items_in_batch, mask, device) -> torch.Tensor | None:
    """The divisor of dapo, cispo and vespo as a float32 tensor on the log-probs' device (the mask's token
    count unless given); None for the other loss types, which need none."""
    if spec.loss_type not in STEP_NORMALISED_LOSS_TYPES:
        return None
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device)


def triton_uncovered(
    loss_type: str,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    entropy_coef: float | None = None,
) -> dict[str, object]:
    """The settings the Triton kernel does not compute, by field name (empty when it covers them)."""
    fields = {}
    if loss_type not in TRITON_LOSS_TYPES:
        fields["loss_type"] = loss_type
    if top_entropy_quantile < 1:
        fields["top_entropy_quantile"] = top_entropy_quantile
    if off_policy_mask_threshold is not None:
        fields["off_policy_mask_threshold"] = off_policy_mask_threshold
    if entropy_coef is not None:
        fields["entropy_coef"] = entropy_coef
    return fields


def _warn_about_level(spec: LossSpec) -> None:
    """TRL's warnings about a level a loss type was not designed for; the numbers are TRL's either way."""
    if spec.level != "token" and spec.loss_type in _TOKEN_SUMMING:
        _warn_once(
            "length:" + spec.loss_type,
            f"importance_sampling_level={spec.level!r} with loss_type={spec.loss_type!r} weights each sequence "
            "by its length; only loss_type='grpo' gives GSPO's per-sequence objective.",
        )
    elif spec.loss_type == "luspo" and spec.level == "token":
        _warn_once(
            "luspo",
            "loss_type='luspo' is LUSPO's correction of GSPO and expects importance_sampling_level='sequence'; "
            "with 'token' it scales each sequence's token-level clipped loss by its length.",
        )
    elif spec.loss_type == "vespo" and spec.level != "token":
        _warn_once(
            "vespo",
            "loss_type='vespo' forms its sequence-level weights itself and expects "
            f"importance_sampling_level='token'; {spec.level!r} changes only the ratio that weights the KL term.",
        )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        # Frames: here, the helper that decided to warn, policy_loss, and policy_loss's caller (named).
        warnings.warn(message, UserWarning, stacklevel=4)


def aggregate(per_token_loss, mask, spec: LossSpec, normaliser):
    """Reduce a (B, T) per-token loss, already zero where ``mask`` is False, as ``spec.loss_type`` asks."""
    if mask.shape[0] == 0:  # no rows at all: a zero that still carries a (zero) gradient
        return per_token_loss.sum()
    if spec.loss_type in ("grpo", "sapo"):
        lengths = mask.sum(-1).clamp(min=1).to(per_token_loss.dtype)
        return (per_token_loss.sum(-1) / lengths).mean()
    if spec.loss_type == "bnpo":
        return per_token_loss.sum() / mask.sum().clamp(min=1).to(per_token_loss.dtype)
    if spec.loss_type == "dr_grpo":
        return per_token_loss.sum() / (mask.shape[0] * spec.max_completion_length)
    if spec.loss_type == "luspo":
        return per_token_loss.sum(-1).mean()
    return per_token_loss.sum() / normaliser.clamp(min=1.0).to(per_token_loss.dtype)


def torch_policy_loss(
    logps, old, advantages, mask, ref, spec: LossSpec, normaliser, entropies=None, entropy_pool=None
):
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
    coef_1 = torch.exp(log_w)  # (B, T), or (B, 1) at sequence level
    per_token, phi = _surrogate(coef_1, log_ratio, logp, adv, mask, spec)
    if spec.off_policy_mask_threshold is not None:
        keep = loss_types.off_policy_mask(adv, logp.detach(), old, mask, spec.off_policy_mask_threshold)
        per_token = torch.where(keep, per_token, zero)
    ent = None if entropies is None else torch.where(mask, entropies.to(dtype), zero)  # (B, T)
    acting = None  # the tokens the policy loss acts on, when not every scored token
    if spec.top_entropy_quantile < 1:
        acting = loss_types.high_entropy_mask(ent, mask, spec.top_entropy_quantile, entropy_pool)
        per_token = torch.where(acting, per_token, zero)
    kl = None
    if spec.beta != 0:
        ref = torch.where(mask, ref.to(dtype), zero)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if spec.use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + spec.beta * kl
    per_token = torch.where(mask, per_token.expand_as(logp), zero)
    loss = aggregate(per_token, mask, spec, normaliser)
    if spec.loss_type in CLIPPED_LOSS_TYPES:
        metrics = clip_metrics(coef_1, adv, mask, lengths, kl, spec)
    else:
        metrics = loss_type_metrics(coef_1, adv, mask, lengths, kl, phi, spec)
    if spec.entropy_coef is not None:
        metrics["policy_loss"] = loss.detach().float()
        if spec.entropy_coef != 0:  # a zero coefficient (adaptive control, gated) sends no entropy gradient
            loss = loss - spec.entropy_coef * loss_types.entropy_bonus(
                ent, mask if acting is None else acting
            )
    return loss, metrics


def _surrogate(coef_1, log_ratio, logp, adv, mask, spec: LossSpec):
    """The per-token policy loss of ``spec.loss_type`` ((B, T), or (B, 1) at sequence level), and VESPO's
    per-sequence weights (B, 1) for its metric (None for the other loss types)."""
    if spec.loss_type == "cispo":
        return loss_types.cispo(coef_1, adv, logp, spec.epsilon_high), None
    if spec.loss_type == "sapo":
        return loss_types.sapo(coef_1, adv, spec.sapo_temperature_pos, spec.sapo_temperature_neg), None
    if spec.loss_type == "vespo":
        k_and_lambda = (spec.vespo_k_pos, spec.vespo_lambda_pos, spec.vespo_k_neg, spec.vespo_lambda_neg)
        phi = loss_types.vespo_weights(log_ratio.detach(), mask, adv, *k_and_lambda)
        return loss_types.vespo(phi, adv, logp), phi
    return loss_types.clipped(coef_1, adv, spec.epsilon_low, spec.epsilon_high, spec.delta), None
