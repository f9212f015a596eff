"""The training progress bar: optimizer steps out of the run's total, with the reward.

Lightning's bars count training batches per epoch. Here a training batch is one micro-batch, and a step-bounded
run is one endless epoch (``max_epochs=-1``), so they showed ``Epoch 0/-2`` and ``4/2`` (four micro-batches of
a two-step run). This bar counts ``global_step``, which is optimizer steps under manual optimization, against
``max_steps`` (or the steps an epoch-bounded run will take), across epochs and from where a resumed run starts.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` over optimizer steps (see the module notes); validation bars are Lightning's."""

    @property
    def train_description(self) -> str:
        return "step"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=total_optimizer_steps(trainer, pl_module))
        bar.initial = 0
        bar.n = trainer.global_step  # a resumed run starts where it stopped
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable or step == bar.n or not self._should_update(step, bar.total):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version says nothing about training
        return metrics


def total_optimizer_steps(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """``max_steps`` when set, else the training batches Lightning expects over every epoch divided by the
    micro-batches per optimizer step; None when that is unknown (an endless data loader)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    batches = trainer.estimated_stepping_batches
    if not math.isfinite(batches):
        return None
    accumulation = getattr(getattr(pl_module, "config", None), "gradient_accumulation_steps", 1)
    return math.ceil(batches / accumulation)
