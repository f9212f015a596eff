"""The algorithm config's rules: each raises a message that names the field and what would be accepted.

Kept apart from ``config.py`` (the fields, their defaults and conversions) so each stays one concern.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from lightning_gspo.kernels.policy_loss import (
    BACKENDS,
    CLIPPED_LOSS_TYPES,
    LEVELS,
    LOSS_TYPES,
    TRITON_COVERS,
    check_objective_parameters,
    triton_uncovered,
)
from lightning_gspo.length_buckets import LAYOUTS

if TYPE_CHECKING:
    from lightning_gspo.config import GSPOConfig

SCALE_REWARDS = ("group", "batch", "none")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LOGPROB_IMPLS = ("fused", "materialized")
GENERATION_ENGINES = ("auto", "hf", "cached")
# generation_kwargs the cached engine honours: the sampling fields it overrides, and the length.
CACHED_ENGINE_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def validate(cfg: GSPOConfig) -> None:
    _one_of("scale_rewards", cfg.scale_rewards, SCALE_REWARDS)
    _one_of("backend", cfg.backend, BACKENDS)
    _one_of("logprobs_impl", cfg.logprobs_impl, LOGPROB_IMPLS)
    _one_of("logprobs_layout", cfg.logprobs_layout, LAYOUTS)
    if cfg.num_generations < 2:
        raise ValueError(
            f"num_generations={cfg.num_generations}: group-relative advantages need at least 2 completions "
            "per prompt; set num_generations >= 2."
        )
    for name in (
        "num_iterations",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_completion_length",
        "logging_steps",
    ):
        _at_least(name, getattr(cfg, name), 1)
    if cfg.max_prompt_length is not None:
        _at_least("max_prompt_length", cfg.max_prompt_length, 1)
    if cfg.reward_weights is not None and not cfg.reward_weights:
        raise ValueError("reward_weights is an empty list; give one weight per reward function, or None.")
    if cfg.num_generations_eval is not None:
        _at_least("num_generations_eval", cfg.num_generations_eval, 0)
    if cfg.eval_steps is not None:
        _at_least("eval_steps", cfg.eval_steps, 1)
    _at_least("dynamic_sampling_max_rounds", cfg.dynamic_sampling_max_rounds, 1)
    _validate_loss(cfg)
    _validate_batches(cfg)
    _validate_sampling(cfg)
    _validate_routing(cfg)
    _validate_optimizer(cfg)


def _validate_loss(cfg: GSPOConfig) -> None:
    _one_of("importance_sampling_level", cfg.importance_sampling_level, LEVELS)
    _one_of("loss_type", cfg.loss_type, LOSS_TYPES)
    _at_least("epsilon", cfg.epsilon, 0.0)
    if cfg.epsilon_high is not None:
        _at_least("epsilon_high", cfg.epsilon_high, 0.0)
    # delta caps the clipped surrogate's ratio; cispo, sapo and vespo never read it.
    clipped = cfg.loss_type in CLIPPED_LOSS_TYPES
    if clipped and cfg.delta is not None and cfg.delta <= 1 + cfg.epsilon_hi:
        raise ValueError(f"delta={cfg.delta} must be greater than 1 + epsilon_high = {1 + cfg.epsilon_hi}.")
    _at_least("beta", cfg.beta, 0.0)
    if cfg.router_aux_loss_coef is not None and not cfg.router_aux_loss_coef >= 0:
        raise ValueError(
            f"router_aux_loss_coef={cfg.router_aux_loss_coef!r} must be >= 0: a negative weight would reward "
            "unbalanced routing. Use 0 to turn the load-balancing loss off, or null for the model's own weight."
        )
    check_objective_parameters(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg, cfg.top_entropy_quantile)
    _validate_adaptive_entropy(cfg)
    bonus = cfg.entropy_coef if cfg.entropy_bonus_enabled else None
    uncovered = triton_uncovered(
        cfg.loss_type, cfg.top_entropy_quantile, cfg.off_policy_mask_threshold, bonus
    )
    if cfg.backend == "triton" and uncovered:
        named = ", ".join(f"{k}={v!r}" for k, v in uncovered.items())
        raise ValueError(f"backend='triton' does not cover {named}: it computes {TRITON_COVERS}; use 'auto'.")


def _validate_adaptive_entropy(cfg: GSPOConfig) -> None:
    if cfg.entropy_coef_min > cfg.entropy_coef_max:
        raise ValueError(
            f"entropy_coef_min={cfg.entropy_coef_min} is above entropy_coef_max={cfg.entropy_coef_max}: the "
            "adaptive entropy coefficient moves within [entropy_coef_min, entropy_coef_max]."
        )
    _at_least("entropy_coef_delta", cfg.entropy_coef_delta, 0.0)


def _validate_batches(cfg: GSPOConfig) -> None:
    if cfg.steps_per_generation is not None and cfg.generation_batch_size is not None:
        raise ValueError(
            "steps_per_generation and generation_batch_size are two ways to say the same thing; set one."
        )
    if cfg.steps_per_generation is not None:
        _at_least("steps_per_generation", cfg.steps_per_generation, 1)
        local = cfg.per_device_train_batch_size * cfg.steps_per_generation
        if local % cfg.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation = {local} completions per rank must be a "
                f"multiple of num_generations={cfg.num_generations}, so every prompt's group stays whole on "
                "one rank; change one of the three."
            )
    elif cfg.generation_batch_size is not None:
        _at_least("generation_batch_size", cfg.generation_batch_size, 1)
    else:
        cfg.steps_per_generation_for(1)  # validates the default: steps_per_generation = accumulation


def _validate_sampling(cfg: GSPOConfig) -> None:
    if cfg.temperature <= 0:
        raise ValueError(f"temperature={cfg.temperature} must be > 0 (log-probs divide the logits by it).")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p={cfg.top_p} must be in (0, 1].")
    _at_least("top_k", cfg.top_k, 0)
    if cfg.min_p is not None and not 0 <= cfg.min_p <= 1:
        raise ValueError(f"min_p={cfg.min_p} must be in [0, 1] or None.")
    if cfg.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={cfg.repetition_penalty} must be > 0 (1.0 disables it).")
    kwargs = cfg.chat_template_kwargs
    if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise ValueError(
            f"chat_template_kwargs={kwargs!r} must be a mapping of keyword names to values, e.g. "
            "{'reasoning_effort': 'low'}, or None."
        )
    _one_of("generation_engine", cfg.generation_engine, GENERATION_ENGINES)
    other = sorted(set(cfg.generation_kwargs or {}) - set(CACHED_ENGINE_KWARGS))
    if cfg.generation_engine == "cached" and other:
        raise ValueError(
            f"generation_kwargs {', '.join(map(repr, other))} are for transformers' generate; "
            f"generation_engine='cached' takes only {', '.join(CACHED_ENGINE_KWARGS)}. Use generation_engine='hf' "
            "for the others."
        )


def _validate_routing(cfg: GSPOConfig) -> None:
    if not isinstance(cfg.routing_replay, bool):
        raise ValueError(f"routing_replay={cfg.routing_replay!r} must be true or false.")
    if cfg.routing_replay and not cfg.is_off_policy:
        warnings.warn(
            "routing_replay=True does nothing on-policy (num_iterations=1 and one optimizer step per generation "
            "batch): no old log-probs are computed, so no routing is recorded. Set num_iterations >= 2 (or "
            "steps_per_generation above gradient_accumulation_steps), or routing_replay=false.",
            UserWarning,
            stacklevel=4,
        )


def _validate_optimizer(cfg: GSPOConfig) -> None:
    _one_of("optim", cfg.optim, OPTIMIZERS)
    _one_of("lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS)
    if cfg.learning_rate <= 0:
        raise ValueError(f"learning_rate={cfg.learning_rate} must be > 0.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be in [0, 1).")
    _at_least("adam_epsilon", cfg.adam_epsilon, 0.0)
    _at_least("weight_decay", cfg.weight_decay, 0.0)
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio={cfg.warmup_ratio} must be in [0, 1].")
    _at_least("warmup_steps", cfg.warmup_steps, 0)
    _at_least("max_grad_norm", cfg.max_grad_norm, 0.0)
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"max_steps={cfg.max_steps} must be a positive number of steps, or -1 for epochs.")
    if cfg.max_steps == -1 and cfg.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs={cfg.num_train_epochs} must be > 0 when max_steps is -1.")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}.")


def _at_least(name: str, value: float, low: float) -> None:
    if value is None or value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}.")
