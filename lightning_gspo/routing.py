"""Routing drift and routing replay for mixture-of-experts policies: which experts each token went to when the
old log-probs were computed, how many of those choices the policy being trained would make differently, and
(``routing_replay``) training through the recorded experts.

An off-policy update can change which experts a token routes to; the token's log-prob then moves by more than
the weight change alone explains, and token-level importance ratios (GRPO) swing with it. GSPO's paper reports
needing "Routing Replay" for GRPO on MoE models and not for GSPO; the R3 paper and Megatron-LM #4168 report
GRPO collapsing without it. This module lets a plain PyTorch run see the drift and remove it.

Choices, and why:
- Routers are found by class (``ROUTERS``), not by guessing from shapes: every Hugging Face router this covers
  (Qwen2/Qwen3-MoE and their variants, OLMoE, Mixtral, MiniMax, gpt-oss, DeepSeek-V2/V3) is a module whose
  forward returns ``(router_logits (N, E), weights (N, k), experts (N, k))`` for the N tokens of the call in
  row-major order, and each normalises the chosen experts' weights its own way. A class not in the table makes
  ``routing_replay`` fail at start-up by name (a replay that normalised wrongly would train a different model);
  without replay it only warns that the drift metric is not logged.
- Replay is a forward hook that swaps the router's output: the recorded experts, with weights recomputed from
  *this* forward's router logits at those experts, normalised exactly as the model normalises its own choice
  (softmax over all experts then renormalised over the chosen ones for Qwen/OLMoE/Mixtral, softmax over the
  chosen logits for gpt-oss, sigmoid for DeepSeek-V3). The router therefore keeps its gradient (through the
  weights of the replayed experts), and with unchanged weights replay reproduces the unreplayed forward bit for
  bit. Forcing the old *weights* as well would cut the router out of training; that is not what R3 or
  Megatron's replay do.
- Recordings are keyed by (rollout row, ordinal of the real token in that row, router layer): padding never
  enters, so the recording does not depend on how wide a micro-batch is padded or trimmed, nor on which rows a
  pass computes (zero-advantage rows are left out of training passes). They live in the rollout
  (``Rollout.routes``, (B, W, L, k) int16, -1 where nothing was recorded), so a micro-batch's view writes into
  the rollout, a checkpoint carries them and a resumed run replays exactly what the uninterrupted one did.
- Which tokens count: every real (non-padding) token of the forward, prompt and completion alike, since both
  feed the scored completion tokens through attention. The shared-prompt forward (``policy_logprobs``) routes a
  group's prompt once; its routing is recorded for every row of the group and read back from the group's first
  row, and the flip rate counts that prompt once. The last token of a sequence is never forwarded (it predicts
  nothing scored) and is never recorded.
- ``routing/expert_flip_rate`` is the share of (token, layer) choices whose top-k *set* of experts used in a
  later pass differs from the recording: the drift the update caused, and exactly 0 under replay, which uses the
  recorded experts. ``routing/router_flip_rate`` compares the router's own choice instead: the same number
  without replay, and under replay how much of the drift replay overrides (the number to compare across runs).
  Both cost an integer top-k comparison per router call, with no extra forward.
- ``policy_logprobs`` declares the token layout of each backbone call (``backbone_call``); a router that runs
  inside a session without one raises, rather than guessing which tokens it saw. Gradient checkpointing
  re-runs each layer during backward, outside any session: a replaying session leaves each router's forced
  experts behind, and a router call made inside a backward with the same token count gets them again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# ---- how each router family turns logits at chosen experts into the weights its experts use ----
WeightsFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _softmax_at(router, logits, experts):
    """Qwen2/Qwen3-MoE, OLMoE: softmax over all experts (float32), renormalised over the chosen when
    ``norm_topk_prob`` (Qwen3-VL-MoE has no such switch and always renormalises), in the logits' dtype."""
    w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, experts)
    if getattr(router, "norm_topk_prob", True):
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(logits.dtype)


