"""Export a trained policy in Hugging Face format: the LoRA adapter and the merged model, each with the tokenizer.

At the end of training (``ExportCallback``, in ``conf/callbacks/default.yaml``) or from any checkpoint:

    python -m lightning_gspo.export --ckpt outputs/.../checkpoints/last.ckpt --out exported --merged

Choices, and why:
- Layout: ``<out>/adapter`` (PEFT's ``save_pretrained``: adapter_config.json and adapter_model.safetensors) when
  the policy has LoRA adapters, for ``PeftModel.from_pretrained``; ``<out>/merged``, a standalone model for
  ``AutoModelForCausalLM.from_pretrained`` (the adapters merged into the base, or the fully fine-tuned model).
- The merged model is the saved adapter applied to the base reloaded *unquantised* on the CPU, then merged. For
  QLoRA that is the model to deploy (merging into 4-bit weights would round much of the update away), so its
  logits differ from the 4-bit training model's by the quantisation error; for LoRA they agree to float
  rounding. It also never needs a second copy of the model in GPU memory.
- From a checkpoint the model is rebuilt from the model settings the checkpoint carries (``hyper_parameters``),
  or a config file, a preset, or ``key=value`` model settings, always unquantised. For LoRA only the
  trainable weights (adapters, ``modules_to_save``) are read from the checkpoint, and each must be there, so a
  rank or target mismatch is an error and not a half-loaded adapter; a full fine-tune loads every weight.
- Under FSDP the policy is sharded when training ends, so the callback leaves the export to this command, which
  reads the full checkpoint Lightning writes.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_gspo.adapters import is_peft_model, is_quantized
from lightning_gspo.models import (
    ModelConfig,
    load_causal_lm,
    load_preset,
    load_tokenizer,
)

log = logging.getLogger(__name__)


def export_model(
    policy,
    tokenizer,
    out_dir: str | Path,
    *,
    merged: bool = True,
    model_config: ModelConfig | None = None,
    merge_in_place: bool = False,
) -> dict[str, Path]:
    """Write ``policy`` to ``out_dir``: ``adapter/`` for a PEFT model, ``merged/`` for a standalone one.

    Args:
        merged: with LoRA, also write the merged model (a full fine-tune is always written to ``merged/``).
        model_config: how the policy was loaded; the merged model starts from its base, unquantised. Without it
            the base named in the adapter's config is loaded in the policy's dtype.
        merge_in_place: merge into ``policy`` itself (when it is not quantised) instead of a reloaded base; the
            policy is consumed. For one-off exports that hold the only copy.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    with _no_progress_bars():
        if not is_peft_model(policy):
            written["merged"] = _save(policy, tokenizer, out / "merged")
            return written
        written["adapter"] = _save(policy, tokenizer, out / "adapter")
        if merged:
            if merge_in_place and not is_quantized(policy.get_base_model()):
                model = policy.merge_and_unload()
            else:
                model = _merged_from_adapter(policy, written["adapter"], model_config)
            written["merged"] = _save(model, tokenizer, out / "merged")
    return written


@contextmanager
def _no_progress_bars():
    """transformers' loading and saving bars off: at the end of fit Lightning's rich progress display still owns
    stderr, and in Jupyter a half-written tqdm line sends rich's stream proxy into endless recursion."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    log.info("wrote %s", path)
    return path


def unquantized(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` loading full-precision weights, without checkpointing (nothing trains here)."""
    bnb = {f.name: f.default for f in fields(ModelConfig) if f.name.startswith("bnb_4bit_")}
    return replace(cfg, load_in_4bit=False, gradient_checkpointing=False, **bnb)


def _merged_from_adapter(policy, adapter_dir: Path, model_config: ModelConfig | None):
    from peft import PeftModel

    if model_config is None:
        peft_cfg = policy.peft_config[policy.active_adapter]
        dtype = next((str(p.dtype).removeprefix("torch.") for p in policy.parameters() if p.is_floating_point()),
                     "float32")  # fmt: skip
        model_config = ModelConfig(name_or_path=peft_cfg.base_model_name_or_path, dtype=dtype)
    base = load_causal_lm(replace(unquantized(model_config), lora=None))
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


class ExportCallback(L.Callback):
    """Exports the policy (see ``export_model``) to ``dirpath`` when training ends, on global rank zero."""

    def __init__(self, dirpath: str | Path, merged: bool = True):
        self.dirpath = Path(dirpath)
        self.merged = merged

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fsdp" in type(trainer.strategy).__name__.lower():
            warnings.warn(
                "ExportCallback: the policy is sharded under FSDP, so nothing is exported at the end of training; "
                "run python -m lightning_gspo.export --ckpt <checkpoint> --out <dir> instead.",
                UserWarning,
                stacklevel=2,
            )
            return
        if trainer.is_global_zero:
            export_model(pl_module.policy, pl_module.tokenizer, self.dirpath, merged=self.merged,
                         model_config=getattr(pl_module, "model_config", None))  # fmt: skip
        trainer.strategy.barrier("export")


