"""Parity of ``lightning_gspo.kernels.policy_loss`` with TRL 1.16's ``GRPOTrainer._compute_loss``.

TRL's method is called unbound on a stand-in trainer that supplies exactly what it reads, for one process
without gradient accumulation: the model forward is replaced by a function returning our log-prob tensor, so
the loss, its gradient w.r.t. the log-probs and the logged metrics can be compared with ours.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from lightning_gspo.kernels import policy_loss  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

EPS_LOW, EPS_HIGH = 0.2, 0.28
MAX_COMPLETION_LENGTH = 9  # larger than the padded width T = 7: dr_grpo must use the configured constant
METRIC_KEYS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)


class _OneProcessAccelerator:
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_compute_loss(logp, old, adv, mask, ref, *, level, loss_type, beta, bias, delta, num_items=None):
    """TRL's loss, the gradient w.r.t. ``logp`` and the metrics it logged."""
    leaf = logp.detach().clone().requires_grad_(True)
    B, T = logp.shape
    entropies = torch.zeros(B, T)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == T
        return leaf, entropies, None

    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=_OneProcessAccelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _entropy_bonus_enabled=False,
    )
    completion_mask = mask.int()  # TRL's completion masks are int tensors
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.int),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        # One process, one optimizer step per generation batch: TRL's count is the batch's token count.
        "num_items_in_batch": completion_mask.sum() if num_items is None else num_items,
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items() if k != "entropy"}
    assert all(len(v) == 1 for v in trainer._metrics["train"].values())
    return loss.detach(), leaf.grad, metrics


def ours(logp, old, adv, mask, ref, *, level, loss_type, beta, bias, delta, num_items=None):
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(
        leaf, old, adv, mask, ref, importance_sampling_level=level, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, delta=delta, beta=beta, use_bias_correction_kl=bias,
        max_completion_length=MAX_COMPLETION_LENGTH, num_items_in_batch=num_items, backend="torch",
    )  # fmt: skip
    loss.backward()
    return loss.detach(), leaf.grad, {k: v.item() for k, v in metrics.items()}


def off_policy_inputs():
    """B=7, T=7, float32. Row offsets of the log-ratio put rows and tokens inside the clip, clipped on either
    side, outside the clip on the side the sign of A leaves unclipped, and one (a single token, A < 0) above
    delta = 3; the last row is fully masked. Padded positions hold finite garbage, as a model's log-probs
    there would be (TRL multiplies them by the mask)."""
    g = torch.Generator().manual_seed(1234)
    B, T = 7, 7
    lengths = torch.tensor([7, 5, 3, 1, 6, 4, 0])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    offsets = torch.tensor([0.25, -0.6, -0.5, 1.4, 0.4, 0.5, 0.0]).unsqueeze(1)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp - (offsets + 0.35 * torch.randn(B, T, generator=g))
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.tensor([0.8, -1.1, 0.6, -0.9, 1.3, -0.7, 0.4])
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inputs_cover_every_branch(level):
    logp, old, adv, mask, _ = off_policy_inputs()
    d = logp - old
    if level == "token":
        r, a = torch.exp(d)[mask], adv.unsqueeze(1).expand_as(mask)[mask]
    else:
        scored = mask.any(-1)
        r, a = torch.exp((d * mask).sum(-1)[scored] / mask.sum(-1)[scored]), adv[scored]
    low, high = r < 1 - EPS_LOW, r > 1 + EPS_HIGH
    assert ((~low) & (~high)).any()  # inside
    assert (low & (a < 0)).any() and (high & (a > 0)).any()  # clipped
    assert (low & (a > 0)).any() and (high & (a < 0) & (r < 3.0)).any()  # outside, not clipped
    assert ((r > 3.0) & (a < 0)).any()  # delta


GRID = list(
    itertools.product(
        ["token", "sequence"], ["grpo", "bnpo", "dr_grpo", "dapo"], [0.0, 0.04], [True, False], [None, 3.0]
    )
)


def assert_match(mine, theirs, beta):
    m_loss, m_grad, m_met = mine
    t_loss, t_grad, t_met = theirs
    torch.testing.assert_close(m_loss, t_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m_grad, t_grad, rtol=1e-5, atol=1e-7)
    assert t_grad.abs().sum() > 0
    want_keys = set(METRIC_KEYS) | ({"kl"} if beta != 0 else set())
    assert set(t_met) == want_keys
    assert set(m_met) == want_keys
    assert m_met == pytest.approx(t_met, rel=1e-5, abs=1e-7)


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
@pytest.mark.parametrize("level,loss_type,beta,bias,delta", GRID)
def test_matches_trl(level, loss_type, beta, bias, delta):
    logp, old, adv, mask, ref = off_policy_inputs()
    kw = dict(level=level, loss_type=loss_type, beta=beta, bias=bias, delta=delta)
    assert_match(
        ours(logp, old, adv, mask, ref, **kw), trl_compute_loss(logp, old, adv, mask, ref, **kw), beta
    )


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dapo_step_token_count_matches_trl(level):
    # dapo divides by the token count of the whole optimizer step, which TRL receives as num_items_in_batch.
    logp, old, adv, mask, ref = off_policy_inputs()
    n = torch.tensor(3 * int(mask.sum()) + 1)
    kw = dict(level=level, loss_type="dapo", beta=0.04, bias=True, delta=3.0, num_items=n)
    assert_match(
        ours(logp, old, adv, mask, ref, **kw), trl_compute_loss(logp, old, adv, mask, ref, **kw), 0.04
    )


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,bias", [(0.0, True), (0.04, False)])
def test_sequence_token_matches_trl_sequence(loss_type, beta, bias):
    # TRL 1.16 has no GSPO-token level; without a ratio-weighted KL it must equal TRL's sequence level.
    logp, old, adv, mask, ref = off_policy_inputs()
    kw = dict(loss_type=loss_type, beta=beta, bias=bias, delta=3.0)
    mine = ours(logp, old, adv, mask, ref, level="sequence_token", **kw)
    assert_match(mine, trl_compute_loss(logp, old, adv, mask, ref, level="sequence", **kw), beta)
