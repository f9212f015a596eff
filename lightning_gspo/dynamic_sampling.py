"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): fill the generation batch with groups that teach.

A group whose rewards are all equal has advantage 0 for every completion: it adds nothing to the gradient (with
``beta = 0`` its rows are not even forwarded), so a batch of mostly such *flat* groups makes a small, noisy step.
This happens as soon as a policy gets most prompts always right (or always wrong). Dynamic sampling replaces each
flat group with the group of a newly drawn prompt.

Choices, and why:
- Replacement is slot for slot, so the generation batch keeps its size and order: micro-batches, accumulation,
  the learning-rate schedule, resume and the logs are those of a run without it.
- Each round draws exactly as many prompts as slots remain flat, from the data module's extra-prompt stream (its
  own seeded order, whose position ``RunState`` keeps, so a resumed run draws the same prompts).
- The extra rounds are capped (``dynamic_sampling_max_rounds``): a task the policy has saturated, or cannot do at
  all, would otherwise sample without end. Flat groups left at the cap stay in the batch, harmless (advantage 0);
  ``dynamic_sampling/groups_left`` counts them and a warning says so the first time.
- Under DDP every rank fills its own slots (a prompt's group stays on its rank) and all ranks run the same number
  of rounds, a rank with nothing left to fill sitting the round out, so every rank ends with the same number of
  groups and the gathers that follow line up.
- Flat means: the group's weighted rewards have zero standard deviation, as ``frac_reward_zero_std`` counts
  them, or fewer than two of its completions were scored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_gspo.advantages import group_advantages, nanstd
from lightning_gspo.rollout import Rollout

SampleAndScore = Callable[[list[dict[str, Any]]], tuple[Rollout, torch.Tensor]]


def flat_groups(scores: torch.Tensor, num_generations: int, reward_weights: list[float] | None) -> list[bool]:
    """Which groups of the (B, R) scores (NaN where unscored) have no reward variance."""
    rewards = group_advantages(scores, num_generations, reward_weights, "none").rewards
    std = nanstd(rewards.view(-1, num_generations), dim=1)
    return (torch.isnan(std) | torch.isclose(std, torch.zeros_like(std))).tolist()


@dataclass
class RefillStats:
    groups: int = 0
    """Groups in the generation batch (this rank)."""
    first_flat: int = 0
    """Flat groups in the first round."""
    rounds: int = 0
    """Extra rounds run."""
    drawn: int = 0
    """Extra prompts drawn."""
    new_flat: int = 0
    """Extra prompts whose groups were flat too (dropped)."""
    left: int = 0
    """Flat groups left in the batch when the rounds ran out."""

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/first_round_zero_std": self.first_flat / max(1, self.groups),
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/prompts_drawn": float(self.drawn),
            "dynamic_sampling/groups_dropped": float(self.first_flat - self.left + self.new_flat),
            "dynamic_sampling/groups_left": float(self.left),
        }


class DynamicSampler:
    """Refills a freshly sampled and scored generation batch. ``draw(start, count)`` gives extra prompts at a
    stream position; ``any_rank_short(n)`` says whether any rank still has flat groups (n on this one)."""

    def __init__(
        self,
        num_generations: int,
        reward_weights: list[float] | None,
        max_rounds: int,
        pad_token_id: int,
    ):
        self.g, self.weights, self.max_rounds, self.pad = (
            num_generations,
            reward_weights,
            max_rounds,
            pad_token_id,
        )
        self.warned = False

    def refill(
        self,
        rollout: Rollout,
        scores: torch.Tensor,
        sample_and_score: SampleAndScore,
        draw: Callable[[int], list[dict[str, Any]]],
        any_rank_short: Callable[[int], bool] = lambda n: n > 0,
    ) -> tuple[Rollout, torch.Tensor, RefillStats]:
        """(the rollout with flat groups replaced, its scores, what it took)."""
        flat = flat_groups(scores, self.g, self.weights)
        short = [i for i, f in enumerate(flat) if f]  # slots still to fill, in batch order
        stats = RefillStats(groups=len(flat), first_flat=len(short))
        parts, part_scores = [rollout], [scores]
        source = [(0, i) for i in range(len(flat))]  # slot -> (part, group within the part)
        while stats.rounds < self.max_rounds and any_rank_short(len(short)):
            stats.rounds += 1
            if not short:
                continue  # this rank is full; the others still sample
            new, new_scores = sample_and_score(draw(len(short)))
            stats.drawn += len(short)
            informative = [j for j, f in enumerate(flat_groups(new_scores, self.g, self.weights)) if not f]
            stats.new_flat += len(short) - len(informative)
            parts.append(new)
            part_scores.append(new_scores)
            for slot, j in zip(short, informative):
                source[slot] = (len(parts) - 1, j)
            short = short[len(informative) :]
        stats.left = len(short)
        self._warn_once(stats)
        if len(parts) == 1:
            return rollout, scores, stats
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p.completion_ids.shape[0])
        rows = torch.tensor([offsets[p] + j * self.g + t for p, j in source for t in range(self.g)])
        merged = Rollout.cat(parts, self.pad).rows(rows)
        return merged, torch.cat(part_scores)[rows.to(scores.device)], stats

    def _warn_once(self, stats: RefillStats) -> None:
        if stats.left and not self.warned:
            self.warned = True
            warnings.warn(
                f"dynamic sampling ran dynamic_sampling_max_rounds={self.max_rounds} extra rounds and {stats.left} "
                f"of {stats.groups} groups still have equal rewards; they stay in the batch with advantage 0 (shown "
                "as dynamic_sampling/groups_left). Raise dynamic_sampling_max_rounds to draw further, or check "
                "the reward functions if this persists (a task that is always solved, or never).",
                UserWarning,
                stacklevel=2,
            )