def _softmax_at_renormalised(router, logits, experts):
    """Mixtral, MiniMax: softmax over all experts in float32, always renormalised, kept in float32."""
    w = torch.softmax(logits.float(), dim=-1).gather(1, experts)
    return w / w.sum(dim=-1, keepdim=True)


def _softmax_of_chosen(router, logits, experts):
    """gpt-oss: softmax over the chosen experts' logits."""
    return torch.softmax(logits.gather(1, experts), dim=1, dtype=logits.dtype)


def _sigmoid_at(router, logits, experts):
    """DeepSeek-V3: sigmoid scores (the selection bias and group limit choose experts, not weights)."""
    w = logits.sigmoid().gather(1, experts)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * router.routed_scaling_factor


def _softmax_scaled(router, logits, experts):
    """DeepSeek-V2: softmax over all experts (the group limit chooses experts, not weights), scaled."""
    return logits.softmax(dim=-1, dtype=torch.float32).gather(1, experts) * router.routed_scaling_factor


# Router class name -> (its transformers model folder, the weights function).
ROUTERS: dict[str, tuple[str, WeightsFn]] = {
    "Qwen2MoeTopKRouter": ("qwen2_moe", _softmax_at),
    "Qwen3MoeTopKRouter": ("qwen3_moe", _softmax_at),
    "Qwen3NextTopKRouter": ("qwen3_next", _softmax_at),
    "Qwen3_5MoeTopKRouter": ("qwen3_5_moe", _softmax_at),
    "Qwen3VLMoeTextTopKRouter": ("qwen3_vl_moe", _softmax_at),
    "OlmoeTopKRouter": ("olmoe", _softmax_at),
    "FlexOlmoTopKRouter": ("flex_olmo", _softmax_at),
    "MixtralTopKRouter": ("mixtral", _softmax_at_renormalised),
    "MiniMaxTopKRouter": ("minimax", _softmax_at_renormalised),
    "GptOssTopKRouter": ("gpt_oss", _softmax_of_chosen),
    "DeepseekV3TopkRouter": ("deepseek_v3", _sigmoid_at),
    "DeepseekV2TopkRouter": ("deepseek_v2", _softmax_scaled),
}
# Config fields that say a model has experts (a router this module does not know, or none at all).
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class UnsupportedRouterError(ValueError):
    pass


def find_routers(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], list[str]]:
    """(recognised routers as (qualified name, module), in forward order; class names of modules that look like
    routers but are not recognised). Works through PEFT wrappers, whose module tree keeps the routers."""
    found, unknown = [], []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in ROUTERS:
            found.append((name, module))
        elif "router" in cls.lower() and cls not in unknown:
            unknown.append(cls)
    return found, unknown


def expert_count(model: torch.nn.Module) -> int:
    """The number of experts the model's config declares (0 for a dense model)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in _EXPERT_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return 0


def routing_tracer(model: torch.nn.Module, replay: bool) -> RoutingTracer | None:
    """The tracer attached to ``model``'s routers; None for a dense model or (without replay, with a warning)
    routers this module does not recognise. ``replay`` turns those two cases into errors."""
    found, unknown = find_routers(model)
    kind = type(model).__name__
    if unknown and (replay or not found):
        message = (
            f"the model ({kind}) has router modules of class {', '.join(unknown)}, which "
            "lightning_gspo.routing does not know (it knows "
            f"{', '.join(ROUTERS)}): their expert weights cannot be recomputed for replay"
        )
        if replay:
            raise UnsupportedRouterError(f"{message}; set routing_replay=false.")
        warnings.warn(f"{message}; routing/expert_flip_rate is not logged.", UserWarning, stacklevel=3)
        return None
    if not found:
        if replay:
            experts = expert_count(model)
            what = f"declares {experts} experts but" if experts else "is a dense model:"
            raise UnsupportedRouterError(
                f"routing_replay=true needs a mixture-of-experts policy; the model ({kind}) {what} has no "
                f"expert router this module knows ({', '.join(ROUTERS)}). Set routing_replay=false."
            )
        return None
    return RoutingTracer(found)


# ---- the token layout of one backbone call, declared by policy_logprobs ----
@dataclass
class _Layout:
    read_rows: torch.Tensor  # (B',) the forward row each call row stands for
    read_ord: torch.Tensor  # (B', T') ordinal of each token among its row's real tokens
    read_real: torch.Tensor  # (B', T') bool
    write_src: torch.Tensor  # (B,) the call row whose routing each forward row takes
    write_ord: torch.Tensor  # (B, T')
    write_real: torch.Tensor  # (B, T') bool


@dataclass
class _Session:
    tracer: RoutingTracer
    mode: str  # "record", "compare" or "replay"
    routes: torch.Tensor  # (R, W, L, k) int16: the rollout rows' recordings (a view when recording)
    row_map: torch.Tensor  # (B,) the routes row of each row of the forward
    layout: _Layout | None = None
    flips: list[torch.Tensor] = field(default_factory=list)  # experts used differ from the recording
    router_flips: list[torch.Tensor] = field(default_factory=list)  # the router's own choice differs
    tokens: list[torch.Tensor] = field(default_factory=list)
    missing: list[torch.Tensor] = field(default_factory=list)
    flip_rate: torch.Tensor | None = None
    """Set when a comparing or replaying session ends: (token, layer) choices whose experts used differ from
    the recording / compared (0-dim)."""
    router_flip_rate: torch.Tensor | None = None
    """The same for the router's own choice (equal to ``flip_rate`` without replay)."""


