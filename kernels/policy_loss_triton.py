"""The GRPO/GSPO policy loss as Triton kernels behind a ``torch.autograd.Function``.

Same contract, values, gradient and metrics as ``torch_policy_loss`` in ``policy_loss.py``; see there for the
algorithm. Choices this implementation makes, and why:

- One program per sequence. GSPO's ratio ``s_i = exp(mean_t(logp - old))`` is a per-row reduction, so a row
  that lives in one program reduces it on chip; the token level uses the same layout so both share the clip
  algebra and the per-row statistics (loss sum, clip counts, KL sum, length) the metrics are built from.
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
- ``sequence_token`` recomputes ``(log s_i + logp) - logp`` per token, as the reference's stop-gradient
  expression does, so values match to the last bit of the reference's own rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_gspo.kernels.policy_loss import LossSpec, compute_dtype, finish_metrics

_LEVEL_IDS = {"token": 0, "sequence": 1, "sequence_token": 2}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rows of the (7, B) per-row statistics written by the forward kernel (the kernels use the literals).
_LOSS, _LOW, _HIGH, _REGION, _KL, _LOG_S, _LEN = range(7)

# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _clip_terms(rho, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """Surrogate ``-min(min(rho, delta) A, clip(rho, lo, hi) A)``, its derivative in rho, and the clip flags."""
    rho_c = rho
    if HAS_DELTA:
        rho_c = tl.minimum(rho, delta)
    a = rho_c * adv
    b = tl.minimum(tl.maximum(rho, lo), hi) * adv
    tie = a == b
    # torch.minimum's backward: the smaller side takes the gradient, a tie splits it in halves.
    g_a = tl.where(a < b, 1.0, tl.where(tie, 0.5, 0.0))
    g_b = tl.where(b < a, 1.0, tl.where(tie, 0.5, 0.0))
    d_a = g_a * adv
    if HAS_DELTA:
        d_a = tl.where(rho <= delta, d_a, 0.0)  # torch.clamp(max=delta) passes the gradient at the bound
    d_b = tl.where((rho >= lo) & (rho <= hi), g_b * adv, 0.0)  # closed interval, as torch.clamp
    loss = -tl.minimum(a, b)
    d_rho = -(d_a + d_b)
    is_low = (rho < lo) & (adv < 0)
    is_high = (rho > hi) & (adv > 0)
    return loss, d_rho, is_low, is_high


@triton.jit
def _load_tile(ptr, row, stride_b, stride_t, offs, m, COMPUTE: tl.constexpr):
    """A (BLOCK_T,) tile of one row in the compute dtype; positions outside the mask are 0 and never read."""
    x = tl.load(ptr + row * stride_b + offs * stride_t, mask=m, other=0.0)
    return tl.where(m, x.to(COMPUTE), 0.0)


@triton.jit
def _load_mask(mask_ptr, row, stride_b, stride_t, offs, T):
    return tl.load(mask_ptr + row * stride_b + offs * stride_t, mask=offs < T, other=0) != 0


@triton.jit
def _kl_terms(lp, ref):
    """k3 = exp(ref - logp) - (ref - logp) - 1 and its derivative in logp."""
    diff = ref - lp
    e = tl.exp(diff)
    return e - diff - 1.0, 1.0 - e


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
    cols = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=COMPUTE)
    n_len = tl.zeros([BLOCK_T], dtype=tl.int32)
    kl_acc = zero

    if LEVEL == 0:
        loss_acc = zero
        low_acc = zero
        high_acc = zero
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
            lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
            old = _load_tile(old_ptr, row, s_old_b, s_old_t, offs, m, COMPUTE)
            rho = tl.exp(lp - old)
            loss, _, is_low, is_high = _clip_terms(rho, adv, lo, hi, delta, HAS_DELTA)
            if HAS_KL:
                ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
                kl, _ = _kl_terms(lp, ref)
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
        log_s = tl.sum(zero, 0)
        length = tl.sum(n_len, 0)
    else:
        # Pass 1: the sequence's mean log-ratio (and, at sequence level, the raw KL sum).
        lr_acc = zero
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
            lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
            old = _load_tile(old_ptr, row, s_old_b, s_old_t, offs, m, COMPUTE)
            lr_acc += lp - old
            n_len += m.to(tl.int32)
            if LEVEL == 1:
                if HAS_KL:
                    ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
                    kl, _ = _kl_terms(lp, ref)
                    kl_acc += tl.where(m, kl, 0.0)
        length = tl.sum(n_len, 0)
        log_s = tl.sum(lr_acc, 0) / tl.maximum(length, 1).to(COMPUTE)
        if LEVEL == 1:
            rho = tl.exp(log_s)
            seq_loss, _, is_low, is_high = _clip_terms(rho, adv, lo, hi, delta, HAS_DELTA)
            loss_sum = tl.where(length > 0, seq_loss * length.to(COMPUTE), 0.0)
            kl_sum = tl.sum(kl_acc, 0)
            if HAS_KL:
                if BIAS_CORR:
                    kl_sum = kl_sum * rho
                loss_sum = loss_sum + beta * kl_sum
            low = tl.where(is_low, 1.0, 0.0).to(COMPUTE)
            high = tl.where(is_high, 1.0, 0.0).to(COMPUTE)
        else:
            # Pass 2 (GSPO-token): the ratio is exp((sg[log s] + logp) - sg[logp]) on every token.
            loss_acc = zero
            low_acc = zero
            high_acc = zero
            for start in range(0, T, BLOCK_T):
                offs = start + cols
                m = _load_mask(mask_ptr, row, s_m_b, s_m_t, offs, T)
                lp = _load_tile(logp_ptr, row, s_lp_b, s_lp_t, offs, m, COMPUTE)
                rho = tl.exp((log_s + lp) - lp)
                loss, _, is_low, is_high = _clip_terms(rho, adv, lo, hi, delta, HAS_DELTA)
                if HAS_KL:
                    ref = _load_tile(ref_ptr, row, s_ref_b, s_ref_t, offs, m, COMPUTE)
                    kl, _ = _kl_terms(lp, ref)
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
    tl.store(stats_ptr + 0 * B + row, loss_sum)
    tl.store(stats_ptr + 1 * B + row, low)
    tl.store(stats_ptr + 2 * B + row, high)
    tl.store(stats_ptr + 3 * B + row, low + high)  # low needs A < 0, high A > 0: never both
    tl.store(stats_ptr + 4 * B + row, kl_sum)
    tl.store(stats_ptr + 5 * B + row, log_s)
    tl.store(stats_ptr + 6 * B + row, length.to(COMPUTE))
