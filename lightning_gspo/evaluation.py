"""Held-out evaluation: completions for prompts the policy does not train on, scored by the training rewards.

For each evaluation batch of prompts, ``Evaluator`` samples
- one greedy completion per prompt (``temperature = 0``, no sampling): ``reward`` (the weighted reward, as in
  training) and ``rewards/<fn>/mean``; ``completions/mean_length`` and ``completions/clipped_ratio``;
- ``num_generations_eval`` completions per prompt at the training temperature (skipped when 0):
  ``sampled/reward`` and ``pass@1`` / ``pass@k`` for ``k = num_generations_eval``, with Chen et al.'s (2021)
  unbiased estimator, a completion succeeding when the success reward function gives at least
  ``eval_success_threshold``.
Metric names carry one prefix: ``eval/`` for the validation split, ``test/`` for the test split.

Choices, and why:
- Totals, not means, are accumulated (weighted sums and a prompt count), and reduced over ranks once at the
  end, so N ranks give exactly the numbers of one process. A padding batch (weight 0) keeps ranks' batch
  counts equal for strategies whose forward needs every rank (FSDP).
- Sampling runs under a forked RNG seeded by the config's seed and the batch's index: evaluation draws nothing
  from the training stream (a run with evaluation trains exactly as one without), the same batch gets the same
  samples at every evaluation and on any number of ranks, and only the policy changes between evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lightning_gspo.data import EvalBatch
from lightning_gspo.decode_engine import build_engine
from lightning_gspo.rollout import sample_completions
from lightning_gspo.scored_sampling import score_rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k completions drawn without replacement from n, of which c are
    correct, is correct: ``1 - C(n - c, k) / C(n, k)``, as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class EvalTotals:
    """Weighted sums over the prompts evaluated so far; ``metrics`` turns them into means."""

    sums: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def reduce(self, strategy) -> None:
        """Sum every total over the ranks, in one collective (keys sorted: the same order on every rank)."""
        if strategy is None or strategy.world_size == 1 or not self.sums:
            return
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=strategy.root_device)
        self.sums = dict(zip(keys, strategy.reduce(values, reduce_op="sum").tolist()))

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {}
        for key, value in self.sums.items():
            if not key.startswith("n/"):
                count = self.sums.get(f"n/{key}", 0.0)
                out[f"{prefix}/{key}"] = value / count if count else math.nan
        return out


class Evaluator:
    """Samples and scores held-out completions for a policy, accumulating ``EvalTotals``."""

    def __init__(self, tokenizer, config, eos: list[int], reward_funcs, reward_names):
        self.tokenizer, self.config, self.eos = tokenizer, config, eos
        self.reward_funcs, self.reward_names = reward_funcs, list(reward_names)
        name = config.eval_success_reward or self.reward_names[0]
        if name not in self.reward_names:
            raise ValueError(
                f"eval_success_reward={name!r} is not one of the reward functions ({', '.join(self.reward_names)}); "
                "name the one whose value decides success for pass@k."
            )
        self.success_index = self.reward_names.index(name)
        self.weights = torch.tensor(config.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        self.greedy = build_engine(tokenizer, config, eos, greedy=True)
        self.sampled = build_engine(tokenizer, config, eos)
        self.totals = EvalTotals()

    @property
    def k(self) -> int:
        """Sampled completions per prompt (0: none)."""
        cfg = self.config
        return cfg.num_generations if cfg.num_generations_eval is None else cfg.num_generations_eval

    def reset(self) -> None:
        self.totals = EvalTotals()

    @torch.no_grad()
    def add_batch(self, policy, batch: EvalBatch, device: torch.device) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.config.seed * 100_003 + batch.index)
            self._add_greedy(policy, batch, device)
            if self.k > 0:
                self._add_sampled(policy, batch, device)

    def _add_reward(self, key: str, scores: torch.Tensor, w: float) -> None:
        """The weighted reward as training computes it: a sample no function scored is left out."""
        scored = ~scores.isnan().all(1)
        self.totals.add(key, w * (scores[scored] * self.weights).nansum())
        self.totals.add(f"n/{key}", w * scored.sum())

    def _add_greedy(self, policy, batch: EvalBatch, device) -> None:
        r = sample_completions(
            policy, self.tokenizer, batch.records, self.config, self.greedy, self.eos, device, 1
        )
        scores, w, t = (
            score_rollout(self.reward_funcs, self.reward_names, r, batch.records, 1),
            batch.weight,
            self.totals,
        )
        for j, name in enumerate(self.reward_names):
            scored = ~scores[:, j].isnan()
            t.add(f"rewards/{name}/mean", w * scores[scored, j].sum())
            t.add(f"n/rewards/{name}/mean", w * scored.sum())
        self._add_reward("reward", scores, w)
        lengths = r.completion_mask.sum(1).float()
        for key, value in (
            ("completions/mean_length", lengths),
            ("completions/clipped_ratio", r.is_truncated),
        ):
            t.add(key, w * value.float().sum())
            t.add(f"n/{key}", w * len(batch.records))

    def _add_sampled(self, policy, batch: EvalBatch, device) -> None:
        k, w, t = self.k, batch.weight, self.totals
        r = sample_completions(
            policy, self.tokenizer, batch.records, self.config, self.sampled, self.eos, device, k
        )
        scores = score_rollout(self.reward_funcs, self.reward_names, r, batch.records, k)
        self._add_reward("sampled/reward", scores, w)
        success = scores[:, self.success_index] >= self.config.eval_success_threshold  # NaN: not a success
        correct = success.view(len(batch.records), k).sum(1).tolist()
        for kk in sorted({1, k}):
            t.add(f"pass@{kk}", w * sum(pass_at_k(k, c, kk) for c in correct))
            t.add(f"n/pass@{kk}", w * len(batch.records))
