"""Per-token log-probs of a Hugging Face causal LM's completion tokens, through the fused hidden->log-prob kernel.

Choices, and why:
- Log-probs come from ``logits / temperature``, as TRL computes them, with position ids taken from the attention
  mask so left-padded rows see the positions they were generated with; a vision-language model's 3-D positions
  come from the model itself (``rope_positions.py``).
- The model's inputs arrive as a mapping (``input_ids``, ``attention_mask``, and whatever else the model's
  forward takes: image tensors for a vision-language model, say), so a new kind of input passes through without
  new arguments here.
- The fused path takes the backbone's last hidden states of the scored tokens only and never builds the (N, V)
  logits. The completions of one group share their prompt, so the backbone runs each distinct prompt once
  and the completions attend to its keys and values (selected per row, so gradients from every completion
  flow back into the one prompt forward): G x (P + C) token positions become P + G x C, with the same numbers.
  A vision-language prompt is its ids and its images (``shared_images`` finds each row's images in the flat
  image tensors and refuses rows whose text matches but whose pictures differ): the vision tower and the
  backbone run each distinct one once, and the completions continue from it with their 3-D positions, so
  G x (vision + P + C) becomes vision + P + G x C.
  It costs one more pass over the weights, so it is used only where it saves at least
  ``SHARE_MIN_SAVED_POSITIONS`` positions and a quarter of the micro-batch's; it needs a plain key/value
  cache, so models with other caches (sliding windows, as in Gemma 3: decided from the config, before any
  forward), and gradient checkpointing (which turns the cache off in training), take the whole sequences.
- Padding is not computed where it can be cut: ``layout`` (``lightning_gspo.length_buckets`` plans it) trims the
  micro-batch to its longest completion and prompt, and by default runs its rows in length buckets, each trimmed
  to its own; with the shared-prompt forward the prompts still run once and each bucket selects its rows' keys
  and values. The result is padded back to (B, C), so the loss and the rollout's old and reference log-probs
  keep their shapes.
- A tied embedding adds its few gradient rows straight into the head's gradient instead of a second dense
  vocabulary-sized gradient (one process; see ``_tied_embeddings``).
- Each backbone call declares which tokens of the micro-batch it runs (``routing.backbone_call``), so a
  mixture-of-experts policy's routing can be recorded and replayed per token whatever the layout.
- The materialised path is kept for comparison and for heads the fused one does not know (soft-capped or
  scaled logits).
- A mixture-of-experts model's load-balancing loss (``return_aux_loss``) comes from the router logits of the same
  forward, over every attended token, the last one included; ``router_aux`` says why and how the shared-prompt
  forward gives the per-completion forward's loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import NamedTuple

import torch

from lightning_gspo.kernels import selective_logprobs
from lightning_gspo.length_buckets import plan_rows
from lightning_gspo.rope_positions import position_ids_for
from lightning_gspo.router_aux import gather_shared, load_balancing_loss
from lightning_gspo.routing import backbone_call, in_session
from lightning_gspo.shared_images import RowImages, images_of, row_images, same_images


class BackboneOut(NamedTuple):
    hidden: torch.Tensor  # (B, C, H) at the positions that predict the completion tokens
    router_logits: tuple[torch.Tensor, ...] | None  # one (B * T', E) per MoE layer when asked for, else None


def _unwrap(model):
    """The causal LM under a PEFT wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_unsupported(model) -> str | None:
    """Why the fused head cannot stand in for this model's logits, or None when it can."""
    lm = _unwrap(model)
    cfg = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"the model's config sets {attr}={getattr(cfg, attr)}"
    head = lm.get_output_embeddings()
    if head is None or not hasattr(lm, lm.base_model_prefix):
        return "the model has no separate backbone and output head"
    if hasattr(head, "lora_A"):  # a PEFT LoRA layer: its weight is the base head's, without the update
        return "the output head carries LoRA adapters (model.lora.target_modules names it)"
    weight = getattr(head, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2):
        return "the output head's weight is not a plain floating-point matrix (a quantised head?)"
    return None


