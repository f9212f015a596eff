"""The Triton policy loss against the PyTorch reference: loss, gradient and every metric.

On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow, so shapes stay small; the sizes that matter for speed run behind
``@pytest.mark.gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning_gspo.kernels.policy_loss import LEVELS, policy_loss
from lightning_gspo.kernels.policy_loss import TRITON_LOSS_TYPES as LOSS_TYPES
from lightning_gspo.kernels.policy_loss_triton import TritonPolicyLoss, triton_policy_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KL_SETTINGS = {"no-kl": (0.0, True), "kl": (0.04, True), "kl-no-bias-corr": (0.04, False)}
GARBAGE = (float("-inf"), float("nan"), float("inf"), 1e30)
# The sequence level's length-weighting warning is policy_loss's business, tested with it.
pytestmark = pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")


def make_inputs(B=6, T=33, dtype=torch.float32, spread=0.3, garbage=True, seed=0, device=DEVICE):
    """Off-policy inputs whose ratios clip for some tokens and sequences and not for others.

    Row 1 is empty (and its advantage NaN), row 2 holds one token, row 3 all T; padded positions of logps,
    old and ref hold -inf/NaN/inf/huge values when ``garbage``.
    """
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(B, T, generator=g)  # (B, T)
    row_shift = spread * torch.randn(B, 1, generator=g)  # moves whole sequences so GSPO's ratio clips too
    old = logps + row_shift + spread * torch.randn(B, T, generator=g)  # (B, T)
    ref = logps + 0.5 * torch.randn(B, T, generator=g)  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if B > 1:
        lengths[1] = 0
    if B > 2:
        lengths[2] = 1
    if B > 3:
        lengths[3] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    advantages = torch.randn(B, generator=g)  # (B,)
    if B > 4:
        advantages[4] = 0.0
    if B > 1:
        advantages[1] = float("nan")
    if garbage:
        fill = torch.tensor(GARBAGE)[torch.arange(B * T) % len(GARBAGE)].view(B, T)
        logps, old, ref = (torch.where(mask, x, fill) for x in (logps, old, ref))
    to = dict(device=device, dtype=dtype)
    return logps.to(**to).requires_grad_(), old.to(**to), advantages.to(device), mask.to(device), ref.to(**to)


def run_both(logps, old, advantages, mask, ref, grad_scale=1.7, **kwargs):
    """(loss, grad, metrics) from the torch and the triton backend, with a non-unit incoming gradient."""
    out = []
    for backend in ("torch", "triton"):
        loss, metrics = policy_loss(logps, old, advantages, mask, ref, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss, logps, torch.tensor(grad_scale, device=loss.device))
        out.append((loss.detach(), grad, metrics))
    return out


def assert_match(ref_out, tri_out, rtol=1e-5, grad_rtol=1e-5, grad_atol=1e-8):
    (l_ref, g_ref, m_ref), (l_tri, g_tri, m_tri) = ref_out, tri_out
    assert torch.isfinite(l_tri)
    torch.testing.assert_close(l_tri, l_ref, rtol=rtol, atol=1e-7)
    assert g_tri.dtype == g_ref.dtype and g_tri.shape == g_ref.shape
    assert torch.isfinite(g_tri).all()
    torch.testing.assert_close(g_tri, g_ref, rtol=grad_rtol, atol=grad_atol)
    assert m_tri.keys() == m_ref.keys()
    for key in m_ref:
        torch.testing.assert_close(m_tri[key], m_ref[key], rtol=rtol, atol=1e-7, equal_nan=True, msg=key)


@pytest.mark.parametrize("delta", [None, 2.0], ids=["no-delta", "delta"])
@pytest.mark.parametrize("kl", list(KL_SETTINGS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_grid_matches_torch(level, loss_type, kl, delta):
    beta, bias_corr = KL_SETTINGS[kl]
    inputs = make_inputs(spread=0.6)
    ref_out, tri_out = run_both(
        *inputs,
        importance_sampling_level=level,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=delta,
        beta=beta,
        use_bias_correction_kl=bias_corr,
        max_completion_length=40,
        num_items_in_batch=50 if loss_type == "dapo" else None,
    )
    assert_match(ref_out, tri_out)
    assert ("kl" in tri_out[2]) == (beta > 0)


@pytest.mark.parametrize("level", LEVELS)
def test_inputs_clip_some_and_not_others(level):
    """The grid is only meaningful if clipped and unclipped ratios both occur, low and high."""
    _, (_, _, metrics) = run_both(*make_inputs(spread=0.6), importance_sampling_level=level, loss_type="grpo")
    assert 0 < metrics["clip_ratio/region_mean"] < 1
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", LEVELS)
def test_bf16_inputs(level, beta):
    ref_out, tri_out = run_both(
        *make_inputs(dtype=torch.bfloat16, spread=0.6), importance_sampling_level=level, beta=beta, delta=3.0
    )
    assert tri_out[1].dtype == torch.bfloat16
    # Both compute in float32 and round the gradient to bf16 once; an ulp of bf16 is 2^-8 relative.
    assert_match(ref_out, tri_out, grad_rtol=2**-7, grad_atol=1e-6)


@pytest.mark.parametrize("T, block_t", [(1, None), (7, None), (33, 16), (130, 32), (130, None)])
@pytest.mark.parametrize("level", LEVELS)
def test_odd_shapes_and_tiling(level, T, block_t):
    """T not a power of two, several tiles per row with a partial last one, length-1 and empty rows."""
    logps, old, adv, mask, ref = make_inputs(B=5, T=T, spread=0.5)
    kwargs = dict(importance_sampling_level=level, loss_type="bnpo", beta=0.04, delta=2.5)
    loss_ref, m_ref = policy_loss(logps, old, adv, mask, ref, backend="torch", **kwargs)
    (g_ref,) = torch.autograd.grad(loss_ref, logps)
    from lightning_gspo.kernels.policy_loss import _check_spec

    spec = _check_spec(level, "bnpo", 0.2, None, 2.5, 0.04, True, None)
    loss_tri, m_tri = triton_policy_loss(logps, old, adv, mask, ref, spec, None, block_t=block_t)
    (g_tri,) = torch.autograd.grad(loss_tri, logps)
    assert_match((loss_ref.detach(), g_ref, m_ref), (loss_tri.detach(), g_tri, m_tri))


@pytest.mark.parametrize("level", LEVELS)
def test_mixed_input_dtypes(level):
    """bf16 log-probs with float32 old and float16 reference log-probs and float64 advantages."""
    logps, old, adv, mask, ref = make_inputs(B=5, T=10, dtype=torch.bfloat16, spread=0.5)
    old, ref, adv = old.float(), ref.half(), adv.double()
    out = run_both(logps, old, adv, mask, ref, importance_sampling_level=level, beta=0.04)
    assert_match(*out, grad_rtol=2**-7, grad_atol=1e-6)


def test_non_contiguous_inputs():
    """Slices of wider tensors (as log-probs usually are, logits[:, :-1]) are read through their strides."""
    logps, old, adv, mask, ref = make_inputs(B=4, T=20)
    wide = lambda x: torch.cat([x, x[:, :3]], dim=1)[:, :20]
    logps_nc = wide(logps.detach()).requires_grad_()
    old_nc, ref_nc, mask_nc = wide(old), wide(ref), wide(mask)
    adv_nc = torch.stack([adv, adv], dim=1)[:, 0]
    assert not logps_nc.is_contiguous() and not mask_nc.is_contiguous() and not adv_nc.is_contiguous()
    out = run_both(
        logps_nc,
        old_nc,
        adv_nc,
        mask_nc,
        ref_nc,
        importance_sampling_level="sequence",
        beta=0.04,
        loss_type="grpo",
    )
    assert_match(*out)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_empty_batch(level, loss_type):
    logps, old, adv, mask, ref = make_inputs(B=3, T=9)
    mask = torch.zeros_like(mask)
    out = run_both(
        logps, old, adv, mask, ref, importance_sampling_level=level, loss_type=loss_type, beta=0.04,
        max_completion_length=9,
    )  # fmt: skip
    loss, grad, _ = out[1]
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert_match(*out)


@pytest.mark.parametrize("level", LEVELS)
def test_zero_rows(level):
    logps = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    empty = torch.zeros(0, 5, device=DEVICE)
    mask = torch.zeros(0, 5, dtype=torch.bool, device=DEVICE)
    loss, metrics = policy_loss(
        logps, empty, torch.zeros(0, device=DEVICE), mask, empty, importance_sampling_level=level,
        loss_type="grpo", beta=0.04, backend="triton",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.item() == 0.0 and grad.shape == (0, 5)


@pytest.mark.parametrize("level", LEVELS)
def test_extreme_log_ratios(level):
    """Log-ratios of +-30 (ratios of 1e13 and 1e-13): finite, and still equal to the reference."""
    logps, old, adv, mask, ref = make_inputs(B=6, T=12)
    sign = torch.where(torch.rand(old.shape, device=DEVICE) < 0.5, -30.0, 30.0)
    old = torch.where(mask, logps.detach() + sign, old)
    for loss_type in ("grpo", "dapo"):
        out = run_both(
            logps, old, adv, mask, ref, importance_sampling_level=level, loss_type=loss_type, beta=0.04,
            delta=4.0,
        )  # fmt: skip
        assert_match(*out, rtol=2e-5, grad_rtol=2e-5)


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_kl_gradient_accurate_at_large_reference_gaps(level):
    """Reference gaps of +-20 with the ratio-weighted KL: float32 autograd sums two exp(20)-sized products
    that cancel and returns noise; the kernel's gradient matches a float64 evaluation of the reference."""
    logps, old, adv, mask, ref = make_inputs(B=6, T=12, spread=0.3)
    sign = torch.where(torch.rand(ref.shape, device=DEVICE) < 0.5, -20.0, 20.0)
    ref = torch.where(mask, logps.detach() + sign, ref)
    kwargs = dict(importance_sampling_level=level, loss_type="grpo", beta=0.04, use_bias_correction_kl=True)
    lp64 = logps.detach().double().requires_grad_()
    loss64, metrics64 = policy_loss(
        lp64, old.double(), adv.double(), mask, ref.double(), backend="torch", **kwargs
    )
    (g64,) = torch.autograd.grad(loss64, lp64)
    for backend in ("triton", "torch"):
        loss, metrics = policy_loss(logps, old, adv, mask, ref, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss, logps)
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
        torch.testing.assert_close(metrics["kl"], metrics64["kl"].float(), rtol=1e-5, atol=0)
        close = torch.allclose(grad.double(), g64, rtol=1e-5, atol=1e-7)
        assert close == (backend == "triton"), backend


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy_ties_split_like_torch(level):
    """On-policy the ratio is exactly 1: torch.minimum's tie split and torch.clamp's closed bounds decide it.

    With epsilon 0 the ratio sits on both clip bounds at once. Independently of the reference, GRPO's gradient
    is then -A_i / (B * L_i) on every scored token.
    """
    logps, _, adv, mask, _ = make_inputs(B=5, T=8)
    adv = torch.nan_to_num(adv)
    for eps in (0.2, 0.0):
        kwargs = dict(importance_sampling_level=level, loss_type="grpo", epsilon_low=eps, epsilon_high=eps)
        out = run_both(logps, None, adv, mask, None, grad_scale=1.0, **kwargs)
        assert_match(*out)
        lengths = mask.sum(-1, keepdim=True).clamp(min=1)
        expected = torch.where(mask, -adv[:, None] / (mask.shape[0] * lengths), torch.zeros(()))
        torch.testing.assert_close(out[1][1], expected.to(out[1][1].dtype))


