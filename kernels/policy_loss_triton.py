"""The GRPO/GSPO policy loss as Triton kernels behind a ``torch.autograd.Function``.

Same contract, values, gradient and metrics as ``torch_policy_loss`` in ``policy_loss.py``; see there for the
algorithm. Choices this implementation makes, and why:

- One program per sequence. GSPO's ratio ``s_i = exp(mean_t(logp - old))`` is a per-row reduction, so a row
  that lives in one program reduces it on chip; the token level uses the same layout so both share the clip
  algebra and the per-row statistics (loss sum, clip counts, KL sum, length) the metrics are built from.
  The price is parallelism: B programs, so a handful of very long rows leaves most of the GPU idle; at
  training shapes (B x T of 64k tokens and up) the pair of kernels runs at about twice the memory floor.
- The forward writes only per-row numbers (B, 7); the loss aggregation over rows (``loss_type``) is a (B,)
  weight vector applied outside the kernel, and the same weights, times ``grad_output``, scale the backward.
  The backward writes d loss / d logps once, zero at padded positions, in logps' dtype.
- Gradients are written by hand and follow PyTorch's autograd of the reference exactly: ``torch.minimum``
  splits the gradient 0.5/0.5 on ties (on-policy every in-range token ties, since the clipped and unclipped
  ratio are the same number), ``torch.clamp`` passes it on the closed interval ``[lo, hi]``.
- Padded positions are never read: every load is masked by the completion mask (other=0), and every
  per-token value is selected with ``tl.where`` before it is summed, so -inf/NaN in padding cannot leak.
- Arithmetic is float32 for 16- and 32-bit inputs and float64 for float64 inputs (a constexpr compute dtype),
  so the Function passes ``torch.autograd.gradcheck``. The clip bounds, delta and beta travel as a small
  tensor in the compute dtype, not as kernel scalars (Triton would round Python floats to float32).
- One gradient departs from autograd's arithmetic, not its value: the bias-corrected KL term's derivative per
  token is computed as ``rho (logp - ref)``, the exact simplification of ``rho (dk3 + k3)``; autograd's sum of
  the two products loses every digit when ``exp(ref - logp) * rho`` is large (float32 at gaps of ~20).
- ``sequence_token`` recomputes ``(log s_i + logp) - logp`` per token, as the reference's stop-gradient
  expression does, so values match to the last bit of the reference's own rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lightning_gspo.kernels.backend_and_precision import compute_dtype
from lightning_gspo.kernels.policy_loss import LossSpec
from lightning_gspo.kernels.policy_loss_metrics import finish_metrics

# The importance-sampling level a kernel is specialised for. Globals a @triton.jit function reads must be
# tl.constexpr; the launcher passes their .value.
LEVEL_TOKEN = tl.constexpr(0)
LEVEL_SEQUENCE = tl.constexpr(1)
LEVEL_SEQUENCE_TOKEN = tl.constexpr(2)
_LEVEL_IDS = {"token": LEVEL_TOKEN, "sequence": LEVEL_SEQUENCE, "sequence_token": LEVEL_SEQUENCE_TOKEN}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rows of the (7, B) per-row statistics: the forward kernel writes them, the backward kernel and the host read
# them (the host through .value, since torch does not index with a constexpr).
_LOSS, _LOW, _HIGH, _REGION, _KL, _LOG_S, _LEN = (tl.constexpr(i) for i in range(7))

# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _clip_sides(rho, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """The two sides of the minimum: ``min(rho, delta) A`` and ``clip(rho, lo, hi) A``."""
    rho_c = rho
    if HAS_DELTA:
        rho_c = tl.minimum(rho, delta)
    return rho_c * adv, tl.minimum(tl.maximum(rho, lo), hi) * adv


@triton.jit
def _clip_loss(rho, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """Surrogate ``-min(min(rho, delta) A, clip(rho, lo, hi) A)`` and the clip flags."""
    a, b = _clip_sides(rho, adv, lo, hi, delta, HAS_DELTA)
    # tl.where rather than `&`: Triton's interpreter rejects `&` between a block and a scalar condition.
    is_low = tl.where(adv < 0, rho < lo, False)
    is_high = tl.where(adv > 0, rho > hi, False)
    return -tl.minimum(a, b), is_low, is_high


@triton.jit
def _clip_grad(rho, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """d surrogate / d rho, following torch's autograd of the reference."""
    a, b = _clip_sides(rho, adv, lo, hi, delta, HAS_DELTA)
    tie = a == b
    # torch.minimum's backward: the smaller side takes the gradient, a tie splits it in halves.
    g_a = tl.where(a < b, 1.0, tl.where(tie, 0.5, 0.0))
    g_b = tl.where(b < a, 1.0, tl.where(tie, 0.5, 0.0))
    d_a = g_a * adv
    if HAS_DELTA:
        d_a = tl.where(rho <= delta, d_a, 0.0)  # torch.clamp(max=delta) passes the gradient at the bound
    d_b = tl.where((rho >= lo) & (rho <= hi), g_b * adv, 0.0)  # closed interval, as torch.clamp
    return -(d_a + d_b)


