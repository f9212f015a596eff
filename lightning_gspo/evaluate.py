"""Evaluate a checkpoint or an exported model on held-out prompts, without training:

    python -m lightning_gspo.evaluate --ckpt outputs/.../checkpoints/last.ckpt
    python -m lightning_gspo.evaluate --model outputs/.../export/merged data=gsm8k reward=math data.val_fraction=0.2
    python -m lightning_gspo.evaluate --ckpt run.ckpt --split test data.test_source=held_out.jsonl

Prints the metrics (the same ``eval/`` or ``test/`` names training logs) and writes them as JSON (``--out``,
default ``eval.json`` beside the checkpoint or model).

Settings come from the training configs (``conf/``) composed with the ``key=value`` overrides, as for
``python -m lightning_gspo.train``; a checkpoint's own settings (model, reward functions, algorithm: its
``hyper_parameters``) take the place of the ``model``, ``reward`` and ``algorithm`` groups, with ``group.key=value``
overrides applied on top (``group=option`` chooses the config's option instead). A reward model is rebuilt from
the path the checkpoint recorded; one that was built in memory cannot be, and the reward functions must then be
given (``reward=...`` or ``reward.funcs=[...]``, or ``evaluate(..., reward_funcs=[...])``). The held-out prompts
are the data config's: the default task holds out the same 20 sums as training (the same seed), so a checkpoint
of the default job is scored on sums it never trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lightning_gspo.config import GSPOConfig
from lightning_gspo.export import load_policy_weights
from lightning_gspo.models import ModelConfig
from lightning_gspo.module import GSPOModule
from lightning_gspo.rewards import BUILT_REWARD_MODEL


def evaluate(
    overrides: list[str],
    ckpt: str | Path | None = None,
    model_dir: str | Path | None = None,
    split: str = "val",
    reward_funcs: list | None = None,
) -> dict[str, float]:
    """The held-out metrics of a checkpoint's or a model directory's policy (one process). ``reward_funcs``
    (callables, import paths or reward models, as ``GSPOModule`` takes them) replace the checkpoint's and the
    config's; a run that trained with a reward model built in memory needs them."""
    if (ckpt is None) == (model_dir is None):
        raise ValueError("give a checkpoint (--ckpt) or a model directory (--model), one of the two.")
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "output_dir=."])
    saved = _checkpoint_settings(ckpt) if ckpt is not None else {}
    model_values = _group(cfg, "model", saved.get("model"), overrides)
    if model_dir is not None:
        model_values = {"name_or_path": str(model_dir), "dtype": model_values.get("dtype", "float32")}
    algo_values = _group(cfg, "algorithm", saved.get("config"), overrides)
    rewards = saved.get("reward_funcs")
    if reward_funcs is not None:
        rewards = reward_funcs
    elif not rewards or _names_group("reward", overrides):
        rewards = OmegaConf.to_container(cfg.reward.funcs, resolve=True)
        if algo_values.get("reward_weights") is None and cfg.reward.get("weights") is not None:
            algo_values["reward_weights"] = list(cfg.reward.weights)
    else:
        _check_rebuildable(rewards, ckpt)
    algo = GSPOConfig.from_dict(algo_values)
    model = ModelConfig(**model_values)
    module = GSPOModule(model, rewards, algo)
    if ckpt is not None:
        load_policy_weights(module.policy, ckpt)
    datamodule = hydra.utils.instantiate(cfg.data, algorithm=algo)
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
    )
    run = trainer.test if split == "test" else trainer.validate
    (metrics,) = run(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def _names_group(group: str, overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == group for o in overrides)


def _group(cfg, group: str, saved: dict[str, Any] | None, overrides: list[str]) -> dict[str, Any]:
    """A config group's values: the checkpoint's, with the ``group.key=value`` overrides applied on top; or the
    composed config's when there are none saved or an override chooses another option (``group=name``)."""
    chosen = any(o.lstrip("+~").split("=", 1)[0] == group for o in overrides)
    if saved is None or chosen:
        return OmegaConf.to_container(cfg[group], resolve=True)
    dotted = [o.lstrip("+~")[len(group) + 1 :] for o in overrides if o.lstrip("+~").startswith(group + ".")]
    merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(dotted))
    return OmegaConf.to_container(merged, resolve=True)


def _check_rebuildable(rewards: list, ckpt: str | Path | None) -> None:
    built = [r for r in rewards if isinstance(r, str) and r.startswith(BUILT_REWARD_MODEL)]
    if built:
        raise ValueError(
            f"{ckpt} was trained with a reward model built in memory ({', '.join(built)}), which a checkpoint "
            "cannot rebuild. Pass the reward functions explicitly: reward=<option> or "
            "'reward.funcs=[path/to/reward_model,package.module.function]' (and reward.weights) on the command "
            "line, or evaluate(..., reward_funcs=[RewardModel(model, tokenizer), ...]) in Python."
        )


def _checkpoint_settings(ckpt: str | Path) -> dict[str, Any]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    return saved.get("hyper_parameters") or {}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_gspo.evaluate",
        description="Score a checkpoint's or a model's completions on held-out prompts.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by a training run")
    source.add_argument("--model", help="a Hugging Face model directory (an export's merged/)")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="the held-out split to score")
    parser.add_argument(
        "--out", help="where to write the metrics as JSON (default: eval.json beside the input)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides as key=value, e.g. data=gsm8k reward=math"
    )
    args = parser.parse_args(argv)
    where = Path(args.ckpt or args.model)
    if not where.exists():
        parser.error(f"{where}: no such file or directory")
    metrics = evaluate(args.overrides, ckpt=args.ckpt, model_dir=args.model, split=args.split)
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:.4f}")
    out = Path(args.out) if args.out else (where.parent if where.is_file() else where) / "eval.json"
    out.write_text(json.dumps({"source": str(where), "split": args.split, "metrics": metrics}, indent=2))
    print(f"written: {out}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
