"""Which rows of a micro-batch go through the backbone together, and how wide: the plan behind the log-prob
forward's layouts (``policy_logprobs.per_token_logps`` carries it out).

Completions are right-padded to the generation batch's longest and prompts left-padded to its longest, so a
(B, P + C) block spends much of its forward and backward on padding when lengths spread (a real model's chat
completions run from a few tokens to ``max_completion_length``). Layouts, all exact (the same log-probs and
gradients as the padded block, up to float rounding):

- ``padded``: the whole block, as it arrives (for comparison).
- ``trimmed``: the columns no row needs are cut: completion columns after the micro-batch's last scored token
  (under causal attention nothing before them sees them) and leading prompt columns that are padding in every
  row (masked keys; the position ids come from the attention mask, so they do not move).
- ``buckets``: rows sorted by completion length and cut into contiguous runs, each trimmed to its own longest
  completion and prompt. Each run is one more backbone call (one more pass over the weights, forward and
  backward), so the runs are chosen to minimise ``runs x call_cost + positions`` (an exact partition by dynamic
  programming over the sorted lengths; B is a micro-batch, so O(B^2) is nothing). ``call_cost`` is what one
  call costs in token positions, measured (``benchmarks/padding_free.py``, docs/benchmarks.md).

Not offered: packing every row into one row with position ids restarting per row (TRL's ``padding_free`` in its
SFT and DPO configs; GRPOConfig 1.16 has none). With SDPA (the CPU) its mask is dense and attention costs
O(T_total^2): measured 2.26x the padded time at 64 tokens and no better than buckets at 128
(docs/benchmarks.md). With flash-attention's varlen kernel on a GPU it would be the cheapest layout; that is
unmeasured here, so it is not shipped.

Rows with no scored token are left out of every call (their log-probs are zero, with no gradient, as in the
padded block), unless no row has one: then one column is kept so the result stays attached to the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("padded", "trimmed", "buckets")

# One more backbone call costs about this many token positions of forward and backward on the CPU
# (SmolLM2-135M, 2 threads: docs/benchmarks.md, "Padding-free log-probs").
CALL_COST_POSITIONS = 64


@dataclass(frozen=True)
class Bucket:
    """Rows that run through the backbone together, and the columns they need."""

    rows: torch.Tensor  # (n,) long: row indices into the micro-batch
    prompt_start: int  # first prompt column any of the rows attends to
    width: int  # completion columns: the rows' longest scored completion


@dataclass(frozen=True)
class Plan:
    """What a micro-batch needs: the columns to keep, each row's lengths; ``buckets`` cuts its rows."""

    width: int  # completion columns kept: the longest scored completion (at least 1); pad back to C after
    prompt_start: int  # leading prompt columns that no scored row attends to
    lengths: list[int]  # (B,) each row's scored completion length (last scored column + 1)
    starts: list[int]  # (B,) each row's first attended prompt column
    scored: list[int]  # rows with a scored token (every row when none has)

    def buckets(self, layout: str, prompt_width: int, shared_prompt: bool = False) -> list[Bucket]:
        """The backbone calls for ``layout`` ('padded', 'trimmed' or 'buckets'); ``prompt_width`` is P before
        trimming. ``shared_prompt``: the prompts run once apart from the buckets (the shared-prompt forward),
        so a bucket's cost counts its completion positions only."""
        if layout == "padded":
            return [Bucket(torch.arange(len(self.lengths)), 0, self.width)]
        if layout == "trimmed":
            return [Bucket(torch.tensor(self.scored), self.prompt_start, self.width)]
        order = sorted(self.scored, key=lambda i: (self.lengths[i], i))
        widths = [max(self.lengths[i], 1) for i in order]
        prompts = [prompt_width - self.starts[i] for i in order]
        cuts = _partition(widths, prompts, shared_prompt, CALL_COST_POSITIONS)
        return [
            Bucket(
                torch.tensor(order[lo:hi]),
                self.prompt_start if shared_prompt else min(self.starts[i] for i in order[lo:hi]),
                widths[hi - 1],
            )
            for lo, hi in zip(cuts[:-1], cuts[1:])
        ]


def scored_lengths(completion_mask: torch.Tensor) -> list[int]:  # (B, C) bool
    """Each row's last scored column + 1 (0 for none): what a row needs, whatever holes its mask has."""
    b, c = completion_mask.shape
    if c == 0:
        return [0] * b
    cols = torch.arange(1, c + 1, device=completion_mask.device)
    return torch.where(completion_mask, cols, 0).amax(1).tolist()


def prompt_starts(prompt_mask: torch.Tensor) -> list[int]:  # (B, P)
    """Each row's first attended prompt column (at most P - 1: the last prompt column predicts the first
    completion token even when a prompt is empty)."""
    b, p = prompt_mask.shape
    if p == 0:
        return [0] * b
    cols = torch.arange(p, device=prompt_mask.device)
    return torch.where(prompt_mask.bool(), cols, p).amin(1).clamp(max=p - 1).tolist()


def plan_rows(
    completion_mask: torch.Tensor,  # (B, C) bool
    prompt_mask: torch.Tensor,  # (B, P)
    layout: str,
) -> Plan:
    """What the rows of a micro-batch need under ``layout`` (the padded layout keeps everything)."""
    if layout not in LAYOUTS:
        raise ValueError(f"logprobs_layout={layout!r}: choose one of {', '.join(LAYOUTS)}.")
    b, c = completion_mask.shape
    if layout == "padded":
        return Plan(c, 0, [c] * b, [0] * b, list(range(b)))
    lengths = scored_lengths(completion_mask)
    starts = prompt_starts(prompt_mask)
    scored = [i for i in range(b) if lengths[i] > 0] or list(range(b))
    prompt_start = min(starts[i] for i in scored)
    return Plan(max(max(lengths, default=0), 1), prompt_start, lengths, starts, scored)


def _partition(widths: list[int], prompts: list[int], shared_prompt: bool, call_cost: int) -> list[int]:
    """Cut points [0, ..., n] of ascending ``widths`` into runs minimising sum(call_cost + rows x positions),
    positions being the run's longest completion plus (unless shared) its longest prompt."""
    n = len(widths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        longest_prompt = 0
        for lo in range(hi - 1, -1, -1):  # run = rows lo..hi-1; its widest completion is widths[hi - 1]
            longest_prompt = max(longest_prompt, prompts[lo])
            positions = widths[hi - 1] + (0 if shared_prompt else longest_prompt)
            cost = best[lo] + call_cost + (hi - lo) * positions
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(cut[cuts[-1]])
    return cuts[::-1]
