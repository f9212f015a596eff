"""The entropy bonus across micro-batches and optimizer steps: ``loss.micro_batch_loss`` with ``EntropyControl``
against TRL 1.16's ``_compute_loss`` run over the same sequence of micro-batches, with gradient accumulation,
so the bonus's accumulation scaling and Skywork-OR1's adaptive coefficient are checked together; and the
controller's state."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from test_policy_loss_trl import TRL_DEFAULTS, _OneProcessAccelerator, stand_in_trainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from lightning_gspo.config import GSPOConfig  # noqa: E402
from lightning_gspo.entropy_control import EntropyControl, gather_across_ranks  # noqa: E402
from lightning_gspo.loss import micro_batch_loss  # noqa: E402
from lightning_gspo.rollout import Rollout  # noqa: E402
from lightning_gspo.run_state import RunState  # noqa: E402

B, T, GA = 4, 6, 2
ADAPTIVE = dict(entropy_coef=0.05, entropy_coef_min=0.01, entropy_coef_max=0.08, entropy_coef_delta=0.02)


def micro_batches(steps: int):
    """``steps`` optimizer steps of GA micro-batches, off-policy, whose mean entropies straddle 1.2 so the
    adaptive coefficient rises to its maximum and falls; row 0 of each has a zero advantage (the bonus still
    trains it)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(steps * GA):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T) < lengths.unsqueeze(1)
        logp = -2 * torch.rand(B, T, generator=g)
        old = logp + 0.3 * torch.randn(B, T, generator=g)
        adv = torch.randn(B, generator=g)
        adv[0] = 0.0
        level = 0.6 if i // GA in (0, 1) else 1.8  # two low-entropy steps, then high-entropy ones
        ent = torch.where(mask, level + 0.3 * torch.rand(B, T, generator=g), torch.tensor(9.0))
        out.append((logp, old, adv, mask, ent))
    return out


def trl_run(batches, loss_type, quantile):
    trainer = stand_in_trainer(
        None, level="token", loss_type=loss_type, beta=0.0, bias=True, delta=None, eps_high=0.28,
        settings={**TRL_DEFAULTS, "top_entropy_quantile": quantile, "entropy_coef": 0.05},
        accelerator=_OneProcessAccelerator(),
    )  # fmt: skip
    trainer.use_adaptive_entropy = True
    trainer.entropy_coef = ADAPTIVE["entropy_coef"]
    trainer.args.entropy_coef_min, trainer.args.entropy_coef_max = ADAPTIVE["entropy_coef_min"], 0.08
    trainer.args.entropy_coef_delta, trainer.args.entropy_target = ADAPTIVE["entropy_coef_delta"], 1.2
    trainer.current_gradient_accumulation_steps = GA
    trainer.args.steps_per_generation = GA
    num_items = sum(int(b[3].sum()) for b in batches[:GA])  # one generation batch = one optimizer step here
    results = []
    for i, (logp, old, adv, mask, ent) in enumerate(batches):
        leaf, ent_leaf = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        trainer._get_per_token_logps_and_entropies = lambda *a, x=leaf, h=ent_leaf, **k: (x, h, None)
        trainer.accelerator.sync_gradients = (i + 1) % GA == 0
        inputs = {
            "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.int),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.int(),
            "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": torch.tensor(num_items),
        }  # fmt: skip
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
        loss.backward()
        results.append((loss.detach(), leaf.grad, ent_leaf.grad, trainer.entropy_coef))
    policy_losses = trainer._metrics["train"]["policy_loss"]
    return results, policy_losses


