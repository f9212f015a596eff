"""Routing drift and replay on tiny mixture-of-experts policies (Qwen3-MoE and gpt-oss), saved and loaded as
Hugging Face directories: the recorded experts come back in replay, the flip rate matches a recount by hand,
replay survives gradient checkpointing and the shared-prompt forward, and a run with replay trains and resumes
exactly."""

import importlib
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import REWARDS, algo, logged, module_and_data, trainer

import lightning_gspo.policy_logprobs as policy_logprobs
from lightning_gspo.module import GSPOModule
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.rollout import Rollout
from lightning_gspo.routing import (
    ROUTERS,
    RoutingTracer,
    UnsupportedRouterError,
    find_routers,
    routing_tracer,
)
from lightning_gspo.tiny import build_char_tokenizer

FAMILIES = ("qwen3_moe", "gpt_oss")


def _build_moe(path, family: str):
    """A 2-layer, 32-wide model with 8 experts, top-2, on the digits vocabulary, written with save_pretrained."""
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = build_char_tokenizer("digits")
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        num_experts_per_tok=2,
    )
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=8, **common)
        cls = Qwen3MoeForCausalLM
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        config = GptOssConfig(
            intermediate_size=32, num_local_experts=8, sliding_window=16, rope_parameters=rope, **common
        )
        cls = GptOssForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
        for name, p in model.named_parameters():  # decisive routers, so a small update flips some choices
            if name.endswith(("gate.weight", "router.weight")):
                p.data.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {f: _build_moe(tmp_path_factory.mktemp(f) / "model", f) for f in FAMILIES}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def _batch(groups: int = 2, size: int = 4, seed: int = 0):
    """Left-padded prompts (each repeated ``size`` times, as a rollout holds them) and right-padded completions
    of different lengths: model inputs and the completion mask."""
    g = torch.Generator().manual_seed(seed)
    p, c, b = 6, 5, groups * size
    prompt_ids = torch.randint(3, 17, (groups, p), generator=g).repeat_interleave(size, 0)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[:size, :2] = 0  # the first group's prompt is shorter
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, 17, (b, c), generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 3])[:b]
    cmask = torch.arange(c)[None] < lengths[:, None]
    completion_ids[~cmask] = 0
    inputs = {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": torch.cat([prompt_mask, cmask.long()], 1),
    }
    return inputs, cmask


