"""Per-token log-probs (and entropy) of ``hidden @ weight.T``, without ever holding the (N, V) logits.

``selective_logprobs(hidden, weight, token_ids)`` returns ``log_softmax((hidden @ weight.T + bias) / T)`` at
the target of each row, in float32. Choices it makes, and why:

- The logits are visited one tile (a block of rows x a block of vocabulary columns) at a time. The forward
  keeps per row only an online logsumexp (running max ``m``, ``s = sum exp(z - m)``), the target logit and,
  for the entropy, ``c = sum exp(z - m) (z - m)`` (kept relative to the running max, so
  ``entropy = log s - c / s`` needs no cancellation of two large numbers). Memory: O(tile + N), never O(N V).
- The bias is added before the temperature division: ``logits = (hidden @ W.T + bias) / temperature``, the
  order in which a model's head and a sampler apply them.
- The backward recomputes each tile from the saved logsumexp, except when all the logits fit in one tile
  (few rows, as in a CPU micro-batch of short completions): the PyTorch path then keeps that one tile of
  log-probs from the forward, which saves the backward a (N, H) x (H, V) product for no more memory than the
  tile the forward already used. ``dz = g (onehot - p) / T`` for the log-prob and
  ``dz = -g_H p (log p + H) / T`` for the entropy (so entropy returned and used in a loss gets its true
  gradient), then ``dhidden = dz @ W`` and ``dW = dz.T @ hidden``, accumulated in float32.
- Gradient sparsity: rows whose incoming gradient (log-prob, and entropy if any) is exactly zero cost nothing
  in the backward. One ``nonzero`` on the incoming gradient selects the live rows; only those are gathered and
  recomputed. In GRPO/GSPO with beta = 0 every row of a zero-advantage group, every padded row and every row
  of a clipped sequence arrives with an exact zero, often most of the batch.
- A frozen head (``weight.requires_grad`` False, e.g. LoRA) costs no weight-gradient work: 6NHV instead of
  8NHV.
- The backward tiles the vocabulary in its outer loop over all live rows at once, so each slice of ``dW`` is
  written by one matrix product with a long inner dimension (no float32 accumulator of the whole head when the
  live rows fit in one row block), and only the (rows, H) hidden gradient is accumulated across tiles.
- Arithmetic is float32 whatever the input dtype (float64 stays float64, for gradcheck). On the CPU, bfloat16
  tiles are upcast before the product (CPU matmuls cannot write float32 from bfloat16); on CUDA the product
  accumulates and writes float32 directly where torch supports ``out_dtype``.

Two implementations share the autograd Function below: PyTorch tiles (CPU, and CUDA with ``backend="torch"``)
and Triton kernels in ``logprobs_triton.py`` (CUDA, or the interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from lightning_gspo.kernels.backend_and_precision import (
    addmm_,
    compute_dtype,
    matmul_operand,
    mm_f32,
    resolve_backend,
)

# A tile holds at most this many logits unless ``chunk_size`` says otherwise: 64 MB of float32 on the CPU; on
# CUDA 128 Mi logits (a 512 MB float32 chunk plus a 256 MB bfloat16 gradient tile), where bigger products keep
# the tensor cores busy and 16k rows x 8k columns still fit.
DEFAULT_TILE_LOGITS = {"cpu": 1 << 24, "cuda": 1 << 27}
# The narrowest vocabulary block a tile is given before rows are split into several blocks; as many rows as
# possible share a tile so that each slice of the weight gradient is one long product.
MIN_VOCAB_BLOCK = 2048


def _tile_plan(n_rows: int, vocab: int, tile_logits: int) -> tuple[int, int]:
    """(rows per block, vocabulary columns per block) for a tile of at most ``tile_logits`` logits."""
    rows = max(1, min(n_rows, tile_logits // min(MIN_VOCAB_BLOCK, vocab)))
    cols = max(1, min(vocab, tile_logits // rows))
    if cols >= 128 and cols < vocab:
        cols -= cols % 128  # whole cache lines and matmul tiles
    return rows, cols


# ----------------------------------------------------------------------------------------------------
# PyTorch tiles
# ----------------------------------------------------------------------------------------------------


def _logits_tile(h, w, b, inv_t, acc_dtype):
    """(r, v) logits in ``acc_dtype`` of rows ``h`` (r, H) against head rows ``w`` (v, H)."""
    z = mm_f32(h, w.t(), acc_dtype)
    if b is not None:
        z.add_(b.to(acc_dtype))
    return z.mul_(inv_t)


def _forward_torch(hidden, weight, bias, token_ids, inv_t, with_entropy, tile_logits, keep_tile=False):
    """Per-row (logsumexp, target logit, entropy or None), one tile at a time; and, with ``keep_tile`` when the
    logits are a single tile, that tile's log-probs (N, V) for the backward (else None)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    target = torch.empty(n, dtype=acc, device=hidden.device)
    entropy = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
    rows, cols = _tile_plan(n, vocab, tile_logits)
    kept = None
    keep_tile = keep_tile and rows >= n and cols >= vocab and n > 0
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        h = matmul_operand(hidden[r0:r1], acc)  # (r, H)
        t = token_ids[r0:r1]  # (r,)
        m = torch.full((r1 - r0,), -math.inf, dtype=acc, device=hidden.device)
        s = torch.zeros_like(m)
        c = torch.zeros_like(m)
        tz = torch.zeros_like(m)
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            z = _logits_tile(
                h, matmul_operand(weight[v0:v1], acc), None if bias is None else bias[v0:v1], inv_t, acc
            )
            local = t - v0
            hit = (local >= 0) & (local < v1 - v0)
            tz += torch.where(hit, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0)
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            z.sub_(m_new[:, None])  # z - m_new, in place
            e = torch.exp(z)
            if with_entropy:
                shift = torch.where(s > 0, m - m_new, 0)  # s = 0 before the first tile, where m = -inf
                c = alpha * (c + s * shift) + torch.linalg.vecdot(e, z)
            s = alpha * s + e.sum(1)
            m = m_new
            if keep_tile:
                kept = z  # z - m over the whole vocabulary: log p once log s is known
            del z, e
        log_s = torch.log(s)
        if kept is not None:
            kept.sub_(log_s[:, None])
        lse[r0:r1] = m + log_s
        target[r0:r1] = tz
        if with_entropy:
            entropy[r0:r1] = log_s - c / s
    return lse, target, entropy, kept


