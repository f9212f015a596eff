"""Parity of ``lightning_gspo.kernels.policy_loss`` with TRL 1.16's ``GRPOTrainer._compute_loss``.

TRL's method is called unbound on a stand-in trainer that supplies exactly what it reads, for one process
without gradient accumulation: the model forward is replaced by a function returning our log-prob and entropy
tensors, so the loss, its gradient w.r.t. the log-probs (and the entropies, under an entropy bonus) and the
logged metrics can be compared with ours. TRL's own helpers (the entropy quantile mask, the off-policy mask,
VESPO's weights) run as TRL wrote them.
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
CISPO_EPS_HIGH = 1.3  # CISPO clips the ratio itself at epsilon_high: 1.3 clips some of these ratios, not all
MAX_COMPLETION_LENGTH = 9  # larger than the padded width T = 7: dr_grpo must use the configured constant
METRIC_KEYS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)
OLD_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
NEW_TYPES = ("cispo", "sapo", "luspo", "vespo")
# Each loss type's metrics besides kl (beta > 0) and policy_loss (entropy bonus).
TYPE_METRICS = {
    **{t: set(METRIC_KEYS) for t in (*OLD_TYPES, "luspo")},
    "cispo": {"cispo_clip_ratio"},
    "sapo": set(),
    "vespo": {"vespo/phi_seq_mean"},
}
# TRL's defaults for the settings our harness leaves out; the trainer reads them from self or self.args.
TRL_DEFAULTS = dict(
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
    vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
    entropy_coef=None,
)  # fmt: skip
# Settings that are a stand-in trainer's attributes (the rest of TRL_DEFAULTS are its args).
ON_TRAINER = ("top_entropy_quantile", "off_policy_mask_threshold")


class _OneProcessAccelerator:
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def __init__(self, other_ranks_entropies=None):
        # Entropies another rank contributes to the quantile (TRL pads, gathers, then drops the padding).
        self.other = other_ranks_entropies

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x if self.other is None else torch.cat([x, self.other])

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def stand_in_trainer(get_logps, *, level, loss_type, beta, bias, delta, eps_high, settings, accelerator):
    """What ``_compute_loss`` reads, as TRL 1.16's trainer sets it up (one process, no vLLM, training)."""
    coef = settings["entropy_coef"]
    trl_args = {k: v for k, v in settings.items() if k not in ON_TRAINER and k != "entropy_coef"}
    adaptive = dict(entropy_coef_min=0.0, entropy_coef_max=1.0, entropy_coef_delta=0.005, entropy_target=0.2)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=get_logps,
        aux_loss_enabled=False,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=eps_high,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias, steps_per_generation=1, **trl_args,
                             **adaptive),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=accelerator,
        _metrics=defaultdict(lambda: defaultdict(list)),
        entropy_coef=0.0 if coef is None else coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=coef is not None,
        _last_world_entropy=float("inf"),
        _entropy_window_stats=None,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        **{k: settings[k] for k in ON_TRAINER},
    )  # fmt: skip
    trainer.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(trainer, *a)
    return trainer


def trl_compute_loss(logp, old, adv, mask, ref, ent=None, *, level, loss_type, beta, bias=True, delta=None,
                     num_items=None, eps_high=EPS_HIGH, other_entropies=None, **settings):  # fmt: skip
    """TRL's loss, the gradients w.r.t. ``logp`` and ``ent``, and the metrics it logged."""
    leaf = logp.detach().clone().requires_grad_(True)
    B, T = logp.shape
    ent_leaf = (torch.zeros(B, T) if ent is None else ent).detach().clone().requires_grad_(True)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == T
        return leaf, ent_leaf, None

    trainer = stand_in_trainer(
        per_token_logps_and_entropies, level=level, loss_type=loss_type, beta=beta, bias=bias, delta=delta,
        eps_high=eps_high, settings={**TRL_DEFAULTS, **settings},
        accelerator=_OneProcessAccelerator(other_entropies),
    )  # fmt: skip
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
    logged = trainer._metrics["train"]
    assert all(len(v) == 1 for v in logged.values())
    if settings.get("entropy_coef") is not None:  # logged at the optimizer step: the module's business
        assert logged.pop("entropy_coef") == [settings["entropy_coef"]]
    metrics = {k: v[0] for k, v in logged.items() if k != "entropy"}
    return loss.detach(), (leaf.grad, ent_leaf.grad), metrics