@triton.jit
def _load_tile(ptr, row, stride_b, stride_t, offs, m, COMPUTE: tl.constexpr):
    """A (BLOCK_T,) tile of one row in the compute dtype; positions outside the mask are 0 and never read."""
    x = tl.load(ptr + row * stride_b + offs * stride_t, mask=m, other=0.0)
    return tl.where(m, x.to(COMPUTE), 0.0)


@triton.jit
def _load_mask(mask_ptr, row, stride_b, stride_t, offs, T):
    return tl.load(mask_ptr + row * stride_b + offs * stride_t, mask=offs < T, other=0) != 0


@triton.jit
def _kl(lp, ref):
    """k3 = exp(ref - logp) - (ref - logp) - 1."""
    diff = ref - lp
    return tl.exp(diff) - diff - 1.0


@triton.jit
def _kl_grad(lp, ref):
    """d k3 / d logp = 1 - exp(ref - logp)."""
    return 1.0 - tl.exp(ref - lp)


@triton.jit
def _token_level_sums(
    logp_ptr, s_lp_b, s_lp_t,
    old_ptr, s_old_b, s_old_t,
    ref_ptr, s_ref_b, s_ref_t,
    mask_ptr, s_m_b, s_m_t,
    row, T, adv, lo, hi, delta, beta,
    HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """GRPO's row in one pass, a ratio per token: (loss sum, low count, high count, kl sum, 0, length)."""
    cols = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=COMPUTE)
    n_len = tl.zeros([BLOCK_T], dtype=tl.int32)
    kl_acc = zero
    loss_acc = zero
    low_acc = zero
    high_acc = zero
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
        lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
        old = _load_tile(old_ptr, row, s_old_b, s_old_t, offs, m, COMPUTE)
        rho = tl.exp(lp - old)
        loss, is_low, is_high = _clip_loss(rho, adv, lo, hi, delta, HAS_DELTA)
        if HAS_KL:
            ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
            kl = _kl(lp, ref)
            if BIAS_CORR:
                kl = kl * rho
            loss = loss + beta * kl
            kl_acc += tl.where(m, kl, 0.0)
        loss_acc += tl.where(m, loss, 0.0)
        low_acc += tl.where(m & is_low, 1.0, 0.0)
        high_acc += tl.where(m & is_high, 1.0, 0.0)
        n_len += m.to(tl.int32)
    low = tl.sum(low_acc, 0)
    high = tl.sum(high_acc, 0)
    loss_sum = tl.sum(loss_acc, 0)
    kl_sum = tl.sum(kl_acc, 0)
    log_s = tl.sum(zero, 0)  # no sequence ratio at this level
    return loss_sum, low, high, kl_sum, log_s, tl.sum(n_len, 0)


