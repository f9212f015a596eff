"""Tests of ``lightning_gspo.kernels.policy_loss`` on the PyTorch backend.

Expected numbers come from closed forms worked out by hand (written in the comments) and evaluated in float64
with ``math``, never from the function under test. Properties (token vs sequence on-policy, GSPO clipping,
padding, empty batches, bf16) compare two different calls whose agreement follows from the contract.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from lightning_gspo.kernels import policy_loss

pl_module = importlib.import_module("lightning_gspo.kernels.policy_loss")

LEVELS = ("token", "sequence", "sequence_token")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
F64 = torch.float64
LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _quiet_length_warning(monkeypatch):
    # The length-weighting warning fires once per process; every test starts from "not yet warned".
    monkeypatch.setattr(pl_module, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def run(logp, old, adv, mask, ref=None, **kw):
    """Loss, gradient w.r.t. a fresh leaf copy of ``logp``, and metrics, on the PyTorch backend."""
    kw.setdefault("backend", "torch")
    kw.setdefault("max_completion_length", 4)
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, old, adv, mask, ref, **kw)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def floats(metrics):
    return {k: v.item() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------------------
# Golden example, B=2, T=3, row 1 has one padded token.
#
#   d = logp - old = [[0.1, -0.1, ln 2],
#                     [-ln 2, ln 2, pad]]          A = [+1, -1], mask lengths L = [3, 2], epsilon = 0.2
#
# Token level, r = exp(d) = [[e^0.1, e^-0.1, 2], [1/2, 2]]; per-token loss -min(r A, clip(r, 0.8, 1.2) A):
#   row 0 (A=+1): -min(r, clip r) = [-e^0.1, -e^-0.1, -1.2]    (2 > 1.2: clipped high, no gradient)
#   row 1 (A=-1): +max(r, clip r) = [0.8, 2]                   (1/2 < 0.8: clipped low, no gradient;
#                                                                2: A<0 leaves the upper side unclipped)
#   d(per-token)/d logp = [[-e^0.1, -e^-0.1, 0], [0, 2, 0]]     (d r / d logp = r)
#   row sums: S0 = -(e^0.1 + e^-0.1 + 1.2) = -3.2100083,  S1 = 2.8
#
# Sequence level, s_i = exp(mean_t d_it):
#   s0 = exp(ln2 / 3) = 2^(1/3) = 1.2599 > 1.2 with A=+1: every token -1.2, row 0 gets no gradient (GSPO
#        clip);
#   s1 = exp(0 / 2) = 1, inside: every token -min(-s1, -s1) = s1 = 1.
#   S0 = -3.6, S1 = 2; d S1 / d logp_1t = L1 * (s1 / L1) = 1 for both scored tokens.
#
# Aggregation = w0 * S0 + w1 * S1 and the gradient is the row-sum gradient times the row weight:
#   grpo:    mean_i S_i / L_i    -> w = (1/(2*3), 1/(2*2)) = (1/6, 1/4)
#   bnpo:    sum / (3 + 2)       -> w = (1/5, 1/5)
#   dr_grpo: sum / (B * 4)       -> w = (1/8, 1/8)     max_completion_length = 4, not the padded width 3
#   dapo:    sum / 10            -> w = (1/10, 1/10)   num_items_in_batch = 10 (a whole step's token count)
# ------------------------------------------------------------------------------------------------------------
E, EI = math.exp(0.1), math.exp(-0.1)
WEIGHTS = {
    "grpo": (1 / 6, 1 / 4),
    "bnpo": (1 / 5, 1 / 5),
    "dr_grpo": (1 / 8, 1 / 8),
    "dapo": (1 / 10, 1 / 10),
}
TOKEN_ROWS = (-(E + EI + 1.2), 0.8 + 2.0)
TOKEN_ROW_GRADS = ([-E, -EI, 0.0], [0.0, 2.0, 0.0])
SEQ_ROWS = (-3.6, 2.0)
SEQ_ROW_GRADS = ([0.0, 0.0, 0.0], [1.0, 1.0, 0.0])
GOLDEN_KW = {"epsilon_low": 0.2, "max_completion_length": 4, "num_items_in_batch": 10}


def golden():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -1.2, 7.0]], dtype=F64)
    d = torch.tensor([[0.1, -0.1, LN2], [-LN2, LN2, 3.0]], dtype=F64)  # the padded 3.0 must not matter
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    return old + d, old, adv, mask


def expected(rows, row_grads, loss_type):
    w = WEIGHTS[loss_type]
    loss = w[0] * rows[0] + w[1] * rows[1]
    grad = torch.tensor([[w[i] * g for g in row_grads[i]] for i in range(2)], dtype=F64)
    return loss, grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_golden_token_level(loss_type):
    loss, grad, metrics = run(*golden(), importance_sampling_level="token", loss_type=loss_type, **GOLDEN_KW)
    want_loss, want_grad = expected(TOKEN_ROWS, TOKEN_ROW_GRADS, loss_type)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    # One of 5 tokens clipped low (row 1, r=1/2, A<0), one clipped high (row 0, r=2, A>0).
    # Per row: low = (0/3, 1/2) -> min 0; high = (1/3, 0/2) -> max 1/3.
    want = {"low_mean": 0.2, "high_mean": 0.2, "region_mean": 0.4, "low_min": 0.0, "high_max": 1 / 3}
    assert {k: metrics[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)
    assert "kl" not in metrics


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_golden_sequence_level(level, loss_type):
    loss, grad, metrics = run(*golden(), importance_sampling_level=level, loss_type=loss_type, **GOLDEN_KW)
    want_loss, want_grad = expected(SEQ_ROWS, SEQ_ROW_GRADS, loss_type)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    # Sequences are counted: row 0 clipped high (s0 = 1.26 > 1.2, A > 0), row 1 not clipped.
    want = {"low_mean": 0.0, "high_mean": 0.5, "region_mean": 0.5, "low_min": 0.0, "high_max": 1.0}
    assert {k: metrics[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)


def test_golden_dapo_default_normaliser_is_local_token_count():
    # Without num_items_in_batch, dapo divides by the 5 scored tokens: (S0 + S1) / 5 at token level.
    kw = {**GOLDEN_KW, "num_items_in_batch": None}
    loss, grad, _ = run(*golden(), loss_type="dapo", **kw)
    assert loss.item() == pytest.approx(sum(TOKEN_ROWS) / 5, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(TOKEN_ROW_GRADS, dtype=F64) / 5)


def test_golden_delta_caps_negative_advantage_ratio():
    # delta = 1.5: row 1 token 1 has r = 2 with A = -1, so min(r, delta) = 1.5 -> loss 1.5, no gradient.
    # Row 0 token 2 (r = 2, A = +1) is unchanged: min(1.5, clip 1.2) = 1.2 as before.
    # grpo: (S0 / 3 + (0.8 + 1.5) / 2) / 2.
    loss, grad, _ = run(*golden(), loss_type="grpo", delta=1.5, **GOLDEN_KW)
    assert loss.item() == pytest.approx((TOKEN_ROWS[0] / 3 + 2.3 / 2) / 2, rel=1e-12)
    want_grad = torch.tensor([[-E / 6, -EI / 6, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_golden_epsilon_high_is_asymmetric():
    # epsilon_low = 0.2, epsilon_high = 1.5: r = 2 < 2.5 is no longer clipped for A > 0, so row 0 token 2
    # costs -2 with gradient -2; the low clip (row 1 token 0, 0.5 < 0.8) is unchanged. bnpo: sum / 5.
    kw = {**GOLDEN_KW, "epsilon_high": 1.5}
    loss, grad, metrics = run(*golden(), loss_type="bnpo", **kw)
    assert loss.item() == pytest.approx((-(E + EI + 2.0) + 2.8) / 5, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-E, -EI, -2.0], [0.0, 2.0, 0.0]], dtype=F64) / 5)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------------------
# Golden KL, beta = 0.04, ref - logp = x = [[ln2, 0, -ln2], [ln2, 0, pad]]:
#   k3(x) = e^x - x - 1 = [[1 - ln2, 0, ln2 - 1/2], [1 - ln2, 0]]
#   d k3 / d logp = 1 - e^x = [[-1, 0, 1/2], [-1, 0]]
# Without bias correction the per-token term is k3; with it, k3 * w where w is the ratio of the level:
#   token:          w_it = r_it,  d(k3 w)/d logp_it = (1 - e^x_it) r_it + k3_it r_it
#   sequence:       w_it = s_i,   d(sum_t k3_it s_i)/d logp_it = (1 - e^x_it) s_i + (sum_t' k3_it') s_i / L_i
#   sequence_token: w_it = s_i in value, own-token path only: (1 - e^x_it) s_i + k3_it s_i
# The metric kl is the masked token mean of the (corrected) term. grpo weights as above.
# ------------------------------------------------------------------------------------------------------------
X = ([LN2, 0.0, -LN2], [LN2, 0.0])
K3 = ([1 - LN2, 0.0, LN2 - 0.5], [1 - LN2, 0.0])
DK3 = ([-1.0, 0.0, 0.5], [-1.0, 0.0])
RATIOS = {"token": ([E, EI, 2.0], [0.5, 2.0]), "sequence": ([2 ** (1 / 3)] * 3, [1.0, 1.0])}
RATIOS["sequence_token"] = RATIOS["sequence"]


def kl_closed_form(level, bias):
    """(row sums of the KL term, its gradient rows, metric) from the formulas above, in float64."""
    w = RATIOS[level] if bias else ([1.0] * 3, [1.0] * 2)
    rows, grads = [], []
    for i in range(2):
        terms = [k * r for k, r in zip(K3[i], w[i])]
        rows.append(sum(terms))
        g = [dk * r for dk, r in zip(DK3[i], w[i])]
        if bias and level in ("token", "sequence_token"):
            g = [gt + k * r for gt, k, r in zip(g, K3[i], w[i])]
        elif bias:
            g = [gt + sum(K3[i]) * w[i][0] / len(K3[i]) for gt in g]
        grads.append(g + [0.0] * (3 - len(g)))
    return rows, grads, sum(rows) / 5


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bias", [True, False])
def test_golden_kl(level, bias):
    logp, old, adv, mask = golden()
    ref = logp + torch.tensor([X[0], X[1] + [-50.0]], dtype=F64)
    beta = 0.04
    loss, grad, metrics = run(
        logp, old, adv, mask, ref, importance_sampling_level=level, loss_type="grpo", beta=beta,
        use_bias_correction_kl=bias, **GOLDEN_KW,
    )  # fmt: skip
    pol_rows, pol_grads = (TOKEN_ROWS, TOKEN_ROW_GRADS) if level == "token" else (SEQ_ROWS, SEQ_ROW_GRADS)
    kl_rows, kl_grads, kl_metric = kl_closed_form(level, bias)
    rows = [p + beta * k for p, k in zip(pol_rows, kl_rows)]
    row_grads = [[p + beta * k for p, k in zip(pg, kg)] for pg, kg in zip(pol_grads, kl_grads)]
    want_loss, want_grad = expected(rows, row_grads, "grpo")
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert metrics["kl"].item() == pytest.approx(kl_metric, rel=1e-6)
    if not bias:  # the plain k3 mean: (2 (1 - ln2) + ln2 - 1/2) / 5 = (3/2 - ln2) / 5
        assert metrics["kl"].item() == pytest.approx((1.5 - LN2) / 5, rel=1e-6)


def test_golden_metrics_with_an_empty_row():
    # A third, fully masked row (A = +1, garbage log-probs). Token level counts tokens and skips the empty row
    # in the per-row min/max (0/0); sequence levels count it as a sequence with ratio exp(0) = 1, not clipped.
    logp, old, adv, mask = golden()
    logp = torch.cat([logp, torch.tensor([[9.0, 9.0, 9.0]], dtype=F64)])
    old = torch.cat([old, torch.tensor([[-9.0, 0.0, 1.0]], dtype=F64)])
    adv = torch.cat([adv, torch.tensor([1.0], dtype=F64)])
    mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    _, _, tok = run(logp, old, adv, mask, **GOLDEN_KW)
    want = {"low_mean": 0.2, "high_mean": 0.2, "region_mean": 0.4, "low_min": 0.0, "high_max": 1 / 3}
    assert {k: tok[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)
    _, _, seq = run(logp, old, adv, mask, importance_sampling_level="sequence", **GOLDEN_KW)
    want = {"low_mean": 0.0, "high_mean": 1 / 3, "region_mean": 1 / 3, "low_min": 0.0, "high_max": 1.0}
    assert {k: seq[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)
    # The empty row adds nothing to the grpo mean but counts in B: (S0/3 + S1/2 + 0) / 3.
    loss, grad, _ = run(logp, old, adv, mask, loss_type="grpo", **GOLDEN_KW)
    assert loss.item() == pytest.approx((TOKEN_ROWS[0] / 3 + TOKEN_ROWS[1] / 2) / 3, rel=1e-12)
    assert torch.all(grad[2] == 0)


def test_golden_metrics_skip_empty_rows_in_per_row_min():
    # Row 0: d = (-ln2, 0), A = -1 -> token 0 clipped low (1/2 < 0.8): low fraction 1/2.
    # Row 1: d = (-ln2, pad), A = -1 -> its only token clipped low: low fraction 1.  Row 2: empty.
    # Token level: low_mean = 2/3 scored tokens, low_min = min(1/2, 1) = 1/2 (row 2 is 0/0, skipped), and
    # high_max = max(0, 0) = 0.  Sequence level: s = (2^-1/2 = 0.71, 1/2, exp(0) = 1), all with A < 0: rows 0
    # and 1 clipped low, the empty row counts and is not, so low_mean = 2/3 and low_min = 0.
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    old = torch.tensor([[-1.0, -2.0], [-0.5, 4.0], [-3.0, 2.0]], dtype=F64)
    logp = old + torch.tensor([[-LN2, 0.0], [-LN2, 1.0], [5.0, -5.0]], dtype=F64)
    adv = -torch.ones(3, dtype=F64)
    _, _, tok = run(logp, old, adv, mask, epsilon_low=0.2)
    want = {"low_mean": 2 / 3, "high_mean": 0.0, "region_mean": 2 / 3, "low_min": 0.5, "high_max": 0.0}
    assert {k: tok[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)
    _, _, seq = run(logp, old, adv, mask, epsilon_low=0.2, importance_sampling_level="sequence")
    want = {"low_mean": 2 / 3, "high_mean": 0.0, "region_mean": 2 / 3, "low_min": 0.0, "high_max": 0.0}
    assert {k: seq[f"clip_ratio/{k}"].item() for k in want} == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_sign_of_advantage_picks_the_clipped_side(level):
    # T = 1, so token and sequence ratios coincide. Row 0: r = 1/2 with A = +1, row 1: r = 2 with A = -1; both
    # lie outside [0.8, 1.2] on the side the sign of A leaves open, so nothing is clipped and both tokens keep
    # their gradient: d(-r A)/d logp = -r A = (-1/2, +2), grpo mean over B = 2 -> (-1/4, 1).
    old = torch.tensor([[-1.0], [-2.0]], dtype=F64)
    logp = old + torch.tensor([[-LN2], [LN2]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    loss, grad, metrics = run(
        logp, old, adv, torch.ones(2, 1, dtype=torch.bool), importance_sampling_level=level
    )
    assert loss.item() == pytest.approx((-0.5 + 2.0) / 2, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-0.25], [1.0]], dtype=F64))
    assert all(v.item() == 0.0 for v in metrics.values())


def test_golden_epsilon_high_defaults_to_epsilon_low():
    # epsilon_low = 0.6 and no epsilon_high: the clip range is [0.4, 1.6] on both sides.
    #   row 0 (A=+1): [-e^0.1, -e^-0.1, -1.6]  (2 > 1.6 clipped high)
    #   row 1 (A=-1): [0.5, 2]                 (0.5 is inside now, gradient 0.5; 2 is unclipped for A < 0)
    # bnpo: sum / 5.
    kw = {**GOLDEN_KW, "epsilon_low": 0.6}
    loss, grad, metrics = run(*golden(), loss_type="bnpo", **kw)
    assert loss.item() == pytest.approx((-(E + EI + 1.6) + 2.5) / 5, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-E, -EI, 0.0], [0.5, 2.0, 0.0]], dtype=F64) / 5)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.2)
    assert metrics["clip_ratio/low_mean"].item() == 0.0


@pytest.mark.parametrize("level", LEVELS)
def test_gradient_reaches_only_per_token_logps(level):
    # old and reference log-probs and advantages are constants of the step, even with autograd history.
    logp, old, adv, mask, ref = random_inputs(scale=0.6)
    old, adv, ref = (x.clone().requires_grad_(True) for x in (old, adv, ref))
    leaf = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(
        leaf, old, adv, mask, ref, importance_sampling_level=level, beta=0.04, delta=3.0, backend="torch"
    )
    loss.backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert old.grad is None and adv.grad is None and ref.grad is None


# ------------------------------------------------------------------------------------------------------------
# gradcheck on inputs whose ratios sit away from every kink (1 - eps, 1 + eps, delta).
# ------------------------------------------------------------------------------------------------------------
def smooth_inputs(dtype=F64):
    """B=7, T=5. Row log-ratio means sit on either side of the clip boundaries ln 0.8 = -0.22, ln 1.2 = 0.18
    and delta ln 3 = 1.10; each token adds a zero-sum wiggle of at most 0.03, so token ratios stay clear of
    the kinks too."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 3, 1, 4, 2, 5, 0]
    means = [0.05, -0.5, 0.6, 1.5, -0.5, 0.6, 0.0]
    adv = torch.tensor([0.7, -1.3, 0.9, -0.8, 1.1, -0.6, 0.5], dtype=dtype)
    # zero-sum wiggles, one per row length
    wiggle = {0: [], 1: [0.0], 2: [0.03, -0.03], 3: [0.03, -0.03, 0.0], 4: [0.03, -0.03, 0.02, -0.02]}
    wiggle[5] = wiggle[4] + [0.0]
    B, T = len(lengths), 5
    mask = torch.zeros(B, T, dtype=torch.bool)
    d = torch.zeros(B, T, dtype=dtype)
    for i, (n, mu) in enumerate(zip(lengths, means)):
        mask[i, :n] = True
        d[i, :n] = mu + torch.tensor(wiggle[n], dtype=dtype)
    d[~mask] = torch.randn(int((~mask).sum()), generator=g, dtype=dtype)  # padding garbage, finite
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logp - d
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    return logp, old, adv, mask, ref


