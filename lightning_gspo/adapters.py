"""LoRA and QLoRA through PEFT: the adapter settings, wrapping a model in adapters, and the 4-bit layers' care.

- LoRA target modules are checked against the model before PEFT sees them: a name that matches nothing would
  otherwise leave that layer silently untrained. The error lists the model's linear layers.
- Mixture-of-experts models in transformers 5 (Qwen3-MoE, gpt-oss) hold their experts as fused 3-D parameters,
  not linear layers, so ``target_modules`` cannot reach them; ``target_parameters`` puts LoRA on such parameters
  (PEFT's ``ParamWrapper``: a rank-r update per expert), checked against the model's parameters the same way.
  PEFT refuses dropout there, so that is refused at configuration time.
- A 4-bit layer's quantisation state, which checkpoints hold beside the packed weight, is read back on load, so
  a QLoRA run resumes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from typing import Any

import torch

LORA_BIAS = ("none", "all", "lora_only")
# PEFT's spellings, accepted as well as ours so a LoraConfig's keywords carry over.
LORA_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}


@dataclass
class LoraSettings:
    """The LoRA adapter (PEFT's ``LoraConfig``, task type causal LM)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32
    """Scale: the update is multiplied by alpha / r (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's lora_dropout). algorithm.disable_dropout turns it off too."""
    target_modules: list[str] | str = "all-linear"
    """Module names (matched as name suffixes, e.g. 'q_proj'), a regular expression matched against full names,
    or 'all-linear' (every linear layer but the output head)."""
    bias: str = "none"
    """Which biases train: 'none', 'all' or 'lora_only'."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapters and saved with them, e.g. ['lm_head']."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly, matched as name suffixes: the fused 3-D expert weights of a mixture-of-experts
    model, e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] (Qwen3-MoE, gpt-oss), which are no linear
    layer's. Each gets a rank-r update per expert. Needs dropout 0."""

    @classmethod
    def from_value(cls, value: Any) -> LoraSettings | None:
        if value is None or isinstance(value, LoraSettings):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"model.lora must be None or a mapping of LoRA settings, got {value!r}.")
        values = {LORA_ALIASES.get(k, k): v for k, v in value.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [f"{k} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                     for k in unknown]  # fmt: skip
            raise ValueError(
                f"model.lora has unknown keys: {', '.join(hints)}. Known keys: {', '.join(sorted(known))}."
            )
        return cls(**values)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"model.lora.r={self.r!r} must be a positive integer (the adapter's rank).")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r} must be > 0.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout!r} must be in [0, 1).")
        if self.bias not in LORA_BIAS:
            raise ValueError(
                f"model.lora.bias={self.bias!r} is not one of {', '.join(map(repr, LORA_BIAS))}."
            )
        targets = self.target_modules
        if isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"model.lora.target_modules={targets!r} must be a non-empty list of module names, "
                    "a regular expression, or 'all-linear'."
                )
            self.target_modules = list(targets)
        elif not isinstance(targets, str) or not targets:
            raise ValueError(
                f"model.lora.target_modules={targets!r} must be a list of module names, a regular expression, "
                "or 'all-linear'."
            )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) for m in self.modules_to_save
            ):
                raise ValueError(
                    f"model.lora.modules_to_save={self.modules_to_save!r} must be a list of module names or None."
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.target_parameters is not None:
            self._check_target_parameters()

    def _check_target_parameters(self) -> None:
        names = self.target_parameters
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"model.lora.target_parameters={names!r} must be a non-empty list of parameter names (e.g. "
                "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']) or None."
            )
        self.target_parameters = list(names)
        if self.dropout:
            raise ValueError(
                f"model.lora.dropout={self.dropout} with model.lora.target_parameters: PEFT cannot apply dropout "
                "to an adapted parameter (its input is not separable); set model.lora.dropout=0."
            )

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            target_parameters=self.target_parameters,
            task_type="CAUSAL_LM",
        )


def load_4bit_quant_state(module, state_dict, prefix, *args) -> None:
    """A checkpoint holds a 4-bit layer as its packed weight plus the quantisation state bitsandbytes writes beside
    it (``weight.absmax``, ``weight.quant_map``, ...). torch's loader knows only the weight, so a resumed QLoRA run
    would stop on those keys; they are taken out here and become the layer's quantisation state."""
    keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
    if not keys:
        return
    from bitsandbytes.functional import QuantState

    stats = {k[len(prefix + "weight.") :]: state_dict.pop(k) for k in keys}
    module.weight.quant_state = QuantState.from_dict(stats, device=module.weight.device)


def apply_lora(model, lora: LoraSettings, exclude: str | None = None):
    """Wrap ``model`` in PEFT LoRA adapters after checking that every target names a module of the model;
    ``exclude`` (a regular expression over full module names) keeps adapters out of matching modules."""
    from peft import get_peft_model

    check_lora_targets(model, lora)
    config = lora.to_peft()
    if exclude is not None:
        config.exclude_modules = exclude
    return get_peft_model(model, config)


def linear_layer_names(model) -> list[str]:
    """The distinct last name components of the model's linear layers (what LoRA target_modules match)."""
    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and (isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt")):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(model, lora: LoraSettings) -> None:
    names = [n for n, _ in model.named_modules() if n]

    def matches(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    problems = []
    if isinstance(lora.target_modules, list):
        if missing := [t for t in lora.target_modules if not matches(t)]:
            problems.append(f"model.lora.target_modules: {missing} match no module")
    elif lora.target_modules != "all-linear" and not any(re.fullmatch(lora.target_modules, n) for n in names):
        problems.append(
            f"model.lora.target_modules={lora.target_modules!r} (a regular expression) matches no module"
        )
    if missing := [m for m in lora.modules_to_save or [] if not matches(m)]:
        problems.append(f"model.lora.modules_to_save: {missing} match no module")
    fused = fused_parameter_names(model)
    if problems:
        experts = f" Its experts are fused parameters ({', '.join(fused)}): name them in model.lora.target_parameters."
        raise ValueError(
            f"{'; '.join(problems)} of {type(model).__name__}. Its linear layers are named "
            f"{', '.join(linear_layer_names(model))}; use some of those, or target_modules='all-linear'."
            + (experts if fused else "")
        )
    params = [n for n, _ in model.named_parameters()]
    if missing := [
        t for t in lora.target_parameters or [] if not any(n == t or n.endswith("." + t) for n in params)
    ]:
        raise ValueError(
            f"model.lora.target_parameters: {missing} match no parameter of {type(model).__name__}. "
            + (f"Its fused expert parameters are {', '.join(fused)}." if fused else "It has no fused expert "
               "parameters (3-D weights); adapt its linear layers with model.lora.target_modules.")
        )  # fmt: skip


def fused_parameter_names(model) -> list[str]:
    """The names within a decoder layer of the model's 3-D parameters (fused experts), e.g. 'mlp.experts.down_proj'."""
    names = set()
    for name, param in model.named_parameters():
        if param.dim() == 3:
            parts = name.split(".")
            digits = [i for i, part in enumerate(parts) if part.isdigit()]
            names.add(".".join(parts[digits[0] + 1 :]) if digits else name)
    return sorted(names)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
