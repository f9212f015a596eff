"""Carrying a TRL ``GRPOConfig`` over to ``GSPOConfig``: which of its fields we take, which we leave to Lightning,
and which we report as skipped.

A field we share is copied; a ``TrainingArguments`` field that Lightning's Trainer owns (precision, output
directory, ...) is left to the Trainer config; any other field is reported, by name and value, when it differs
from TRL's default, so nothing a TRL user set is dropped silently.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any


def carry_over(grpo_config: Any, ours: set[str]) -> tuple[dict[str, Any], list[str]]:
    """(the values of the fields in ``ours``, ``"name=value"`` of each other non-default field, sorted) from a
    TRL ``GRPOConfig`` or its ``to_dict()``."""
    values = grpo_config if isinstance(grpo_config, dict) else grpo_config.to_dict()
    taken, skipped = {}, []
    trl_defaults = _trl_defaults(grpo_config)
    for key, value in values.items():
        if key in ours:
            if key == "generation_batch_size" and values.get("steps_per_generation") is not None:
                continue  # TRL fills both in after resolving one; steps_per_generation says it all
            taken[key] = value
        elif key not in _TRAINING_ARGS_WE_HANDLE_ELSEWHERE and trl_defaults.get(key, MISSING) != value:
            skipped.append(f"{key}={value!r}")
    return taken, sorted(skipped)


# TrainingArguments fields that Lightning's Trainer and loggers own (precision, output_dir, ...): the Trainer
# config sets them, so they are neither copied nor reported as skipped.
_TRAINING_ARGS_WE_HANDLE_ELSEWHERE = {
    "output_dir",
    "bf16",
    "fp16",
    "tf32",
    "report_to",
    "logging_dir",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "run_name",
    "push_to_hub",
    "hub_model_id",
    "gradient_checkpointing",
    "local_rank",
    "logging_strategy",
    "logging_first_step",
    "dataloader_num_workers",
    "overwrite_output_dir",
    "do_train",
    "data_seed",
    "use_cpu",
    "ddp_backend",
    "eval_strategy",
    "do_eval",
    "per_device_eval_batch_size",
}


def _trl_defaults(grpo_config: Any) -> dict[str, Any]:
    """The values a default-constructed config of the same class has, after its own __post_init__."""
    if isinstance(grpo_config, dict):
        return {}
    try:
        same_machine = {k: getattr(grpo_config, k) for k in ("output_dir", "use_cpu", "bf16", "fp16")}
        return type(grpo_config)(**same_machine).to_dict()
    except Exception:  # a config class that cannot be built bare: fall back to the declared defaults
        declared = {}
        for f in fields(type(grpo_config)):
            if f.default is not MISSING:
                declared[f.name] = f.default
            elif f.default_factory is not MISSING:
                declared[f.name] = f.default_factory()
        return declared
