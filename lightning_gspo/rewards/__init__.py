"""Reward functions, with TRL's signature: ``fn(prompts, completions, **dataset_columns) -> list[float | None]``.

A function returns one value per completion; None means "not applicable to this sample" (it is left out, not
counted as zero). ``resolve_reward_funcs`` turns import paths from a config into callables.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

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
