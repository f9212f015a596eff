import json

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, logged, module_and_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.models import ModelConfig
from lightning_gspo.module import GSPOModule
from lightning_gspo.tasks.arithmetic import make_dataset


def _run(tiny_dir, out, max_steps, ckpt_path=None, every=None, **overrides):
    L.seed_everything(7)
    module, data = module_and_data(tiny_dir, num_iterations=2, **overrides)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    t = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged(out)


@pytest.mark.parametrize("stop_at", [2, 3])  # 3 stops in the middle of a generation batch
def test_resume_continues_exactly(tiny_dir, tmp_path, stop_at):
    full_module, full = _run(tiny_dir, tmp_path / "full", max_steps=6)
    _run(tiny_dir, tmp_path / "first", max_steps=stop_at, every=stop_at)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob(f"*step={stop_at}.ckpt")
    resumed_module, resumed = _run(tiny_dir, tmp_path / "second", max_steps=6, ckpt_path=str(ckpt))
    after = [r for r in full if int(r["step"]) > stop_at + (stop_at % 2)]
    assert after and len(after) == len(resumed[-len(after) :])
    for a, b in zip(after, resumed[-len(after) :]):
        for key in ("reward", "loss", "entropy", "clip_ratio/region_mean", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


# Adaptive entropy control with a target above the tiny model's entropy: the coefficient rises every optimizer
# step and the bonus applies from the second step on, so a resume that lost the controller's state would differ.
ADAPTIVE = dict(
    use_adaptive_entropy=True,
    entropy_coef=0.0,
    entropy_coef_delta=0.01,
    entropy_target=50.0,
    top_entropy_quantile=0.5,
)


def test_resume_continues_the_adaptive_entropy_coefficient(tiny_dir, tmp_path):
    full_module, full = _run(tiny_dir, tmp_path / "full", max_steps=6, **ADAPTIVE)
    _run(tiny_dir, tmp_path / "first", max_steps=3, every=3, **ADAPTIVE)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=3.ckpt")
    resumed_module, resumed = _run(
        tiny_dir, tmp_path / "second", max_steps=6, ckpt_path=str(ckpt), **ADAPTIVE
    )
    coefs = [float(r["entropy_coef"]) for r in full if r.get("entropy_coef")]  # means between logs
    assert (
        len(coefs) >= 2 and coefs == sorted(coefs) and full_module.state.entropy.coef == pytest.approx(0.06)
    )
    after = [r for r in full if int(r["step"]) > 4]
    assert after and len(after) == len(resumed[-len(after) :])
    for a, b in zip(after, resumed[-len(after) :]):
        for key in ("loss", "policy_loss", "entropy", "entropy_coef", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    assert resumed_module.state.entropy.coef == pytest.approx(full_module.state.entropy.coef)
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


# ---- bad input: each a clear message before or at the first step ----


def test_missing_prompt_column(tiny_dir):
    data = PromptGroupDataModule([{"question": "1+1="}] * 8, algorithm=algo())
    with pytest.raises(ValueError, match=r"prompt_column='prompt'.*columns are \['question'\]"):
        data.setup("fit")


def test_empty_dataset():
    data = PromptGroupDataModule({"prompt": []}, algorithm=algo())
    with pytest.raises(ValueError, match="empty"):
        data.setup("fit")


def test_too_few_prompts_for_a_generation_batch():
    data = PromptGroupDataModule(make_dataset(2), algorithm=algo())
    with pytest.raises(ValueError, match="fewer than one generation batch"):
        data.setup("fit")


def test_missing_data_file():
    data = PromptGroupDataModule("./no/such/file.jsonl", algorithm=algo())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.setup("fit")


def test_model_path_that_does_not_exist():
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path='./no/such/model'"):
        GSPOModule({"name_or_path": "./no/such/model"}, REWARDS, algo())


def test_unknown_tiny_vocabulary():
    with pytest.raises(ValueError, match="tiny:digits"):
        ModelConfig(name_or_path="tiny:greek")


def test_reward_weights_must_match_functions(tiny_dir):
    with pytest.raises(ValueError, match="reward_weights has 3 entries for 2 reward functions"):
        GSPOModule({"name_or_path": str(tiny_dir)}, REWARDS, algo(reward_weights=[1, 2, 3]))


def test_unimportable_reward_function(tiny_dir):
    with pytest.raises(ValueError, match="lightning_gspo.rewards.nope"):
        GSPOModule({"name_or_path": str(tiny_dir)}, ["lightning_gspo.rewards.nope.reward"], algo())


def raising_reward(prompts, completions, **kw):
    raise KeyError("answer")


def short_reward(prompts, completions, **kw):
    return [1.0]


def nan_reward(prompts, completions, **kw):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def none_reward(prompts, completions, **kw):
    return [None] * len(completions)


@pytest.mark.parametrize(
    "fn, error, match",
    [
        (
            raising_reward,
            RuntimeError,
            r"reward function 'raising_reward' raised KeyError.*First sample: prompt=",
        ),
        (short_reward, ValueError, r"'short_reward' returned 1 values for 16 completions"),
        (nan_reward, ValueError, r"'nan_reward' returned nan for prompt='\d\+\d=', completion="),
    ],
)
def test_bad_reward_function_stops_the_run_by_name(tiny_dir, tmp_path, fn, error, match):
    cfg = algo()
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [fn], cfg)
    data = PromptGroupDataModule(make_dataset(64), algorithm=cfg)
    with pytest.raises(error, match=match):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=data)


def test_none_rewards_give_zero_advantage_and_train_on(tiny_dir, tmp_path):
    cfg = algo(reward_weights=[1.0, 1.0])
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [none_reward, REWARDS[1]], cfg)
    trainer(tmp_path, max_steps=2).fit(
        module, datamodule=PromptGroupDataModule(make_dataset(64), algorithm=cfg)
    )
    row = logged(tmp_path)[0]
    assert row.get("rewards/none_reward/mean", "") in ("", "nan")  # never scored: no mean, and no crash
    assert float(row["rewards/format_reward/mean"]) >= 0


def test_log_completions_writes_a_table(tiny_dir, tmp_path, capsys):
    module, data = module_and_data(tiny_dir, log_completions=True, num_completions_to_print=3)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    out = capsys.readouterr().out
    assert "completions at step 1" in out and "completions at step 2" in out  # one optimizer step per batch
    rows = [json.loads(line) for line in (tmp_path / "csv" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert {"prompt", "completion", "correctness_reward", "format_reward", "advantage"} <= set(rows[0])
