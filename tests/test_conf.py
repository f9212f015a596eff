"""Every config option composes and instantiates; the CLI and DDP run end to end."""

import csv
import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from test_config import OBJECTIVE, UNSLOTH

from lightning_gspo.config import GSPOConfig
from lightning_gspo.models import ModelConfig
from lightning_gspo.rewards import resolve_reward_funcs
from lightning_gspo.train import build

CONF = files("lightning_gspo.conf")
GROUPS = {
    g: sorted(p.name[:-5] for p in CONF.joinpath(g).iterdir() if p.name.endswith(".yaml"))
    for g in ("algorithm", "model", "data", "reward", "trainer", "logger", "callbacks", "experiment")
}
ROOT = Path(__file__).resolve().parents[1]


def _compose(tmp_path, *overrides):
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.model.tiny_dir = str(tmp_path / "tiny")
    return cfg


def _option_params():
    for group, options in GROUPS.items():
        for option in options:
            if not (group == "algorithm" and option == "base"):
                yield pytest.param(group, option, id=f"{group}={option}")


@pytest.mark.parametrize("group, option", list(_option_params()))
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "files":
        prompts = tmp_path / "p.jsonl"
        rows = [{"prompt": f"{i}+1=", "answer": str((i + 1) % 10)} for i in range(64)]
        prompts.write_text("\n".join(json.dumps(r) for r in rows))
        overrides.append(f"data.source={prompts}")
    if (
        group == "data" and option == "mathvista"
    ):  # the hub's MathVista needs a network: local rows laid out as its
        from PIL import Image

        Image.new("RGB", (28, 28)).save(tmp_path / "p.png")
        rows = [
            {"question": f"{i}+1?", "answer": str(i + 1), "decoded_image": str(tmp_path / "p.png")}
            for i in range(64)
        ]
        (tmp_path / "mv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        overrides.append(f"data.source.path={tmp_path / 'mv.jsonl'}")
    cfg = _compose(tmp_path, *overrides)
    algo = GSPOConfig.from_dict(OmegaConf.to_container(cfg.algorithm, resolve=True))
    ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    resolve_reward_funcs(list(cfg.reward.funcs))
    dm = hydra.utils.instantiate(cfg.data, algorithm=algo)
    if group == "data":
        dm.setup("fit")
        assert len(next(iter(dm.train_dataloader())).records) == algo.prompts_per_rank(1)
    for cb in (cfg.callbacks or {}).values():
        hydra.utils.instantiate(cb)
    for lg in (cfg.logger or {}).values():
        if "Wandb" in lg._target_:
            pytest.importorskip("wandb")
        if "TensorBoard" in lg._target_:
            pytest.importorskip("tensorboard")
        hydra.utils.instantiate(lg)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if (
        trainer_cfg["accelerator"] == "gpu"
    ):  # compose-only on a machine without GPUs: check the strategy is known
        pytest.importorskip("torch").cuda.is_available() or trainer_cfg.update(accelerator="cpu", devices=1)
        trainer_cfg.pop("precision")
        if trainer_cfg.get("strategy") in ("ddp", "fsdp"):
            trainer_cfg["strategy"] = "auto"
    hydra.utils.instantiate(trainer_cfg, max_steps=1, logger=False)


def test_presets_select_the_algorithm(tmp_path):
    def algo(name):
        return GSPOConfig.from_dict(OmegaConf.to_container(_compose(tmp_path, f"algorithm={name}").algorithm))

    assert algo("gspo").importance_sampling_level == "sequence" and algo("gspo").epsilon == 3e-4
    assert algo("gspo_token").importance_sampling_level == "sequence_token"
    assert algo("grpo").importance_sampling_level == "token" and algo("grpo").loss_type == "grpo"
    assert algo("dr_grpo").loss_type == "dr_grpo" and algo("dr_grpo").scale_rewards == "none"
    assert algo("dapo").epsilon_high == 0.28 and algo("dapo").mask_truncated_completions
    assert algo("dapo").dynamic_sampling and not algo("gspo").dynamic_sampling
    assert algo("cispo").loss_type == "cispo" and algo("cispo").epsilon_high == 5.0
    assert algo("sapo").loss_type == "sapo" and algo("sapo").sapo_temperature_neg == 1.05
    for name in ("gspo", "grpo"):
        assert algo(name).num_iterations >= 2  # the demo is off-policy, where the two differ


def test_base_carries_trl_defaults_for_the_objective_fields():
    base = OmegaConf.to_container(OmegaConf.load(CONF.joinpath("algorithm", "base.yaml")))
    defaults = GSPOConfig()
    for key in set(OBJECTIVE) - {"loss_type"}:
        assert base[key] == getattr(defaults, key), key


def test_unsloth_experiment_reaches_the_module_unchanged(tmp_path):
    cfg = _compose(tmp_path, "experiment=unsloth_gspo", "logger=none", "callbacks=none")
    _, module, _ = build(cfg)
    expected = UNSLOTH  # the Unsloth GSPO notebook's GRPOConfig, as tests/test_config.py writes it
    for key, value in expected.items():
        assert getattr(module.config, key) == value, key


def test_cli_overrides_reach_the_config(tmp_path):
    cfg = _compose(tmp_path, "algorithm=grpo", "algorithm.epsilon_high=0.28", "algorithm.max_steps=100")
    algo = GSPOConfig.from_dict(OmegaConf.to_container(cfg.algorithm))
    assert (algo.loss_type, algo.epsilon_high, algo.max_steps) == ("grpo", 0.28, 100)


def test_unknown_key_and_bad_value_are_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="epsilon_hgh"):
        _compose(tmp_path, "algorithm.epsilon_hgh=0.3")
    with pytest.raises(ConfigCompositionException, match="algorithm/grpoo"):
        _compose(tmp_path, "algorithm=grpoo")
    cfg = _compose(tmp_path, "algorithm.loss_type=ppo", "logger=none", "callbacks=none")
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        build(cfg)


