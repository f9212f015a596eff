"""``GSPOModule``'s Lightning hooks for held-out evaluation: the baseline before training (``eval_on_start``),
validation during it and ``trainer.test`` after it, each scored by the module's ``Evaluator``
(``lightning_gspo.evaluation``) with metrics under ``eval/`` and ``test/``.

A mixin, so the module's class holds training and this file holds evaluation; it uses the module's
``evaluator``, ``sampler``, ``policy``, ``config`` and ``_log_metrics``.
"""

from __future__ import annotations

from lightning_gspo.data import EvalBatch


class EvaluationHooks:
    def on_train_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        loader = dm.val_dataloader() if self.config.eval_on_start and dm is not None else []
        if self.global_step == 0 and loader:
            self.evaluator.reset()
            for batch in loader:
                self.evaluator.add_batch(self.policy, batch, self.device)
            self._log_metrics(self._eval_metrics("eval"))  # the baseline, at step 0

    def on_validation_epoch_start(self) -> None:
        self.sampler.reward_models_to(self.device)  # trainer.validate runs no fit hooks
        self.evaluator.reset()

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self.evaluator.add_batch(self.policy, batch, self.device)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("eval")

    def on_test_epoch_start(self) -> None:
        self.sampler.reward_models_to(self.device)
        self.evaluator.reset()

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self.evaluator.add_batch(self.policy, batch, self.device)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _eval_metrics(self, prefix: str) -> dict[str, float]:
        self.evaluator.totals.reduce(self.trainer.strategy)
        return self.evaluator.totals.metrics(prefix)

    def _log_eval(self, prefix: str) -> None:
        if self.trainer.sanity_checking:  # Lightning's pre-training check logs nothing
            return
        metrics = self._eval_metrics(prefix)  # already the same on every rank
        fitting = self.trainer.state.fn == "fit"
        if fitting:
            # Written at the optimizer step, like the training metrics (Lightning's own logging would count
            # micro-batches); self.log keeps them for callbacks (ModelCheckpoint's monitor) and the progress bar.
            self._log_metrics(metrics)
        reward = metrics.pop(f"{prefix}/reward", None)
        self.log_dict(metrics, logger=not fitting, sync_dist=False)
        if reward is not None:
            self.log(f"{prefix}/reward", reward, prog_bar=True, logger=not fitting, sync_dist=False)