@triton.jit
def _mean_log_ratio(
    logp_ptr, s_lp_b, s_lp_t,
    old_ptr, s_old_b, s_old_t,
    ref_ptr, s_ref_b, s_ref_t,
    mask_ptr, s_m_b, s_m_t,
    row, T,
    LEVEL: tl.constexpr, HAS_KL: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """The first pass of both sequence levels: (log s_i, length, and at sequence level the (BLOCK_T,) partial
    sums of the raw KL, else zeros)."""
    cols = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=COMPUTE)
    n_len = tl.zeros([BLOCK_T], dtype=tl.int32)
    kl_acc = zero
    lr_acc = zero
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
        lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
        old = _load_tile(old_ptr, row, s_old_b, s_old_t, offs, m, COMPUTE)
        lr_acc += lp - old
        n_len += m.to(tl.int32)
        if LEVEL == LEVEL_SEQUENCE:
            if HAS_KL:
                ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
                kl = _kl(lp, ref)
                kl_acc += tl.where(m, kl, 0.0)
    length = tl.sum(n_len, 0)
    log_s = tl.sum(lr_acc, 0) / tl.maximum(length, 1).to(COMPUTE)
    return log_s, length, kl_acc


@triton.jit
def _sequence_level_sums(
    log_s, length, kl_acc, adv, lo, hi, delta, beta,
    HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, COMPUTE: tl.constexpr,
):  # fmt: skip
    """GSPO's row: one clip decision for the whole sequence. (loss sum, low, high, kl sum)."""
    rho = tl.exp(log_s)
    seq_loss, is_low, is_high = _clip_loss(rho, adv, lo, hi, delta, HAS_DELTA)
    loss_sum = tl.where(length > 0, seq_loss * length.to(COMPUTE), 0.0)
    kl_sum = tl.sum(kl_acc, 0)
    if HAS_KL:
        if BIAS_CORR:
            kl_sum = kl_sum * rho
        loss_sum = loss_sum + beta * kl_sum
    low = tl.where(is_low, 1.0, 0.0).to(COMPUTE)
    high = tl.where(is_high, 1.0, 0.0).to(COMPUTE)
    return loss_sum, low, high, kl_sum