_ACTIVE: list[_Session] = []  # the session in progress, at most one


def in_session() -> bool:
    """Whether a routing session is recording, comparing or replaying the forwards now."""
    return bool(_ACTIVE)


@contextmanager
def backbone_call(
    attention_mask: torch.Tensor,  # (B, S) the whole sequences of the forward
    start: int,
    end: int,
    rows: torch.Tensor | None = None,  # (B',) forward rows the call runs; None: all
    shares: torch.Tensor | None = None,  # (B,) the call row standing for each forward row; None: row b is b
) -> Iterator[None]:
    """Declare that the backbone call inside runs columns ``[start, end)`` of the forward's sequences for
    ``rows`` (the shared-prompt forward runs one row per group and ``shares`` maps every row to it). A no-op
    outside a routing session."""
    if not _ACTIVE:
        yield
        return
    session = _ACTIVE[-1]
    if attention_mask.shape[0] != session.row_map.shape[0]:
        raise RuntimeError(
            f"a forward over {attention_mask.shape[0]} rows in a routing session for "
            f"{session.row_map.shape[0]}: pass the rows it computes to RoutingTracer.session."
        )
    real = attention_mask.bool()
    ordinal = attention_mask.long().cumsum(1) - 1
    all_rows = torch.arange(real.shape[0], device=real.device)
    read_rows = all_rows if rows is None else rows
    session.layout = _Layout(
        read_rows,
        ordinal[read_rows, start:end],
        real[read_rows, start:end],
        all_rows if shares is None else shares,
        ordinal[:, start:end],
        real[:, start:end],
    )
    try:
        yield
    finally:
        session.layout = None