def _dlogits_torch(h, w, b, targets, v0, lse, entropy, g, g_ent, inv_t, acc_dtype, logp=None):
    """Gradient of the loss w.r.t. one recomputed logits tile, (r, v) in ``acc_dtype``.

    h (r, H), w (v, H) the head rows [v0, v0 + v), b (v,) or None, targets/lse/entropy/g/g_ent (r,)
    (entropy and g_ent None when the entropy carries no gradient; g None when the log-probs carry none).
    ``logp``: the tile's log-probs kept from the forward (overwritten), or None to recompute them.
    """
    if logp is None:
        logp = _logits_tile(h, w, b, inv_t, acc_dtype).sub_(lse[:, None])  # log p
    p = torch.exp(logp)
    if g_ent is not None:
        # -p (g + g_H (log p + H)), the log-prob and entropy terms together
        q = logp.add_(entropy[:, None]).mul_(g_ent[:, None])
        if g is not None:
            q.add_(g[:, None])
        dz = q.mul_(p).neg_()
    else:
        dz = p.mul_(-g[:, None])
    if g is not None:
        local = targets - v0
        hit = ((local >= 0) & (local < dz.shape[1])).nonzero().squeeze(1)
        dz[hit, local[hit]] += g[hit]
    return dz.mul_(inv_t)