@triton.jit
def _sequence_token_sums(
    logp_ptr, s_lp_b, s_lp_t,
    ref_ptr, s_ref_b, s_ref_t,
    mask_ptr, s_m_b, s_m_t,
    row, T, log_s, adv, lo, hi, delta, beta,
    HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """GSPO-token's second pass: the ratio is exp((sg[log s] + logp) - sg[logp]) on every token.
    (loss sum, low, high, kl sum)."""
    cols = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=COMPUTE)
    kl_acc = zero
    loss_acc = zero
    low_acc = zero
    high_acc = zero
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
        lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
        rho = tl.exp((log_s + lp) - lp)
        loss, is_low, is_high = _clip_loss(rho, adv, lo, hi, delta, HAS_DELTA)
        if HAS_KL:
            ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
            kl = _kl(lp, ref)
            if BIAS_CORR:
                kl = kl * rho
            loss = loss + beta * kl
            kl_acc += tl.where(m, kl, 0.0)
        loss_acc += tl.where(m, loss, 0.0)
        # The reference counts one decision per sequence, read at column 0.
        first = (offs == 0) & (offs < T)
        low_acc += tl.where(first & is_low, 1.0, 0.0)
        high_acc += tl.where(first & is_high, 1.0, 0.0)
    loss_sum = tl.sum(loss_acc, 0)
    kl_sum = tl.sum(kl_acc, 0)
    low = tl.sum(low_acc, 0)
    high = tl.sum(high_acc, 0)
    return loss_sum, low, high, kl_sum


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr,  # (B, T)
    old_ptr,  # (B, T)
    ref_ptr,  # (B, T), unused unless HAS_KL
    mask_ptr,  # (B, T) uint8
    adv_ptr,  # (B,)
    param_ptr,  # (4,) lo, hi, delta, beta in the compute dtype
    stats_ptr,  # (7, B) out: loss sum, low, high, region, kl sum, log s, length
    B,
    T,
    s_lp_b,
    s_lp_t,
    s_old_b,
    s_old_t,
    s_ref_b,
    s_ref_t,
    s_m_b,
    s_m_t,
    s_adv,
    LEVEL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_CORR: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.load(param_ptr)
    hi = tl.load(param_ptr + 1)
    delta = tl.load(param_ptr + 2)
    beta = tl.load(param_ptr + 3)
    adv = tl.load(adv_ptr + row * s_adv).to(COMPUTE)
    if LEVEL == LEVEL_TOKEN:
        loss_sum, low, high, kl_sum, log_s, length = _token_level_sums(
            logp_ptr, s_lp_b, s_lp_t, old_ptr, s_old_b, s_old_t, ref_ptr, s_ref_b, s_ref_t,
            mask_ptr, s_m_b, s_m_t, row, T, adv, lo, hi, delta, beta,
            HAS_DELTA, HAS_KL, BIAS_CORR, COMPUTE, BLOCK_T,
        )  # fmt: skip
    else:
        log_s, length, kl_acc = _mean_log_ratio(
            logp_ptr, s_lp_b, s_lp_t, old_ptr, s_old_b, s_old_t, ref_ptr, s_ref_b, s_ref_t,
            mask_ptr, s_m_b, s_m_t, row, T, LEVEL, HAS_KL, COMPUTE, BLOCK_T,
        )  # fmt: skip
        if LEVEL == LEVEL_SEQUENCE:
            loss_sum, low, high, kl_sum = _sequence_level_sums(
                log_s, length, kl_acc, adv, lo, hi, delta, beta, HAS_DELTA, HAS_KL, BIAS_CORR, COMPUTE
            )
        else:
            loss_sum, low, high, kl_sum = _sequence_token_sums(
                logp_ptr, s_lp_b, s_lp_t, ref_ptr, s_ref_b, s_ref_t, mask_ptr, s_m_b, s_m_t,
                row, T, log_s, adv, lo, hi, delta, beta,
                HAS_DELTA, HAS_KL, BIAS_CORR, COMPUTE, BLOCK_T,
            )  # fmt: skip
    tl.store(stats_ptr + _LOSS * B + row, loss_sum)
    tl.store(stats_ptr + _LOW * B + row, low)
    tl.store(stats_ptr + _HIGH * B + row, high)
    tl.store(stats_ptr + _REGION * B + row, low + high)  # low needs A < 0, high A > 0: never both
    tl.store(stats_ptr + _KL * B + row, kl_sum)
    tl.store(stats_ptr + _LOG_S * B + row, log_s)
    tl.store(stats_ptr + _LEN * B + row, length.to(COMPUTE))