def _perturb_routers(model, scale: float = 0.3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in find_routers(model)[0]:
            router.weight.add_(torch.randn(router.weight.shape, generator=g) * scale)


def _experts_used(model):
    """Capture the expert indices each MoE block's experts module receives, in call order."""
    used, handles = [], []
    for _, router in find_routers(model)[0]:
        block = next(m for m in model.modules() if router in m.children())
        handles.append(block.experts.register_forward_pre_hook(lambda m, a: used.append(a[1].clone())))
    return used, handles


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the weights each router family gives its experts ----
@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("norm", [True, False])
def test_replay_weights_are_the_routers_own_at_its_own_choice(name, norm):
    folder, weights_fn = ROUTERS[name]
    module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    config = SimpleNamespace(
        hidden_size=16, num_experts=8, num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2,
        norm_topk_prob=norm, routed_scaling_factor=2.5, n_group=2, topk_group=1, topk_method="greedy",
    )  # fmt: skip
    router = getattr(module, name)(config)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
    hidden = torch.randn(5, 16, dtype=torch.float64).to(router.weight.dtype)
    logits, scores, experts = router(hidden)
    torch.testing.assert_close(weights_fn(router, logits, experts), scores, rtol=0, atol=0)


# ---- replay reproduces the recording ----
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_replay_with_unchanged_weights_changes_nothing(moe_dirs, family, impl):
    model = _load(moe_dirs[family])
    tracer = routing_tracer(model, replay=True)
    inputs, cmask = _batch()
    plain = per_token_logps(model, inputs, cmask, 0.7, impl)[0]
    plain.sum().backward()
    plain_grads = _grads(model)
    model.zero_grad()
    routes = tracer.empty_routes(inputs["attention_mask"])
    with torch.no_grad(), tracer.session("record", routes):
        recorded = per_token_logps(model, inputs, cmask, 0.7, impl)[0]
    real = inputs["attention_mask"][:, :-1].sum(1)  # every forwarded real token was recorded, nothing else
    assert ((routes >= 0).all(-1).all(-1).sum(1) == real).all()
    used, _ = _experts_used(model)
    with tracer.session("replay", routes) as s:
        replayed = per_token_logps(model, inputs, cmask, 0.7, impl)[0]
    assert s.flip_rate.item() == 0
    torch.testing.assert_close(replayed, plain, rtol=0, atol=0)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    replayed.sum().backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=0, msg=name)
    assert any("gate" in n or "router" in n for n in plain_grads)  # the router is trained
    # The experts actually used are the recorded ones, token for token.
    keep = inputs["attention_mask"][:, :-1].bool()
    for layer, experts in enumerate(used):
        mine = experts.view(*keep.shape, -1)[keep].sort(-1).values
        assert torch.equal(mine, routes[..., layer, :][routes[..., layer, 0] >= 0].long().sort(-1).values)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_forces_the_recorded_experts_after_the_router_moves(moe_dirs, family):
    model = _load(moe_dirs[family])
    tracer = routing_tracer(model, replay=True)
    inputs, cmask = _batch()
    routes = tracer.empty_routes(inputs["attention_mask"])
    with torch.no_grad(), tracer.session("record", routes):
        per_token_logps(model, inputs, cmask, 1.0)
    _perturb_routers(model)
    used, _ = _experts_used(model)
    with tracer.session("replay", routes) as s:
        per_token_logps(model, inputs, cmask, 1.0)[0].sum().backward()
    assert s.router_flip_rate > 0 and s.flip_rate.item() == 0  # the router would have chosen differently...
    keep = inputs["attention_mask"][:, :-1].bool()
    for layer, experts in enumerate(used):  # ...but the recorded experts ran
        mine = experts.view(*keep.shape, -1)[keep].sort(-1).values
        assert torch.equal(mine, routes[..., layer, :][routes[..., layer, 0] >= 0].long().sort(-1).values)


# ---- the flip rate, recounted by hand ----
def _router_topk_by_hand(model, inputs):
    """Each router's top-k set (B, T, k) per layer from its logits, in a forward with no session."""
    sets, handles = [], []
    for _, router in find_routers(model)[0]:
        handles.append(
            router.register_forward_hook(lambda m, a, out: sets.append(out[0].topk(m.top_k).indices))
        )
    with torch.no_grad():
        per_token_logps(model, inputs, inputs["attention_mask"][:, -5:].bool(), 1.0)
    for h in handles:
        h.remove()
    b, t = inputs["input_ids"].shape
    return [s.view(b, t - 1, -1).sort(-1).values for s in sets]


