import copy
import math
import types

import lightning as L
import pytest
import torch
from helpers import algo, logged, module_and_data, trainer

import lightning_gspo.module as module_lib
from lightning_gspo.module import GSPOModule
from lightning_gspo.rollout import Rollout

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
    rec = _Recorder(module_lib.policy_loss)
    monkeypatch.setattr(module_lib, "policy_loss", rec)
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
    rec = _Recorder(module_lib.policy_loss)
    monkeypatch.setattr(module_lib, "policy_loss", rec)
    module, data = module_and_data(tiny_dir, num_iterations=1)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert module.forward_counts == {"policy": 4, "old": 0, "ref": 0}
    assert rec.gaps == [None] * 4


def _attach(module: GSPOModule, world_size: int = 1, reduce=None):
    """A stand-in trainer for calling the loss directly: what micro_batch_loss reads, nothing more."""
    strategy = types.SimpleNamespace(reduce=reduce or (lambda x, reduce_op=None: x), world_size=world_size)
    module._trainer = types.SimpleNamespace(world_size=world_size, strategy=strategy, global_rank=0)
    module.spg = module.config.steps_per_generation_for(world_size)


def fixed_rollout(module: GSPOModule, n: int, seed: int = 0) -> Rollout:
    """A rollout with varied completion lengths, some truncation, off-policy old log-probs and a reference."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, 17, (n, 4), generator=g)
    completion_ids = torch.randint(2, 17, (n, 6), generator=g)
    lengths = torch.randint(1, 7, (n,), generator=g)
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    r = Rollout(prompt_ids, torch.ones_like(prompt_ids), completion_ids, mask, lengths == 6)
    r.advantages = torch.randn(n, generator=g)
    with torch.no_grad():
        _attach(module)
        current = module._logps(r, "old", entropy=False)[0]
    r.old_logps = current + 0.3 * torch.randn(
        current.shape, generator=g
    )  # off-policy: ratios around 1 +- 0.3
    r.ref_logps = current + 0.1 * torch.randn(current.shape, generator=g)
    r.num_items = mask.sum().float()
    return r


def _grad_over_micro_batches(module: GSPOModule, r: Rollout) -> torch.Tensor:
    module.policy.zero_grad()
    size = module.config.per_device_train_batch_size
    for i in range(r.completion_ids.shape[0] // size):
        loss, _ = module.micro_batch_loss(r.micro_batch(i, size))
        loss.backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_accumulated_gradient_equals_full_batch_gradient(tiny_dir, loss_type, level):
    common = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, num_iterations=2)
    full, _ = module_and_data(
        tiny_dir, per_device_train_batch_size=16, gradient_accumulation_steps=1, **common
    )
    accum, _ = module_and_data(
        tiny_dir, per_device_train_batch_size=4, gradient_accumulation_steps=4, **common
    )
    accum.policy.load_state_dict(full.policy.state_dict())
    for m in (full, accum):
        _attach(m)
    r = fixed_rollout(full, 16)
    g_full = _grad_over_micro_batches(full, r)
    g_accum = _grad_over_micro_batches(accum, r)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_accum, g_full, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank, world, port, tiny_dir, overrides, rollout_path, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module = GSPOModule({"name_or_path": tiny_dir}, ["lightning_gspo.rewards.arithmetic.format_reward"],
                            algo(**overrides))  # fmt: skip

        def reduce(x, reduce_op=None):
            dist.all_reduce(x)
            return x / world if reduce_op == "mean" else x

        _attach(module, world_size=world, reduce=reduce)
        r = torch.load(rollout_path, weights_only=False)
        size = r.completion_ids.shape[0] // world
        grad = _grad_over_micro_batches(module, r.micro_batch(rank, size))
        dist.all_reduce(grad)  # what DDP does to gradients: the mean over ranks
        if rank == 0:
            torch.save(grad / world, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_ddp_gradient_equals_single_process(tiny_dir, tmp_path, loss_type):
    overrides = dict(loss_type=loss_type, importance_sampling_level="sequence", num_iterations=2,
                     per_device_train_batch_size=8, gradient_accumulation_steps=1)  # fmt: skip
    single, _ = module_and_data(tiny_dir, **{**overrides, "per_device_train_batch_size": 16})
    _attach(single)
    r = fixed_rollout(single, 16)
    r.advantages[[1, 2, 9, 12, 13, 14]] = 0.0  # rows each rank leaves out (beta = 0)
    if loss_type == "bnpo":
        # bnpo normalises by each rank's own token count (TRL's definition), so ranks agree with one process
        # only when they hold equally many tokens: give both halves the same lengths.
        r.completion_mask[8:] = r.completion_mask[:8]
        r.num_items = r.completion_mask.sum().float()
    expected = _grad_over_micro_batches(single, r)
    torch.save(r, tmp_path / "rollout.pt")
    port = 29500 + (hash(loss_type) % 400)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny_dir), overrides, tmp_path / "rollout.pt",
                                                   tmp_path / "grad.pt"), nprocs=2)  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "grad.pt"), expected, rtol=1e-4, atol=1e-6)


def _fsdp_clip_worker(rank, world, port, tiny_dir, out_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module = GSPOModule(
            {"name_or_path": tiny_dir}, ["lightning_gspo.rewards.arithmetic.format_reward"], algo()
        )
        root = FSDP(module.policy, device_id=torch.device("cpu"), use_orig_params=True)
        _attach(module, world_size=world)
        module._trainer.strategy.model = root
        ids = torch.randint(2, 17, (4, 6), generator=torch.Generator().manual_seed(rank))
        root(input_ids=ids).logits.float().pow(2).mean().backward()

        def full_grad_norm():
            with FSDP.summon_full_params(root, with_grads=True):
                return torch.cat([p.grad.flatten() for p in root.parameters() if p.grad is not None]).norm()

        params = [p for p in root.parameters() if p.requires_grad]
        local = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        before = full_grad_norm()
        norm = module._clip_grad_norm(params, float(before) / 2)
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


def test_zero_advantage_micro_batch_is_skipped_at_beta_zero(tiny_dir):
    module, _ = module_and_data(tiny_dir)
    _attach(module)
    r = fixed_rollout(module, 8)
    r.advantages.zero_()
    loss, _ = module.micro_batch_loss(r)
    loss.backward()
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert all(g.abs().max() == 0 for g in grads)  # nothing to learn: what the training step skips


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_zero_advantage_rows_are_left_out_with_the_same_gradient_and_metrics(
    tiny_dir, monkeypatch, loss_type, level
):
    module, _ = module_and_data(tiny_dir, loss_type=loss_type, importance_sampling_level=level,
                                epsilon=0.1, epsilon_high=0.1)  # fmt: skip
    _attach(module)
    r = fixed_rollout(module, 8)
    r.advantages[[1, 2, 5]] = 0.0  # rows 1 (and others) carry tokens: they count in bnpo's normaliser
    r.num_items = r.completion_mask.sum().float()
    calls = []
    real_logps = module._logps
    monkeypatch.setattr(module, "_logps", lambda s, *a, **k: calls.append(s.completion_ids.shape[0])
                        or real_logps(s, *a, **k))  # fmt: skip

    def run(skip: bool):
        module.policy.zero_grad()
        with monkeypatch.context() as m:
            if not skip:
                m.setattr(module, "_scored_rows", lambda r: (None, 1.0))
            loss, metrics = module.micro_batch_loss(r)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
        return loss.detach(), metrics, grad

    loss_all, metrics_all, grad_all = run(skip=False)
    loss_kept, metrics_kept, grad_kept = run(skip=True)
    assert calls == [8, 5]
    assert grad_all.abs().max() > 0
    torch.testing.assert_close(grad_kept, grad_all, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss_kept, loss_all, rtol=1e-5, atol=1e-7)
    assert metrics_all["clip_ratio/region_mean"] > 0  # the metrics below are not trivially zero
    for key, value in metrics_all.items():
        if key != "entropy":  # the scored rows' entropy, by design
            assert math.isclose(metrics_kept[key], value, rel_tol=1e-5, abs_tol=1e-7) or (
                math.isnan(value) and math.isnan(metrics_kept[key])
            ), (key, metrics_kept[key], value)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_left_out_rows_count_as_unclipped_in_the_min_and_max(tiny_dir, monkeypatch, level):
    module, _ = module_and_data(tiny_dir, importance_sampling_level=level, epsilon=0.1)
    _attach(module)
    r = fixed_rollout(module, 8)
    r.old_logps = module._logps(r, "old", entropy=False)[0].detach() + 1.0  # every ratio e^-1: below 1 - eps
    r.advantages = -torch.ones(8)  # every computed row is clipped low, on every token
    r.advantages[[0, 3]] = 0.0
    _, kept = module.micro_batch_loss(r)
    monkeypatch.setattr(module, "_scored_rows", lambda r: (None, 1.0))
    _, full = module.micro_batch_loss(r)
    assert full["clip_ratio/low_min"] == 0 and kept["clip_ratio/low_min"] == 0
    assert full["clip_ratio/low_mean"] > 0.5
    assert math.isclose(kept["clip_ratio/low_mean"], full["clip_ratio/low_mean"], rel_tol=1e-6)


def test_all_zero_micro_batch_under_ddp_runs_one_row_with_zero_loss(tiny_dir, monkeypatch):
    module, _ = module_and_data(tiny_dir)
    _attach(module, world_size=2)
    r = fixed_rollout(module, 8)
    r.advantages.zero_()
    rows = []
    real_logps = module._logps
    monkeypatch.setattr(module, "_logps", lambda s, *a, **k: rows.append(s.completion_ids.shape[0])
                        or real_logps(s, *a, **k))  # fmt: skip
    loss, _ = module.micro_batch_loss(r)
    loss.backward()
    assert rows == [1] and loss.item() == 0
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)  # a backward ran, and moved nothing


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


def test_fused_and_materialized_log_probs_train_alike(tiny_dir, tmp_path):
    """One optimizer step from the same rollout gives the same parameters with either log-prob path."""
    params = {}
    for impl in ("materialized", "fused"):
        module, _ = module_and_data(
            tiny_dir, logprobs_impl=impl, num_iterations=2, temperature=0.7, beta=0.04
        )
        _attach(module)
        r = fixed_rollout(module, 16)
        # SGD, not Adam: Adam turns float noise on gradients that are zero in exact arithmetic (the key bias
        # cancels in the softmax) into full-size steps of random sign.
        opt = torch.optim.SGD(module.policy.parameters(), lr=1e-2)
        size = module.config.per_device_train_batch_size
        for i in range(2):
            loss, _ = module.micro_batch_loss(r.micro_batch(i, size))
            loss.backward()
        opt.step()
        params[impl] = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    start = module_and_data(tiny_dir)[0].policy.state_dict()
    moved = 0
    for k, v in params["materialized"].items():
        torch.testing.assert_close(params["fused"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved += not torch.equal(v, start[k])
    assert moved > 10  # the step did something, and did the same thing on both paths
