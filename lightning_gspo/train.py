"""Hydra entry point: ``python -m lightning_gspo.train algorithm=gspo model=tiny trainer=ddp ...``.

``train(cfg)`` composes the pieces (data module, module, callbacks, loggers, trainer) and runs; ``main()`` only
wraps it for Hydra. Nothing else in the package imports Hydra, so every piece can be built by hand.

Run as the program on a machine whose cores other processes already keep busy, it asks OpenMP's threads to sleep
rather than spin when idle (``lightning_gspo.openmp``: several times faster on shared cores, slower on idle
ones), before anything imports torch.
"""

from __future__ import annotations

from lightning_gspo.openmp import is_cli_entry, prefer_passive_wait

# Before torch (imported by lightning below) loads OpenMP, which reads its environment once.
PASSIVE_WAIT_SET = is_cli_entry(__name__) and prefer_passive_wait()

import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from lightning_gspo.config import GSPOConfig
from lightning_gspo.models import ModelConfig
from lightning_gspo.module import GSPOModule
from lightning_gspo.progress import StepProgressBar

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, GSPOModule, L.Trainer]:
    """The data module, module and trainer a config describes, before anything runs."""
    algo_values = OmegaConf.to_container(cfg.algorithm, resolve=True)
    if algo_values.get("reward_weights") is None and cfg.reward.get("weights") is not None:
        algo_values["reward_weights"] = list(cfg.reward.weights)
    algo = GSPOConfig.from_dict(algo_values)
    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = hydra.utils.instantiate(cfg.data, algorithm=algo)
    # Entries are import paths, reward models' directories or hub names, or mappings {model: ..., batch_size: ...}.
    reward_funcs = OmegaConf.to_container(cfg.reward.funcs, resolve=True)
    module = GSPOModule(model_cfg, reward_funcs=reward_funcs, config=algo)
    callbacks = _with_progress_bar(
        [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()],
        cfg.trainer.get("enable_progress_bar", True),
    )
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer_kwargs: dict[str, Any] = {}
    if algo.max_steps > 0:
        trainer_kwargs["max_steps"] = algo.max_steps
        trainer_kwargs["max_epochs"] = -1
    else:
        trainer_kwargs["max_epochs"] = math.ceil(algo.num_train_epochs)
    if algo.eval_steps and cfg.trainer.get("val_check_interval") is None:
        # Lightning counts training batches, and one training batch here is one micro-batch.
        trainer_kwargs["val_check_interval"] = algo.eval_steps * algo.gradient_accumulation_steps
        trainer_kwargs["check_val_every_n_epoch"] = None
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_kwargs
    )
    if algo.max_steps <= 0 and algo.num_train_epochs != int(algo.num_train_epochs):
        datamodule.trainer = trainer
        datamodule.setup("fit")
        trainer.fit_loop.max_steps = datamodule.optimizer_steps(algo.num_train_epochs)
    return datamodule, module, trainer


def _with_progress_bar(callbacks: list, enabled: bool) -> list:
    """The bar over optimizer steps when the trainer shows one and no callback is a bar already; none when it
    shows none (Lightning refuses a bar callback with ``enable_progress_bar=false``)."""
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    if not enabled:
        return [c for c in callbacks if c not in bars]
    return callbacks if bars else [*callbacks, StepProgressBar()]


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("plot") and trainer.is_global_zero:
        from lightning_gspo.plots import plot_run

        for logger in trainer.loggers:
            csv = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
            if csv.exists():
                png = plot_run(csv, Path(cfg.output_dir) / "reward_curve.png", title=_title(cfg))
                log.info("reward curve: %s", png)
    return metrics


def _title(cfg: DictConfig) -> str:
    a = cfg.algorithm
    return f"{a.importance_sampling_level} level, loss {a.loss_type}, eps {a.epsilon}/{a.epsilon_high or a.epsilon}"


@hydra.main(version_base="1.3", config_path="pkg://lightning_gspo.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if PASSIVE_WAIT_SET:
        log.info(
            "OMP_WAIT_POLICY=PASSIVE: other processes keep this machine's cores busy, so idle OpenMP threads "
            "sleep instead of spinning (export OMP_WAIT_POLICY to choose otherwise)"
        )
    metrics = train(cfg)
    return metrics.get("reward")


if __name__ == "__main__":
    main()