@pytest.mark.parametrize("family", FAMILIES)
def test_logged_flip_rate_is_a_recount_by_hand(moe_dirs, family):
    tok = build_char_tokenizer("digits")
    # No load-balancing term: the passes forward the last token only for it, and the recount leaves it out.
    cfg = algo(num_iterations=2, router_aux_loss_coef=0.0)
    module = GSPOModule(_load(moe_dirs[family]), REWARDS, cfg, tokenizer=tok)
    inputs, cmask = _batch()
    p = inputs["input_ids"].shape[1] - cmask.shape[1]
    r = Rollout(
        inputs["input_ids"][:, :p], inputs["attention_mask"][:, :p], inputs["input_ids"][:, p:], cmask,
        torch.zeros(8, dtype=torch.bool), advantages=torch.ones(8),
    )  # fmt: skip
    r.routes = module.routing.empty_routes(inputs["attention_mask"])
    before = _router_topk_by_hand(module.policy, inputs)
    for i in range(2):  # the old pass, micro-batch by micro-batch, as _make_rollout runs it
        module._logps(r.micro_batch(i, 4), "old", entropy=False)
    _perturb_routers(module.policy, scale=0.1)
    after = _router_topk_by_hand(module.policy, inputs)
    keep = inputs["attention_mask"][:, :-1].bool()
    flipped = sum(int((a != b).any(-1)[keep].sum()) for a, b in zip(after, before))
    assert 0 < flipped < keep.sum() * len(before)
    rows = torch.tensor([1, 3, 5, 6])  # a later pass that computes some rows only, as _micro_loss does
    with module._routing(r, False, rows) as s:
        module._logps(r.rows(rows), "policy", entropy=False)
    expected = sum(int((a != b).any(-1)[rows][keep[rows]].sum()) for a, b in zip(after, before))
    assert s.flip_rate.item() == pytest.approx(expected / (int(keep[rows].sum()) * len(before)))
    assert s.router_flip_rate.item() == s.flip_rate.item()  # without replay the router's choice is used


# ---- replay through gradient checkpointing and the shared-prompt forward ----
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_survives_gradient_checkpointing(moe_dirs, family):
    inputs, cmask = _batch()
    results = []
    for checkpointing in (False, True):
        model = _load(moe_dirs[family])
        if checkpointing:
            model.activation_checkpointing_enable()
        tracer = routing_tracer(model, replay=True)
        routes = tracer.empty_routes(inputs["attention_mask"])
        with torch.no_grad(), tracer.session("record", routes):
            per_token_logps(model, inputs, cmask, 1.0)
        _perturb_routers(model)
        with tracer.session("replay", routes) as s:
            logps = per_token_logps(model, inputs, cmask, 1.0)[0]
        logps.sum().backward()
        assert s.router_flip_rate > 0 and s.flip_rate.item() == 0
        results.append((logps.detach(), _grads(model)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("record_shared", [True, False])
def test_replay_through_the_shared_prompt_forward(moe_dirs, monkeypatch, record_shared):
    inputs, cmask = _batch()
    model = _load(moe_dirs["qwen3_moe"])
    tracer = routing_tracer(model, replay=True)
    backbone_calls = []
    model.model.register_forward_pre_hook(lambda m, a: backbone_calls.append(1))

    def logps(shared: bool, **kw):
        monkeypatch.setattr(policy_logprobs, "SHARE_MIN_SAVED_POSITIONS", 0 if shared else 10**9)
        backbone_calls.clear()
        out = per_token_logps(model, inputs, cmask, 1.0, "fused")[0]
        assert len(backbone_calls) == (2 if shared else 1)
        return out

    routes = tracer.empty_routes(inputs["attention_mask"])
    with torch.no_grad(), tracer.session("record", routes):
        logps(record_shared)
    assert ((routes >= 0).all(-1).all(-1).sum(1) == inputs["attention_mask"][:, :-1].sum(1)).all()
    _perturb_routers(model)
    out = {}
    for shared in (True, False):
        with torch.no_grad(), tracer.session("replay", routes) as s:
            out[shared] = logps(shared)
        assert s.router_flip_rate > 0 and s.flip_rate.item() == 0
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)


# ---- training runs ----
def _run(path, out, max_steps, ckpt_path=None, every=None, **overrides):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(7)
    module, data = module_and_data(path, num_iterations=2, max_completion_length=3, **overrides)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    t = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged(out)


@pytest.mark.parametrize("family, beta", [("qwen3_moe", 0.04), ("gpt_oss", 0.0)])
def test_training_with_replay_logs_the_flip_rate_and_learns(moe_dirs, tmp_path, family, beta):
    start = {k: v.clone() for k, v in _load(moe_dirs[family]).state_dict().items()}
    module, rows = _run(moe_dirs[family], tmp_path, max_steps=4, routing_replay=True, beta=beta)
    if beta:  # the reference copy was made before the hooks: its routers run untouched
        assert all(not r._forward_hooks for _, r in find_routers(module.ref_model)[0])
        assert all(r["kl"] for r in rows if r.get("loss"))
    logged = [r for r in rows if r.get("routing/expert_flip_rate")]
    assert logged and all(float(r["routing/expert_flip_rate"]) == 0 for r in logged)  # replay: as recorded
    assert all(0 <= float(r["routing/router_flip_rate"]) <= 1 for r in logged)
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, start[k])]
    assert any("gate" in k or "router" in k for k in changed) and any("experts" in k for k in changed)