# ----------------------------------------------------------------------------------------------------
# Shared backward driver: live rows only, vocabulary-outer tiles, float32 accumulation
# ----------------------------------------------------------------------------------------------------


class _LiveRows(NamedTuple):
    """What the backward needs of the rows whose incoming gradient is not zero, gathered once."""

    index: torch.Tensor  # (M,) positions of the live rows in the batch
    hidden: torch.Tensor  # (M, H)
    targets: torch.Tensor  # (M,)
    lse: torch.Tensor  # (M,)
    entropy: torch.Tensor | None  # (M,), only when the entropy carries a gradient
    g: torch.Tensor | None  # (M,) incoming gradient of the log-probs, compute dtype
    g_ent: torch.Tensor | None  # (M,) incoming gradient of the entropy, compute dtype

    def block(self, part: slice) -> _LiveRows:
        return _LiveRows(*(None if x is None else x[part] for x in self))


def _live_row_index(grad_logps, grad_entropy, n: int) -> torch.Tensor | None:
    """(M,) indices of the rows with a non-zero incoming gradient; None when no gradient arrived at all."""
    live = None
    if grad_logps is not None:
        live = grad_logps != 0
    if grad_entropy is not None:
        live = grad_entropy != 0 if live is None else live | (grad_entropy != 0)
    return None if live is None or n == 0 else live.nonzero().squeeze(1)  # the one sync of the backward


def _gather_live_rows(rows, hidden, token_ids, lse, entropy, grad_logps, grad_entropy) -> _LiveRows:
    acc = compute_dtype(hidden.dtype)
    g = None if grad_logps is None else grad_logps.index_select(0, rows).to(acc)
    g_ent = None if grad_entropy is None else grad_entropy.index_select(0, rows).to(acc)
    return _LiveRows(
        index=rows,
        hidden=hidden.index_select(0, rows),
        targets=token_ids.index_select(0, rows),
        lse=lse.index_select(0, rows),
        entropy=None if g_ent is None else entropy.index_select(0, rows),
        g=g,
        g_ent=g_ent,
    )


@dataclass
class _GradBuffers:
    """The backward's outputs and the compute-dtype buffers that tiles add into before the outputs are
    written; a buffer is None when its output is not needed or when tiles can write the output directly."""

    dtype: torch.dtype  # the inputs', in which the gradients are returned
    rows: torch.Tensor  # (M,) live rows, where the hidden gradient lands
    grad_h: torch.Tensor | None  # (N, H)
    grad_w: torch.Tensor | None  # (V, H)
    grad_b: torch.Tensor | None  # (V,)
    dh: torch.Tensor | None  # (M, H): several vocabulary tiles add to each live row
    w_acc: torch.Tensor | None  # (V, H): grad_w itself unless several row blocks add in a bfloat16 head
    b_acc: torch.Tensor | None  # (V,)
    accumulate_w: bool  # several row blocks add to each head slice

    @classmethod
    def allocate(cls, hidden, weight, bias, rows, plan, needs) -> _GradBuffers:
        need_h, need_w, need_b = needs
        acc = compute_dtype(hidden.dtype)
        m, (rows_per_block, cols) = rows.numel(), plan
        one_row_block = rows_per_block >= m
        grad_w = w_acc = None
        if need_w:
            # One row block writes each head slice whole, once: no zero fill. Several accumulate, in float32
            # when the head is not.
            grad_w = torch.empty_like(weight) if one_row_block else torch.zeros_like(weight)
            w_acc = grad_w
            if not one_row_block and weight.dtype != acc:
                w_acc = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        dh = None
        if need_h and cols < weight.shape[0]:  # several vocabulary tiles add to each live row
            dh = torch.zeros(m, hidden.shape[1], dtype=acc, device=hidden.device)
        return cls(
            dtype=hidden.dtype,
            rows=rows,
            grad_h=torch.zeros_like(hidden) if need_h else None,
            grad_w=grad_w,
            grad_b=torch.zeros_like(bias) if need_b else None,
            dh=dh,
            w_acc=w_acc,
            b_acc=torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if need_b else None,
            accumulate_w=not one_row_block,
        )

    def add_tile(self, dz, w_op, h_blk, part: slice, v0: int, v1: int) -> None:
        """Fold one tile's logits gradient dz (r, v) into the gradients of the live rows ``part`` and of the
        head rows [v0, v1); w_op (v, H) and h_blk (r, H) are the operands the tile was formed from."""
        acc = compute_dtype(self.dtype)
        if self.b_acc is not None:
            self.b_acc[v0:v1] += dz.sum(0, dtype=acc)
        if dz.is_cuda and dz.dtype != self.dtype:
            dz = dz.to(self.dtype)  # tensor-core products; float32 accumulation below
        if self.grad_h is not None:
            if self.dh is None:
                self.grad_h.index_copy_(0, self.rows[part], mm_f32(dz, w_op, acc).to(self.dtype))
            else:
                addmm_(self.dh[part], dz, w_op)
        if self.w_acc is not None:
            _weight_grad_tile(self.w_acc[v0:v1], dz, h_blk, accumulate=self.accumulate_w)

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if self.dh is not None:
            self.grad_h.index_copy_(0, self.rows, self.dh.to(self.dtype))
        if self.w_acc is not None and self.w_acc is not self.grad_w:
            self.grad_w.copy_(self.w_acc)
        if self.b_acc is not None:
            self.grad_b.copy_(self.b_acc)
        return self.grad_h, self.grad_w, self.grad_b