class RoutingTracer:
    """Forward hooks on a policy's routers that record, compare with or replay a rollout's routing (see the
    module notes). Outside ``session`` (generation, evaluation, the reference pass) the routers run untouched."""

    def __init__(self, routers: list[tuple[str, torch.nn.Module]]):
        self.names = [name for name, _ in routers]
        tops = {int(m.top_k) for _, m in routers}
        if len(tops) != 1:
            raise UnsupportedRouterError(f"routers with different top-k ({sorted(tops)}) are not supported.")
        self.top_k = tops.pop()
        self.num_layers = len(routers)
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (tokens, forced experts)
        self._handles = [
            module.register_forward_hook(self._hook_for(layer, ROUTERS[type(module).__name__][1]))
            for layer, (_, module) in enumerate(routers)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def empty_routes(self, attention_mask: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, W, L, k)
        """A rollout's blank recording: room for each row's real tokens, -1 everywhere."""
        width = max(int(attention_mask.sum(1).max()), 1)
        shape = (attention_mask.shape[0], width, self.num_layers, self.top_k)
        return torch.full(shape, -1, dtype=torch.int16, device=attention_mask.device)

    @contextmanager
    def session(
        self,
        mode: str,
        routes: torch.Tensor,  # (R, W, L, k) int16; a view of the rollout's when recording
        rows: torch.Tensor | None = None,  # (B,) the routes row of each forward row; None: row b is b
    ) -> Iterator[_Session]:
        """Record into ``routes``, compare with it, or replay it, for the forwards inside. Yields the session,
        whose ``flip_rate`` is set on exit (None when nothing was compared)."""
        if mode not in ("record", "compare", "replay"):
            raise ValueError(f"mode={mode!r}: one of 'record', 'compare', 'replay'.")
        if _ACTIVE:
            raise RuntimeError("routing sessions do not nest.")
        row_map = torch.arange(routes.shape[0], device=routes.device) if rows is None else rows
        session = _Session(self, mode, routes, row_map)
        self._pending.clear()
        _ACTIVE.append(session)
        try:
            yield session
        finally:
            _ACTIVE.pop()
        if session.missing and int(torch.stack(session.missing).sum()):
            raise RuntimeError(
                "routing replay found tokens with no recorded experts: the later pass ran tokens the recording "
                "pass did not (a different micro-batch or trimming?)."
            )
        if session.tokens:
            total = torch.stack(session.tokens).sum()
            session.flip_rate = torch.stack(session.flips).sum() / total.clamp(min=1)
            session.router_flip_rate = torch.stack(session.router_flips).sum() / total.clamp(min=1)

    def _hook_for(self, layer: int, weights_fn: WeightsFn):
        def hook(module, args, output):
            logits, _, experts = output
            if torch._C._current_graph_task_id() != -1:  # a layer re-run by gradient checkpointing
                pending = self._pending.get(layer)
                if pending is None or pending[0] != experts.shape[0]:
                    return None
                forced = pending[1]
                return logits, weights_fn(module, logits, forced), forced
            if not _ACTIVE or _ACTIVE[-1].tracer is not self:
                return None
            session = _ACTIVE[-1]
            if session.layout is None:
                raise RuntimeError(
                    f"router {self.names[layer]} ran in a routing session without a declared token layout "
                    "(lightning_gspo.routing.backbone_call)."
                )
            return _route(session, layer, module, logits, experts, weights_fn)

        return hook


def _route(session: _Session, layer: int, module, logits, experts, weights_fn):
    """Record, compare or replay one router call; the router's new output, or None to keep its own."""
    lay = session.layout
    calls, width = lay.read_ord.shape
    if experts.shape[0] != calls * width:
        raise RuntimeError(
            f"router {session.tracer.names[layer]} saw {experts.shape[0]} tokens; the declared layout has "
            f"{calls} x {width}."
        )
    own = experts.view(calls, width, -1)
    if session.mode == "record":
        keep = lay.write_real
        rows = session.row_map[:, None].expand_as(keep)[keep]
        values = own.index_select(0, lay.write_src)[keep]
        session.routes[rows, lay.write_ord[keep], layer] = values.to(session.routes.dtype)
        return None
    keep = lay.read_real
    rows = session.row_map[lay.read_rows][:, None].expand_as(keep)[keep]
    recorded = session.routes[rows, lay.read_ord[keep], layer].long()  # (n, k)
    mine = own[keep]
    recorded_set = recorded.sort(-1).values
    differs = (mine.sort(-1).values != recorded_set).any(-1)
    session.router_flips.append(differs.sum())
    session.tokens.append(torch.tensor(differs.numel(), device=differs.device))
    if session.mode == "compare":
        session.flips.append(differs.sum())
        return None
    absent = (recorded < 0).any(-1)
    session.missing.append(absent.sum())
    forced = own.clone()
    forced[keep] = torch.where(absent[:, None], mine, recorded).to(forced.dtype)
    session.flips.append((forced[keep].long().sort(-1).values != recorded_set).any(-1).sum())
    forced = forced.view_as(experts)
    session.tracer._pending[layer] = (experts.shape[0], forced)  # for a re-run by gradient checkpointing
    return logits, weights_fn(module, logits, forced), forced
