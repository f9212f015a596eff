"""Properties of the loss types TRL 1.16 added (cispo, sapo, luspo, vespo), the token masks and the entropy
bonus: gradcheck, padding, empty batches, GSPO-token; TRL's warnings about levels; which backend computes them;
misuse. The hand-derived values are in ``test_loss_types.py``."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from lightning_gspo.kernels import policy_loss
from test_loss_types import NEW_TYPES, H
from test_policy_loss import F64, golden

pl_module = importlib.import_module("lightning_gspo.kernels.policy_loss")
bp_module = importlib.import_module("lightning_gspo.kernels.backend_and_precision")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # Each warning fires once per process; every test starts from "not yet warned".
    monkeypatch.setattr(pl_module, "_warned", set())
    monkeypatch.setattr(bp_module, "_warned_fallbacks", set())


# ------------------------------------------------------------------------------------------------------------
# Properties of the new settings.
# ------------------------------------------------------------------------------------------------------------
def smooth(dtype=F64):
    from test_policy_loss import smooth_inputs

    logp, old, adv, mask, ref = smooth_inputs(dtype)
    g = torch.Generator().manual_seed(5)
    ent = torch.where(
        mask, 2 * torch.rand(mask.shape, generator=g, dtype=dtype), torch.tensor(7.0, dtype=dtype)
    )
    return logp, old, adv, mask, ref, ent


# cispo's and vespo's weights are constants of the step by definition (stop-gradient), so their gradient is not
# the derivative of their value and finite differences cannot check it; the goldens above check it instead.
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["sapo", "luspo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gradcheck_new_loss_types_with_masks_and_bonus(level, loss_type, beta):
    logp, old, adv, mask, ref, ent = smooth()
    kw = dict(importance_sampling_level=level, loss_type=loss_type, beta=beta, epsilon_high=1.5,
              top_entropy_quantile=0.5, off_policy_mask_threshold=0.0, entropy_coef=0.2, backend="torch")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fn = lambda x, h: policy_loss(x, old, adv, mask, ref, entropies=h, **kw)[0]
        args = (logp.clone().requires_grad_(True), ent.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", NEW_TYPES)
@pytest.mark.parametrize("fill", [float("-inf"), float("nan")])
def test_padding_garbage_is_ignored(level, loss_type, fill):
    logp, old, adv, mask, ref, ent = smooth()
    kw = dict(importance_sampling_level=level, loss_type=loss_type, beta=0.04, top_entropy_quantile=0.5,
              off_policy_mask_threshold=0.0, entropy_coef=0.2, backend="torch")  # fmt: skip
    outs = []
    for pad in (0.0, fill):
        x, o, r, h = (torch.where(mask, t, torch.tensor(pad, dtype=F64)) for t in (logp, old, ref, ent))
        x, h = x.requires_grad_(True), h.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss, metrics = policy_loss(x, o, adv, mask, r, entropies=h, **kw)
        loss.backward()
        outs.append((loss.detach(), x.grad, h.grad, {k: v.item() for k, v in metrics.items()}))
    (c_loss, c_g, c_h, c_m), (d_loss, d_g, d_h, d_m) = outs
    assert torch.isfinite(d_loss) and torch.equal(d_loss, c_loss)
    assert torch.equal(d_g, c_g) and torch.equal(d_h, c_h)
    assert d_m == pytest.approx(c_m)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_all_empty_batch_gives_finite_zero(loss_type):
    garbage = torch.full((3, 4), float("nan"), dtype=F64)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    leaf = garbage.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        leaf, garbage, torch.tensor([1.0, -2.0, 0.5], dtype=F64), mask, garbage, loss_type=loss_type, beta=0.04,
        entropies=garbage, top_entropy_quantile=0.5, off_policy_mask_threshold=0.1, entropy_coef=0.1,
        importance_sampling_level="sequence" if loss_type == "luspo" else "token", backend="torch",
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.all(leaf.grad == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_sequence_token_equals_sequence_without_ratio_weighted_kl(loss_type):
    # Without a ratio-weighted KL term and without the entropy mask, GSPO-token has the sequence level's
    # value and gradient for every loss type.
    logp, old, adv, mask, ref, _ = smooth()
    outs = []
    for level in ("sequence", "sequence_token"):
        x = logp.clone().requires_grad_(True)
        kw = dict(
            importance_sampling_level=level, loss_type=loss_type, beta=0.04, use_bias_correction_kl=False
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss, _ = policy_loss(x, old, adv, mask, ref, epsilon_high=1.5, backend="torch", **kw)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    torch.testing.assert_close(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------------------
# TRL's warnings about levels, backend choice, and misuse.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "level,loss_type,expect",
    [
        ("token", "luspo", "loss_type='luspo'"),
        ("sequence", "vespo", "loss_type='vespo'"),
        ("sequence_token", "vespo", "loss_type='vespo'"),
        ("sequence", "cispo", "weights each sequence by its length"),
        ("sequence_token", "dapo", "weights each sequence by its length"),
        ("sequence", "luspo", None),
        ("token", "vespo", None),
        ("sequence", "sapo", None),
        ("token", "cispo", None),
    ],
)
def test_trl_warns_about_these_levels_and_so_do_we(level, loss_type, expect):
    # TRL 1.16 warns (and computes) where a loss type expects another level; nothing is refused.
    logp, old, adv, mask = golden()
    kw = dict(importance_sampling_level=level, loss_type=loss_type, max_completion_length=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            policy_loss(logp, old, adv, mask, backend="torch", **kw)
    msgs = [w for w in caught if issubclass(w.category, UserWarning)]
    if expect is None:
        assert not msgs
        return
    assert len(msgs) == 1 and expect in str(msgs[0].message)
    assert "importance_sampling_level" in str(msgs[0].message)
    assert msgs[0].filename == __file__  # points at the caller of policy_loss


def _as_if_on_cuda(monkeypatch):
    """Backend resolution as on a CUDA machine with triton: 'auto' would pick the Triton kernel."""
    monkeypatch.setattr(
        bp_module, "resolve_backend", lambda backend, device: "triton" if backend == "auto" else backend
    )


UNCOVERED = {
    "loss_type": {"loss_type": "cispo"},
    "top_entropy_quantile": {"top_entropy_quantile": 0.5},
    "off_policy_mask_threshold": {"off_policy_mask_threshold": 0.1},
    "entropy_coef": {"entropy_coef": 0.0},
}


@pytest.mark.parametrize("field", list(UNCOVERED))
def test_triton_refuses_what_its_kernel_does_not_compute(monkeypatch, field):
    _as_if_on_cuda(monkeypatch)
    logp, old, adv, mask = golden()
    with pytest.raises(ValueError, match=f"backend='triton' does not cover {field}="):
        policy_loss(logp, old, adv, mask, entropies=H, backend="triton", **UNCOVERED[field])


@pytest.mark.parametrize("field", list(UNCOVERED))
def test_auto_computes_the_rest_with_pytorch_and_says_so_once(monkeypatch, field):
    _as_if_on_cuda(monkeypatch)
    logp, old, adv, mask = golden()
    kw = dict(entropies=H, **UNCOVERED[field])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = [policy_loss(logp, old, adv, mask, backend="auto", **kw) for _ in range(2)]
    msgs = [str(w.message) for w in caught if "Triton kernel does not cover" in str(w.message)]
    assert len(msgs) == 1 and f"{field}=" in msgs[0]
    assert caught[0].filename == __file__
    torch_loss, torch_metrics = policy_loss(logp, old, adv, mask, backend="torch", **kw)
    assert torch.equal(auto[0][0], torch_loss) and auto[0][1].keys() == torch_metrics.keys()


def test_auto_on_cuda_keeps_the_triton_kernel_for_what_it_covers(monkeypatch):
    _as_if_on_cuda(monkeypatch)
    chosen = []
    monkeypatch.setattr(
        "lightning_gspo.kernels.policy_loss_triton.triton_policy_loss",
        lambda *args: chosen.append("triton") or pl_module.torch_policy_loss(*args),
        raising=False,
    )
    logp, old, adv, mask = golden()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy_loss(logp, old, adv, mask, backend="auto", loss_type="grpo", entropies=H)
    assert chosen == ["triton"] and not caught  # entropies alone (for a metric) need no PyTorch fallback


BAD = {
    "quantile below 0": ({"top_entropy_quantile": -0.1}, "top_entropy_quantile"),
    "quantile above 1": ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    "sapo temperature 0": ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
    "sapo temperature < 0": ({"sapo_temperature_pos": -1.0}, "sapo_temperature_pos"),
    "quantile without entropies": ({"top_entropy_quantile": 0.5, "entropies": None}, "entropies"),
    "bonus without entropies": ({"entropy_coef": 0.1, "entropies": None}, "entropies"),
    "entropies shape": ({"entropies": torch.zeros(2, 4, dtype=F64)}, "entropies"),
    "entropies integer": ({"entropies": torch.zeros(2, 3, dtype=torch.long)}, "entropies"),
    "unknown loss type": ({"loss_type": "ppo"}, "loss_type"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_validation_errors(case):
    over, name = BAD[case]
    logp, old, adv, mask = golden()
    kw = {"entropies": H, "backend": "torch", **over}
    with pytest.raises(ValueError, match=name):
        policy_loss(logp, old, adv, mask, **kw)


def test_delta_is_checked_only_where_it_is_read():
    # delta caps the clipped surrogate's ratio; cispo (epsilon_high 5, ScaleRL's value) never reads it.
    logp, old, adv, mask = golden()
    policy_loss(logp, old, adv, mask, loss_type="cispo", epsilon_high=5.0, delta=2.0)
    with pytest.raises(ValueError, match="delta"):
        policy_loss(logp, old, adv, mask, loss_type="luspo", epsilon_high=5.0, delta=2.0)
