"""Triton kernels for ``selective_logprobs``: the forward statistics and the gradient of a logits tile.

Choices, and why:

- Forward (Cut-Cross-Entropy style): each program owns a block of rows and a contiguous range of the
  vocabulary. It takes each (BLOCK_N, BLOCK_V) logits tile and folds it at once into an online logsumexp
  (running max, sum of exponentials), the target logit and, for the entropy, the sum of ``exp(z - m) (z - m)``.
  The vocabulary is split across programs so a few thousand rows still fill the GPU; the per-split partials (a
  few floats per row and split) are merged in PyTorch, which costs O(N x splits). The tile comes either from
  ``tl.dot`` inside the kernel (``MATMUL["forward"] = "fused"``: the logits never reach memory) or from a
  cuBLAS product written in float32 one (rows, columns) chunk at a time (``"cublas"``, the default on CUDA:
  cuBLAS's higher matmul rate repays the write and read of the chunk, see ``MATMUL``). The backward has the
  same two choices.
- Backward (hybrid): a kernel recomputes a tile of logits with ``tl.dot`` (or reads a cuBLAS chunk), turns
  it into the gradient of the logits (``g (onehot - p) / T``, plus the entropy term) and writes that tile once,
  in the input dtype. The two gradient products ``dz @ W`` and ``dz.T @ h`` then run in cuBLAS on the tile: a
  fused Triton kernel would have to add each tile's (BLOCK_N, H) and (BLOCK_V, H) partial gradients
  atomically, and at H = 4096 those atomics cost more than the one extra write and two reads of the tile (6
  bytes per logit against 6H FLOPs). The caller (``logprobs.py``) picks the live rows and the tile, so
  gradient sparsity and the frozen head are handled there for both backends.
- float32 inputs use IEEE products (no TF32), to agree with PyTorch's default float32 matmul.
- Under the interpreter (CPU tests) 16-bit operands are widened to float32 before ``tl.dot``: Triton 3.9's
  interpreter reads bfloat16 dot operands as raw integers and returns garbage.

Layout follows the house style: ``@triton.jit`` kernels, then the launch functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lightning_gspo.kernels.backend_and_precision import mm_f32


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) float32 tile of h[rows] @ w[cols].T, accumulated over H in BLOCK_H steps."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        a_mask = row_mask[:, None]
        b_mask = col_mask[None, :]
        if not EVEN_H:  # a hidden size that BLOCK_H divides (the usual case) needs no mask along H
            a_mask = a_mask & (ks < H)[None, :]
            b_mask = b_mask & (ks < H)[:, None]
        a = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk, mask=b_mask, other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fold_tile(z, cols, col_mask, target, m, s, c, tz, WITH_ENTROPY: tl.constexpr):
    """Folds a (BLOCK_N, BLOCK_V) tile of logits z (-inf outside ``col_mask``) into each row's running max m,
    sum s = sum exp(z - m), entropy sum c = sum exp(z - m) (z - m) and target logit tz."""
    hit = (cols[None, :] == target[:, None]) & col_mask[None, :]  # a target past this range is not in it
    tz += tl.sum(tl.where(hit, z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
    e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
    if WITH_ENTROPY:
        shift = tl.where(s > 0, m - m_new, 0.0)  # before the first tile s = 0 and m = -inf
        c = alpha * (c + s * shift) + tl.sum(e * d, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, c, tz


@triton.jit
def _forward_kernel(
    h_ptr,
    w_ptr,
    z_ptr,
    b_ptr,
    t_ptr,
    m_ptr,
    s_ptr,
    c_ptr,
    tz_ptr,
    row0,
    R,
    N,
    col0,
    VT,
    H,
    cols_per_split,
    slot0,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_z,
    inv_t,
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    # Rows [row0, row0 + R) and columns [col0, col0 + VT) of the logits; this program takes BLOCK_N rows and
    # one split of the columns, and writes its partial statistics to slot ``slot0 + split``. With FROM_Z the
    # logits come from a float32 tile z (R, VT) that a matmul wrote; otherwise they are formed here.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    local_rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = local_rows < R
    rows = row0 + local_rows
    target = tl.load(t_ptr + rows, mask=row_mask, other=-1) - col0
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, VT)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # local to [col0, col0 + VT)
        col_mask = cols < v_end
        if FROM_Z:
            z = tl.load(
                z_ptr + local_rows[:, None] * stride_z + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
        else:
            z = _logits_tile(
                h_ptr, w_ptr, rows, col0 + cols, row_mask, col_mask, H,
                stride_hn, stride_hk, stride_wv, stride_wk,
                BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT, EVEN_H,
            )  # fmt: skip
        if HAS_BIAS:
            z += tl.load(b_ptr + col0 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_mask[None, :], z * inv_t, float("-inf"))
        m, s, c, tz = _fold_tile(z, cols, col_mask, target, m, s, c, tz, WITH_ENTROPY)
    out = (slot0 + split) * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(tz_ptr + out, tz, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(c_ptr + out, c, mask=row_mask)


@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    z_ptr,
    b_ptr,
    t_ptr,
    lse_ptr,
    ent_ptr,
    g_ptr,
    ge_ptr,
    dz_ptr,
    R,
    VT,
    H,
    v0,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_z,
    stride_dz,
    inv_t,
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    # w_ptr points at head row v0 and b_ptr at its bias; cols are local to the tile [0, VT)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < R
    col_mask = cols < VT
    if FROM_Z:
        z = tl.load(
            z_ptr + rows[:, None] * stride_z + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
    else:
        z = _logits_tile(
            h_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
            stride_hn, stride_hk, stride_wv, stride_wk,
            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT, EVEN_H,
        )  # fmt: skip
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    logp = z * inv_t - lse[:, None]
    p = tl.exp(logp)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        target = tl.load(t_ptr + rows, mask=row_mask, other=-1) - v0
        onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        dz += g[:, None] * (onehot - p)
    if HAS_GE:
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_t
    tl.store(
        dz_ptr + rows[:, None] * stride_dz + cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

# How each kernel gets its logits. "fused": formed inside the kernel with tl.dot, never stored. "cublas": cuBLAS
# writes each chunk in float32 and the same kernel reads it (FROM_Z), at the cost of one write and one read of
# the chunk. On an H100 (bf16, N = 16384, H = 4096, V = 151936) cuBLAS runs at ~720 TFLOP/s against ~520 for
# these tl.dot loops, which repays the traffic: forward 35 ms against 41, backward 92 against 96, for a
# float32 chunk of at most 2**27 logits (512 MB) more memory. The fused path stays, tested, for when memory
# is tighter than time.
MATMUL = {"forward": "cublas", "dlogits": "cublas"}

# Block shapes on CUDA, per kernel and operand width, the fastest of a sweep on an H100 (benchmarks/logprobs.py
# --sweep); module-level so the benchmark can sweep them. "fold" is the FROM_Z variant of both kernels:
# memory-bound, no tl.dot.
CUDA_BLOCKS = {
    ("forward", "16bit"): dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=4),
    ("dlogits", "16bit"): dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=4),
    ("forward", "float32"): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=3),
    ("dlogits", "float32"): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=3),
    ("fold", "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=16, num_warps=4, num_stages=2),
    ("fold", "float32"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=16, num_warps=4, num_stages=2),
}


def _config(kernel: str, device: torch.device, dtype: torch.dtype) -> dict:
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    if device.type != "cuda":
        # The interpreter: small blocks keep the CPU tests quick and still cover masking. Its tl.dot mistakes
        # bfloat16 operands for raw integers (Triton 3.9), so 16-bit operands are widened to float32 there.
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, DOT_PRECISION=precision, UPCAST_DOT=True)
    width = "float32" if dtype == torch.float32 else "16bit"
    return dict(CUDA_BLOCKS[(kernel, width)], DOT_PRECISION=precision, UPCAST_DOT=False)


def _num_splits(device: torch.device, n_row_blocks: int, n_col_blocks: int) -> int:
    if device.type != "cuda":
        return min(2, n_col_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_col_blocks, triton.cdiv(2 * sms, n_row_blocks)))


def _launch_forward(
    hidden, weight, z, bias, token_ids, part, row0, r, col0, vt, slot0, inv_t, with_entropy, splits
):
    kernel = "forward" if z is None else "fold"
    cfg = _config(kernel, hidden.device, hidden.dtype)
    row_blocks = triton.cdiv(r, cfg["BLOCK_N"])
    col_blocks = triton.cdiv(vt, cfg["BLOCK_V"])
    cols_per_split = triton.cdiv(col_blocks, splits) * cfg["BLOCK_V"]
    m, s, c, tz = part.unbind(0)
    _forward_kernel[(row_blocks, triton.cdiv(vt, cols_per_split))](
        hidden,
        weight,
        hidden if z is None else z,
        hidden if bias is None else bias,
        token_ids,
        m,
        s,
        c,
        tz,
        row0,
        r,
        hidden.shape[0],
        col0,
        vt,
        hidden.shape[1],
        cols_per_split,
        slot0,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        0 if z is None else z.stride(0),
        float(inv_t),
        FROM_Z=z is not None,
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=with_entropy,
        EVEN_H=hidden.shape[1] % cfg["BLOCK_H"] == 0,
        **cfg,
    )


def _splits_for(device, r, vt, kernel, dtype, splits):
    """How many programs share a row block's columns: enough to fill the GPU, none of them empty."""
    cfg = _config(kernel, device, dtype)
    col_blocks = triton.cdiv(vt, cfg["BLOCK_V"])
    want = splits or _num_splits(device, triton.cdiv(r, cfg["BLOCK_N"]), col_blocks)
    cols_per_split = triton.cdiv(col_blocks, want) * cfg["BLOCK_V"]
    return triton.cdiv(vt, cols_per_split)


