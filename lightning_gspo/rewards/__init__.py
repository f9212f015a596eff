"""Reward functions, with TRL's signature: ``fn(prompts, completions, **dataset_columns) -> list[float | None]``.

A function returns one value per completion; None means "not applicable to this sample" (it is left out, not
counted as zero). A reward model (a sequence classifier with one label) is called like a function, with TRL's
semantics (``reward_model.RewardModel``). ``resolve_reward_funcs`` turns import paths and reward models'
directories or hub names from a config into callables; ``score_completions`` calls them and checks what they
return, so a broken reward stops the run with its name and the offending sample instead of a NaN advantage later.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from math import isfinite, nan  # not `import math`: the submodule rewards.math takes that name here
from typing import Any

RewardFunc = Callable[..., Sequence[float | None]]


# What a checkpoint's settings hold in place of a reward model built in memory, which they cannot rebuild.
BUILT_REWARD_MODEL = "<reward model built in memory>"


def resolve_reward_funcs(
    funcs: Sequence[str | Mapping[str, Any] | RewardFunc],
) -> tuple[list[RewardFunc], list[str]]:
    """Callables and names for reward functions given as callables, ``"package.module.function"`` paths, or reward
    models: a directory or hub name (a string with "/" or an existing directory), a mapping with ``model`` and
    options (``RewardModel.load``), a built sequence-classification model, or a ``RewardModel``."""
    if not funcs:
        raise ValueError("no reward functions: give at least one (reward_funcs=[...] or a reward= config).")
    resolved, names = [], []
    for f in funcs:
        f = _resolve(f)
        if not callable(f):
            raise ValueError(f"reward function {f!r} is not callable.")
        resolved.append(f)
        names.append(getattr(f, "__name__", type(f).__name__))
    return resolved, names


def _resolve(f: Any) -> Any:
    if isinstance(f, str) and f.startswith(BUILT_REWARD_MODEL):
        raise ValueError(
            f"reward function {f!r}: a reward model built in memory is recorded by name only and cannot be "
            "rebuilt; pass the reward functions explicitly."
        )
    if isinstance(f, Mapping) or (isinstance(f, str) and is_model_source(f)):
        from lightning_gspo.rewards.reward_model import RewardModel

        return RewardModel.load(f)
    if isinstance(f, str):
        module_name, _, attr = f.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(
                f"reward function {f!r} is neither an importable function ('package.module.function': {err}) nor "
                "a reward model (a model directory, or a hub name 'org/name')."
            ) from err
    torch = sys.modules.get("torch")  # a torch module can only exist once torch is imported
    if torch is not None and isinstance(f, torch.nn.Module):  # a built model, as TRL takes one
        from lightning_gspo.rewards.reward_model import RewardModel

        return RewardModel(f)
    return f


def is_model_source(entry: str) -> bool:
    """Whether a reward function given as a string names a model (an existing directory, or a string with "/":
    a path or a hub name "org/name") rather than an import path "package.module.function"."""
    return "/" in entry or os.path.isdir(entry)


def reward_func_settings(given: Sequence[Any], resolved: Sequence[RewardFunc]) -> list[str | dict[str, Any]]:
    """What a checkpoint records for each reward function so that ``resolve_reward_funcs`` rebuilds it: an entry
    given as an import path, a model's directory or hub name, or a mapping stays as given; a callable is recorded
    by its import path; a reward model by the path it was loaded from, or, built in memory, by
    ``BUILT_REWARD_MODEL`` and its name (it cannot be rebuilt)."""
    # No RewardModel exists before its module is imported; nothing here imports it (or torch) for nothing.
    reward_model = sys.modules.get("lightning_gspo.rewards.reward_model")
    out: list[str | dict[str, Any]] = []
    for g, f in zip(given, resolved, strict=True):
        if isinstance(g, (str, Mapping)):
            out.append(g if isinstance(g, str) else dict(g))
        elif reward_model is not None and isinstance(f, reward_model.RewardModel):
            out.append(f.source if f.source is not None else f"{BUILT_REWARD_MODEL}: {f.__name__}")
        else:
            out.append(f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', f)}")
    return out


def score_completions(
    funcs: Sequence[RewardFunc],
    names: Sequence[str],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> list[list[float]]:
    """Rewards of B completions by R functions as B rows of R floats, NaN where a function returned None.

    Each function is called once with TRL's keywords (``prompts``, ``completions``, ``completion_ids`` and the
    dataset's other columns, one entry per completion)."""
    out = [[nan] * len(funcs) for _ in prompts]
    for j, (fn, name) in enumerate(zip(funcs, names)):
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as err:
            raise RuntimeError(
                f"reward function {name!r} raised {type(err).__name__}: {err}. First sample: "
                f"prompt={prompts[0]!r}, completion={completions[0]!r}"
            ) from err
        if values is None or len(values) != len(prompts):
            raise ValueError(
                f"reward function {name!r} returned {None if values is None else len(values)} "
                f"values for {len(prompts)} completions; it must return one per completion."
            )
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isfinite(float(v)):
                raise ValueError(
                    f"reward function {name!r} returned {v} for prompt={prompts[i]!r}, "
                    f"completion={completions[i]!r}; rewards must be finite numbers or None."
                )
            out[i][j] = float(v)
    return out
