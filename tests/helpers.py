"""Small builders shared by the training tests: a module, a data module and a quiet CPU trainer."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.module import GSPOModule
from lightning_gspo.tasks.arithmetic import make_dataset

REWARDS = [
    "lightning_gspo.rewards.arithmetic.correctness_reward",
    "lightning_gspo.rewards.arithmetic.format_reward",
]
SMALL = dict(
    num_generations=4,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    max_completion_length=4,
    max_prompt_length=16,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    seed=1,
)


def algo(**overrides) -> GSPOConfig:
    return GSPOConfig(**{**SMALL, **overrides})


def module_and_data(tiny_dir, num_prompts: int = 64, **overrides):
    cfg = algo(**overrides)
    module = GSPOModule({"name_or_path": str(tiny_dir)}, REWARDS, cfg)
    data = PromptGroupDataModule(make_dataset(num_prompts, seed=3), algorithm=cfg)
    return module, data


def trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return L.Trainer(**{**defaults, **kwargs})


def logged(tmp_path: Path) -> list[dict[str, str]]:
    with open(Path(tmp_path) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def loss_of(module: GSPOModule, r, **kwargs):
    """``loss.micro_batch_loss`` of micro-batch ``r`` with the module's policy and config, as a training step
    computes it (``kwargs``: world_size, record_old, rows; the module's load-balancing coefficient)."""
    from lightning_gspo.loss import micro_batch_loss

    kwargs.setdefault("router_aux_loss_coef", module.router_aux_coef)
    return micro_batch_loss(r, module.config, lambda s: module._logps(s, "policy", entropy=True), **kwargs)


def execute_notebook(name: str, tmp_path: Path, monkeypatch, steps: int, timeout: int = 600) -> str:
    """Run ``notebooks/<name>`` top to bottom in ``tmp_path`` with ``steps`` training steps; what it printed."""
    import pytest

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LIGHTNING_GSPO_NOTEBOOK_STEPS", str(steps))
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / name, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
