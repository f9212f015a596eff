"""The micro-batch loss policy (``lightning_gspo.loss``), called directly with a tiny model's policy: accumulation,
DDP, zero-advantage rows left out, and the fused and materialised log-probs giving the same step."""

import math

import pytest
import torch
from helpers import algo, loss_of, module_and_data

from lightning_gspo.loss import scored_rows
from lightning_gspo.module import GSPOModule
from lightning_gspo.rollout import Rollout

ALL_ROWS = (None, 1.0)  # scored_rows' answer that computes every row


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
        current = module._logps(r, "old", entropy=False)[0]
    r.old_logps = current + 0.3 * torch.randn(
        current.shape, generator=g
    )  # off-policy: ratios around 1 +- 0.3
    r.ref_logps = current + 0.1 * torch.randn(current.shape, generator=g)
    r.num_items = mask.sum().float()
    return r


def _grad_over_micro_batches(module: GSPOModule, r: Rollout, world_size: int = 1) -> torch.Tensor:
    module.policy.zero_grad()
    size = module.config.per_device_train_batch_size
    for i in range(r.completion_ids.shape[0] // size):
        loss, _ = loss_of(module, r.micro_batch(i, size), world_size=world_size)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
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
        r = torch.load(rollout_path, weights_only=False)
        size = r.completion_ids.shape[0] // world
        grad = _grad_over_micro_batches(module, r.micro_batch(rank, size), world_size=world)
        dist.all_reduce(grad)  # what DDP does to gradients: the mean over ranks
        if rank == 0:
            torch.save(grad / world, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize(
    "loss_type,extra",
    [("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("dapo", {"top_entropy_quantile": 0.5})],
    ids=["grpo", "bnpo", "dr_grpo", "dapo", "dapo-top-entropy"],
)
def test_ddp_gradient_equals_single_process(tiny_dir, tmp_path, loss_type, extra):
    # With top_entropy_quantile the threshold is the quantile over both ranks' tokens, as in one process.
    overrides = dict(loss_type=loss_type, importance_sampling_level="sequence", num_iterations=2,
                     per_device_train_batch_size=8, gradient_accumulation_steps=1, **extra)  # fmt: skip
    single, _ = module_and_data(tiny_dir, **{**overrides, "per_device_train_batch_size": 16})
    r = fixed_rollout(single, 16)
    if extra:  # rank 0 gets the lower-entropy rows, so neither rank's own quantile is the pooled one
        with torch.no_grad():
            _, entropy = single._logps(r, "policy", entropy=True)
        m = r.completion_mask
        r = r.rows(((entropy * m).sum(1) / m.sum(1)).argsort())
    r.advantages[[1, 2, 9, 12, 13, 14]] = 0.0  # rows each rank leaves out (beta = 0)
    if loss_type == "bnpo":
        # bnpo normalises by each rank's own token count (TRL's definition), so ranks agree with one process
        # only when they hold equally many tokens: give both halves the same lengths.
        r.completion_mask[8:] = r.completion_mask[:8]
        r.num_items = r.completion_mask.sum().float()
    expected = _grad_over_micro_batches(single, r)
    torch.save(r, tmp_path / "rollout.pt")
    port = 29500 + (hash((loss_type, *extra)) % 400)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny_dir), overrides, tmp_path / "rollout.pt",
                                                   tmp_path / "grad.pt"), nprocs=2)  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "grad.pt"), expected, rtol=1e-4, atol=1e-6)