# ---------------------------------------------------------------------------------------------------------------
# From a checkpoint.


def load_policy_weights(policy, ckpt_path: str | Path) -> None:
    """Load a ``GSPOModule`` checkpoint's policy weights into ``policy``: the trainable ones for a PEFT model,
    all of them otherwise. Every weight the model expects must be in the checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    state = ckpt.get("state_dict", ckpt)
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not weights:
        raise ValueError(f"{ckpt_path} holds no 'policy.*' weights; is it a GSPOModule checkpoint?")
    peft = is_peft_model(policy)
    own = dict(policy.named_parameters())
    wanted = [n for n, p in own.items() if p.requires_grad] if peft else list(policy.state_dict())
    missing = [n for n in wanted if n not in weights]
    extra = [k for k in weights if (".lora_" in k or ".modules_to_save." in k) and k not in own]
    if missing or (extra if peft else weights.keys() - set(wanted)):
        lacking = f"lacks {len(missing)} weights the model has (e.g. {missing[:3]})" if missing else ""
        surplus = sorted(extra if peft else weights.keys() - set(wanted))
        more = f"has {len(surplus)} the model lacks (e.g. {surplus[:3]})" if surplus else ""
        raise ValueError(
            f"{ckpt_path} {' and '.join(filter(None, [lacking, more]))}: the model settings differ from the run's "
            "(LoRA rank, target modules, modules_to_save, or LoRA versus full fine-tuning). Export with the "
            "settings the checkpoint carries (no --config, --preset or overrides) or the same settings."
        )
    try:
        policy.load_state_dict({n: weights[n] for n in wanted}, strict=not peft)
    except RuntimeError as err:
        raise ValueError(f"{ckpt_path} does not fit the model built from these settings: {err}") from err


def model_config_for(ckpt: Path, config: str | None, preset: str | None, overrides: list[str]) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint was trained with: from a preset, a config file (a Hydra run's
    config.yaml or a model config), or the settings the checkpoint carries; then ``key=value`` overrides."""
    from omegaconf import OmegaConf

    if preset and config:
        raise ValueError("give --preset or --config, not both.")
    base: Any = OmegaConf.create({})
    if preset:
        base = OmegaConf.create(load_preset(preset).to_dict())
    elif config:
        loaded = OmegaConf.load(config)
        base = loaded.model if "model" in loaded else loaded
        log.info("model settings from %s", config)
    elif (carried := checkpoint_model_settings(ckpt)) is not None:
        base = OmegaConf.create(carried)
    elif not overrides:
        raise ValueError(
            f"{ckpt} carries no model settings (a built model was trained, or the checkpoint predates them); give "
            "--config RUN/.hydra/config.yaml, --preset NAME, or model settings such as "
            "name_or_path=Qwen/Qwen2.5-0.5B-Instruct lora.r=16."
        )
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    return ModelConfig(**OmegaConf.to_container(merged, resolve=True))


def checkpoint_model_settings(ckpt: str | Path) -> dict[str, Any] | None:
    """The model settings (``ModelConfig`` fields) a ``GSPOModule`` checkpoint carries, or None."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    return (saved.get("hyper_parameters") or {}).get("model")


def export_checkpoint(
    ckpt: str | Path, out_dir: str | Path, model_config: ModelConfig, merged: bool = True
) -> dict[str, Path]:
    """Rebuild the policy (unquantised), load the checkpoint's weights and export it."""
    if model_config.load_in_4bit:
        log.info(
            "exporting on the unquantised base: the 4-bit weights were frozen, the adapters are what trained"
        )
    cfg = unquantized(model_config)
    policy = load_causal_lm(cfg)
    load_policy_weights(policy, ckpt)
    return export_model(
        policy, load_tokenizer(cfg), out_dir, merged=merged, model_config=cfg, merge_in_place=True
    )


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_gspo.export",
        description="Write a GSPOModule checkpoint's policy as a LoRA adapter and/or a merged Hugging Face model.",
    )
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint written by a training run")
    parser.add_argument("--out", required=True, help="output folder: adapter/ and merged/ go inside")
    parser.add_argument("--merged", action="store_true", help="with LoRA, also write the merged model")
    parser.add_argument(
        "--config", help="the run's .hydra/config.yaml, or a model config YAML (default: the checkpoint's)"
    )
    parser.add_argument("--preset", help="a model preset from conf/model, e.g. qwen2.5-0.5b-instruct-lora")
    parser.add_argument("overrides", nargs="*", help="model settings as key=value, e.g. lora.r=16")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        parser.error(f"--ckpt {ckpt}: no such file")
    cfg = model_config_for(ckpt, args.config, args.preset, args.overrides)
    written = export_checkpoint(ckpt, args.out, cfg, merged=args.merged)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
