"""The loss types TRL 1.16 added to GRPO (cispo, sapo, luspo, vespo), the token masks (entropy quantile,
off-policy sequences) and the entropy bonus, on the PyTorch backend.

Expected numbers are closed forms worked out by hand in the comments and evaluated with ``math`` in float64,
on the golden example of ``test_policy_loss.py``:

    d = logp - old = [[0.1, -0.1, ln 2],
                      [-ln 2, ln 2, pad]]        A = [+1, -1], lengths L = [3, 2]
    logp = [[-0.9, -2.1, -1.5 + ln 2],
            [-0.5 - ln 2, -1.2 + ln 2, pad]]
    token ratios r = [[e^0.1, e^-0.1, 2], [1/2, 2]];  sequence ratios s = (2^(1/3), 1)

TRL parity of the same settings, over a grid, is in ``test_policy_loss_trl.py``.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from lightning_gspo.kernels import policy_loss
from test_policy_loss import EI, F64, LN2, SEQ_ROW_GRADS, SEQ_ROWS, TOKEN_ROW_GRADS, TOKEN_ROWS, E, golden

pl_module = importlib.import_module("lightning_gspo.kernels.policy_loss")
bp_module = importlib.import_module("lightning_gspo.kernels.backend_and_precision")
NEW_TYPES = ("cispo", "sapo", "luspo", "vespo")
LOGP = ([-0.9, -2.1, -1.5 + LN2], [-0.5 - LN2, -1.2 + LN2])
R = ([E, EI, 2.0], [0.5, 2.0])
S = (2 ** (1 / 3), 1.0)
N_ITEMS = 10  # dapo, cispo and vespo divide by a whole step's token count


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # Each warning fires once per process; every test starts from "not yet warned".
    monkeypatch.setattr(pl_module, "_warned", set())
    monkeypatch.setattr(bp_module, "_warned_fallbacks", set())


def run(level, loss_type, ent=None, **kw):
    """Loss, gradient w.r.t. logp (and the entropies when given) and metrics on the golden example."""
    logp, old, adv, mask = golden()
    leaf = logp.clone().requires_grad_(True)
    ent_leaf = None if ent is None else ent.clone().requires_grad_(True)
    kw = {"max_completion_length": 4, "num_items_in_batch": N_ITEMS, "backend": "torch", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss, metrics = policy_loss(
            leaf,
            old,
            adv,
            mask,
            importance_sampling_level=level,
            loss_type=loss_type,
            entropies=ent_leaf,
            **kw,
        )
    loss.backward()
    grads = leaf.grad if ent is None else (leaf.grad, ent_leaf.grad)
    return loss.item(), grads, {k: v.item() for k, v in metrics.items()}


def as_grad(rows, weights=(1.0, 1.0)):
    """(2, 3) float64 gradient from per-row lists (row 1 has no padded entry), each row times its weight."""
    padded = [list(rows[0]), list(rows[1]) + [0.0] * (3 - len(rows[1]))]
    return torch.tensor([[w * g for g in row] for row, w in zip(padded, weights)], dtype=F64)


def close(grad, want):
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------------------
# CISPO, epsilon_high = 1.2 (the weight itself is clipped at 1.2, not at 1 + 1.2):
#   per-token loss -sg(min(r, 1.2)) A logp, gradient -min(r, 1.2) A; summed and divided by the step's 10 tokens.
#   token:    w = [[e^0.1, e^-0.1, 1.2], [1/2, 1.2]]
#             loss = (-(e^0.1 logp00 + e^-0.1 logp01 + 1.2 logp02) + (1/2 logp10 + 1.2 logp11)) / 10
#             grad = [[-e^0.1, -e^-0.1, -1.2], [1/2, 1.2]] / 10
#             cispo_clip_ratio: r > 1.2 with A > 0 is row 0's r = 2 only: 1 of 5 tokens.
#   sequence: w = (min(2^(1/3), 1.2), min(1, 1.2)) = (1.2, 1) on every token of the row;
#             one clipped sequence of 2: cispo_clip_ratio = 1/2.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_golden_cispo(level):
    w = ([E, EI, 1.2], [0.5, 1.2]) if level == "token" else ([1.2] * 3, [1.0] * 2)
    loss, grad, metrics = run(level, "cispo", epsilon_high=1.2)
    A = (1.0, -1.0)
    want = sum(-w[i][t] * A[i] * LOGP[i][t] for i in range(2) for t in range(len(LOGP[i]))) / N_ITEMS
    assert loss == pytest.approx(want, rel=1e-12)
    close(grad, as_grad([[-x for x in w[0]], w[1]], (1 / N_ITEMS, 1 / N_ITEMS)))
    assert metrics == pytest.approx({"cispo_clip_ratio": 0.2 if level == "token" else 0.5})


# ------------------------------------------------------------------------------------------------------------
# SAPO, tau_pos = 1 (A > 0), tau_neg = 1.05 (A <= 0); gate g(r) = sigmoid(tau (r - 1)) 4 / tau:
#   per-token loss -A g(r), gradient -A g'(r) r with g'(r) = 4 sigma (1 - sigma) (tau cancels), sigma at the
#   same point. Aggregation as grpo: (S0 / 3 + S1 / 2) / 2.
#   token:    row 0 sigma(r - 1) at r = e^0.1, e^-0.1, 2; row 1 sigma(1.05 (r - 1)) at r = 1/2, 2.
#   sequence: every token of row i carries g(s_i); d s_i / d logp_it = s_i / L_i, so the row's mean loss
#             -A g(s_i) has gradient -A g'(s_i) s_i / L_i on each of its tokens. Row 1: s = 1, sigma = 1/2,
#             g = 2 / 1.05, g' = 1.
# ------------------------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_golden_sapo(level):
    taus, A = (1.0, 1.05), (1.0, -1.0)
    rows = R if level == "token" else ([S[0]] * 3, [S[1]] * 2)
    losses, grads = [], []
    for i in range(2):
        sig = [_sigmoid(taus[i] * (r - 1)) for r in rows[i]]
        losses.append(sum(-A[i] * s * 4 / taus[i] for s in sig))
        dg = [-A[i] * 4 * s * (1 - s) * r for s, r in zip(sig, rows[i])]
        grads.append(dg if level == "token" else [g / len(rows[i]) for g in dg])
    loss, grad, metrics = run(level, "sapo")
    assert loss == pytest.approx((losses[0] / 3 + losses[1] / 2) / 2, rel=1e-12)
    close(grad, as_grad(grads, (1 / 6, 1 / 4)) if level == "token" else as_grad(grads, (1 / 2, 1 / 2)))
    assert metrics == {}  # TRL logs no ratio metric for sapo
    # Row 1 at sequence level: the gate 2 / 1.05 on both tokens, gradient 1 x 1/2 per token, x 1/2 for B.
    if level != "token":
        assert losses[1] == pytest.approx(2 * 2 / 1.05) and grad[1, 0].item() == pytest.approx(0.25)


def test_golden_sapo_temperatures_reach_the_gate():
    # tau_pos = 2 on row 0 at token level: sigma(2 (r - 1)) 4 / 2 instead of sigma(r - 1) 4.
    loss, _, _ = run("token", "sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5)
    row0 = sum(-_sigmoid(2 * (r - 1)) * 2 for r in R[0])
    row1 = sum(_sigmoid(0.5 * (r - 1)) * 8 for r in R[1])
    assert loss == pytest.approx((row0 / 3 + row1 / 2) / 2, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# LUSPO: the clipped surrogate, aggregated as the mean over sequences of each sequence's token *sum* (a
# sequence weighs by its length). With the row sums of test_policy_loss.py:
#   sequence: (S0 + S1) / 2 = (-3.6 + 2) / 2, gradient = row-sum gradients / 2 (row 0 clipped: none);
#   token:    (-(e^0.1 + e^-0.1 + 1.2) + 2.8) / 2.
#   Clip metrics as the clipped surrogate's: one sequence of 2 clipped high, or 1 + 1 of 5 tokens.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_golden_luspo(level):
    rows, row_grads = (TOKEN_ROWS, TOKEN_ROW_GRADS) if level == "token" else (SEQ_ROWS, SEQ_ROW_GRADS)
    loss, grad, metrics = run(level, "luspo")
    assert loss == pytest.approx(sum(rows) / 2, rel=1e-12)
    close(grad, torch.tensor(row_grads, dtype=F64) / 2)
    high = 0.2 if level == "token" else 0.5
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high)


# ------------------------------------------------------------------------------------------------------------
# VESPO, (k, lambda) = (2, 3) for A >= 0 and (3, 2) otherwise; w = exp(sum_t d_t) (a sum, not a mean):
#   row 0: w = exp(0.1 - 0.1 + ln 2) = 2,  log phi = 3 + 2 ln 2 - 3 x 2,  phi = 4 e^-3
#   row 1: w = exp(-ln 2 + ln 2) = 1,      log phi = 2 + 0 - 2,          phi = 1
#   per-token loss -phi A logp, summed over the step's 10 tokens; gradient -phi A / 10 (phi has none).
#   vespo/phi_seq_mean = (4 e^-3 + 1) / 2. The level does not enter (it only weights a KL term).
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_golden_vespo(level):
    phi, A = (4 * math.exp(-3), 1.0), (1.0, -1.0)
    loss, grad, metrics = run(level, "vespo")
    want = sum(-phi[i] * A[i] * lp for i in range(2) for lp in LOGP[i]) / N_ITEMS
    assert loss == pytest.approx(want, rel=1e-12)
    close(grad, as_grad([[-phi[0]] * 3, [phi[1]] * 2], (1 / N_ITEMS, 1 / N_ITEMS)))
    assert metrics == pytest.approx({"vespo/phi_seq_mean": (phi[0] + 1) / 2}, rel=1e-6)  # metrics are float32


def test_golden_vespo_clamps_the_log_weight():
    # One token per row. Row 0: d = -30, A = +1: the token's log-ratio is clamped to -20, the sum to
    # log 1e-8, so phi = exp(3 + 2 log 1e-8 - 3e-8). Row 1: d = +25, A = -1: clamped to 20, phi =
    # exp(2 + 60 - 2 e^20), which underflows to 0. Loss = -phi0 logp0 / 2 (the default normaliser counts the
    # batch's 2 tokens).
    logp = torch.tensor([[-1.0], [-2.0]], dtype=F64)
    old = logp - torch.tensor([[-30.0], [25.0]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, old, adv, torch.ones(2, 1, dtype=torch.bool), loss_type="vespo")
    phi0 = math.exp(3 + 2 * math.log(1e-8) - 3e-8)
    assert loss.item() == pytest.approx(phi0 / 2, rel=1e-9)
    assert metrics["vespo/phi_seq_mean"].item() == pytest.approx(phi0 / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Off-policy sequence mask (DeepSeek-V3.2): drop a sequence with A < 0 whose mean (old - logp) exceeds the
# threshold. Row 1 (A = -1) has mean (ln 2 - ln 2) / 2 = 0 (to rounding): kept at threshold 0.1, dropped at
# -0.1. Row 0 (A > 0) is always kept. grpo token level: (S0 / 3 + [kept] S1 / 2) / 2.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold,kept", [(0.1, True), (-0.1, False)])
def test_golden_off_policy_mask(threshold, kept):
    loss, grad, metrics = run("token", "grpo", off_policy_mask_threshold=threshold)
    row1 = TOKEN_ROWS[1] if kept else 0.0
    assert loss == pytest.approx((TOKEN_ROWS[0] / 3 + row1 / 2) / 2, rel=1e-12)
    close(grad, as_grad([TOKEN_ROW_GRADS[0], TOKEN_ROW_GRADS[1] if kept else [0.0, 0.0]], (1 / 6, 1 / 4)))
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.2)  # metrics see every token, masked or not


def test_off_policy_mask_keeps_a_sequence_at_the_threshold():
    # On-policy (old = logp) every mean is exactly 0: a threshold of 0 keeps every sequence (<=), a negative
    # one drops those with A < 0, whose gradient then vanishes.
    logp, _, adv, mask = golden()
    for threshold, row1_kept in ((0.0, True), (-1e-9, False)):
        leaf = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(leaf, None, adv, mask, loss_type="grpo", off_policy_mask_threshold=threshold)
        loss.backward()
        assert bool((leaf.grad[1] != 0).any()) == row1_kept and bool((leaf.grad[0] != 0).all())


# ------------------------------------------------------------------------------------------------------------
# Entropy quantile ("Beyond the 80/20 rule"), entropies H = [[0.5, 2.0, 1.0], [3.0, 0.1, pad]]:
#   scored values sorted 0.1, 0.5, 1.0, 2.0, 3.0. top_entropy_quantile 0.4 -> the 0.6 quantile, linear:
#   position 0.6 x 4 = 2.4, threshold 1.0 + 0.4 (2.0 - 1.0) = 1.4: tokens (0, 1) and (1, 0) stay.
#   grpo token level, per-token losses [[-e^0.1, -e^-0.1, -1.2], [0.8, 2]]: (-e^-0.1 / 3 + 0.8 / 2) / 2;
#   gradient only at (0, 1): -e^-0.1 / 6 ((1, 0) is clipped low: none anyway).
#   top_entropy_quantile 0 keeps only the highest, 3.0: (0.8 / 2) / 2 and no gradient at all.
# Entropy bonus, coefficient 0.1, over the tokens the policy loss acts on: all 5 (mean 6.6 / 5) or, with the
# quantile, the two kept (mean 2.5); d loss / d H = -0.1 / 5 or -0.1 / 2 on those tokens.
# ------------------------------------------------------------------------------------------------------------
H = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.1, 99.0]], dtype=F64)  # 99 in padding must stay out


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_golden_entropy_quantile(level):
    loss, (grad, ent_grad), metrics = run(level, "grpo", H, top_entropy_quantile=0.4)
    if level == "token":
        assert loss == pytest.approx((-EI / 3 + 0.8 / 2) / 2, rel=1e-12)
        close(grad, as_grad([[0.0, -EI, 0.0], [0.0, 0.0]], (1 / 6, 1 / 4)))
    assert ent_grad is None  # no bonus: the entropies are not differentiated
    assert "policy_loss" not in metrics
    loss, (grad, _), _ = run("token", "grpo", H, top_entropy_quantile=0.0)
    assert loss == pytest.approx(0.8 / 4, rel=1e-12) and torch.all(grad == 0)


@pytest.mark.parametrize("quantile,mean,kept", [(1.0, 6.6 / 5, 5), (0.4, 2.5, 2)])
def test_golden_entropy_bonus(quantile, mean, kept):
    plain_loss, _, plain = run("token", "grpo", H, top_entropy_quantile=quantile)
    loss, (grad, ent_grad), metrics = run("token", "grpo", H, top_entropy_quantile=quantile, entropy_coef=0.1)
    assert loss == pytest.approx(plain_loss - 0.1 * mean, rel=1e-12)
    assert metrics["policy_loss"] == pytest.approx(plain_loss, rel=1e-6)  # metrics are float32
    mask = golden()[3]
    acting = mask if quantile == 1 else (H >= 1.4) & mask
    close(ent_grad, torch.where(acting, torch.tensor(-0.1 / kept, dtype=F64), torch.zeros((), dtype=F64)))
    assert {k: v for k, v in metrics.items() if k != "policy_loss"} == pytest.approx(plain)


def test_zero_entropy_coef_reports_policy_loss_and_sends_no_entropy_gradient():
    # Adaptive control applies a coefficient of 0 while the entropy is above target: the bonus is on, so
    # policy_loss is reported, and the entropies get no gradient.
    loss, (_, ent_grad), metrics = run("token", "grpo", H, entropy_coef=0.0)
    assert metrics["policy_loss"] == pytest.approx(loss, rel=1e-6) and ent_grad is None
