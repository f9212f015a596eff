"""The mixture-of-experts load-balancing loss (``router_aux_loss_coef``), with TRL 1.16's GRPOTrainer semantics.

What TRL does, and so what this does:
- A model takes part when its (text) config declares ``output_router_logits``, whatever that flag's value: the MoE
  families (Qwen3-MoE, gpt-oss, Mixtral, ...) do, dense models do not.
- ``router_aux_loss_coef=None`` takes the coefficient the model's config declares (transformers' default 0.001
  for Qwen3-MoE and gpt-oss; a checkpoint's config.json may say otherwise); 0.0 turns the loss off. A non-zero
  coefficient for a model without router logits is an error, raised when the module is built.
- The loss is the model's own ``load_balancing_loss_func`` (Switch Transformer's, from the model's modelling
  module) over the router logits of every attended token of the micro-batch's sequences, prompt and completion,
  masked by the attention mask: what the causal LM's forward returns as ``aux_loss`` for those inputs with
  ``output_router_logits=True``. It is added to the micro-batch's loss as ``coef * aux_loss /
  gradient_accumulation_steps`` whatever the loss type, and logged unscaled as ``aux_loss`` (TRL's name).
- It is a per-micro-batch quantity (routing statistics of that micro-batch, on that rank), so it depends on the
  micro-batch size, as TRL's does; under DDP each rank adds its own and the gradients are averaged.

Choices of ours (``policy_logprobs`` carries them out):
- The policy forward calls the backbone, not the causal LM (fused head, shared prompts), so router logits are
  requested from the backbone and the loss is computed here with the causal LM's expert counts. The forward then
  also runs each sequence's last token, which it otherwise leaves out (its output predicts nothing scored),
  because the model's own forward and TRL's route it too.
- The shared-prompt forward runs each distinct prompt once; its router logits are gathered back to one copy per
  completion (an index, so every completion's gradient reaches the one prompt pass), which gives the token set,
  value and gradient of the per-completion forward: sharing stays on.
- Zero-advantage rows are computed while the loss is on (``loss.scored_rows``): the load-balancing loss has a
  gradient on every row.
- A zero coefficient and dense models request no router logits at all: nothing is computed, the step is the one
  without the feature.
"""

from __future__ import annotations

import sys

import torch

FIELD = "algorithm.router_aux_loss_coef"


def _text_config(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is None:
        return lm, None
    return lm, config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve_router_aux_coef(model, coef: float | None) -> float:
    """The coefficient in force for ``model``: ``coef``, or the model config's when ``coef`` is None (0.0 for a
    model without one). A non-zero ``coef`` for a model that returns no router logits is an error, as in TRL."""
    lm, text_config = _text_config(model)
    is_moe = text_config is not None and hasattr(text_config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(
            f"{FIELD}={coef} but {type(lm).__name__} is not a mixture-of-experts model that returns router logits "
            f"(its config declares no output_router_logits), so there is no load-balancing loss to weight. Leave "
            f"{FIELD} unset (null) or 0 for this model."
        )
    resolved = (
        float(getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
    )
    if not is_moe or resolved == 0.0:
        return 0.0
    if _loss_function(lm) is None:
        raise ValueError(
            f"{type(lm).__name__} declares router logits but its modelling module has no load_balancing_loss_func, "
            f"so the load-balancing loss cannot be computed as the model computes it; set {FIELD}=0."
        )
    return resolved


def _loss_function(lm):
    return getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)


def load_balancing_loss(
    model,
    router_logits: tuple[torch.Tensor, ...],  # one (B * T, E) per MoE layer, rows in (batch, position) order
    attention_mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """The model's own load-balancing loss over the attended tokens, with its causal LM's expert counts."""
    lm, text_config = _text_config(model)
    experts = getattr(lm, "num_experts", None) or getattr(text_config, "num_experts", None)
    top_k = getattr(lm, "num_experts_per_tok", None) or text_config.num_experts_per_tok
    return _loss_function(lm)(tuple(router_logits), experts, top_k, attention_mask)


def gather_shared(
    prompt_logits: tuple[torch.Tensor, ...],  # one (U * P, E) per layer: each distinct prompt once
    completion_logits: tuple[
        torch.Tensor, ...
    ],  # one (B * S, E) per layer: every row's tokens after its prompt
    row_run: torch.Tensor,  # (B,) which distinct prompt each row has
    prompt_length: int,
) -> tuple[torch.Tensor, ...]:
    """Per layer, the router logits (B * (P + S), E) the per-completion forward would give: each row's prompt part
    taken from its prompt's pass, then its own tokens."""
    b = row_run.shape[0]
    out = []
    for prompt, completion in zip(prompt_logits, completion_logits, strict=True):
        prompt = prompt.view(-1, prompt_length, prompt.shape[-1]).index_select(0, row_run)
        out.append(torch.cat([prompt, completion.view(b, -1, completion.shape[-1])], 1).flatten(0, 1))
    return tuple(out)
