"""The entropy bonus's coefficient across optimizer steps, as TRL 1.16 runs it: fixed, or Skywork-OR1's adaptive
control; and the collectives that make the entropy quantile and the controller's measurement span every rank.

Choices, and why (TRL's, so that a run matches TRL's):

- Every micro-batch of an optimizer step applies the same coefficient, the one in force when the step began; an
  adaptive update takes effect at the next step.
- Adaptive control measures the mean entropy of the tokens the policy loss acts on over the whole step: entropy
  sums and token counts are added over its micro-batches and ranks (a token-weighted mean, not a mean of
  means). At or below ``entropy_target`` the coefficient rises by ``entropy_coef_delta`` (at most
  ``entropy_coef_max``), above it it falls (at least ``entropy_coef_min``). The bonus applies only while the
  last measurement is at or below the target, so none before the first measurement.
- The state (coefficient, last measurement, the step's sums so far) is part of ``RunState``: a resumed run
  continues the same sequence of coefficients.
- Under torch.distributed the quantile of ``top_entropy_quantile`` is taken over every rank's tokens, as TRL
  gathers them; ranks may hold different token counts, so each rank's values are padded to the longest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class EntropyControl:
    coef: float
    """The coefficient: fixed, or the adaptive controller's current value."""
    adaptive: bool = False
    target: float = 0.2
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    last_entropy: float = math.inf
    """The mean entropy measured at the last optimizer step (inf before the first)."""
    window: torch.Tensor | None = None
    """(entropy sum, token count) of this optimizer step's micro-batches so far, float32, this rank's."""

    @classmethod
    def from_config(cls, cfg: Any) -> EntropyControl | None:
        """The control a ``GSPOConfig`` asks for; None when the loss has no entropy bonus."""
        if not cfg.entropy_bonus_enabled:
            return None
        return cls(
            coef=float(cfg.entropy_coef),
            adaptive=bool(cfg.use_adaptive_entropy),
            target=float(cfg.entropy_target),
            coef_min=float(cfg.entropy_coef_min),
            coef_max=float(cfg.entropy_coef_max),
            delta=float(cfg.entropy_coef_delta),
        )

    def applied(self) -> float:
        """The coefficient this optimizer step's micro-batches apply."""
        if self.adaptive and not self.last_entropy <= self.target:
            return 0.0
        return self.coef

    def observe(self, entropy_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Add one micro-batch's entropy sum and token count (over the tokens the policy loss acts on)."""
        if not self.adaptive:
            return
        stats = torch.stack([entropy_sum.detach().float(), count.detach().float()])
        self.window = stats if self.window is None else self.window + stats

    def step(self) -> None:
        """At an optimizer step: update the adaptive coefficient from the step's mean entropy over every rank."""
        if not self.adaptive:
            return
        stats = torch.zeros(2) if self.window is None else self.window
        if _distributed():  # every rank reaches its optimizer step together
            stats = stats.clone()
            dist.all_reduce(stats)
        entropy = (stats[0] / stats[1].clamp(min=1.0)).item()
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = entropy
        self.window = None

    def state_dict(self) -> dict[str, Any]:
        window = None if self.window is None else self.window.tolist()
        return {"coef": self.coef, "last_entropy": self.last_entropy, "window": window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
        window = state.get("window")
        self.window = None if window is None else torch.tensor(window, dtype=torch.float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``values`` concatenated in rank order (lengths may differ); ``values`` alone without
    torch.distributed."""
    if not _distributed():
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