def _weight_grad_tile(
    grad_w_slice: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, accumulate: bool
) -> None:
    """``grad_w_slice (v, H) (+)= dz.T (v, r) @ h (r, H)``: the head's share of one tile."""
    if accumulate:
        addmm_(grad_w_slice, dz.t(), h)
    elif dz.dtype == h.dtype == grad_w_slice.dtype:
        torch.mm(dz.t(), h, out=grad_w_slice)  # one rounding, from the matmul's float32 accumulator
    else:
        grad_w_slice.copy_(mm_f32(dz.t(), h, compute_dtype(grad_w_slice.dtype)))


def _backward_kept_tile(live: _LiveRows, kept, weight, bias, bufs: _GradBuffers, inv_t: float) -> None:
    """All the logits were one tile and the forward kept its log-probs: nothing is recomputed."""
    acc = compute_dtype(weight.dtype)
    h, w_op = matmul_operand(live.hidden, acc), matmul_operand(weight, acc)
    logp = kept.index_select(0, live.index)  # (M, V)
    dz = _dlogits_torch(
        h, w_op, bias, live.targets, 0, live.lse, live.entropy, live.g, live.g_ent, inv_t, acc, logp
    )
    bufs.add_tile(dz, w_op, h, slice(0, h.shape[0]), 0, weight.shape[0])


def _backward_torch_tiles(live: _LiveRows, weight, bias, plan, bufs: _GradBuffers, inv_t: float) -> None:
    """Vocabulary-outer tiles of PyTorch matmuls, each recomputed from the saved logsumexp."""
    acc = compute_dtype(weight.dtype)
    live = live._replace(hidden=matmul_operand(live.hidden, acc))
    rows_per_block, cols = plan
    m = live.index.numel()
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        w_op = matmul_operand(weight[v0:v1], acc)  # (v, H)
        b_tile = None if bias is None else bias[v0:v1]
        for r0 in range(0, m, rows_per_block):
            part = slice(r0, min(r0 + rows_per_block, m))
            blk = live.block(part)
            dz = _dlogits_torch(
                blk.hidden, w_op, b_tile, blk.targets, v0, blk.lse, blk.entropy, blk.g, blk.g_ent, inv_t, acc
            )
            bufs.add_tile(dz, w_op, blk.hidden, part, v0, v1)
            del dz