def _partials(slots: int, n: int, device: torch.device) -> torch.Tensor:
    """(4, slots, N) running max, sum, entropy sum and target logit; a slot no program writes stays neutral."""
    part = torch.zeros(4, slots, n, dtype=torch.float32, device=device)
    part[0] = float("-inf")
    return part


def forward_stats(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    token_ids: torch.Tensor,  # (N,) int64
    inv_t: float,
    with_entropy: bool,
    splits: int | None = None,
    tile: tuple[int, int] | None = None,  # (rows, cols) of a float32 logits tile in "cublas" mode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row float32 (logsumexp, target logit, entropy or None) of ``(hidden @ W.T + bias) * inv_t``."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    if n == 0:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone() if with_entropy else None
    if MATMUL["forward"] == "fused":
        k = _splits_for(hidden.device, n, vocab, "forward", hidden.dtype, splits)
        part = _partials(k, n, hidden.device)
        _launch_forward(
            hidden, weight, None, bias, token_ids, part, 0, n, 0, vocab, 0, inv_t, with_entropy, k
        )
    else:
        rows, cols = tile or (n, vocab)
        k = _splits_for(hidden.device, rows, cols, "fold", hidden.dtype, splits)
        part = _partials(k * triton.cdiv(vocab, cols), n, hidden.device)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            for j, v0 in enumerate(range(0, vocab, cols)):
                v1 = min(v0 + cols, vocab)
                z = mm_f32(hidden[r0:r1], weight[v0:v1].t(), torch.float32)  # (r, v)
                _launch_forward(
                    hidden,
                    weight,
                    z,
                    bias,
                    token_ids,
                    part,
                    r0,
                    r1 - r0,
                    v0,
                    v1 - v0,
                    j * k,
                    inv_t,
                    with_entropy,
                    k,
                )
                del z
    m, s, c, tz = part.unbind(0)  # (slots, N) each
    top = m.amax(0)  # (N,)
    scale = torch.exp(m - top)  # (slots, N)
    total = (s * scale).sum(0)
    log_total = torch.log(total)
    lse = top + log_total
    entropy = None
    if with_entropy:
        c_top = torch.where(s > 0, scale * (c + s * (m - top)), 0.0)  # each slot's c relative to the max
        entropy = log_total - c_top.sum(0) / total
    return lse, tz.sum(0), entropy


def dlogits(
    h: torch.Tensor,  # (R, H) live rows
    w: torch.Tensor,  # (VT, H) head rows [v0, v0 + VT)
    b: torch.Tensor | None,  # (VT,)
    targets: torch.Tensor,  # (R,) int64, global ids
    v0: int,
    lse: torch.Tensor,  # (R,) float32
    entropy: torch.Tensor | None,  # (R,) float32, needed with g_ent
    g: torch.Tensor | None,  # (R,) float32 incoming gradient of the log-probs
    g_ent: torch.Tensor | None,  # (R,) float32 incoming gradient of the entropy
    inv_t: float,
) -> torch.Tensor:
    """The gradient w.r.t. the logits tile (R, VT), in ``h``'s dtype, recomputed from the saved logsumexp."""
    r, hdim = h.shape
    vt = w.shape[0]
    z = None if MATMUL["dlogits"] == "fused" else mm_f32(h, w.t(), torch.float32)  # (R, VT)
    cfg = _config("dlogits" if z is None else "fold", h.device, h.dtype)
    dz = torch.empty(r, vt, dtype=h.dtype, device=h.device)
    dummy = lse
    grid = (triton.cdiv(r, cfg["BLOCK_N"]), triton.cdiv(vt, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](
        h,
        w,
        h if z is None else z,
        h if b is None else b,
        targets,
        lse,
        dummy if entropy is None else entropy,
        dummy if g is None else g,
        dummy if g_ent is None else g_ent,
        dz,
        r,
        vt,
        hdim,
        v0,
        h.stride(0),
        h.stride(1),
        w.stride(0),
        w.stride(1),
        0 if z is None else z.stride(0),
        dz.stride(0),
        float(inv_t),
        FROM_Z=z is not None,
        HAS_BIAS=b is not None,
        HAS_G=g is not None,
        HAS_GE=g_ent is not None,
        EVEN_H=hdim % cfg["BLOCK_H"] == 0,
        **cfg,
    )
    return dz