@triton.jit
def _sequence_level_grad(
    logp_ptr, s_lp_b, s_lp_t,
    ref_ptr, s_ref_b, s_ref_t,
    mask_ptr, s_m_b, s_m_t,
    stats_ptr, grad_ptr, B, row, T, log_s, scale, adv, lo, hi, delta, beta,
    HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Writes GSPO's row of d loss / d logp: everything through s_i is one number per row, d loss / d log s_i,
    spread as 1/L over the tokens, plus each token's own KL gradient."""
    cols = tl.arange(0, BLOCK_T)
    length = tl.load(stats_ptr + _LEN * B + row)
    rho = tl.exp(log_s)
    d_rho = _clip_grad(rho, adv, lo, hi, delta, HAS_DELTA)
    d_log_s = length * (d_rho * rho)
    if HAS_KL:
        if BIAS_CORR:
            d_log_s += beta * tl.load(stats_ptr + _KL * B + row)  # sum_t kl_t * s_i, saved by the forward
    g_seq = d_log_s / tl.maximum(length, 1.0)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
        g = tl.zeros([BLOCK_T], dtype=COMPUTE) + g_seq
        if HAS_KL:
            lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
            ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
            d_kl = _kl_grad(lp, ref)
            if BIAS_CORR:
                d_kl = d_kl * rho
            g += beta * d_kl
        g = tl.where(m, g * scale, 0.0)
        tl.store(grad_ptr + row * T + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < T)


@triton.jit
def _per_token_grad(
    logp_ptr, s_lp_b, s_lp_t,
    old_ptr, s_old_b, s_old_t,
    ref_ptr, s_ref_b, s_ref_t,
    mask_ptr, s_m_b, s_m_t,
    grad_ptr, row, T, log_s, scale, adv, lo, hi, delta, beta,
    LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Writes the row of d loss / d logp at the token and sequence_token levels, where each token's ratio has
    its own gradient path."""
    cols = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
        lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
        if LEVEL == LEVEL_TOKEN:
            old = _load_tile(old_ptr, row, s_old_b, s_old_t, offs, m, COMPUTE)
            rho = tl.exp(lp - old)
        else:
            rho = tl.exp((log_s + lp) - lp)
        d_rho = _clip_grad(rho, adv, lo, hi, delta, HAS_DELTA)
        g = d_rho * rho  # d rho / d logp = rho on both paths (the stop-gradient keeps logp's own path)
        if HAS_KL:
            ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
            if BIAS_CORR:
                # d(k3 rho)/d logp = rho (dk3 + k3) = rho (logp - ref): exact, where autograd's sum of the two
                # products cancels catastrophically once exp(ref - logp) is large.
                g += beta * (rho * (lp - ref))
            else:
                d_kl = _kl_grad(lp, ref)
                g += beta * d_kl
        g = tl.where(m, g * scale, 0.0)
        tl.store(grad_ptr + row * T + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < T)


@triton.jit
def _policy_loss_bwd_kernel(
    logp_ptr,  # (B, T)
    old_ptr,  # (B, T)
    ref_ptr,  # (B, T), unused unless HAS_KL
    mask_ptr,  # (B, T) uint8
    adv_ptr,  # (B,)
    param_ptr,  # (4,) lo, hi, delta, beta in the compute dtype
    stats_ptr,  # (7, B) from the forward
    scale_ptr,  # (B,) grad_output x the row's aggregation weight
    grad_ptr,  # (B, T) out, contiguous, logps' dtype
    B,
    T,
    s_lp_b,
    s_lp_t,
    s_old_b,
    s_old_t,
    s_ref_b,
    s_ref_t,
    s_m_b,
    s_m_t,
    s_adv,
    LEVEL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_CORR: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.load(param_ptr)
    hi = tl.load(param_ptr + 1)
    delta = tl.load(param_ptr + 2)
    beta = tl.load(param_ptr + 3)
    adv = tl.load(adv_ptr + row * s_adv).to(COMPUTE)
    scale = tl.load(scale_ptr + row)
    log_s = tl.load(stats_ptr + _LOG_S * B + row)
    if LEVEL == LEVEL_SEQUENCE:
        _sequence_level_grad(
            logp_ptr, s_lp_b, s_lp_t, ref_ptr, s_ref_b, s_ref_t, mask_ptr, s_m_b, s_m_t,
            stats_ptr, grad_ptr, B, row, T, log_s, scale, adv, lo, hi, delta, beta,
            HAS_DELTA, HAS_KL, BIAS_CORR, COMPUTE, BLOCK_T,
        )  # fmt: skip
    else:
        _per_token_grad(
            logp_ptr, s_lp_b, s_lp_t, old_ptr, s_old_b, s_old_t, ref_ptr, s_ref_b, s_ref_t,
            mask_ptr, s_m_b, s_m_t, grad_ptr, row, T, log_s, scale, adv, lo, hi, delta, beta,
            LEVEL, HAS_DELTA, HAS_KL, BIAS_CORR, COMPUTE, BLOCK_T,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------------------


def _block_t(T: int, dtype: torch.dtype, block_t: int | None) -> int:
    if block_t is not None:
        return block_t
    cap = 1024 if dtype == torch.float64 else 2048
    return min(max(triton.next_power_of_2(max(T, 1)), 16), cap)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def _common_args(logps, old, ref, mask, advantages):
    ref_ = old if ref is None else ref  # never read when HAS_KL is False; any (B, T) pointer will do
    return (
        logps.stride(0), logps.stride(1), old.stride(0), old.stride(1), ref_.stride(0), ref_.stride(1),
        mask.stride(0), mask.stride(1), advantages.stride(0),
    )  # fmt: skip


def _flags(spec: LossSpec, dtype: torch.dtype) -> dict:
    return {
        "LEVEL": _LEVEL_IDS[spec.level].value,
        "HAS_DELTA": spec.delta is not None,
        "HAS_KL": spec.beta != 0,
        "BIAS_CORR": spec.use_bias_correction_kl,
        "COMPUTE": tl.float64 if dtype == torch.float64 else tl.float32,
    }


_params_cache: dict[tuple, torch.Tensor] = {}


def _params(spec: LossSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(4,) lo, hi, delta, beta on the device; cached, since a host-to-device copy per call costs more than
    the kernels at training sizes."""
    delta = spec.delta if spec.delta is not None else 0.0
    values = (1 - spec.epsilon_low, 1 + spec.epsilon_high, delta, spec.beta)
    key = (values, dtype, device)
    if key not in _params_cache:
        if len(_params_cache) > 64:
            _params_cache.clear()
        _params_cache[key] = torch.tensor(values, dtype=dtype, device=device)
    return _params_cache[key]


def policy_loss_forward(
    logps: torch.Tensor,  # (B, T)
    old: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) bool
    ref: torch.Tensor | None,  # (B, T)
    spec: LossSpec,
    params: torch.Tensor,  # (4,) from _params
    block_t: int | None = None,
) -> torch.Tensor:
    """Per-row statistics (7, B) in the compute dtype: loss sum, low, high, region, kl sum, log s, length."""
    B, T = logps.shape
    dtype = params.dtype
    stats = torch.empty((7, B), dtype=dtype, device=logps.device)  # every entry is written
    if B == 0:
        return stats
    mask_u8 = mask.view(torch.uint8)
    block = _block_t(T, dtype, block_t)
    _policy_loss_fwd_kernel[(B,)](
        logps, old, old if ref is None else ref, mask_u8, advantages, params, stats,
        B, T, *_common_args(logps, old, ref, mask_u8, advantages),
        **_flags(spec, dtype), BLOCK_T=block, num_warps=_num_warps(block),
    )  # fmt: skip
    return stats


def policy_loss_backward(
    logps: torch.Tensor,  # (B, T)
    old: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) bool
    ref: torch.Tensor | None,  # (B, T)
    spec: LossSpec,
    params: torch.Tensor,  # (4,)
    stats: torch.Tensor,  # (7, B) from policy_loss_forward
    scale: torch.Tensor,  # (B,) grad_output x row weight, compute dtype
    block_t: int | None = None,
) -> torch.Tensor:
    """d loss / d logps (B, T), contiguous, in logps' dtype; zero at padded positions."""
    B, T = logps.shape
    grad = torch.empty((B, T), dtype=logps.dtype, device=logps.device)
    if B == 0 or T == 0:
        return grad
    mask_u8 = mask.view(torch.uint8)
    dtype = params.dtype
    block = _block_t(T, dtype, block_t)
    _policy_loss_bwd_kernel[(B,)](
        logps, old, old if ref is None else ref, mask_u8, advantages, params, stats, scale, grad,
        B, T, *_common_args(logps, old, ref, mask_u8, advantages),
        **_flags(spec, dtype), BLOCK_T=block, num_warps=_num_warps(block),
    )  # fmt: skip
    return grad