def our_run(batches, loss_type, quantile):
    cfg = GSPOConfig(
        loss_type=loss_type, top_entropy_quantile=quantile, use_adaptive_entropy=True, entropy_target=1.2, epsilon_high=0.28,
        gradient_accumulation_steps=GA, per_device_train_batch_size=B, num_generations=B, backend="torch",
        **ADAPTIVE,
    )  # fmt: skip
    control = EntropyControl.from_config(cfg)
    num_items = torch.tensor(float(sum(int(b[3].sum()) for b in batches[:GA])))
    results, policy_losses = [], []
    for i, (logp, old, adv, mask, ent) in enumerate(batches):
        leaf, ent_leaf = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        zeros = torch.zeros(B, 2, dtype=torch.long)
        r = Rollout(
            zeros,
            torch.ones_like(zeros),
            torch.zeros(B, T, dtype=torch.long),
            mask,
            torch.zeros(B, dtype=torch.bool),
        )
        r.advantages, r.old_logps, r.num_items = adv, old, num_items
        loss, metrics = micro_batch_loss(
            r,
            cfg,
            lambda s, x=leaf, h=ent_leaf: (x, h),
            steps_per_generation=GA,
            rows=None,
            entropy_control=control,
        )
        loss.backward()
        if (i + 1) % GA == 0:
            control.step()
        results.append((loss.detach(), leaf.grad, ent_leaf.grad, control.coef))
        policy_losses.append(metrics["policy_loss"])
    return results, policy_losses


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_bonus_and_adaptive_coefficient_match_trl_over_steps(loss_type, quantile):
    batches = micro_batches(steps=5)
    theirs, their_policy = trl_run(batches, loss_type, quantile)
    ours, our_policy = our_run(batches, loss_type, quantile)
    coefs = []
    for i, ((t_loss, t_g, t_e, t_coef), (m_loss, m_g, m_e, m_coef)) in enumerate(zip(theirs, ours)):
        torch.testing.assert_close(m_loss, t_loss, rtol=1e-5, atol=1e-7, msg=f"micro-batch {i}")
        torch.testing.assert_close(m_g, t_g, rtol=1e-5, atol=1e-7)
        if t_e is None or (t_e == 0).all():  # the bonus is off until entropy falls to the target
            assert m_e is None or (m_e == 0).all()
        else:
            torch.testing.assert_close(m_e, t_e, rtol=1e-5, atol=1e-7)
        assert m_coef == pytest.approx(t_coef, abs=1e-12)
        coefs.append(t_coef)
    assert our_policy == pytest.approx(their_policy, rel=1e-5, abs=1e-7)
    # The scenario moves the coefficient up and down and applies the bonus on some steps, not others.
    assert len(set(coefs)) > 2 and any(e is not None and e.abs().sum() > 0 for _, _, e, _ in theirs)


def test_fixed_coefficient_is_applied_from_the_first_step():
    control = EntropyControl.from_config(GSPOConfig(entropy_coef=0.1))
    assert control.applied() == 0.1
    control.observe(torch.tensor(3.0), torch.tensor(2.0))
    control.step()
    assert control.coef == 0.1 and control.window is None
    assert EntropyControl.from_config(GSPOConfig()) is None  # no bonus: no control


def test_adaptive_control_waits_for_a_measurement_and_stays_in_its_range():
    control = EntropyControl.from_config(
        GSPOConfig(use_adaptive_entropy=True, **ADAPTIVE, entropy_target=1.0)
    )
    assert control.applied() == 0.0  # no measurement yet: TRL starts from an infinite entropy
    for entropy, want in (
        (0.5, 0.07),
        (0.5, 0.08),
        (0.5, 0.08),
        (2.0, 0.06),
        (2.0, 0.04),
        (2.0, 0.02),
        (2.0, 0.01),
    ):
        control.observe(torch.tensor(entropy * 4), torch.tensor(4.0))
        control.step()
        assert control.coef == pytest.approx(want)
        assert control.applied() == (control.coef if entropy <= 1.0 else 0.0)


def test_state_round_trips_through_the_run_state():
    cfg = GSPOConfig(use_adaptive_entropy=True, **ADAPTIVE)
    state = RunState(entropy=EntropyControl.from_config(cfg))
    state.entropy.observe(torch.tensor(0.1), torch.tensor(1.0))
    state.entropy.step()
    state.entropy.observe(torch.tensor(5.0), torch.tensor(3.0))  # a step half-way through its micro-batches
    saved = state.state_dict()
    fresh = RunState(entropy=EntropyControl.from_config(cfg))
    fresh.load_state_dict(saved)
    assert fresh.entropy.coef == state.entropy.coef and fresh.entropy.last_entropy == pytest.approx(0.1)
    torch.testing.assert_close(fresh.entropy.window, torch.tensor([5.0, 3.0]))
    old_checkpoint = {k: v for k, v in saved.items() if k != "entropy"}  # written before the bonus existed
    RunState(entropy=EntropyControl.from_config(cfg)).load_state_dict(old_checkpoint)


def test_gather_across_ranks_is_the_identity_on_one_process():
    x = torch.arange(5.0)
    assert torch.equal(gather_across_ranks(x), x)
    assert math.isinf(EntropyControl(coef=0.0, adaptive=True).last_entropy)
