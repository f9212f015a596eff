"""``CachedGenerate``: a decode loop of our own behind the ``GenerationEngine`` seam, returning what
``HFGenerate`` returns (``(U * G, C)`` completion ids, right-padded with the pad id after each row's EOS, ``C`` the
longest completion) from the same sampling distribution (``lightning_gspo.sampling``).

Where transformers' ``generate`` spends work it need not, and what this loop does instead:
- ``generate`` receives each prompt G times and runs its prefill G times. Here the U distinct prompts are
  prefilled once, then their key/value cache and last-position logits are repeated G times
  (``shared_prefill``).
- ``generate`` keeps decoding a row after its EOS, writing padding, until the last row stops. Here finished rows
  leave the batch: their rows are selected out of the cache, the attention mask and the position ids
  (``early_exit``). Compaction copies the cache once, about what one step of a dynamic cache copies (it
  concatenates every step), and measured faster at every step where a row finished than after a quarter of the
  batch had (116 against 105 tokens/s, docs/benchmarks.md); ``compact_fraction`` can still wait.
- ``generate``'s dynamic cache concatenates each step's keys and values, copying the whole cache every step. Here
  full-attention layers write in place into buffers of the final length (``preallocate``).
- Per step it does one forward, the processor chain and one draw: no stopping-criteria objects, no re-preparing
  of model inputs. ``torch.compile`` with a static cache was slower on CPU (docs/benchmarks.md).

Position ids come from the attention mask's running sum, as ``generate`` computes them, so left-padded prompts
of different lengths continue exactly where they would. The uniform numbers that drive sampling are drawn for all
U * G rows and every step before the loop (one ``torch.rand`` call from the global generator), and each row reads
its own: the same seed gives the same completions with or without early exit and shared prefill.

Vision-language policies (``images``, an ``ImageBatch`` with one entry per distinct prompt):
- The prefill takes each prompt's image inputs, so the vision tower encodes each prompt's images once; ``generate``
  receives and encodes them once per completion. Decode steps need no image input: the image features are in the
  cache.
- Qwen2-VL-style models place image tokens on a 3-D (temporal, height, width) grid and let the text after an
  image continue from the grid's extent, so the mask's running sum is not a token's position. The prefill takes
  the model's own 3-D positions (``rope_positions.position_ids_for``), and each row continues on all three axes
  from its largest prompt position + 1: what ``generate`` reaches with its ``rope_deltas``. Decode steps pass
  (3, n, 1) positions; transformers' optional fourth (text) row only serves masks built from positions, and an
  attention mask is always given here. LLaVA-style models keep the 1-D positions of a text model.
- Image placeholder ids (``tokenizer.placeholder_ids``) are never drawn, as ``HFGenerate`` suppresses them: a
  sampled placeholder would ask the model for image features that do not exist. Their logits are set to -inf
  before the sampling chain, which every processor keeps at -inf, so where the chain applies the suppression
  does not change the distribution.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers before per-layer cache objects: caches are not preallocated there
    DynamicLayer = object

from lightning_gspo.config_checks import CACHED_ENGINE_KWARGS
from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.rollout import GenerationEngine, HFGenerate
from lightning_gspo.rope_positions import position_ids_for
from lightning_gspo.sampling import FILTER_VALUE, SamplingSettings, next_tokens, seen_tokens


def engine_name(config) -> str:
    """'hf' or 'cached': what ``config.generation_engine`` means (see ``GSPOConfig.generation_engine``)."""
    name = getattr(config, "generation_engine", "hf")
    if name != "auto":
        return name
    other = set(getattr(config, "generation_kwargs", None) or {}) - set(CACHED_ENGINE_KWARGS)
    return "hf" if other else "cached"


def build_engine(tokenizer, config, eos: list[int], greedy: bool = False) -> GenerationEngine:
    """The engine ``config.generation_engine`` names, with the config's sampling settings (or greedy), for text
    and vision-language policies alike."""
    if engine_name(config) == "cached":
        return CachedGenerate(tokenizer, config, eos, greedy=greedy)
    return HFGenerate(tokenizer, config, eos, greedy=greedy)


@dataclass
class _Batch:
    """The rows still decoding and what the model needs of them, all indexed alike."""

    rows: torch.Tensor  # (n,) each row's index in the output
    live: torch.Tensor  # (n,) bool: no EOS yet (rows that finished stay until the next compaction)
    mask: torch.Tensor  # (n, L) attention mask over the cache and the next token
    position: torch.Tensor  # (n,) position id of the next token (on every rotary axis)
    seen: torch.Tensor | None  # (n, V) bool: tokens the repetition penalty applies to
    rope_axes: int = 0  # 3 for Qwen2-VL-style (temporal, height, width) positions; 0 for 1-D ones

    def position_ids(self) -> torch.Tensor:
        """(n, 1) the next token's position ids, or (rope_axes, n, 1), the same on every axis."""
        ids = self.position.unsqueeze(1)
        return ids.unsqueeze(0).expand(self.rope_axes, -1, -1) if self.rope_axes else ids

    def select(self, keep: torch.Tensor, cache) -> None:
        """Keep only rows ``keep`` (indices), in the cache too."""
        cache.batch_select_indices(keep)
        self.rows, self.live, self.mask, self.position = (
            self.rows[keep],
            self.live[keep],
            self.mask[keep],
            self.position[keep],
        )
        if self.seen is not None:
            self.seen = self.seen[keep]