def ours(logp, old, adv, mask, ref, ent=None, *, level, loss_type, beta, bias=True, delta=None, num_items=None,
         eps_high=EPS_HIGH, other_entropies=None, **settings):  # fmt: skip
    leaf = logp.detach().clone().requires_grad_(True)
    ent_leaf = None if ent is None else ent.detach().clone().requires_grad_(True)
    pool = None
    if other_entropies is not None:
        pool = torch.cat([ent[mask], other_entropies])
    loss, metrics = policy_loss(
        leaf, old, adv, mask, ref, importance_sampling_level=level, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=eps_high, delta=delta, beta=beta, use_bias_correction_kl=bias,
        max_completion_length=MAX_COMPLETION_LENGTH, num_items_in_batch=num_items, backend="torch",
        entropies=ent_leaf, entropy_pool=pool, **settings,
    )  # fmt: skip
    loss.backward()
    ent_grad = None if ent_leaf is None else ent_leaf.grad
    return loss.detach(), (leaf.grad, ent_grad), {k: v.item() for k, v in metrics.items()}


def off_policy_inputs():
    """B=7, T=7, float32. Row offsets of the log-ratio put rows and tokens inside the clip, clipped on either
    side, outside the clip on the side the sign of A leaves unclipped, and one (a single token, A < 0) above
    delta = 3; row 6 is fully masked, row 7 has a zero advantage (VESPO and SAPO pick their parameters by
    A >= 0 and A > 0). Padded positions hold finite garbage, as a model's log-probs there would be (TRL
    multiplies them by the mask)."""
    g = torch.Generator().manual_seed(1234)
    B, T = 7, 7
    lengths = torch.tensor([7, 5, 3, 1, 6, 4, 0, 5])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    offsets = torch.tensor([0.25, -0.6, -0.5, 1.4, 0.4, 0.5, 0.0]).unsqueeze(1)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp - (offsets + 0.35 * torch.randn(B, T, generator=g))
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    extra = -3 * torch.rand(1, T, generator=g)  # row 7, drawn after the others so theirs stay as they were
    logp, old, ref = (torch.cat([x, extra + shift]) for x, shift in ((logp, 0.0), (old, 0.3), (ref, 0.2)))
    adv = torch.tensor([0.8, -1.1, 0.6, -0.9, 1.3, -0.7, 0.4, 0.0])
    return logp, old, adv, mask, ref


def entropies_for(mask):
    """Distinct per-token entropies in [0, 2.5); padding holds 50, which would move any quantile it entered."""
    g = torch.Generator().manual_seed(99)
    return torch.where(mask, 2.5 * torch.rand(mask.shape, generator=g), torch.tensor(50.0))


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
    assert ((r > CISPO_EPS_HIGH) & (a > 0)).any() and ((r <= CISPO_EPS_HIGH) & (a > 0)).any()  # cispo


