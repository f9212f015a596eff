"""The micro-batch loss policy: what one micro-batch of a rollout contributes to the gradient, with no trainer.

``micro_batch_loss`` takes a rollout's micro-batch, the algorithm config and a function that computes the
policy's per-token log-probs, and returns the loss to backpropagate and its metrics. Choices, and why:

- Accumulation follows TRL: ``dapo``'s normaliser spans the whole accumulation window (its token count over every
  micro-batch and rank), the other loss types are per-micro-batch means divided by the number of micro-batches
  in the window.
- With ``beta = 0``, a completion whose advantage is zero has zero loss and zero gradient, so it is left out of
  the forward and backward (``scored_rows``), and the loss is rescaled so the gradient is the whole
  micro-batch's: ``grpo`` and ``dr_grpo`` by kept rows over rows, ``bnpo`` by kept tokens over tokens, ``dapo``
  needs nothing (its normaliser is the whole batch's). A micro-batch with nothing left still computes one row
  times 0, so that under DDP every rank runs a backward and the gradient collectives line up.
- TRL's clip-ratio metrics (and cispo's) are reproduced exactly with rows left out (``with_left_out_rows``: a
  left-out row is never clipped); the entropy metric and vespo's mean weight are the computed rows' (a left-out
  row's weight needs its log-probs).
- Every row is computed when the entropy matters: the entropy quantile is taken over the whole micro-batch's
  tokens (all ranks'), and the entropy bonus has a gradient on zero-advantage rows too.
- The entropy bonus follows TRL: a per-micro-batch mean divided by the accumulation steps whatever the loss
  type, so under dapo, cispo and vespo (whose loss is not divided here) the coefficient is divided instead.
- ``record_old``: on the first pass over a generation batch, when it runs before any optimizer step, the
  log-probs computed with gradients are the old log-probs; the ratio is taken as 1 and the computed rows are
  written into the rollout's ``old_logps`` for the later passes.
- A mixture-of-experts model's load-balancing loss (``router_aux_loss_coef``; ``router_aux`` has TRL's rules) is
  added as TRL adds it, ``coef * aux_loss / gradient_accumulation_steps`` whatever the loss type, and keeps every
  row computed (it has a gradient on zero-advantage rows too). The logged ``loss`` includes it; ``aux_loss`` is
  the unscaled value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_gspo.config import GSPOConfig
from lightning_gspo.entropy_control import EntropyControl, gather_across_ranks
from lightning_gspo.kernels import policy_loss
from lightning_gspo.kernels.loss_types import high_entropy_mask
from lightning_gspo.kernels.policy_loss import STEP_NORMALISED_LOSS_TYPES
from lightning_gspo.rollout import Rollout

# (rows of a micro-batch) -> (log-probs (B, C) float32 with gradients, entropies (B, C)), and the load-balancing
# loss (a scalar) as a third item when the loss has a router term
LogpsFn = Callable[[Rollout], tuple[torch.Tensor, ...]]
# (rows to compute, None for all; the factor that makes their loss the micro-batch's)
Rows = tuple[torch.Tensor | None, float]


def scored_rows(r: Rollout, cfg: GSPOConfig, router_aux: bool = False) -> Rows:
    """Which rows of ``r`` to compute and the factor that makes their loss the micro-batch's (see the module
    notes). At ``beta > 0`` every row has a gradient (the KL term), as under an entropy bonus or a load-balancing
    loss (``router_aux``: its coefficient is not 0), and the entropy quantile needs every row's tokens: all are
    computed."""
    if cfg.beta != 0 or cfg.entropy_bonus_enabled or cfg.top_entropy_quantile < 1 or router_aux:
        return None, 1.0
    keep = r.advantages != 0
    n = int(keep.sum())
    if n == keep.numel():
        return None, 1.0
    if n == 0:  # one row with a zero loss: a backward that lines up with the other ranks'
        return torch.zeros(1, dtype=torch.long, device=keep.device), 0.0
    rows = keep.nonzero().squeeze(1)
    if cfg.loss_type in STEP_NORMALISED_LOSS_TYPES:
        return rows, 1.0
    if cfg.loss_type == "bnpo":
        tokens = r.completion_mask.sum()
        return rows, float(r.completion_mask[rows].sum() / tokens.clamp(min=1))
    return rows, n / keep.numel()  # grpo, sapo, dr_grpo, luspo: means over rows


def micro_batch_loss(
    r: Rollout,
    cfg: GSPOConfig,
    logps_fn: LogpsFn,
    *,
    world_size: int = 1,
    steps_per_generation: int | None = None,
    record_old: bool = False,
    rows: Rows | None = None,
    entropy_control: EntropyControl | None = None,
    router_aux_loss_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for micro-batch ``r``, already scaled for accumulation, and its metrics.

    ``rows``: ``scored_rows(r, ...)`` when the caller has it already (``(None, 1.0)`` computes every row).
    ``record_old``: see the module notes; ``r.old_logps`` must then be a view of the rollout's.
    ``entropy_control``: the run's entropy-bonus coefficient, which this micro-batch's entropy also feeds
    (adaptive control); None takes the config's, as at the first optimizer step.
    ``router_aux_loss_coef``: the load-balancing loss's coefficient in force (``router_aux.resolve_router_aux_coef``);
    when it is not 0, ``logps_fn`` returns the loss as a third item."""
    spg = steps_per_generation or cfg.steps_per_generation_for(world_size)
    keep, scale = rows or scored_rows(r, cfg, router_aux=router_aux_loss_coef != 0)
    s = r if keep is None else r.rows(keep)
    logps, entropy, *aux = logps_fn(s)
    if record_old:
        r.old_logps[slice(None) if keep is None else keep] = logps.detach().to(r.old_logps.dtype)
    ga = cfg.gradient_accumulation_steps
    control = entropy_control or EntropyControl.from_config(cfg)
    entropy_kw = _entropy_settings(cfg, entropy, s.completion_mask, control, world_size)
    loss, metrics = policy_loss(
        logps,
        None if record_old or scale == 0 else s.old_logps,
        s.advantages,
        s.completion_mask,
        s.ref_logps,
        num_items_in_batch=r.num_items / world_size * ga / spg,
        **_loss_settings(cfg),
        **entropy_kw,
    )
    if control is not None:
        _observe_entropy(control, entropy, s.completion_mask, cfg, entropy_kw["entropy_pool"])
    if keep is not None:
        loss = loss * scale
        metrics = with_left_out_rows(metrics, r.completion_mask, keep, cfg.importance_sampling_level)
    m = s.completion_mask
    metrics = {k: float(v) for k, v in metrics.items()}
    # The loss below is divided by the accumulation steps unless its normaliser spans the window already; the
    # router term is divided by them in any case (TRL), so it enters here as coef * aux * divisor / ga.
    divisor = 1 if cfg.loss_type in STEP_NORMALISED_LOSS_TYPES else ga
    if router_aux_loss_coef != 0:
        loss = loss + router_aux_loss_coef * aux[0] * (divisor / ga)
        metrics["aux_loss"] = float(aux[0].detach())
    metrics["loss"] = float(loss.detach())
    metrics["entropy"] = float(torch.where(m, entropy.detach(), 0).sum() / m.sum().clamp(min=1))
    return loss / divisor, metrics


