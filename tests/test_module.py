import copy
import math

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, logged, module_and_data, trainer

import lightning_gspo.loss as loss_lib
from lightning_gspo.module import GSPOModule
from lightning_gspo.optim import clip_grad_norm
from lightning_gspo.rollout import GenerationEngine

PRESETS = {
    "gspo": dict(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4),
    "gspo_token": dict(
        importance_sampling_level="sequence_token", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4
    ),
    "grpo": dict(importance_sampling_level="token", loss_type="grpo", beta=0.04),
    "dr_grpo": dict(importance_sampling_level="token", loss_type="dr_grpo", scale_rewards="none"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_each_algorithm_trains_and_logs(tiny_dir, tmp_path, preset):
    L.seed_everything(0)
    module, data = module_and_data(tiny_dir, num_iterations=2, **PRESETS[preset])
    before = copy.deepcopy(module.policy.state_dict())
    trainer(tmp_path, max_steps=4).fit(module, datamodule=data)
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)
    rows = logged(tmp_path)
    keys = {k for r in rows for k, v in r.items() if v}
    expected = {
        "loss", "reward", "reward_std", "rewards/correctness_reward/mean", "rewards/format_reward/mean",
        "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean",
        "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "learning_rate", "grad_norm",
    }  # fmt: skip
    assert expected <= keys, expected - keys
    assert ("kl" in keys) == (PRESETS[preset].get("beta", 0) > 0)
    assert [int(r["step"]) for r in rows] == [2, 4]  # one row per generation batch with logging_steps=1
    assert (module.ref_model is not None) == (preset == "grpo")


# TRL 1.16's other objectives and options, each with the metrics TRL logs for it.
OBJECTIVES = {
    "cispo": (dict(loss_type="cispo", epsilon_high=5.0), {"cispo_clip_ratio"}),
    "sapo": (dict(loss_type="sapo"), set()),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), {"clip_ratio/region_mean"}),
    "vespo": (dict(loss_type="vespo"), {"vespo/phi_seq_mean"}),
    "masks": (dict(top_entropy_quantile=0.2, off_policy_mask_threshold=0.0), {"clip_ratio/region_mean"}),
    "adaptive-entropy": (
        dict(use_adaptive_entropy=True, entropy_target=10.0, entropy_coef_delta=0.01),
        {"policy_loss", "entropy_coef", "clip_ratio/region_mean"},
    ),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_trains_and_logs_its_metrics(tiny_dir, tmp_path, name):
    overrides, metrics = OBJECTIVES[name]
    L.seed_everything(0)
    module, data = module_and_data(tiny_dir, num_iterations=2, **overrides)
    before = copy.deepcopy(module.policy.state_dict())
    trainer(tmp_path, max_steps=4).fit(module, datamodule=data)
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    keys = {k for r in logged(tmp_path) for k, v in r.items() if v}
    assert metrics | {"loss", "entropy", "grad_norm"} <= keys, metrics - keys
    assert not ({"cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss"} - metrics) & keys


class _Recorder:
    """Wraps policy_loss to record, per call, the largest |logp - old| (None when old is None)."""

    def __init__(self, real):
        self.real, self.gaps = real, []

    def __call__(self, logps, old, *args, **kwargs):
        self.gaps.append(None if old is None else (logps.detach() - old).abs().max().item())
        return self.real(logps, old, *args, **kwargs)


def test_off_policy_takes_old_logps_from_the_first_pass_and_second_pass_sees_ratio_not_one(
    tiny_dir, tmp_path, monkeypatch
):
    rec = _Recorder(loss_lib.policy_loss)
    monkeypatch.setattr(loss_lib, "policy_loss", rec)
    module, data = module_and_data(tiny_dir, num_iterations=2)
    trainer(tmp_path, max_steps=4).fit(module, datamodule=data)  # 2 generation batches x 2 passes x 2 micro
    # spg == gradient_accumulation_steps: the first pass runs before any update, so its log-probs are the old
    # ones and no separate no-grad pass runs.
    assert module.forward_counts == {"policy": 8, "old": 0, "ref": 0}
    first_pass, second_pass = rec.gaps[0:2] + rec.gaps[4:6], rec.gaps[2:4] + rec.gaps[6:8]
    assert first_pass == [None] * 4  # ratio exactly 1
    assert all(g > 1e-4 for g in second_pass)  # after an optimizer step it is not