def row_weights(
    lengths: torch.Tensor,  # (B,) scored tokens per row, compute dtype
    spec: LossSpec,
    normaliser: torch.Tensor | None,  # () dapo's token count
) -> torch.Tensor:
    """The weight (B,) of each row's masked loss sum in the scalar loss, as ``aggregate`` reduces (may be a
    stride-0 view when every row weighs the same)."""
    B = lengths.shape[0]
    if spec.loss_type == "grpo":
        return (lengths.clamp(min=1) * max(B, 1)).reciprocal()
    if spec.loss_type == "bnpo":
        return lengths.sum().clamp(min=1).reciprocal().expand(B)
    if spec.loss_type == "dr_grpo":
        return lengths.new_full((B,), 1.0 / max(B * spec.max_completion_length, 1))
    return normaliser.clamp(min=1.0).to(lengths.dtype).reciprocal().expand(B)


# ----------------------------------------------------------------------------------------------------------
# Autograd Function and entry point
# ----------------------------------------------------------------------------------------------------------


class TritonPolicyLoss(torch.autograd.Function):
    """Scalar loss and per-row statistics (7, B; not differentiable); the gradient flows to logps only."""

    @staticmethod
    def forward(ctx, logps, old, advantages, mask, ref, spec: LossSpec, normaliser, block_t=None):
        dtype = compute_dtype(logps.dtype)
        params = _params(spec, dtype, logps.device)
        stats = policy_loss_forward(logps, old, advantages, mask, ref, spec, params, block_t)
        weights = row_weights(stats[_LEN.value], spec, normaliser)  # (B,)
        loss = (stats[_LOSS.value] * weights).sum()
        ctx.save_for_backward(logps, old, advantages, mask, ref, params, stats, weights)
        ctx.spec = spec
        ctx.block_t = block_t
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logps, old, advantages, mask, ref, params, stats, weights = ctx.saved_tensors
        scale = (weights * grad_loss.to(weights.dtype)).contiguous()  # (B,)
        grad = policy_loss_backward(
            logps, old, advantages, mask, ref, ctx.spec, params, stats, scale, ctx.block_t
        )
        return grad, None, None, None, None, None, None, None