def test_smooth_inputs_are_away_from_kinks():
    logp, old, adv, mask, _ = smooth_inputs()
    d = (logp - old)[mask]
    seq = torch.stack([(logp - old)[i][mask[i]].mean() for i in range(6)])
    for x in (d, seq):
        for b in (math.log(0.8), math.log(1.2), math.log(3.0)):
            assert (x - b).abs().min() > 0.01


# GSPO-token's gradient is defined through stop-gradients, not as the derivative of its value: its value
# equals sequence level's everywhere, its ratio-weighted KL gradient does not, so finite differences cannot
# check that one combination (test_golden_kl checks it against the closed form instead).
GRADCHECK_CASES = [
    (level, loss_type, beta, bias, delta)
    for level in LEVELS
    for loss_type in LOSS_TYPES
    for beta, bias in [(0.0, True), (0.04, True), (0.04, False)]
    for delta in (None, 3.0)
    if not (level == "sequence_token" and beta > 0 and bias)
]


@pytest.mark.parametrize("level,loss_type,beta,bias,delta", GRADCHECK_CASES)
def test_gradcheck(level, loss_type, beta, bias, delta):
    logp, old, adv, mask, ref = smooth_inputs()
    kw = dict(
        importance_sampling_level=level, loss_type=loss_type, epsilon_low=0.2, delta=delta, beta=beta,
        use_bias_correction_kl=bias, max_completion_length=6, backend="torch",
    )  # fmt: skip
    fn = lambda x: policy_loss(x, old, adv, mask, ref, **kw)[0]
    assert torch.autograd.gradcheck(fn, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Properties.
# ------------------------------------------------------------------------------------------------------------
def random_inputs(B=5, T=6, dtype=F64, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 4
    old = logp + scale * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logp + scale * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths.unsqueeze(1)
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,bias", [(0.0, True), (0.04, False)])
@pytest.mark.parametrize("old_is_none", [True, False])
def test_on_policy_token_equals_sequence(loss_type, beta, bias, old_is_none):
    logp, _, adv, mask, ref = random_inputs()
    old = None if old_is_none else logp.detach()
    kw = dict(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias, max_completion_length=8)
    tok_loss, tok_grad, _ = run(logp, old, adv, mask, ref, importance_sampling_level="token", **kw)
    seq_loss, seq_grad, _ = run(logp, old, adv, mask, ref, importance_sampling_level="sequence", **kw)
    torch.testing.assert_close(tok_loss, seq_loss)
    torch.testing.assert_close(tok_grad, seq_grad)
    # On policy the ratio is 1, so the policy part of the gradient is -A_i times the row weight.
    assert tok_grad[mask].abs().min() > 0


def test_on_policy_bias_corrected_kl_differs_between_levels():
    # With use_bias_correction_kl the KL term carries d(ratio)/d logp, which is per token at token level and
    # spread over the sequence at sequence level (TRL does the same), so the gradients differ even on-policy.
    logp, _, adv, mask, ref = random_inputs()
    kw = dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True)
    tok_loss, tok_grad, _ = run(logp, None, adv, mask, ref, importance_sampling_level="token", **kw)
    seq_loss, seq_grad, _ = run(logp, None, adv, mask, ref, importance_sampling_level="sequence", **kw)
    torch.testing.assert_close(tok_loss, seq_loss)
    assert not torch.allclose(tok_grad, seq_grad)


def clip_case(dtype=F64):
    """Row 0: per-token log-ratios (0.1, 0.5, 0.9), mean 0.5 -> s0 = e^0.5 = 1.65 > 1.2 with A > 0: clipped.
    Row 1: (-0.1, -0.5, -0.9), mean -0.5 -> s1 = 0.61 < 0.8 with A < 0: clipped.
    Row 2: (0.05, -0.05, 0.0), mean 0 -> s2 = 1: not clipped.
    Token level clips only 0.5, 0.9 (and their negatives).
    """
    d = torch.tensor([[0.1, 0.5, 0.9], [-0.1, -0.5, -0.9], [0.05, -0.05, 0.0]], dtype=dtype)
    logp = -torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.1, 2.2], [0.7, 0.9, 1.3]], dtype=dtype)
    adv = torch.tensor([1.0, -0.5, 0.8], dtype=dtype)
    mask = torch.ones(3, 3, dtype=torch.bool)
    return logp, logp - d, adv, mask


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_clipped_sequence_gets_zero_gradient(level, loss_type):
    logp, old, adv, mask = clip_case()
    _, grad, metrics = run(logp, old, adv, mask, importance_sampling_level=level, loss_type=loss_type)
    assert torch.all(grad[:2] == 0)
    assert torch.all(grad[2] != 0)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    # The same rows at token level keep a gradient on their unclipped first token.
    _, tok_grad, _ = run(logp, old, adv, mask, importance_sampling_level="token", loss_type=loss_type)
    assert torch.all(tok_grad[:2, 0] != 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_clip_zeroes_only_that_token(loss_type):
    logp, old, adv, mask = clip_case()
    # Row 2 gets one token with ratio e^0.4 = 1.49 > 1.2 and A > 0; its other tokens stay inside the clip.
    old = old.clone()
    old[2, 1] = logp[2, 1] - 0.4
    _, grad, metrics = run(logp, old, adv, mask, importance_sampling_level="token", loss_type=loss_type)
    assert grad[2, 1] == 0
    assert grad[2, 0] != 0 and grad[2, 2] != 0
    # Rows 0/1: tokens 1 and 2 are clipped (0.5 and 0.9 are outside ln 1.2 / ln 0.8), token 0 is not.
    assert torch.all(grad[:2, 1:] == 0) and torch.all(grad[:2, 0] != 0)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(3 / 9)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(2 / 9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,bias", [(0.0, True), (0.04, False)])
@pytest.mark.parametrize("delta", [None, 3.0])
def test_sequence_token_equals_sequence(loss_type, beta, bias, delta):
    logp, old, adv, mask, ref = random_inputs(scale=0.6)
    kw = dict(
        loss_type=loss_type, beta=beta, use_bias_correction_kl=bias, delta=delta, max_completion_length=8
    )
    s_loss, s_grad, s_met = run(logp, old, adv, mask, ref, importance_sampling_level="sequence", **kw)
    st_loss, st_grad, st_met = run(
        logp, old, adv, mask, ref, importance_sampling_level="sequence_token", **kw
    )
    torch.testing.assert_close(st_loss, s_loss)
    torch.testing.assert_close(st_grad, s_grad)
    assert floats(st_met) == pytest.approx(floats(s_met))
    assert s_grad.abs().sum() > 0


def test_sequence_token_differs_with_bias_corrected_kl():
    logp, old, adv, mask, ref = random_inputs(scale=0.6)
    kw = dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True)
    s_loss, s_grad, _ = run(logp, old, adv, mask, ref, importance_sampling_level="sequence", **kw)
    st_loss, st_grad, _ = run(logp, old, adv, mask, ref, importance_sampling_level="sequence_token", **kw)
    torch.testing.assert_close(st_loss, s_loss)
    assert (st_grad - s_grad).abs().max() > 1e-4


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")])
def test_padding_garbage_is_ignored(level, loss_type, fill):
    logp, old, adv, mask, ref = random_inputs(scale=0.6)
    assert (~mask).any()
    kw = dict(
        importance_sampling_level=level, loss_type=loss_type, beta=0.04, use_bias_correction_kl=True,
        delta=3.0, max_completion_length=8,
    )  # fmt: skip
    clean = [torch.where(mask, x, torch.zeros((), dtype=F64)) for x in (logp, old, ref)]
    dirty = [torch.where(mask, x, torch.full((), fill, dtype=F64)) for x in (logp, old, ref)]
    c_loss, c_grad, c_met = run(clean[0], clean[1], adv, mask, clean[2], **kw)
    d_loss, d_grad, d_met = run(dirty[0], dirty[1], adv, mask, dirty[2], **kw)
    assert torch.isfinite(d_loss) and torch.isfinite(d_grad).all()
    torch.testing.assert_close(d_loss, c_loss, rtol=0, atol=0)
    torch.testing.assert_close(d_grad, c_grad, rtol=0, atol=0)
    assert torch.all(d_grad[~mask] == 0)
    assert floats(d_met) == pytest.approx(floats(c_met), nan_ok=True)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_empty_batch_gives_finite_zero(level, loss_type):
    B, T = 3, 4
    garbage = torch.tensor(float("nan"), dtype=F64).expand(B, T).clone()
    garbage[0, 0] = float("-inf")
    mask = torch.zeros(B, T, dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    loss, grad, metrics = run(
        garbage, garbage, adv, mask, garbage, importance_sampling_level=level, loss_type=loss_type, beta=0.04,
        max_completion_length=4,
    )  # fmt: skip
    assert loss.item() == 0.0
    assert torch.all(grad == 0)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    assert metrics["kl"].item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_row_batch_gives_finite_zero(loss_type):
    # A batch with no sequences at all (B = 0) is the emptiest batch there is; grpo handles it explicitly, and
    # every loss type must give the same finite zero.
    logp = torch.zeros(0, 4, dtype=F64)
    mask = torch.zeros(0, 4, dtype=torch.bool)
    loss, grad, _ = run(
        logp, None, torch.zeros(0, dtype=F64), mask, loss_type=loss_type, max_completion_length=4
    )
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_inputs_use_float32_arithmetic(level, loss_type):
    logp, old, adv, mask, ref = (
        x.to(torch.bfloat16) if x.is_floating_point() else x for x in random_inputs()
    )
    kw = dict(importance_sampling_level=level, loss_type=loss_type, beta=0.04, max_completion_length=8)
    b_loss, b_grad, b_met = run(logp, old, adv, mask, ref, **kw)
    up = [x.float() for x in (logp, old, adv, ref)]
    f_loss, f_grad, f_met = run(up[0], up[1], up[2], mask, up[3], **kw)
    assert b_loss.dtype == torch.float32
    assert b_grad.dtype == torch.bfloat16
    torch.testing.assert_close(b_loss, f_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b_grad, f_grad.to(torch.bfloat16), rtol=0, atol=0)
    assert floats(b_met) == pytest.approx(floats(f_met), rel=1e-6)
    # The check has teeth: the same formula evaluated in bf16 is visibly off.
    r = torch.exp(logp - old)
    assert (r.float() - torch.exp(up[0] - up[1])).abs().max() > 1e-4


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo"])
def test_length_weighting_warning_once(loss_type):
    logp, old, adv, mask, _ = random_inputs()
    kw = dict(importance_sampling_level="sequence", loss_type=loss_type, max_completion_length=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(logp, old, adv, mask, **kw)
        run(logp, old, adv, mask, **kw)
    msgs = [w for w in caught if "weights each sequence by its length" in str(w.message)]
    assert len(msgs) == 1
    assert loss_type in str(msgs[0].message) and "grpo" in str(msgs[0].message)
    assert msgs[0].category is UserWarning
    assert msgs[0].filename == __file__  # points at the caller of policy_loss


@pytest.mark.parametrize(
    "level,loss_type", [("sequence", "grpo"), ("token", "bnpo"), ("token", "dapo"), ("token", "dr_grpo")]
)
def test_no_length_weighting_warning(level, loss_type):
    logp, old, adv, mask, _ = random_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(
            logp,
            old,
            adv,
            mask,
            importance_sampling_level=level,
            loss_type=loss_type,
            max_completion_length=8,
        )
    assert not [w for w in caught if "weights each sequence by its length" in str(w.message)]


# ------------------------------------------------------------------------------------------------------------
# Validation: every misuse is a ValueError whose message names the argument.
# ------------------------------------------------------------------------------------------------------------
def _bad(**over):
    """Positional tensors and keyword settings of a valid call, with ``over`` replacing some of them."""
    logp, old, adv, mask, ref = random_inputs(B=3, T=4)
    args = {"per_token_logps": logp, "old_per_token_logps": old, "advantages": adv, "completion_mask": mask}
    args |= {"ref_per_token_logps": ref, "backend": "torch", "max_completion_length": 4}
    args.update(over)
    positional = [args.pop(k) for k in list(args)[:5]]
    return positional, args


BAD = {
    "unknown level": ({"importance_sampling_level": "tokens"}, "importance_sampling_level"),
    "unknown loss type": ({"loss_type": "ppo"}, "loss_type"),
    "negative epsilon_low": ({"epsilon_low": -0.1}, "epsilon_low"),
    "negative epsilon_high": ({"epsilon_high": -0.1}, "epsilon_high"),
    "delta below 1+eps_high": ({"delta": 1.1, "epsilon_high": 0.28}, "delta"),
    "delta equal 1+eps_high": ({"delta": 1.2, "epsilon_low": 0.2}, "delta"),
    "delta vs eps_high not eps_low": ({"delta": 1.5, "epsilon_low": 0.2, "epsilon_high": 0.6}, "delta"),
    "negative beta": ({"beta": -0.1}, "beta"),
    "beta without ref": ({"beta": 0.04, "ref_per_token_logps": None}, "ref_per_token_logps"),
    "dr_grpo without max len": (
        {"loss_type": "dr_grpo", "max_completion_length": None},
        "max_completion_length",
    ),
    "dr_grpo zero max len": ({"loss_type": "dr_grpo", "max_completion_length": 0}, "max_completion_length"),
    "old shape": ({"old_per_token_logps": torch.zeros(3, 5, dtype=F64)}, "old_per_token_logps"),
    "ref shape": ({"ref_per_token_logps": torch.zeros(2, 4, dtype=F64), "beta": 0.04}, "ref_per_token_logps"),
    "mask shape": ({"completion_mask": torch.ones(3, 5, dtype=torch.bool)}, "completion_mask"),
    "advantages (B,1)": ({"advantages": torch.zeros(3, 1, dtype=F64)}, "advantages"),
    "advantages wrong B": ({"advantages": torch.zeros(4, dtype=F64)}, "advantages"),
    "advantages (B,T)": ({"advantages": torch.zeros(3, 4, dtype=F64)}, "advantages"),
    "logps 1-D": ({"per_token_logps": torch.zeros(12, dtype=F64)}, "per_token_logps"),
    "logps 3-D": ({"per_token_logps": torch.zeros(3, 4, 1, dtype=F64)}, "per_token_logps"),
    "logps integer": ({"per_token_logps": torch.zeros(3, 4, dtype=torch.long)}, "per_token_logps"),
    "unknown backend": ({"backend": "cuda"}, "backend"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_validation_errors(case):
    over, name = BAD[case]
    positional, kw = _bad(**over)
    with pytest.raises(ValueError, match=name):
        policy_loss(*positional, **kw)


def test_valid_base_call_does_not_raise():
    # The validation cases above differ from this call only in the one argument they break.
    positional, kw = _bad()
    policy_loss(*positional, **kw)
    policy_loss(*positional, **kw, loss_type="dr_grpo", beta=0.04, delta=1.21)
