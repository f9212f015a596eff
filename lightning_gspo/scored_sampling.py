"""A generation batch, sampled and scored: the engine's completions of the prompts, the reward functions' scores
and, with dynamic sampling, the refill of groups whose rewards are all equal.

``GSPOModule`` turns the result into advantages and log-probs; what it hands in are the two things only the
trainer knows: where the extra prompts come from and whether any rank still needs some.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_gspo.dynamic_sampling import DynamicSampler
from lightning_gspo.rewards import score_completions
from lightning_gspo.rewards.reward_model import RewardModel
from lightning_gspo.rollout import GenerationEngine, Rollout, sample_completions


def score_rollout(
    reward_funcs, reward_names, r: Rollout, records: list[dict[str, Any]], num_generations: int
) -> torch.Tensor:
    """(B, R) float32 rewards of a rollout's completions, NaN where a function returned None; ``records`` are
    the prompts' dataset rows, whose other columns reach the reward functions once per completion."""
    ids = [row[m].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
    g = num_generations
    columns = {k: [rec[k] for rec in records for _ in range(g)] for k in records[0] if k != "prompt"}
    texts = r.texts["prompts"], r.texts["completions"]
    return torch.tensor(
        score_completions(reward_funcs, reward_names, *texts, ids, columns), dtype=torch.float32
    )


class ScoredSampler:
    """Samples ``num_generations`` completions per prompt record with ``engine`` and scores them."""

    def __init__(
        self, tokenizer, config, engine: GenerationEngine, eos: list[int], reward_funcs, reward_names
    ):
        self.tokenizer, self.config, self.engine, self.eos = tokenizer, config, engine, eos
        self.reward_funcs, self.reward_names = reward_funcs, reward_names
        self.dynamic: DynamicSampler | None = None
        if config.dynamic_sampling:  # DAPO's (lightning_gspo.dynamic_sampling)
            self.dynamic = DynamicSampler(
                config.num_generations,
                config.reward_weights,
                config.dynamic_sampling_max_rounds,
                tokenizer.pad_token_id,
            )

    def reward_models_to(self, device: torch.device) -> None:
        """Reward models sit outside the module's registry (``RewardModel`` is no ``nn.Module``, so it is never
        trained or checkpointed) and Lightning moves nothing of theirs; a no-op once they are there."""
        for f in self.reward_funcs:
            if isinstance(f, RewardModel):
                f.to(device)

    def sample_and_score(
        self, policy, records: list[dict[str, Any]], device: torch.device
    ) -> tuple[Rollout, torch.Tensor]:
        """Completions of ``records``' prompts and their (B, R) rewards, NaN where a function returned None."""
        r = sample_completions(policy, self.tokenizer, records, self.config, self.engine, self.eos, device)
        scores = score_rollout(self.reward_funcs, self.reward_names, r, records, self.config.num_generations)
        return r, scores.to(device)

    def generation_batch(
        self,
        policy,
        records: list[dict[str, Any]],
        device: torch.device,
        draw: Callable[[int], list[dict[str, Any]]],
        any_rank_short: Callable[[int], bool],
    ) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """(rollout, rewards, dynamic sampling's metrics or {}); ``draw(count)`` gives extra prompts."""
        r, rewards = self.sample_and_score(policy, records, device)
        if self.dynamic is None:
            return r, rewards, {}
        r, rewards, stats = self.dynamic.refill(
            r, rewards, lambda more: self.sample_and_score(policy, more, device), draw, any_rank_short
        )
        return r, rewards, stats.metrics()
