"""Optimizers, learning-rate schedules (transformers' names: ``optim``, ``lr_scheduler_type``) and gradient
clipping.

Choices, and why:
- 16-bit trainable weights (a bfloat16 or float16 policy trained in full) get float32 master weights: the
  optimizer (torch's AdamW, fused or not, or bitsandbytes' 8-bit AdamW) steps float32 copies with float32
  gradients and state, and each step ends by rounding the copies into the model. Stepping bfloat16 weights
  directly loses every update smaller than half a unit in the last place: 1e-5 against a weight of 0.02 (whose
  spacing is 1.2e-4) rounds to no change, so at lr 1e-5 two steps on SmolLM2 changed 1.7% of the weights in
  bfloat16 and 94% in float32. bitsandbytes' 8-bit AdamW rounds the same way (it keeps 8-bit moments, not
  float32 weights), so it gets the master copies too. Costs 4 bytes per 16-bit weight.
- The master copies are part of the optimizer's ``state_dict`` (``master_weights``), so a resumed run continues
  from the float32 values, not from the rounded model.
- Clipping sees the float32 gradients: ``clip_grad_norm`` moves a 16-bit weight's gradient into its master copy
  first (accumulated there in float32), then measures and scales the float32 tensors.
- FSDP saves optimizer state by its own flattened parameters, which the master copies are not: there, keep the
  weights in float32 and let ``precision='bf16-mixed'`` do the 16-bit compute.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lightning_gspo.config import GSPOConfig

HALF = (torch.bfloat16, torch.float16)
# model parameter -> the optimizer that keeps its float32 master copy (weakly: a dropped optimizer lets go).
_MASTER_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()


class MasterWeights:
    """Mixin for a torch optimizer class: it steps float32 copies of the 16-bit parameters it is given and
    copies the results back, rounded (see the module notes). Float32 parameters are stepped as they are."""

    def __init__(self, params, **kwargs: Any):
        self.model_params = list(params)
        masters = [p.detach().float() if p.dtype in HALF else p for p in self.model_params]
        self._pairs = [(p, m) for p, m in zip(self.model_params, masters) if m is not p]
        self._master_by_id = {id(p): m for p, m in self._pairs}
        super().__init__(masters, **kwargs)
        for p, _ in self._pairs:
            _MASTER_OWNER[p] = weakref.ref(self)

    def master_of(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s float32 master copy, holding its gradient (moved there from ``param.grad``)."""
        master = self._master_by_id.get(id(param), param)
        if master is not param:
            _move_grad(param, master)
        return master

    def sync_grads(self) -> None:
        for p, m in self._pairs:
            _move_grad(p, m)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_grads()
        super().step()
        if self._pairs:
            model, masters = zip(*self._pairs)
            torch._foreach_copy_(list(model), list(masters))  # round to nearest even
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p, _ in self._pairs:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_weights"] = [m for _, m in self._pairs]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:  # a checkpoint from float32 weights: start from the model's own values
            return
        if len(masters) != len(self._pairs):
            raise ValueError(
                f"the checkpoint's optimizer holds {len(masters)} float32 master weights, this model has "
                f"{len(self._pairs)} 16-bit trainable weights: the model's dtype or trainable set differ."
            )
        with torch.no_grad():
            for (_, m), saved in zip(self._pairs, masters):
                m.copy_(saved)


def _move_grad(p: torch.Tensor, master: torch.Tensor) -> None:
    """Add ``p.grad`` (16-bit) into ``master.grad`` (float32) and free it."""
    if p.grad is None:
        return
    if master.grad is None:
        master.grad = p.grad.float()
    else:
        master.grad.add_(p.grad)
    p.grad = None


@functools.cache
def with_master_weights(cls: type) -> type:
    """``cls`` (a torch optimizer class) stepping float32 master copies of 16-bit parameters; still a ``cls``."""
    return type(f"{cls.__name__}MasterWeights", (MasterWeights, cls), {"__module__": __name__})


def build_optimizer(cfg: GSPOConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the policy has no trainable parameters: nothing for the optimizer to update.")
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    # 16-bit weights: float32 master copies (module notes), whichever AdamW steps them.
    wrap = with_master_weights if any(p.dtype in HALF for p in params) else (lambda cls: cls)
    if cfg.optim in ("adamw_torch", "adamw_torch_fused"):
        adamw = wrap(torch.optim.AdamW)
        if cfg.optim == "adamw_torch_fused":  # one kernel per step, on CUDA and on the CPU alike
            try:
                return adamw(params, fused=True, **kwargs)
            except RuntimeError as err:  # a device or dtype the fused kernel lacks
                warnings.warn(
                    f"optim='adamw_torch_fused' is not available here ({err}); using adamw_torch.",
                    UserWarning,
                    stacklevel=2,
                )
        return adamw(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(f"optim={cfg.optim!r} needs bitsandbytes (pip install bitsandbytes).") from err
    if cfg.optim == "paged_adamw_8bit":
        return wrap(bnb.optim.PagedAdamW8bit)(params, **kwargs)
    return wrap(bnb.optim.AdamW8bit)(params, **kwargs)


def warmup_steps(cfg: GSPOConfig, total: int) -> int:
    """transformers' rule: warmup_steps when >= 1, a ratio when below 1, else warmup_ratio."""
    if cfg.warmup_steps >= 1:
        return int(cfg.warmup_steps)
    ratio = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio
    return math.ceil(ratio * total)


def build_scheduler(cfg: GSPOConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    if kind == "constant":  # transformers' 'constant' has no warm-up
        warm = 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, root: Any = None) -> torch.Tensor:
    """torch's ``clip_grad_norm_``, returning the total norm before clipping; under FSDP (``root``, the strategy's
    wrapped model, is an FSDP module) the root module's, which reduces the norm over the ranks' shards: torch's,
    on a rank's own shards, would clip each rank by its own piece of the norm. A 16-bit weight with a float32
    master copy is measured and clipped by that copy's float32 gradient."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(_grad_holders(params), max_norm)


def _grad_holders(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    holders = []
    for p in params:
        owner = _MASTER_OWNER.get(p)
        optimizer = owner() if owner is not None else None
        holders.append(p if optimizer is None else optimizer.master_of(p))
    return holders