def test_zero_advantage_micro_batch_is_skipped_at_beta_zero(tiny_dir):
    module, _ = module_and_data(tiny_dir)
    r = fixed_rollout(module, 8)
    r.advantages.zero_()
    loss, _ = loss_of(module, r)
    loss.backward()
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert all(g.abs().max() == 0 for g in grads)  # nothing to learn: what the training step skips


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_zero_advantage_rows_are_left_out_with_the_same_gradient_and_metrics(
    tiny_dir, monkeypatch, loss_type, level
):
    eps_high = 0.85 if loss_type == "cispo" else 0.1  # cispo clips the ratio itself at epsilon_high
    module, _ = module_and_data(tiny_dir, loss_type=loss_type, importance_sampling_level=level,
                                epsilon=0.1, epsilon_high=eps_high)  # fmt: skip
    r = fixed_rollout(module, 8)
    r.advantages[[1, 2, 5]] = 0.0  # rows 1 (and others) carry tokens: they count in bnpo's normaliser
    r.num_items = r.completion_mask.sum().float()
    calls = []
    real_logps = module._logps
    monkeypatch.setattr(module, "_logps", lambda s, *a, **k: calls.append(s.completion_ids.shape[0])
                        or real_logps(s, *a, **k))  # fmt: skip

    def run(skip: bool):
        module.policy.zero_grad()
        loss, metrics = loss_of(module, r, rows=None if skip else ALL_ROWS)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
        return loss.detach(), metrics, grad

    loss_all, metrics_all, grad_all = run(skip=False)
    loss_kept, metrics_kept, grad_kept = run(skip=True)
    assert calls == [8, 5]
    assert grad_all.abs().max() > 0
    torch.testing.assert_close(grad_kept, grad_all, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss_kept, loss_all, rtol=1e-5, atol=1e-7)
    clipped = {"cispo": "cispo_clip_ratio", "sapo": None, "vespo": None}.get(
        loss_type, "clip_ratio/region_mean"
    )
    assert clipped is None or metrics_all[clipped] > 0  # the metrics below are not trivially zero
    for key, value in metrics_all.items():
        if key not in ("entropy", "vespo/phi_seq_mean"):  # the scored rows', by design
            assert math.isclose(metrics_kept[key], value, rel_tol=1e-5, abs_tol=1e-7) or (
                math.isnan(value) and math.isnan(metrics_kept[key])
            ), (key, metrics_kept[key], value)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_left_out_rows_count_as_unclipped_in_the_min_and_max(tiny_dir, level):
    module, _ = module_and_data(tiny_dir, importance_sampling_level=level, epsilon=0.1)
    r = fixed_rollout(module, 8)
    r.old_logps = module._logps(r, "old", entropy=False)[0].detach() + 1.0  # every ratio e^-1: below 1 - eps
    r.advantages = -torch.ones(8)  # every computed row is clipped low, on every token
    r.advantages[[0, 3]] = 0.0
    _, kept = loss_of(module, r)
    _, full = loss_of(module, r, rows=ALL_ROWS)
    assert full["clip_ratio/low_min"] == 0 and kept["clip_ratio/low_min"] == 0
    assert full["clip_ratio/low_mean"] > 0.5
    assert math.isclose(kept["clip_ratio/low_mean"], full["clip_ratio/low_mean"], rel_tol=1e-6)