def triton_policy_loss(
    logps: torch.Tensor,  # (B, T) carries the gradient
    old: torch.Tensor,  # (B, T) detached
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) bool
    ref: torch.Tensor | None,  # (B, T), None when beta == 0
    spec: LossSpec,
    normaliser: torch.Tensor | None,  # () float32 for dapo, else None
    block_t: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same arguments, values, gradient and metrics as ``torch_policy_loss``, on the Triton kernels."""
    for name, t in (("per_token_logps", logps), ("old_per_token_logps", old), ("ref_per_token_logps", ref)):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"the Triton policy loss takes float16/bfloat16/float32/float64 {name}, got {t.dtype}."
            )
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor, got {advantages.dtype}.")
    if mask.dtype != torch.bool:
        raise ValueError(f"completion_mask must be bool here (policy_loss converts it), got {mask.dtype}.")
    if spec.beta != 0 and ref is None:
        raise ValueError("beta > 0 needs ref_per_token_logps.")
    if spec.loss_type == "dapo" and normaliser is None:
        raise ValueError("loss_type='dapo' needs the normaliser (the step's token count).")
    ref = ref if spec.beta != 0 else None
    loss, stats = TritonPolicyLoss.apply(logps, old, advantages, mask, ref, spec, normaliser, block_t)
    kl_sum = stats[_KL.value] if spec.beta != 0 else None
    metrics = finish_metrics(
        stats[_LOW.value], stats[_HIGH.value], stats[_REGION.value], kl_sum, stats[_LEN.value], spec.level
    )
    return loss, metrics
