"""Optimizers, learning-rate schedules (transformers' names: ``optim``, ``lr_scheduler_type``) and gradient
clipping."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from lightning_gspo.config import GSPOConfig


def build_optimizer(cfg: GSPOConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the policy has no trainable parameters: nothing for the optimizer to update.")
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optim in ("adamw_torch", "adamw_torch_fused"):
        if cfg.optim == "adamw_torch_fused":  # one kernel per step, on CUDA and on the CPU alike
            try:
                return torch.optim.AdamW(params, fused=True, **kwargs)
            except RuntimeError as err:  # a device or dtype the fused kernel lacks
                warnings.warn(
                    f"optim='adamw_torch_fused' is not available here ({err}); using adamw_torch.",
                    UserWarning,
                    stacklevel=2,
                )
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(f"optim={cfg.optim!r} needs bitsandbytes (pip install bitsandbytes).") from err
    if cfg.optim == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    return bnb.optim.AdamW8bit(params, **kwargs)


def warmup_steps(cfg: GSPOConfig, total: int) -> int:
    """transformers' rule: warmup_steps when >= 1, a ratio when below 1, else warmup_ratio."""
    if cfg.warmup_steps >= 1:
        return int(cfg.warmup_steps)
    ratio = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio
    return math.ceil(ratio * total)


def build_scheduler(cfg: GSPOConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    if kind == "constant":  # transformers' 'constant' has no warm-up
        warm = 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, root: Any = None) -> torch.Tensor:
    """torch's ``clip_grad_norm_``, returning the total norm before clipping; under FSDP (``root``, the strategy's
    wrapped model, is an FSDP module) the root module's, which reduces the norm over the ranks' shards: torch's,
    on a rank's own shards, would clip each rank by its own piece of the norm."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
