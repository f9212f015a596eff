"""What a checkpoint keeps of a LoRA (PEFT) policy: the weights that train, not the frozen base.

The base weights never change during a LoRA or QLoRA run and are loaded again from the model's source whenever
the run is rebuilt (a resume, ``export``), so writing them into every checkpoint only costs disk and time: for
a 0.5B model about 2 GB per checkpoint against a few MB of adapters. A checkpoint of a PEFT policy therefore
holds its trainable parameters and its buffers; on load, the frozen entries are taken from the freshly built
policy, so a strict load still checks every adapter key (a rank or target mismatch is an error, not a
half-loaded adapter).
"""

from __future__ import annotations

from typing import Any

import torch


def _kept_keys(policy: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(keys of the trainable parameters and buffers, keys of everything else) in ``policy.state_dict()``."""
    buffers = {name for name, _ in policy.named_buffers()}
    kept, frozen = set(), set()
    for key, value in policy.state_dict(keep_vars=True).items():
        trainable = isinstance(value, torch.nn.Parameter) and value.requires_grad
        (kept if trainable or key in buffers else frozen).add(key)
    return kept, frozen


def without_frozen(policy: torch.nn.Module, state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state_dict`` (a module's, the policy's entries under ``prefix``) less the policy's frozen weights.
    Left whole when it does not name every trainable weight as this policy does (a sharded layout, say)."""
    kept, frozen = _kept_keys(policy)
    if not all(prefix + k in state_dict for k in kept):
        return state_dict
    drop = {prefix + k for k in frozen}
    return {k: v for k, v in state_dict.items() if k not in drop}


def with_frozen(policy: torch.nn.Module, state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state_dict`` with the frozen weights it lacks taken from ``policy`` itself, so it loads strictly."""
    kept, frozen = _kept_keys(policy)
    missing = {k for k in frozen if prefix + k not in state_dict}
    if not missing:
        return state_dict
    own = policy.state_dict()
    return {**{prefix + k: own[k] for k in missing}, **state_dict}