def test_masks_drop_some_terms_and_keep_others():
    # The off-policy mask at 0.05 drops a negative-advantage row (mean old - logp = 0.6) and keeps the other
    # rows; the entropy quantile 0.4 keeps part of every long row. Otherwise the grid below tests nothing.
    logp, old, adv, mask, _ = off_policy_inputs()
    kl = ((old - logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    dropped = (adv < 0) & (kl > OFF_POLICY)
    assert 0 < int(dropped.sum()) < int((adv < 0).sum())
    ent = entropies_for(mask)
    kept = (ent >= torch.quantile(ent[mask], 1 - QUANTILE)) & mask
    assert 0 < int(kept.sum()) < int(mask.sum())


def assert_match(mine, theirs, loss_type, beta, bonus=False):
    m_loss, (m_grad, m_ent_grad), m_met = mine
    t_loss, (t_grad, t_ent_grad), t_met = theirs
    torch.testing.assert_close(m_loss, t_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m_grad, t_grad, rtol=1e-5, atol=1e-7)
    assert t_grad.abs().sum() > 0
    if bonus:
        torch.testing.assert_close(m_ent_grad, t_ent_grad, rtol=1e-5, atol=1e-7)
        assert t_ent_grad.abs().sum() > 0
    else:
        assert m_ent_grad is None or m_ent_grad.abs().sum() == 0
    want_keys = (
        TYPE_METRICS[loss_type] | ({"kl"} if beta != 0 else set()) | ({"policy_loss"} if bonus else set())
    )
    assert set(t_met) == want_keys
    assert set(m_met) == want_keys
    assert m_met == pytest.approx(t_met, rel=1e-5, abs=1e-7)


def check(level, loss_type, beta, *, ent=False, **kw):
    logp, old, adv, mask, ref = off_policy_inputs()
    entropies = entropies_for(mask) if ent else None
    kw = dict(level=level, loss_type=loss_type, beta=beta, **kw)
    if loss_type == "cispo":
        kw.setdefault("eps_high", CISPO_EPS_HIGH)
    mine = ours(logp, old, adv, mask, ref, entropies, **kw)
    theirs = trl_compute_loss(logp, old, adv, mask, ref, entropies, **kw)
    assert_match(mine, theirs, loss_type, beta, bonus=kw.get("entropy_coef") is not None)


GRID = list(itertools.product(["token", "sequence"], OLD_TYPES, [0.0, 0.04], [True, False], [None, 3.0]))


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
@pytest.mark.parametrize("level,loss_type,beta,bias,delta", GRID)
def test_matches_trl(level, loss_type, beta, bias, delta):
    check(level, loss_type, beta, bias=bias, delta=delta)


QUANTILE, OFF_POLICY = 0.4, 0.05
MASKS = {"no-mask": {}, "entropy": {"top_entropy_quantile": QUANTILE},
         "off-policy": {"off_policy_mask_threshold": OFF_POLICY},
         "both": {"top_entropy_quantile": QUANTILE, "off_policy_mask_threshold": OFF_POLICY}}  # fmt: skip
# Every loss type at both of TRL's levels (TRL computes each, warning where a type expects the other) x beta x
# masks; the four original types without masks are the grid above.
MASK_GRID = [
    (level, loss_type, beta, masks)
    for level, loss_type, beta, masks in itertools.product(
        ["token", "sequence"], OLD_TYPES + NEW_TYPES, [0.0, 0.04], list(MASKS)
    )
    if loss_type in NEW_TYPES or masks != "no-mask"
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("level,loss_type,beta,masks", MASK_GRID)
def test_loss_types_and_masks_match_trl(level, loss_type, beta, masks):
    check(level, loss_type, beta, ent=True, **MASKS[masks])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "loss_type,kw",
    [
        ("luspo", dict(delta=3.0, bias=False)),
        ("sapo", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.6)),
        ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_pos=0.8, vespo_k_neg=0.5, vespo_lambda_neg=1.2)),
        ("cispo", dict(eps_high=0.9)),
    ],
)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_type_parameters_reach_the_loss_as_in_trl(level, loss_type, kw):
    check(level, loss_type, 0.04, **kw)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", OLD_TYPES + NEW_TYPES)
@pytest.mark.parametrize("masks", ["no-mask", "both"])
def test_entropy_bonus_matches_trl(level, loss_type, masks):
    # Loss, gradient w.r.t. log-probs and entropies, and policy_loss; the bonus acts on the entropy-masked tokens.
    check(level, loss_type, 0.04, ent=True, entropy_coef=0.3, **MASKS[masks])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_entropy_quantile_over_all_ranks_matches_trl(loss_type):
    # Under DDP TRL takes the quantile over every rank's scored tokens; entropy_pool carries them.
    other = torch.linspace(0.1, 2.4, 23)
    check("token", loss_type, 0.0, ent=True, top_entropy_quantile=0.3, other_entropies=other)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_step_token_count_matches_trl(level, loss_type):
    # dapo, cispo and vespo divide by the token count of the whole optimizer step (TRL's num_items_in_batch).
    logp, old, adv, mask, ref = off_policy_inputs()
    n = torch.tensor(3 * int(mask.sum()) + 1)
    check(level, loss_type, 0.04, num_items=n, delta=3.0 if loss_type == "dapo" else None)


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
@pytest.mark.parametrize("loss_type", OLD_TYPES)
@pytest.mark.parametrize("beta,bias", [(0.0, True), (0.04, False)])
def test_sequence_token_matches_trl_sequence(loss_type, beta, bias):
    # TRL 1.16 has no GSPO-token level; without a ratio-weighted KL it must equal TRL's sequence level.
    logp, old, adv, mask, ref = off_policy_inputs()
    kw = dict(loss_type=loss_type, beta=beta, bias=bias, delta=3.0)
    mine = ours(logp, old, adv, mask, ref, level="sequence_token", **kw)
    assert_match(mine, trl_compute_loss(logp, old, adv, mask, ref, level="sequence", **kw), loss_type, beta)