CHECK_CASES = [
    ("token", "grpo", 0.0, True, None),
    ("token", "dapo", 0.04, True, 2.0),
    ("token", "bnpo", 0.04, False, None),
    ("sequence", "grpo", 0.04, True, 2.0),
    ("sequence", "dr_grpo", 0.04, False, None),
    ("sequence", "bnpo", 0.0, True, 2.0),
    # Not sequence_token with the ratio-weighted KL: its stop-gradient makes the analytical gradient differ
    # from the function's finite differences by design (per-token KL values, one shared ratio).
    ("sequence_token", "grpo", 0.04, False, None),
    ("sequence_token", "dapo", 0.04, False, 2.0),
]


@pytest.mark.parametrize("level, loss_type, beta, bias_corr, delta", CHECK_CASES)
def test_gradcheck_float64(level, loss_type, beta, bias_corr, delta):
    from lightning_gspo.kernels.policy_loss import _check_spec

    logps, old, adv, mask, ref = make_inputs(B=4, T=5, dtype=torch.float64, spread=0.5, seed=3)
    adv = torch.nan_to_num(adv)
    spec = _check_spec(level, loss_type, 0.2, 0.28, delta, beta, bias_corr, 7)
    normaliser = torch.tensor(11.0, device=DEVICE)
    fn = lambda x: TritonPolicyLoss.apply(x, old, adv, mask, ref if beta else None, spec, normaliser, 4)[0]
    # gradcheck perturbs every entry, padding included: the kernel never reads padding, so its -inf/NaN stay
    # out and both the numerical and the analytical derivative there are 0.
    assert torch.autograd.gradcheck(fn, (logps,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_sees_a_wrong_gradient():
    """The gradcheck above can fail: a Function whose backward is off by a factor is caught."""
    from lightning_gspo.kernels.policy_loss import _check_spec

    class Doubled(TritonPolicyLoss):
        @staticmethod
        def backward(ctx, grad_loss, grad_stats):
            grads = TritonPolicyLoss.backward(ctx, grad_loss, grad_stats)
            return (2 * grads[0], *grads[1:])

    logps, old, adv, mask, ref = make_inputs(B=3, T=4, dtype=torch.float64, garbage=False)
    spec = _check_spec("sequence", "grpo", 0.2, None, None, 0.0, True, None)
    fn = lambda x: Doubled.apply(x, old, torch.nan_to_num(adv), mask, None, spec, None)[0]
    assert not torch.autograd.gradcheck(fn, (logps,), raise_exception=False)


def test_unsupported_dtype_raises():
    from lightning_gspo.kernels.policy_loss import _check_spec

    spec = _check_spec("token", "grpo", 0.2, None, None, 0.0, True, None)
    logps = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        triton_policy_loss(logps, logps, torch.zeros(2, device=DEVICE), mask, None, spec, None)
    with pytest.raises(ValueError, match="floating"):
        policy_loss(logps, None, torch.zeros(2), mask.cpu(), backend="triton")


def test_bad_backend_raises():
    logps, old, adv, mask, _ = make_inputs(B=2, T=3)
    with pytest.raises(ValueError, match="backend"):
        policy_loss(logps, old, adv, mask, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logps, old, adv, mask, _ = make_inputs(B=2, T=3, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        policy_loss(logps, old, adv, mask, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_gpu_one_million_tokens(level, dtype):
    B, T = 1024, 1024
    logps, old, adv, mask, ref = make_inputs(B=B, T=T, dtype=dtype, spread=0.3, device="cuda")
    out = run_both(logps, old, adv, mask, ref, importance_sampling_level=level, loss_type="dapo", beta=0.04)
    grad_rtol = 1e-5 if dtype == torch.float32 else 2**-7
    # A million-term sum in a different order: a few float32 ulps of the total.
    assert_match(*out, rtol=1e-4, grad_rtol=grad_rtol, grad_atol=1e-9)
    assert math.isfinite(out[1][0].item())