class CachedGenerate(GenerationEngine):
    """Args:
    tokenizer: gives the pad id written after each EOS, and, for a vision-language policy (``VisionProcessor``),
        the image placeholder ids never sampled.
    config: the sampling settings and ``max_completion_length`` (``GSPOConfig``; ``generation_kwargs`` may
        override the sampling fields, as for ``generate``).
    eos: the ids that end a completion.
    greedy: the most likely token at every step, no sampling setting applied.
    early_exit: take finished rows out of the batch.
    shared_prefill: prefill each distinct prompt once for its group.
    compact_fraction: with ``early_exit``, compact once at least this share of the rows in the batch has finished
        (0: at every step where a row finished).
    preallocate: hold full-attention layers' keys and values in buffers of the final length, written in place
        (``PreallocatedLayer``), instead of transformers' dynamic layers, which copy the whole cache every step.
    """

    def __init__(
        self,
        tokenizer,
        config,
        eos: list[int],
        greedy: bool = False,
        *,
        early_exit: bool = True,
        shared_prefill: bool = True,
        compact_fraction: float = 0.0,
        preallocate: bool = True,
    ):
        self.settings = SamplingSettings.from_config(config, greedy)
        self.max_new_tokens = int(
            (config.generation_kwargs or {}).get("max_new_tokens", config.max_completion_length)
        )
        self.pad_token_id = tokenizer.pad_token_id
        self.suppressed = sorted(set(getattr(tokenizer, "placeholder_ids", None) or []))
        self.eos = sorted(set(eos))
        self.early_exit, self.shared_prefill = early_exit, shared_prefill
        self.compact_fraction, self.preallocate = compact_fraction, preallocate

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, num_generations, images: ImageBatch | None = None):
        """``images``: each prompt's image tensors (one entry per row of ``prompt_ids``), for a vision-language
        policy."""
        was_training = model.training
        model.eval()
        try:
            return self._decode(model, prompt_ids, prompt_mask, num_generations, images)
        finally:
            model.train(was_training)

    def _decode(
        self,
        model,
        prompt_ids: torch.Tensor,  # (U, P)
        prompt_mask: torch.Tensor,  # (U, P)
        g: int,
        images: ImageBatch | None = None,
    ) -> torch.Tensor:
        n, width, device = prompt_ids.shape[0] * g, self.max_new_tokens, prompt_ids.device
        self._cache_name = _cache_kwarg(model)
        # Drawn whether or not a row is still running, so each row's numbers depend on nothing else.
        uniforms = (
            None if self.settings.greedy else torch.rand((width, n), dtype=torch.float64, device=device)
        )
        cache, logits, batch = self._prefill(model, prompt_ids, prompt_mask, g, images)
        out = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=device)
        eos = torch.tensor(self.eos, device=device)
        suppressed = torch.tensor(self.suppressed, dtype=torch.long, device=device)
        steps = width
        for t in range(width):
            u = None if uniforms is None else uniforms[t, batch.rows]
            if len(suppressed):
                logits = logits.index_fill(1, suppressed, FILTER_VALUE)
            token = next_tokens(logits, self.settings, u, batch.seen)
            out[batch.rows[batch.live], t] = token[batch.live]
            if batch.seen is not None:
                batch.seen[torch.arange(len(token), device=device), token] = True
            batch.live &= ~torch.isin(token, eos)
            if t == width - 1 or not batch.live.any():
                steps = t + 1
                break
            if (keep := self._compaction(batch)) is not None:
                batch.select(keep, cache)
                token = token[keep]
            logits = self._step(model, cache, batch, token)
        return out[:, :steps]

    def _prefill(
        self, model, ids: torch.Tensor, mask: torch.Tensor, g: int, images: ImageBatch | None = None
    ) -> tuple[Any, torch.Tensor, _Batch]:
        """The cache and last-position logits of every output row, and the batch that decodes them."""
        if not self.shared_prefill:
            ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
            if images is not None:
                images = images.rows(torch.arange(len(images)).repeat_interleave(g))
        extra = {} if images is None else images.model_inputs(ids)  # each row's images, in the prefill only
        positions = position_ids_for(model, ids, mask, extra)  # (B, P), or (3, B, P) with mm_token_type_ids
        # The next position of each row: after its largest prompt position on every axis (3-D positions after an
        # image are not the token count); the last one for 1-D positions of a left-padded prompt.
        rope_axes = positions.shape[0] if positions.dim() == 3 else 0
        after = (positions.amax(0) if rope_axes else positions).amax(-1) + 1  # (B,)
        cache = _new_cache(model, ids.shape[1] + self.max_new_tokens if self.preallocate else None)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **extra,
            **{self._cache_name: cache},
        )
        logits = out.logits[:, -1].float()
        seen = seen_tokens(ids, mask, logits.shape[-1]) if self.settings.penalises_repeats else None
        if self.shared_prefill and g > 1:
            cache.batch_repeat_interleave(g)
            logits, mask, after = (x.repeat_interleave(g, 0) for x in (logits, mask, after))
            seen = None if seen is None else seen.repeat_interleave(g, 0)
        n = logits.shape[0]
        rows = torch.arange(n, device=ids.device)
        live = torch.ones(n, dtype=torch.bool, device=ids.device)
        return cache, logits, _Batch(rows, live, mask, after, seen, rope_axes)

    def _compaction(self, batch: _Batch) -> torch.Tensor | None:
        """The rows to keep when finished rows should leave the batch now, else None."""
        finished = int((~batch.live).sum())
        if self.early_exit and finished and finished >= self.compact_fraction * len(batch.live):
            return batch.live.nonzero().squeeze(1)
        return None

    def _step(self, model, cache, batch: _Batch, token: torch.Tensor) -> torch.Tensor:
        """(n, V) float32 next-token logits of the batch's rows after feeding them ``token``."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=batch.mask,
            position_ids=batch.position_ids(),
            use_cache=True,
            **{self._cache_name: cache},
        )
        batch.position = batch.position + 1
        return out.logits[:, -1].float()


def _new_cache(model, capacity: int | None):
    """transformers' dynamic cache for ``model``; with ``capacity``, its full-attention layers preallocated."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers before the per-layer cache types: no layer to replace
        return DynamicCache()
    if capacity is not None and hasattr(cache, "layers"):
        cache.layers = [PreallocatedLayer(capacity) if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer whose keys and values live in buffers of ``capacity`` positions: each step writes
    its new position in place and attention reads the filled prefix (a view), where ``DynamicLayer``
    concatenates, copying the whole cache at every step. Selecting or repeating rows copies the buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        self.device = key_states.device
        self._keys = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(
                f"the preallocated cache holds {self.capacity} positions; {end} were asked for."
            )
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()


def _cache_kwarg(model) -> str:
    """The forward's name for the key/value cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
