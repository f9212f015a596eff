"""What a training run carries from one Lightning step to the next, and across a resume, beyond the weights and
the optimizer: the rollout in flight, the accumulation position, the metric window, the entropy bonus's
coefficient, the extra-prompt stream's position (dynamic sampling) and the RNG.

A resumed run must continue exactly as the uninterrupted one: the same prompts (the data module's position),
the same micro-batches of the same rollout (which is saved whole, with its old and reference log-probs), the
same accumulation phase, and the same random numbers. The RNG is applied at the next training step rather than
on load, because Lightning draws from the global generator while it sets up (the data loader's base seed), which
the uninterrupted run did before the checkpoint, not after it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_gspo.entropy_control import EntropyControl
from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.reporting import MetricWindow
from lightning_gspo.rollout import Rollout


@dataclass
class RunState:
    micro_steps: int = 0
    """Micro-batches trained so far (the accumulation phase is ``micro_steps % gradient_accumulation_steps``)."""
    old_from_first_pass: bool = False
    """The rollout's old log-probs are being written by its first pass (see ``GSPOModule``)."""
    position: tuple[int, int, int] | None = None
    """(epoch, generation batch, repeat) of the last batch trained, for the data module's resume."""
    last_logged_step: int = 0
    window: MetricWindow = field(default_factory=MetricWindow)
    """Metrics gathered since the last log."""
    rollout: Rollout | None = None
    """The generation batch in use."""
    pending_rng: tuple[torch.Tensor, Any] | None = None
    """(CPU, CUDA) generator states to apply at the next training step."""
    entropy: EntropyControl | None = None
    """The entropy bonus's coefficient (adaptive control's state); None without a bonus."""
    extra_prompts_drawn: int = 0
    """Position in the data module's extra-prompt stream (dynamic sampling)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "micro_steps": self.micro_steps,
            "old_from_first_pass": self.old_from_first_pass,
            "position": self.position,
            "last_logged_step": self.last_logged_step,
            "window": (dict(self.window.sums), dict(self.window.counts)),
            "rollout": None
            if self.rollout is None
            else {
                **{k: v.cpu() for k, v in self.rollout.tensors().items()},
                "texts": self.rollout.texts,
                # A VLM's image tensors: without them a resumed step would run its image tokens as plain text.
                **({"images": self.rollout.images.state_dict()} if self.rollout.images is not None else {}),
            },
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "entropy": None if self.entropy is None else self.entropy.state_dict(),
            "extra_prompts_drawn": self.extra_prompts_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_steps, self.last_logged_step = state["micro_steps"], state["last_logged_step"]
        self.old_from_first_pass = state.get("old_from_first_pass", False)
        self.position = state["position"]
        self.extra_prompts_drawn = state.get("extra_prompts_drawn", 0)
        self.window.sums.update(state["window"][0])
        self.window.counts.update(state["window"][1])
        if state["rollout"] is not None:
            saved = dict(state["rollout"])
            texts = saved.pop("texts")
            images = saved.pop("images", None)
            images = None if images is None else ImageBatch.from_state(images)
            self.rollout = Rollout(**saved, texts=texts, images=images)
        self.pending_rng = (state["rng"], state["cuda_rng"])
        if self.entropy is not None and state.get("entropy") is not None:
            self.entropy.load_state_dict(state["entropy"])

    def apply_pending_rng(self) -> None:
        if self.pending_rng is None:
            return
        cpu, cuda = self.pending_rng
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        self.pending_rng = None

    def rollout_to(self, device: torch.device) -> None:
        """Move a rollout restored from a checkpoint (before the model reached its device) to ``device``."""
        if self.rollout is not None:
            for key, value in self.rollout.tensors().items():
                setattr(self.rollout, key, value.to(device))
            if self.rollout.images is not None:
                self.rollout.images = self.rollout.images.to(device)

    def resume_data(self, datamodule: Any) -> None:
        """Tell the data module where the checkpointed run stopped, so the prompt order continues."""
        if self.position is None:
            return
        if hasattr(datamodule, "resume_after"):
            datamodule.resume_after(*self.position)
        else:
            warnings.warn(
                "resuming without a PromptGroupDataModule: the prompt order restarts at the beginning of the "
                "epoch.",
                UserWarning,
                stacklevel=3,
            )