def per_token_logps(
    model,
    inputs: Mapping[str, torch.Tensor],  # input_ids (B, P + C), attention_mask (B, P + C), extra model inputs
    completion_mask: torch.Tensor,  # (B, C) bool
    temperature: float,
    impl: str = "fused",
    compute_entropy: bool = False,
    entropy_grad: bool = False,
    return_aux_loss: bool = False,
    layout: str = "padded",
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs (B, C) float32 of the completion tokens (and their entropies), zero where the mask is False.

    ``inputs`` holds the whole sequences (prompt then completion) as ``input_ids`` and ``attention_mask``; any
    other entry is passed to the model's forward as it is. The entropies carry a gradient only with
    ``entropy_grad`` (an entropy bonus): otherwise the backward never pays for them. With ``return_aux_loss`` a
    third item: the mixture-of-experts model's load-balancing loss (a scalar) over every attended token of
    ``inputs``, the last included. ``layout``: which rows run together and how wide
    (``lightning_gspo.length_buckets``); every layout gives the same numbers. Image inputs, the load-balancing
    loss (a statistic of the whole micro-batch) and a routing session (keyed by the micro-batch's rows) take the
    padded block."""
    if (
        layout != "padded"
        and not return_aux_loss
        and not in_session()
        and set(inputs) == {"input_ids", "attention_mask"}
    ):
        return _by_length(
            model, inputs, completion_mask, temperature, impl, compute_entropy, entropy_grad, layout
        )
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    c, t = completion_mask.shape[1], input_ids.shape[1]
    # The last token's own output predicts nothing we score, and under causal attention no earlier position
    # sees it: it is left out of every forward, unless its routing is needed for the load-balancing loss.
    span = t if return_aux_loss else t - 1
    position_ids = position_ids_for(model, input_ids, attention_mask, extra)  # (B, T), or (3, B, T) for a VLM
    if "mm_token_type_ids" in extra:  # per token, like the ids: cut where the ids are cut
        extra["mm_token_type_ids"] = extra["mm_token_type_ids"][:, :span]
    entropy = (compute_entropy or entropy_grad, entropy_grad)
    if impl == "fused":
        out = _completion_hidden(model, input_ids, attention_mask, position_ids, c, extra, return_aux_loss)
        head = _unwrap(model).get_output_embeddings()
        result = _fused_logps(out.hidden, head, input_ids[:, -c:], completion_mask, temperature, *entropy)
        if not return_aux_loss:
            return result
        return (*result, load_balancing_loss(model, out.router_logits, attention_mask[:, :span]))
    with backbone_call(attention_mask, 0, span):
        out = model(
            input_ids=input_ids[:, :span],
            attention_mask=attention_mask[:, :span],
            position_ids=position_ids[..., :span],
            logits_to_keep=c + span - (t - 1),
            use_cache=False,
            **({"output_router_logits": True} if return_aux_loss else {}),
            **extra,
        )
    logits = out.logits[:, :c]  # the kept positions that predict the completion tokens
    result = _materialized_logps(logits, input_ids[:, -c:], completion_mask, temperature, *entropy)
    return (*result, out.aux_loss) if return_aux_loss else result


def _by_length(model, inputs, completion_mask, temperature, impl, compute_entropy, entropy_grad, layout):
    """``per_token_logps`` of each run of rows the layout plans, each trimmed to its own longest completion and
    prompt, gathered back into (B, C) with zeros after each row's width (rows with nothing scored stay zero, as
    the padded block gives them, with no gradient)."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    b, c = completion_mask.shape
    p = input_ids.shape[1] - c
    plan = plan_rows(completion_mask, attention_mask[:, :p], layout)
    parts, rows = [], []
    for bucket in plan.buckets(layout, p):
        sel, start, end = bucket.rows.to(input_ids.device), bucket.prompt_start, p + bucket.width
        sub = {"input_ids": input_ids[sel, start:end], "attention_mask": attention_mask[sel, start:end]}
        out = per_token_logps(
            model, sub, completion_mask[sel, : bucket.width], temperature, impl, compute_entropy, entropy_grad
        )
        parts.append([None if t is None else torch.nn.functional.pad(t, (0, c - bucket.width)) for t in out])
        rows.append(sel)
    order = torch.cat(rows)
    if order.numel() == b and torch.equal(order, torch.arange(b, device=order.device)):
        return tuple(None if ts[0] is None else torch.cat(ts) for ts in zip(*parts))
    gathered = []
    for ts in zip(*parts):
        if ts[0] is None:
            gathered.append(None)
            continue
        stacked = torch.cat(ts)
        gathered.append(stacked.new_zeros(b, c).index_copy(0, order, stacked))
    return tuple(gathered)


def _completion_hidden(
    model, input_ids, attention_mask, position_ids, c: int, extra: dict, router: bool = False
) -> BackboneOut:
    """The backbone's last hidden states at the positions that predict the completion tokens, and with ``router``
    the router logits of every position up to the last (included)."""
    lm = _unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    t = input_ids.shape[1]
    span = t if router else t - 1
    embeds = None if extra else _tied_embeddings(backbone, head, input_ids[:, :span])
    shared = _shared_prompt_hidden(
        lm, backbone, input_ids, attention_mask, position_ids, c, embeds, router, extra
    )
    if shared is not None:
        return shared
    with backbone_call(attention_mask, 0, span):
        out = backbone(
            **({"input_ids": input_ids[:, :span]} if embeds is None else {"inputs_embeds": embeds}),
            attention_mask=attention_mask[:, :span],
            position_ids=position_ids[..., :span],
            use_cache=False,
            **({"output_router_logits": True} if router else {}),
            **extra,
        )
    return BackboneOut(out.last_hidden_state[:, t - 1 - c : t - 1], out.router_logits if router else None)


def _fused_logps(
    hidden, head, targets, completion_mask, temperature: float, compute_entropy: bool, entropy_grad: bool
):
    out = selective_logprobs(
        hidden[completion_mask],
        head.weight,
        targets[completion_mask],
        temperature=temperature,
        bias=getattr(head, "bias", None),
        return_entropy=compute_entropy,
    )
    logps_sel, ent_sel = out if compute_entropy else (out, None)
    dtype = torch.promote_types(logps_sel.dtype, torch.float32)  # float32, or float64 from a float64 model
    logps = hidden.new_zeros(completion_mask.shape, dtype=dtype).masked_scatter(completion_mask, logps_sel)
    entropy = None
    if compute_entropy:
        ent_sel = ent_sel if entropy_grad else ent_sel.detach()
        entropy = torch.zeros_like(logps).masked_scatter(completion_mask, ent_sel)
    return logps, entropy


def _materialized_logps(
    logits, targets, completion_mask, temperature: float, compute_entropy: bool, entropy_grad: bool
):
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a float64 model keeps float64
    logp_all = (logits / temperature).log_softmax(-1)  # (B, C, V)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(completion_mask, logps, torch.zeros_like(logps))
    entropy = None
    if compute_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.where(completion_mask, entropy, torch.zeros_like(entropy))
    return logps, entropy


def _prompt_runs(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, images: RowImages | None = None, extra=None
):
    """(first row of each run of identical neighbouring prompts (U,), each row's run (B,)), or None when no two
    neighbours share a prompt. With ``images`` (the rows' images in ``extra``) a prompt is its ids and images."""
    if prompt_ids.shape[0] < 2 or prompt_ids.shape[1] == 0:
        return None
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    if images is not None:
        same = same_images(images, extra, same)
    if not bool(same.any()):
        return None
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def _plain_kv_cache(lm) -> bool:
    """Whether the model's forward keeps a plain key/value cache for every layer (``DynamicLayer``), which is what
    the completions can attend to row by row. Decided from the config, as transformers' ``DynamicCache`` reads
    it: sliding-window and chunked layers (Gemma 3, Mistral with a window), layers that share another layer's
    cache and recurrent (stateful) models keep something else."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers 4.x: caches without per-layer objects
        return False
    config = getattr(lm, "config", None)
    if config is None or getattr(lm, "_is_stateful", False):
        return False
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):  # a config the cache cannot read: do not guess
        return False
    if not cache.layers:  # no layer types in the config: every layer is made a DynamicLayer on first use
        return getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
    return _plain_layers(cache.layers)


def _plain_layers(layers) -> bool:
    from transformers.cache_utils import DynamicLayer

    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


# Sharing adds a backbone call (one more pass over the weights, forward and backward) to save the repeated
# prompt positions. On the CPU (benchmarks/logprob_step.py, docs/benchmarks.md) a 0.5B model's 8 completions of
# 16 tokens after 96-token prompts, 4 per prompt, took 5.0 s instead of 10.6 s forward and backward; with
# 4-token prompts (24 positions saved) it was 4% slower, and the 1M-parameter demo model lost 3.6 ms a step.
SHARE_MIN_SAVED_POSITIONS = 256


def _shared_prompt_hidden(
    lm, backbone, input_ids, attention_mask, position_ids, c: int, embeds=None, router=False, extra=None
) -> BackboneOut | None:
    """The backbone's hidden states (B, C, H) at the positions that predict the completion tokens, with each
    distinct prompt run once (and with ``router`` the router logits of every position, the last included, as the
    per-completion forward gives them); None when too few positions would be saved or the model cannot (see the
    module notes). ``embeds``: the input embeddings of the positions to run, when the caller has them.
    ``extra``: the other model inputs; a VLM's images (Qwen2-VL or LLaVA layout, ``shared_images``) run with their
    prompt, once, and the completions attend to it with their 3-D positions; any other extra input is not shared."""
    p = input_ids.shape[1] - c
    checkpointing = getattr(lm, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(lm, "is_gradient_checkpointing", False)
    most_saved = (input_ids.shape[0] - 1) * p  # if every row shared one prompt
    if p < 1 or c < 1 or checkpointing or most_saved < SHARE_MIN_SAVED_POSITIONS:
        return None  # decided from shapes alone: no comparison of prompts, no host sync
    if not _plain_kv_cache(lm):  # decided from the config: no prompt pass to throw away
        return None
    images = row_images(lm.config, extra, input_ids) if extra else None
    if extra and images is None:  # inputs whose rows cannot be told apart (shared_images): not shared
        return None
    runs = _prompt_runs(input_ids[:, :p], attention_mask[:, :p], images, extra)
    if runs is None:
        return None
    first, row_run = runs
    saved = (input_ids.shape[0] - first.numel()) * p
    if saved < SHARE_MIN_SAVED_POSITIONS or 4 * saved < input_ids.numel():
        return None
    cache_arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    span = input_ids.shape[1] - (0 if router else 1)  # the last token predicts nothing we score; it routes
    # Embedded once, so the embedding's (possibly dense, vocabulary-sized) gradient is formed once.
    if embeds is None:
        embeds = backbone.get_input_embeddings()(input_ids[:, :span])
    routing = {"output_router_logits": True} if router else {}
    tokens = {"inputs_embeds": embeds[first, :p]}
    if images is not None:  # 3-D positions slice as 1-D ones do (rows, positions last)
        tokens.update(_prompt_images(images, extra, input_ids[first, :p], first))
    with backbone_call(attention_mask, 0, p, rows=first, shares=row_run):  # a group's prompt routes once
        prompt = backbone(
            **tokens,
            attention_mask=attention_mask[first, :p],
            position_ids=position_ids[..., first, :p],
            use_cache=True,
            **routing,
        )
    cache = getattr(prompt, "cache", None) or getattr(prompt, "past_key_values", None)
    if not _plain_layers(getattr(cache, "layers", None)):
        # A model that builds a cache of its own kind, which its config did not show: the prompt pass is lost.
        return None
    last_prompt = prompt.last_hidden_state[:, -1:].index_select(0, row_run)  # predicts the first token
    if span == p:  # one completion token and no routing wanted: nothing after the prompt to run
        return BackboneOut(last_prompt, None)
    cache.batch_select_indices(row_run)  # indexing: each row's keys and values, differentiably
    with backbone_call(attention_mask, p, span):
        completion = backbone(
            inputs_embeds=embeds[:, p:span],
            attention_mask=attention_mask[:, :span],
            position_ids=position_ids[..., p:span],
            use_cache=True,
            **{cache_arg: cache},
            **routing,
        )
    hidden = torch.cat([last_prompt, completion.last_hidden_state[:, : c - 1]], 1)
    if not router:
        return BackboneOut(hidden, None)
    return BackboneOut(hidden, gather_shared(prompt.router_logits, completion.router_logits, row_run, p))


def _prompt_images(images: RowImages, extra, prompt_ids, first) -> dict:
    """The image inputs of the prompt rows ``first`` for their one run. Where the image features replace the
    embeddings a Qwen2-VL-style forward reads from the ids, given beside the embeddings; a LLaVA-style one takes the
    embeddings alone and finds its image token's embedding in them."""
    out = images_of(images, extra, first.tolist())
    return {**out, "input_ids": prompt_ids} if images.grid else out


def _tied_embeddings(backbone, head, ids: torch.Tensor) -> torch.Tensor | None:
    """The input embeddings of ``ids`` when the embedding matrix is the trained output head's (tied), with the
    embedding's share of the gradient added straight into the matrix's ``.grad`` rows; else None.

    torch's embedding backward forms a dense (V, H) gradient for the few rows a batch touches and then adds it
    to the head's (V, H) gradient: two passes over a vocabulary-sized matrix per micro-batch (79 ms on the CPU
    for a 151,936 x 896 head). Here the embedding output is a leaf whose gradient hook index-adds its rows into
    ``weight.grad``, in whichever order it and the head's gradient arrive. Under torch.distributed the
    gradient hooks of DDP/FSDP fire when the head's gradient lands, before these rows would be added, so there
    the ordinary embedding is used.
    """
    emb = backbone.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if (
        type(emb) is not torch.nn.Embedding  # scaled or otherwise custom embeddings keep their own forward
        or weight is None
        or emb.weight is not weight
        or not weight.requires_grad
        or not torch.is_grad_enabled()
        or emb.max_norm is not None
        or (torch.distributed.is_available() and torch.distributed.is_initialized())
    ):
        return None
    out = torch.nn.functional.embedding(ids, weight.detach()).requires_grad_()
    padding_idx = emb.padding_idx

    def add_rows(grad: torch.Tensor) -> None:
        rows, g = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if padding_idx is not None:  # nn.Embedding gives its padding row no gradient
            keep = rows != padding_idx
            rows, g = rows[keep], g[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, g.to(weight.grad.dtype))

    out.register_hook(add_rows)
    return out