# policy_loss's keywords that are GSPOConfig fields of the same name and meaning.
_SAME_NAMES = (
    "importance_sampling_level", "loss_type", "delta", "beta", "use_bias_correction_kl", "max_completion_length",
    "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "top_entropy_quantile", "off_policy_mask_threshold", "backend",
)  # fmt: skip


def _loss_settings(cfg: GSPOConfig) -> dict:
    return {
        "epsilon_low": cfg.epsilon,
        "epsilon_high": cfg.epsilon_high,
        **{k: getattr(cfg, k) for k in _SAME_NAMES},
    }


def _entropy_settings(
    cfg: GSPOConfig, entropy, mask, control: EntropyControl | None, world_size: int
) -> dict:
    """policy_loss's entropy keywords: the entropies, every rank's when the quantile needs them, and the bonus
    coefficient, divided by the accumulation steps where the loss is not divided afterwards (see the notes)."""
    pool = None
    if cfg.top_entropy_quantile < 1 and world_size > 1:
        pool = gather_across_ranks(entropy.detach()[mask])
    coef = None
    if control is not None:
        step_normalised = cfg.loss_type in STEP_NORMALISED_LOSS_TYPES
        coef = control.applied() / (cfg.gradient_accumulation_steps if step_normalised else 1)
    return {"entropies": entropy, "entropy_pool": pool, "entropy_coef": coef}


def _observe_entropy(control: EntropyControl, entropy, mask, cfg: GSPOConfig, pool) -> None:
    """Feed adaptive control this micro-batch's entropy over the tokens the policy loss acted on."""
    if not control.adaptive:
        return
    acting = mask
    if cfg.top_entropy_quantile < 1:
        acting = high_entropy_mask(entropy, mask, cfg.top_entropy_quantile, pool)
    control.observe(torch.where(acting, entropy.detach(), 0).sum(), acting.sum())


def with_left_out_rows(
    metrics: dict,
    completion_mask: torch.Tensor,  # (B, C) of the whole micro-batch
    keep: torch.Tensor,  # (K,) the computed rows
    level: str,
) -> dict:
    """TRL's clip metrics (and cispo's) of the whole micro-batch from those of its computed rows: a left-out row
    (advantage 0) is never clipped, so it adds to the denominators and puts a 0 into the per-row minimum and
    maximum. Other metrics stay the computed rows'."""
    lengths = completion_mask.sum(1)
    left_out = torch.ones_like(lengths, dtype=torch.bool)
    left_out[keep] = False
    if level == "token":
        share = lengths[keep].sum() / lengths.sum().clamp(min=1)
        zero_rows = bool((left_out & (lengths > 0)).any())
    else:
        share = torch.tensor(keep.numel() / lengths.numel())
        zero_rows = bool(left_out.any())
    out = dict(metrics)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"):
        if key in metrics:
            out[key] = metrics[key] * share.to(metrics[key].dtype)
    if zero_rows and "clip_ratio/low_min" in metrics:
        zero = torch.zeros_like(metrics["clip_ratio/low_min"])
        out["clip_ratio/low_min"] = torch.fmin(metrics["clip_ratio/low_min"], zero)
        out["clip_ratio/high_max"] = torch.fmax(metrics["clip_ratio/high_max"], zero)
    return out
