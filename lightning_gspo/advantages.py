"""Group-relative advantages, as GRPO and GSPO define them, with TRL 1.16's numbers.

``R_i`` is the weighted sum over reward functions (a function may return None for a sample: it is NaN here and
left out of the sum); ``A_i = (R_i - mean_group(R)) / (std(R) + 1e-4)``, the std taken over the group
(``scale_rewards="group"``), the whole batch (``"batch"``) or not divided by at all (``"none"``, Dr. GRPO's
advice: dividing by a small std over-weights near-unanimous groups). Statistics ignore NaN (Bessel-corrected
std), and a sample that no function scored gets advantage 0 and is left out of the group's baseline.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

STD_EPS = 1e-4


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B,) one per completion
    rewards: torch.Tensor  # (B,) weighted reward sum, NaN where no function scored the sample
    metrics: dict[str, float]  # TRL's names: reward, reward_std, rewards/<fn>/mean|std, frac_reward_zero_std


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaN; NaN where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return var.sqrt()


def group_advantages(
    rewards_per_func: torch.Tensor,  # (B, R) NaN where a function returned None
    num_generations: int,
    reward_weights: torch.Tensor | list[float] | None = None,  # (R,)
    scale_rewards: str = "group",
    reward_names: list[str] | None = None,
) -> Advantages:
    """Advantages for B = groups x num_generations completions laid out group after group."""
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be (B, R), got shape {tuple(rewards_per_func.shape)}.")
    n, r = rewards_per_func.shape
    if n % num_generations:
        raise ValueError(f"{n} completions do not split into groups of num_generations={num_generations}.")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of 'group', 'batch', 'none'.")
    rewards_per_func = rewards_per_func.float()
    weights = (
        torch.ones(r) if reward_weights is None else torch.as_tensor(reward_weights, dtype=torch.float32)
    )
    if weights.shape != (r,):
        raise ValueError(
            f"reward_weights has {weights.numel()} entries for {r} reward functions; give one each."
        )
    weights = weights.to(rewards_per_func.device)
    names = reward_names or [f"reward_{i}" for i in range(r)]

    unscored = torch.isnan(rewards_per_func).all(dim=1)  # (B,)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    rewards = torch.where(unscored, torch.full_like(rewards, float("nan")), rewards)
    grouped = rewards.view(-1, num_generations)  # (groups, G)
    baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if n > 1 else torch.zeros_like(rewards)
    else:  # "none" still measures the group std, for frac_reward_zero_std
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - baseline
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)

    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards).item()
    metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return Advantages(advantages, rewards, metrics)