def _backward_triton_tiles(live: _LiveRows, weight, bias, plan, bufs: _GradBuffers, inv_t: float) -> None:
    """Vocabulary-outer tiles whose logits gradient a Triton kernel recomputes; the products stay in BLAS."""
    from lightning_gspo.kernels import logprobs_triton

    rows_per_block, cols = plan
    m = live.index.numel()
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        w_tile = weight[v0:v1]  # (v, H)
        b_tile = None if bias is None else bias[v0:v1]
        for r0 in range(0, m, rows_per_block):
            part = slice(r0, min(r0 + rows_per_block, m))
            blk = live.block(part)
            dz = logprobs_triton.dlogits(
                blk.hidden, w_tile, b_tile, blk.targets, v0, blk.lse, blk.entropy, blk.g, blk.g_ent, inv_t
            )
            bufs.add_tile(dz, w_tile, blk.hidden, part, v0, v1)
            del dz


def _backward(ctx, grad_logps, grad_entropy):
    hidden, weight, bias, token_ids, lse, entropy, kept = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not ctx.with_entropy:
        grad_entropy = None
    rows = _live_row_index(grad_logps, grad_entropy, hidden.shape[0])
    if rows is None or rows.numel() == 0 or not any(needs):
        return tuple(torch.zeros_like(t) if need else None for t, need in zip((hidden, weight, bias), needs))

    live = _gather_live_rows(rows, hidden, token_ids, lse, entropy, grad_logps, grad_entropy)
    plan = _tile_plan(rows.numel(), weight.shape[0], ctx.tile_logits)
    bufs = _GradBuffers.allocate(hidden, weight, bias, rows, plan, needs)
    if ctx.backend == "triton":
        _backward_triton_tiles(live, weight, bias, plan, bufs, ctx.inv_t)
    elif kept is not None:  # the forward kept one tile for N rows, so the M <= N live rows are one tile too
        _backward_kept_tile(live, kept, weight, bias, bufs, ctx.inv_t)
    else:
        _backward_torch_tiles(live, weight, bias, plan, bufs, ctx.inv_t)
    return bufs.finish()


