import math

import pytest
import torch

from lightning_gspo.advantages import group_advantages, nanstd

NAN = float("nan")


def test_group_scaling_by_hand():
    # One group of 4 with rewards 0, 1, 1, 2: mean 1, Bessel std sqrt((1+0+0+1)/3) = sqrt(2/3) = 0.816497.
    rewards = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    adv, total, m = group_advantages(rewards, num_generations=4)
    std = math.sqrt(2 / 3)
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0]) / (std + 1e-4)
    torch.testing.assert_close(adv, expected)
    assert m["reward"] == pytest.approx(1.0)
    assert m["reward_std"] == pytest.approx(std, rel=1e-6)
    assert m["frac_reward_zero_std"] == 0.0


def test_two_groups_one_unanimous():
    # Group A (1, 1) has std 0: advantages 0 and it counts in frac_reward_zero_std. Group B (0, 4): mean 2,
    # std sqrt(((−2)² + 2²)/1) = 2.828427, advantages ∓2 / (2.828427 + 1e-4).
    rewards = torch.tensor([[1.0], [1.0], [0.0], [4.0]])
    adv, _, m = group_advantages(rewards, num_generations=2)
    s = math.sqrt(8)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -2 / (s + 1e-4), 2 / (s + 1e-4)]))
    assert m["frac_reward_zero_std"] == 0.5


def test_batch_and_none_scaling():
    rewards = torch.tensor([[1.0], [1.0], [0.0], [4.0]])
    # batch: std over all four values 1, 1, 0, 4 (mean 1.5): sqrt((.25+.25+2.25+6.25)/3) = sqrt(3) = 1.732051.
    adv, _, m = group_advantages(rewards, num_generations=2, scale_rewards="batch")
    s = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -2 / (s + 1e-4), 2 / (s + 1e-4)]))
    assert m["frac_reward_zero_std"] == 0.0  # batch std is not zero anywhere
    adv, _, m = group_advantages(rewards, num_generations=2, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -2.0, 2.0]))
    assert m["frac_reward_zero_std"] == 0.5  # still measured on groups


def test_weights_and_none_rewards():
    # Two functions, weights (1, 0.5). Row 2's first function returned None: its reward is 0.5 * 2 = 1.
    # Row 3 was scored by nobody: reward NaN, left out of the baseline, advantage 0.
    rpf = torch.tensor([[1.0, 0.0], [0.0, 4.0], [NAN, 2.0], [NAN, NAN]])
    adv, total, m = group_advantages(
        rpf, num_generations=4, reward_weights=[1.0, 0.5], scale_rewards="none", reward_names=["a", "b"]
    )
    torch.testing.assert_close(total[:3], torch.tensor([1.0, 2.0, 1.0]))
    assert math.isnan(total[3])
    baseline = 4 / 3
    torch.testing.assert_close(adv, torch.tensor([1 - baseline, 2 - baseline, 1 - baseline, 0.0]))
    assert m["rewards/a/mean"] == pytest.approx(0.5)  # mean of 1, 0 (NaN skipped)
    assert m["rewards/b/mean"] == pytest.approx(2.0)  # mean of 0, 4, 2
    assert m["rewards/b/std"] == pytest.approx(2.0)
    assert m["reward"] == pytest.approx(baseline)


def test_nanstd_matches_trl():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x = torch.tensor([[1.0, NAN, 3.0, 7.0], [2.0, 2.0, NAN, NAN], [NAN, NAN, NAN, 5.0]])
    torch.testing.assert_close(nanstd(x, dim=1), trl_utils.nanstd(x, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(x), trl_utils.nanstd(x), equal_nan=True)


@pytest.mark.parametrize(
    "bad", [dict(num_generations=3), dict(scale_rewards="max"), dict(reward_weights=[1, 2, 3])]
)
def test_bad_input(bad):
    args = dict(num_generations=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        group_advantages(torch.zeros(4, 1), **args)