def _cli(tmp_path, *overrides, timeout=600):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "LIGHTNING_GSPO_CACHE": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "lightning_gspo.train",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f)), out


@pytest.mark.slow
def test_cli_runs_from_the_repository_root(tmp_path):
    rows, _ = _cli(
        tmp_path,
        "algorithm=dapo",
        "algorithm.max_steps=4",
        "algorithm.num_generations=4",
        "algorithm.per_device_train_batch_size=16",
        "model.tiny.num_hidden_layers=2",
        "algorithm.logging_steps=1",
    )
    assert [int(r["step"]) for r in rows if r.get("reward")] == [2, 4]
    assert [int(r["step"]) for r in rows if r.get("eval/reward")] == [0]  # the baseline before training
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_on_two_cpu_processes(tmp_path):
    rows, out = _cli(
        tmp_path,
        "trainer=ddp_sim",
        "algorithm.max_steps=2",
        "algorithm.num_generations=4",
        "algorithm.per_device_train_batch_size=8",
        "algorithm.loss_type=dapo",
        "algorithm.dynamic_sampling=true",
        "algorithm.dynamic_sampling_max_rounds=2",
        "model.tiny.num_hidden_layers=2",
        "callbacks=none",
    )
    trained = [r for r in rows if r.get("reward")]
    assert [int(r["step"]) for r in trained] == [2]
    assert float(trained[0]["grad_norm"]) > 0
    # Both ranks ran the refill rounds in step (the run would hang otherwise) and report them.
    assert 0 <= float(trained[0]["dynamic_sampling/rounds"]) <= 2
    (baseline,) = [r for r in rows if r.get("eval/reward")]  # evaluated on both ranks, reduced once
    assert int(baseline["step"]) == 0 and 0 <= float(baseline["eval/pass@1"]) <= 1


def test_a_chat_template_is_one_override_away(tmp_path):
    cfg = _compose(tmp_path, "model=smollm2-135m-instruct", "model.chat_template=chatml")
    assert ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)).chat_template == "chatml"