def test_old_logps_from_the_first_pass_train_as_a_separate_pass_does(tiny_dir, tmp_path, monkeypatch):
    """The same run with old log-probs kept from the first pass and from TRL's separate no-grad pass ends with
    the same weights: the two are the same numbers."""
    weights = {}
    for separate in (False, True):
        if separate:
            monkeypatch.setattr(GSPOModule, "_first_pass_is_on_policy", lambda self: False)
        L.seed_everything(0)
        module, data = module_and_data(tiny_dir, num_iterations=2, beta=0.04)
        trainer(tmp_path / str(separate), max_steps=4).fit(module, datamodule=data)
        assert module.forward_counts["old"] == (4 if separate else 0)
        weights[separate] = module.policy.state_dict()
    start = module_and_data(tiny_dir)[0].policy.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in weights[False].items())
    for k, v in weights[True].items():
        torch.testing.assert_close(weights[False][k], v, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("case", ["more_micro_batches_than_accumulation", "dropout"])
def test_separate_old_pass_when_the_first_pass_is_not_on_policy(tiny_dir, tmp_path, case):
    if case == "dropout":
        module, data = module_and_data(tiny_dir, num_iterations=2, disable_dropout=False)
        module.policy.config.attention_dropout = 0.1
    else:  # 4 micro-batches per generation, an optimizer step after every 2: the first pass spans an update
        module, data = module_and_data(
            tiny_dir, num_iterations=1, steps_per_generation=4, gradient_accumulation_steps=2
        )
    assert module.config.is_off_policy
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert module.forward_counts["old"] > 0


def test_on_policy_does_no_extra_forward(tiny_dir, tmp_path, monkeypatch):
    rec = _Recorder(loss_lib.policy_loss)
    monkeypatch.setattr(loss_lib, "policy_loss", rec)
    module, data = module_and_data(tiny_dir, num_iterations=1)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert module.forward_counts == {"policy": 4, "old": 0, "ref": 0}
    assert rec.gaps == [None] * 4


def _fsdp_clip_worker(rank, world, port, tiny_dir, out_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module = GSPOModule(
            {"name_or_path": tiny_dir}, ["lightning_gspo.rewards.arithmetic.format_reward"], algo()
        )
        root = FSDP(module.policy, device_id=torch.device("cpu"), use_orig_params=True)
        ids = torch.randint(2, 17, (4, 6), generator=torch.Generator().manual_seed(rank))
        root(input_ids=ids).logits.float().pow(2).mean().backward()

        def full_grad_norm():
            with FSDP.summon_full_params(root, with_grads=True):
                return torch.cat([p.grad.flatten() for p in root.parameters() if p.grad is not None]).norm()

        params = [p for p in root.parameters() if p.requires_grad]
        local = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        before = full_grad_norm()
        norm = clip_grad_norm(params, float(before) / 2, root)
        after = full_grad_norm()
        if rank == 0:
            torch.save({"local": local, "before": before, "norm": norm, "after": after}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_fsdp_clips_by_the_norm_over_all_shards(tiny_dir, tmp_path):
    """Under FSDP each rank holds a shard of every gradient: the clip must use the norm over all shards."""
    torch.multiprocessing.spawn(_fsdp_clip_worker, args=(2, 29977, str(tiny_dir), tmp_path / "norms.pt"),
                                nprocs=2)  # fmt: skip
    r = torch.load(tmp_path / "norms.pt")
    assert not math.isclose(float(r["local"]), float(r["before"]), rel_tol=1e-3)  # a rank's own shard differs
    torch.testing.assert_close(r["norm"], r["before"], rtol=1e-5, atol=0)
    torch.testing.assert_close(r["after"], r["before"] / 2, rtol=1e-4, atol=0)


def test_learning_rate_schedule_follows_transformers(tiny_dir):
    from transformers import get_scheduler

    from lightning_gspo.optim import build_scheduler

    for kind in ("linear", "cosine", "constant_with_warmup"):
        cfg = algo(lr_scheduler_type=kind, warmup_ratio=0.1, learning_rate=1.0)
        p = [torch.nn.Parameter(torch.zeros(1))]
        ours = build_scheduler(cfg, torch.optim.SGD(p, lr=1.0), 50)
        theirs = get_scheduler(kind, torch.optim.SGD(p, lr=1.0), num_warmup_steps=5, num_training_steps=50)
        for _ in range(50):
            assert math.isclose(ours.get_last_lr()[0], theirs.get_last_lr()[0], abs_tol=1e-9)
            ours.step()
            theirs.step()


class _ScriptedEngine(GenerationEngine):
    """An engine that answers every prompt with the same completion: what a new engine has to provide."""

    def __init__(self, completion: list[int]):
        self.completion, self.calls = completion, []

    def generate(self, model, prompt_ids, prompt_mask, num_generations):
        self.calls.append((tuple(prompt_ids.shape), num_generations))
        return torch.tensor([self.completion] * (prompt_ids.shape[0] * num_generations))


def test_a_generation_engine_is_one_class_behind_the_sampling_seam(tiny_dir, tmp_path):
    module, data = module_and_data(tiny_dir, num_iterations=1)
    eos = module.tokenizer.eos_token_id
    digit = module.tokenizer.convert_tokens_to_ids("7")
    module.sampler.engine = engine = _ScriptedEngine([digit, eos, eos, eos])
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    # each distinct prompt once, with the group size: 8 completions per rank per generation batch x 2 steps
    assert engine.calls == [((4, engine.calls[0][0][1]), 4)] * 2
    rows = logged(tmp_path)
    assert float(rows[-1]["completions/mean_length"]) == 2  # "7" and its EOS, the rest masked
    assert float(rows[-1]["frac_reward_zero_std"]) == 1  # identical completions: nothing to learn


def test_checkpoint_carries_the_runs_settings(tiny_dir, tmp_path):
    module, data = module_and_data(tiny_dir, num_iterations=2)
    ckpt = tmp_path / "run.ckpt"
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    t.fit(module, datamodule=data)
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    assert saved["model"]["name_or_path"] == str(tiny_dir)
    assert saved["config"] == module.config.to_dict()
    assert saved["reward_funcs"] == REWARDS
    again = GSPOModule.load_from_checkpoint(ckpt)  # rebuilt from the checkpoint alone
    assert again.config == module.config
    for k, v in module.policy.state_dict().items():
        assert torch.equal(again.policy.state_dict()[k], v)