@pytest.mark.parametrize(
    "overrides", [dict(entropy_coef=0.01), dict(use_adaptive_entropy=True), dict(top_entropy_quantile=0.5)]
)
def test_every_row_is_computed_when_the_entropy_matters(tiny_dir, overrides):
    # The bonus trains zero-advantage rows too, and the quantile is taken over the whole micro-batch's tokens.
    module, _ = module_and_data(tiny_dir, **overrides)
    r = fixed_rollout(module, 8)
    r.advantages[[1, 2]] = 0.0
    assert scored_rows(r, module.config) == ALL_ROWS
    assert scored_rows(r, module_and_data(tiny_dir)[0].config)[0].tolist() == [0, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_entropy_bonus_trains_through_either_log_prob_path(tiny_dir, quantile):
    """The bonus's gradient reaches the weights alike through the fused kernel's entropy and the materialised
    logits', and it changes the step."""
    grads = {}
    for impl, coef in (("materialized", 0.5), ("fused", 0.5), ("fused", 0.0)):
        module, _ = module_and_data(
            tiny_dir, logprobs_impl=impl, num_iterations=2, temperature=0.7, entropy_coef=coef,
            top_entropy_quantile=quantile,
        )  # fmt: skip
        r = fixed_rollout(module, 8)
        module.policy.zero_grad()
        loss, metrics = loss_of(module, r)
        loss.backward()
        grads[impl, coef] = torch.cat(
            [p.grad.flatten() for p in module.policy.parameters() if p.grad is not None]
        )
        assert ("policy_loss" in metrics) == (coef != 0)
    torch.testing.assert_close(grads["fused", 0.5], grads["materialized", 0.5], rtol=1e-4, atol=1e-6)
    assert (grads["fused", 0.5] - grads["fused", 0.0]).abs().max() > 1e-4


def test_all_zero_micro_batch_under_ddp_runs_one_row_with_zero_loss(tiny_dir, monkeypatch):
    module, _ = module_and_data(tiny_dir)
    r = fixed_rollout(module, 8)
    r.advantages.zero_()
    rows = []
    real_logps = module._logps
    monkeypatch.setattr(module, "_logps", lambda s, *a, **k: rows.append(s.completion_ids.shape[0])
                        or real_logps(s, *a, **k))  # fmt: skip
    loss, _ = loss_of(module, r, world_size=2)
    loss.backward()
    assert rows == [1] and loss.item() == 0
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)  # a backward ran, and moved nothing


def test_fused_and_materialized_log_probs_train_alike(tiny_dir, tmp_path):
    """One optimizer step from the same rollout gives the same parameters with either log-prob path."""
    params = {}
    for impl in ("materialized", "fused"):
        module, _ = module_and_data(
            tiny_dir, logprobs_impl=impl, num_iterations=2, temperature=0.7, beta=0.04
        )
        r = fixed_rollout(module, 16)
        # SGD, not Adam: Adam turns float noise on gradients that are zero in exact arithmetic (the key bias
        # cancels in the softmax) into full-size steps of random sign.
        opt = torch.optim.SGD(module.policy.parameters(), lr=1e-2)
        size = module.config.per_device_train_batch_size
        for i in range(2):
            loss, _ = loss_of(module, r.micro_batch(i, size))
            loss.backward()
        opt.step()
        params[impl] = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    start = module_and_data(tiny_dir)[0].policy.state_dict()
    moved = 0
    for k, v in params["materialized"].items():
        torch.testing.assert_close(params["fused"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved += not torch.equal(v, start[k])
    assert moved > 10  # the step did something, and did the same thing on both paths


@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_bfloat16_policy_gives_float32_logprobs_and_the_float32_loss_and_gradient(tiny_dir, impl):
    """A bf16 policy on the CPU: log-probs and ratios are float32 (the numeric contract), and the loss and the
    gradient agree with the float32 model's within bf16's rounding of the weights and activations."""
    from lightning_gspo.models import ModelConfig, load_causal_lm

    common = dict(logprobs_impl=impl, num_iterations=2, beta=0.04, importance_sampling_level="sequence",
                  epsilon=0.2, epsilon_high=0.2)  # fmt: skip
    full, _ = module_and_data(tiny_dir, **common)
    half, _ = module_and_data(tiny_dir, **common)
    half.policy = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), dtype="bfloat16")).train()
    assert next(half.policy.parameters()).dtype == torch.bfloat16
    r = fixed_rollout(full, 8)
    logps, _ = half._logps(r, "old", entropy=False)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, full._logps(r, "old", entropy=False)[0], rtol=0.05, atol=0.05)
    results = []
    for m in (full, half):
        m.policy.zero_grad()
        loss, metrics = loss_of(m, r)
        assert loss.dtype == torch.float32  # the ratio and the loss are computed in float32
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in m.policy.parameters() if p.grad is not None])
        results.append((loss.detach().float(), grad))
    (loss32, grad32), (loss16, grad16) = results
    torch.testing.assert_close(loss16, loss32, rtol=0.02, atol=2e-3)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert grad32.abs().max() > 0 and cosine > 0.99, float(cosine)
    assert (grad16.norm() / grad32.norm() - 1).abs() < 0.05