class SelectiveLogprobsFunction(torch.autograd.Function):
    """Log-probs (and optionally entropy) of the targets under ``softmax((hidden @ weight.T + bias) / T)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, with_entropy, backend, tile_logits):
        # hidden (N, H), weight (V, H), bias (V,) or None, token_ids (N,) int64
        ctx.set_materialize_grads(False)
        inv_t = 1.0 / temperature
        if backend == "triton":
            from lightning_gspo.kernels import logprobs_triton

            tile = _tile_plan(hidden.shape[0], weight.shape[0], tile_logits)
            lse, target, entropy = logprobs_triton.forward_stats(
                hidden, weight, bias, token_ids, inv_t, with_entropy, tile=tile
            )
            kept = None
        else:
            keep = any(ctx.needs_input_grad[:3])
            lse, target, entropy, kept = _forward_torch(
                hidden, weight, bias, token_ids, inv_t, with_entropy, tile_logits, keep_tile=keep
            )
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy, kept)
        ctx.inv_t = inv_t
        ctx.with_entropy = with_entropy
        ctx.backend = backend
        ctx.tile_logits = tile_logits
        out_dtype = compute_dtype(hidden.dtype)
        logps = (target - lse).to(out_dtype)
        if entropy is None:
            ent_out = logps.new_empty(0)
            ctx.mark_non_differentiable(ent_out)
        else:
            ent_out = entropy.to(out_dtype)
        return logps, ent_out

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        grad_h, grad_w, grad_b = _backward(ctx, grad_logps, grad_entropy)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _validate(hidden, weight, token_ids, temperature, bias, chunk_size):
    _validate_hidden_and_head(hidden, weight)
    _validate_token_ids(token_ids, hidden, weight.shape[0])
    _validate_options(temperature, bias, chunk_size, weight.shape[0], hidden.device)


def _validate_hidden_and_head(hidden, weight):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a (N, H) tensor, got shape {tuple(getattr(hidden, 'shape', ()))}.")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}.")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a (V, H) tensor, got shape {tuple(getattr(weight, 'shape', ()))}.")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} (shape {tuple(weight.shape)}); hidden has "
            f"{hidden.shape[1]} (shape {tuple(hidden.shape)}). weight must be (V, H)."
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}.")
    if weight.device != hidden.device:
        raise ValueError(
            f"weight is on {weight.device} and hidden on {hidden.device}; they must share a device."
        )


def _validate_token_ids(token_ids, hidden, vocab: int):
    if not isinstance(token_ids, torch.Tensor) or token_ids.shape != (hidden.shape[0],):
        raise ValueError(
            f"token_ids must be (N,) = ({hidden.shape[0]},), one per row of hidden; got shape "
            f"{tuple(getattr(token_ids, 'shape', ()))}."
        )
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be an int64 (or int32) tensor, got {token_ids.dtype}.")
    if token_ids.device != hidden.device:
        raise ValueError(f"token_ids is on {token_ids.device} and hidden on {hidden.device}.")
    if vocab == 0:
        raise ValueError("weight has no rows: the vocabulary is empty.")
    if token_ids.numel() > 0:
        lo, hi = (int(x) for x in torch.aminmax(token_ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"token_ids must lie in [0, {vocab}) (the rows of weight); found min {lo}, max {hi}."
            )


def _validate_options(temperature, bias, chunk_size, vocab: int, device: torch.device):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (vocab,):
            raise ValueError(
                f"bias must be (V,) = ({vocab},), one per row of weight; got shape "
                f"{tuple(getattr(bias, 'shape', ()))}."
            )
        if not bias.is_floating_point() or bias.device != device:
            raise ValueError(
                f"bias must be a floating tensor on {device}, got {bias.dtype} on {bias.device}."
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int (logits per tile) or None, got {chunk_size!r}.")


def selective_logprobs(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H) the lm_head weight
    token_ids: torch.Tensor,  # (N,) int64, each in [0, V)
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,  # (V,)
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Returns the log-probs (N,) in float32 (float64 for float64 inputs), or ``(logps, entropy)`` when
    ``return_entropy`` is True; both carry exact gradients to ``hidden``, ``weight`` (only when it requires
    grad) and ``bias``. The (N, V) logits are never held: memory is one tile of at most ``chunk_size`` logits
    (default: 2**24 on the CPU, 2**27 on CUDA) plus O(N) per-row statistics; when all the logits fit in one
    tile the PyTorch backend keeps it between forward and backward instead of recomputing it, and its
    backward then holds two tiles (the kept log-probs of the live rows and their gradient).

    ``backend``: ``"torch"`` (tiles of PyTorch matmuls), ``"triton"`` (fused Triton kernels, CUDA or
    ``TRITON_INTERPRET=1``; ``chunk_size`` then bounds only the backward's tiles) or ``"auto"`` (Triton on
    CUDA, PyTorch elsewhere and for float64).
    """
    _validate(hidden, weight, token_ids, temperature, bias, chunk_size)
    if backend == "auto" and hidden.dtype == torch.float64:
        backend = "torch"
    which = resolve_backend(backend, hidden.device)
    if which == "triton" and hidden.dtype == torch.float64:
        raise ValueError(
            "backend='triton' takes bfloat16, float16 or float32 inputs; use backend='torch' for float64."
        )
    tile_logits = chunk_size or DEFAULT_TILE_LOGITS["cuda" if hidden.is_cuda else "cpu"]
    logps, entropy = SelectiveLogprobsFunction.apply(
        hidden, weight, bias, token_ids.long(), float(temperature), bool(return_entropy), which, tile_logits
    )
    return (logps, entropy) if return_entropy else logps