def test_resume_mid_generation_batch_replays_as_the_uninterrupted_run(moe_dirs, tmp_path):
    path, kw = moe_dirs["qwen3_moe"], dict(routing_replay=True)
    full_module, full = _run(path, tmp_path / "full", max_steps=6, **kw)
    _run(path, tmp_path / "first", max_steps=3, every=3, **kw)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=3.ckpt")
    resumed_module, resumed = _run(path, tmp_path / "second", max_steps=6, ckpt_path=str(ckpt), **kw)
    after = [r for r in full if int(r["step"]) > 4]
    assert after and len(after) == len(resumed[-len(after) :])
    for a, b in zip(after, resumed[-len(after) :]):
        for key in ("loss", "entropy", "clip_ratio/region_mean", "grad_norm", "routing/expert_flip_rate"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


# ---- errors and warnings ----
def test_replay_on_a_dense_model_is_refused_by_name(tiny_dir):
    with pytest.raises(UnsupportedRouterError, match=r"routing_replay=true.*Qwen2ForCausalLM.*dense"):
        GSPOModule({"name_or_path": str(tiny_dir)}, REWARDS, algo(num_iterations=2, routing_replay=True))


def test_an_unknown_router_class_is_named(moe_dirs):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    class FancyTopKRouter(Qwen3MoeTopKRouter):
        pass

    tok = build_char_tokenizer("digits")
    model = _load(moe_dirs["qwen3_moe"])
    for m in model.modules():
        if isinstance(m, Qwen3MoeTopKRouter):
            m.__class__ = FancyTopKRouter
    with pytest.raises(UnsupportedRouterError, match="FancyTopKRouter.*routing_replay=false"):
        GSPOModule(model, REWARDS, algo(num_iterations=2, routing_replay=True), tokenizer=tok)
    with pytest.warns(UserWarning, match="FancyTopKRouter.*expert_flip_rate is not logged"):
        module = GSPOModule(model, REWARDS, algo(num_iterations=2), tokenizer=tok)
    assert module.routing is None


def test_replay_on_policy_warns_and_a_non_boolean_is_refused():
    with pytest.warns(UserWarning, match="routing_replay=True does nothing on-policy"):
        algo(num_iterations=1, routing_replay=True)
    with pytest.raises(ValueError, match="routing_replay='yes'"):
        algo(num_iterations=2, routing_replay="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algo(num_iterations=2, routing_replay=True)


def test_routers_are_found_under_peft_and_replay_there(moe_dirs):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _load(moe_dirs["qwen3_moe"]), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    tracer = routing_tracer(model, replay=True)
    assert isinstance(tracer, RoutingTracer) and tracer.num_layers == 2
    inputs, cmask = _batch()
    plain = per_token_logps(model, inputs, cmask, 1.0)[0]
    routes = tracer.empty_routes(inputs["attention_mask"])
    with torch.no_grad(), tracer.session("record", routes):
        per_token_logps(model, inputs, cmask, 1.0)
    with tracer.session("replay", routes) as s:
        replayed = per_token_logps(model, inputs, cmask, 1.0)[0]
    assert s.flip_rate.item() == 0
    torch.testing.assert_close(replayed, plain, rtol=0, atol=0)
    assert json.dumps(tracer.names)  # qualified names, for messages
