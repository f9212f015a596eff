"""Reward functions, with TRL's signature: ``fn(prompts, completions, **dataset_columns) -> list[float | None]``.

A function returns one value per completion; None means "not applicable to this sample" (it is left out, not
counted as zero). ``resolve_reward_funcs`` turns import paths from a config into callables;
``score_completions`` calls them and checks what they return, so a broken reward stops the run with its name and
the offending sample instead of a NaN advantage later.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from math import isfinite, nan  # not `import math`: the submodule rewards.math takes that name here
from typing import Any

RewardFunc = Callable[..., Sequence[float | None]]


def resolve_reward_funcs(funcs: Sequence[str | RewardFunc]) -> tuple[list[RewardFunc], list[str]]:
    """Callables and names for reward functions given as callables or ``"package.module.function"`` paths."""
    if not funcs:
        raise ValueError("no reward functions: give at least one (reward_funcs=[...] or a reward= config).")
    resolved, names = [], []
    for f in funcs:
        if isinstance(f, str):
            module_name, _, attr = f.rpartition(".")
            try:
                f = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(f"reward function {f!r} cannot be imported: {err}") from err
        if not callable(f):
            raise ValueError(f"reward function {f!r} is not callable.")
        resolved.append(f)
        names.append(getattr(f, "__name__", type(f).__name__))
    return resolved, names


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
