"""Mixture-of-experts models (tiny Qwen3-MoE and gpt-oss, loaded through from_pretrained) through every training
path: full fine-tuning, LoRA on the fused experts, QLoRA, gradient checkpointing, fused log-probs, DDP, resume and
export; the load-balancing loss against the model's own; gpt-oss's chat format and MXFP4 checkpoints."""

import json
import shutil

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, logged, loss_of, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

import lightning_gspo.policy_logprobs as logprobs_lib
from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.models import ModelConfig, load_causal_lm, load_preset, load_tokenizer
from lightning_gspo.module import GSPOModule
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.rollout import Rollout, prompt_text, sample_completions
from lightning_gspo.tasks.arithmetic import make_dataset
from lightning_gspo.tiny import build_tiny_moe

FAMILIES = ("qwen3_moe", "gpt_oss")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA = {
    "r": 4,
    "alpha": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "target_parameters": EXPERTS,
}
MODES = {
    "full": {},
    "lora": {"lora": LORA},
    "checkpointing": {"gradient_checkpointing": True},
    "qlora": {"lora": LORA, "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
}
COEF = 0.05


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """Each family's tiny model (2 layers, 4 experts, top-2), written once as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("moe")
    return {family: build_tiny_moe(root / family, family) for family in FAMILIES}


def moe_module(path, model: dict | None = None, **overrides) -> GSPOModule:
    return GSPOModule({"name_or_path": str(path), **(model or {})}, REWARDS, algo(**overrides))


def grouped_rollout(n: int = 8, group: int = 4, seed: int = 0, vocab: tuple[int, int] = (3, 18)) -> Rollout:
    """``n`` completions in groups of ``group`` sharing a left-padded prompt (of different lengths per group), with
    completions of varied lengths and some zero advantages."""
    g = torch.Generator().manual_seed(seed)
    p, c = 6, 5
    prompt_ids = torch.zeros(n, p, dtype=torch.long)
    prompt_mask = torch.zeros(n, p, dtype=torch.long)
    for start in range(0, n, group):
        length = int(torch.randint(3, p + 1, (1,), generator=g))
        prompt_ids[start : start + group, p - length :] = torch.randint(*vocab, (length,), generator=g)
        prompt_mask[start : start + group, p - length :] = 1
    completion_ids = torch.randint(*vocab, (n, c), generator=g)
    mask = torch.arange(c).unsqueeze(0) < torch.randint(1, c + 1, (n,), generator=g).unsqueeze(1)
    r = Rollout(prompt_ids, prompt_mask, completion_ids, mask, mask.all(1))
    r.advantages = torch.randn(n, generator=g)
    r.advantages[[1, 6]] = 0.0
    r.num_items = mask.sum().float()
    return r


def models_own_aux_loss(model, r: Rollout) -> torch.Tensor:
    """The causal LM's own load-balancing loss for the rollout's whole sequences, as its forward returns it."""
    inputs = r.model_inputs()
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, position_ids=position_ids, output_router_logits=True).aux_loss


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the tiny models ----


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_moe_models_have_their_familys_shape_and_load_by_name(moe_dirs, tmp_path, family):
    prefix = {"qwen3_moe": "tiny-moe:", "gpt_oss": "tiny-gpt-oss:"}[family]
    cfg = ModelConfig(name_or_path=prefix + "digits", tiny_dir=str(tmp_path))
    model, tok = load_causal_lm(cfg), load_tokenizer(cfg)
    assert model.config.model_type == family and model.config.num_experts_per_tok == 2
    assert hasattr(model.config, "output_router_logits") and model.config.router_aux_loss_coef == 0.001
    fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert len(fused) == 2 * 2 and all(p.shape[0] == 4 for p in fused.values())  # 2 layers x (gate_up, down)
    assert (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    )  # untied, as theirs
    assert tok.decode(tok("3+4=")["input_ids"]) == "3+4="
    written = (tmp_path / f"{family}-digits" / "model.safetensors").stat().st_mtime_ns
    load_causal_lm(cfg)  # same settings: the directory is reused, not rewritten
    assert (tmp_path / f"{family}-digits" / "model.safetensors").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="tiny-moe:digits, tiny-moe:ascii"):
        ModelConfig(name_or_path="tiny-moe:greek")


def test_gpt_oss_renders_harmony_with_the_reasoning_effort(moe_dirs):
    tok = load_tokenizer(ModelConfig(name_or_path=str(moe_dirs["gpt_oss"])))
    chat = [{"role": "system", "content": "12"}, {"role": "user", "content": "3+4="}]
    low = prompt_text(chat, tok, {"reasoning_effort": "low"})
    assert low == (
        "<|start|>system<|message|>Reasoning: low<|end|><|start|>developer<|message|>12<|end|>"
        "<|start|>user<|message|>3+4=<|end|><|start|>assistant"
    )
    assert "Reasoning: medium" in prompt_text(chat, tok)  # gpt-oss's default effort
    ids = tok(low, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("Reasoning: low") in ids and tok.eos_token == "<|return|>"
    answer = tok.convert_tokens_to_ids(["<|channel|>", "final", "<|message|>"]) + tok("7")["input_ids"]
    assert tok.decode(answer, skip_special_tokens=True) == "7"  # markers leave the completion text

    # The config carries it to sampling; TRL's command line gives it as a JSON string.
    cfg = GSPOConfig(chat_template_kwargs='{"reasoning_effort": "high"}', num_generations=2)
    kwargs = cfg.chat_template_kwargs
    module = moe_module(
        moe_dirs["gpt_oss"], num_generations=2, chat_template_kwargs=kwargs, max_prompt_length=64
    )
    records = [{"prompt": chat}]
    r = sample_completions(module.policy, tok, records, module.config, module.sampler.engine, module.eos)
    assert tok.convert_tokens_to_ids("Reasoning: high") in r.prompt_ids[0].tolist()


# ---- every training path ----


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_training_mode_trains_and_logs_the_aux_loss(moe_dirs, tmp_path, family, mode):
    L.seed_everything(0)
    cfg = algo(router_aux_loss_coef=COEF, learning_rate=1e-2)
    module = GSPOModule({"name_or_path": str(moe_dirs[family]), **MODES[mode]}, REWARDS, cfg)
    if mode == "qlora":
        import bitsandbytes as bnb

        quantized = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == 2 * 4  # the attention projections; the fused experts stay unquantised
    trained = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    data = PromptGroupDataModule(make_dataset(32, seed=3), algorithm=cfg)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    now = dict(module.policy.named_parameters())
    moved = {n for n, before in trained.items() if not torch.equal(before, now[n])}
    experts = {n for n in trained if "experts" in n or "router" in n or "mlp.gate" in n}
    assert experts and experts <= moved  # every expert (or expert adapter) and router weight trained
    rows = [r for r in logged(tmp_path) if r.get("aux_loss")]
    assert len(rows) == 2 and all(1.9 < float(r["aux_loss"]) < 2.5 for r in rows)  # top-2: ~2 when balanced


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_aux_loss_and_gradients(moe_dirs, family):
    r = grouped_rollout()
    out = []
    for checkpointing in (False, True):
        module = moe_module(
            moe_dirs[family], {"gradient_checkpointing": checkpointing}, router_aux_loss_coef=COEF
        )
        module.policy.zero_grad()
        loss, metrics = loss_of(module, r)
        loss.backward()
        out.append((loss.detach(), metrics["aux_loss"], grads(module.policy)))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = out
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert aux_b == pytest.approx(aux_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("router" in k or "gate.weight" in k for k in grads_a)
    for name, value in grads_a.items():
        torch.testing.assert_close(grads_b[name], value, rtol=1e-4, atol=1e-7, msg=name)


# ---- the load-balancing loss ----


@pytest.mark.parametrize(
    "family, impl, loss_type",
    [
        ("qwen3_moe", "fused", "grpo"),
        ("qwen3_moe", "fused", "dapo"),
        ("qwen3_moe", "materialized", "grpo"),
        ("gpt_oss", "fused", "grpo"),
        ("gpt_oss", "materialized", "dapo"),
    ],
)
def test_the_added_term_is_the_models_own_aux_loss_times_the_coefficient(
    moe_dirs, monkeypatch, family, impl, loss_type
):
    # With the shared-prompt forward allowed wherever it works (Qwen3-MoE: each prompt once). Float32: the log-probs
    # are float32 by contract; the token set is checked in float64 below.
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)
    module = moe_module(moe_dirs[family], router_aux_loss_coef=COEF, logprobs_impl=impl, loss_type=loss_type)
    r = grouped_rollout()
    ga = module.config.gradient_accumulation_steps
    assert ga == 2 and module.router_aux_coef == COEF

    def loss_and_grads(coef: float):
        module.router_aux_coef = coef
        module.policy.zero_grad()
        loss, metrics = loss_of(module, r)
        loss.backward()
        return loss.detach(), metrics, grads(module.policy)

    with_aux, metrics, g_aux = loss_and_grads(COEF)
    without, metrics0, g0 = loss_and_grads(0.0)
    module.policy.zero_grad()
    own = models_own_aux_loss(module.policy, r)
    own.backward()
    g_own = grads(module.policy)
    assert 1.5 < float(own) < 3 and "aux_loss" not in metrics0
    torch.testing.assert_close(with_aux - without, COEF * own.detach() / ga, rtol=1e-5, atol=1e-7)
    assert metrics["aux_loss"] == pytest.approx(float(own), rel=1e-6)
    router = [n for n in g_own if "router" in n or "gate.weight" in n]
    assert router and all(g_own[n].abs().max() > 0 for n in router)
    for name, value in g_aux.items():
        expected = g0.get(name, torch.zeros_like(value)) + COEF / ga * g_own.get(
            name, torch.zeros_like(value)
        )
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("family, shared", [("qwen3_moe", False), ("qwen3_moe", True), ("gpt_oss", False)])
def test_the_router_logits_are_those_of_the_models_own_forward_in_float64(
    moe_dirs, monkeypatch, family, shared
):
    """The backbone's router logits (every attended token, the last included; with the shared-prompt forward,
    gathered back per completion) give exactly the load-balancing loss of the causal LM's own forward."""
    from lightning_gspo.router_aux import load_balancing_loss

    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    model = load_causal_lm(
        ModelConfig(name_or_path=str(moe_dirs[family]), experts_implementation="eager")
    ).double()
    r = grouped_rollout()
    inputs = r.model_inputs()
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    calls = []
    real = logprobs_lib._shared_prompt_hidden
    monkeypatch.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: calls.append(real(*a)) or calls[-1])
    out = logprobs_lib._completion_hidden(
        model, inputs["input_ids"], inputs["attention_mask"], position_ids, 5, {}, True
    )
    assert (calls[0] is not None) == shared and out.hidden.dtype == torch.float64
    assert all(
        layer.shape == (8 * 11, 4) for layer in out.router_logits
    )  # 8 rows x (6 + 5) positions, 4 experts
    ours = load_balancing_loss(model, out.router_logits, inputs["attention_mask"])
    torch.testing.assert_close(ours, models_own_aux_loss(model, r), rtol=1e-12, atol=0)
    without_last = load_balancing_loss(model, tuple(x.view(8, 11, 4)[:, :-1].flatten(0, 1) for x in out.router_logits),
                                       inputs["attention_mask"][:, :-1])  # fmt: skip
    assert (
        abs(float(without_last - ours)) > 1e-6
    )  # the last token's routing counts: leaving it out would show


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_coefficient_adds_nothing_and_asks_for_no_router_logits(moe_dirs, monkeypatch, family):
    module = moe_module(moe_dirs[family], router_aux_loss_coef=0.0, beta=0.0)
    assert module.router_aux_coef == 0.0
    lm = module.policy
    seen = []
    backbone = lm.model
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    r = grouped_rollout()
    lm.zero_grad()
    loss, metrics = loss_of(module, r)
    loss.backward()
    ours = grads(lm)
    assert seen and not any(kw.get("output_router_logits") for kw in seen) and "aux_loss" not in metrics

    # The same step written without the feature: log-probs of the rows with an advantage (the zero-advantage
    # rows are left out, as they are for a dense model), the micro-batch loss of those.
    from lightning_gspo.loss import micro_batch_loss

    def plain(s):
        layout = module.config.logprobs_layout  # the same rows through the same calls
        return per_token_logps(
            lm, s.model_inputs(), s.completion_mask, 1.0, "fused", compute_entropy=True, layout=layout
        )

    lm.zero_grad()
    loss_plain, _ = micro_batch_loss(r, module.config, plain)
    loss_plain.backward()
    assert torch.equal(loss.detach(), loss_plain.detach())
    for name, value in grads(lm).items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logprobs_equal_the_materialised_ones(moe_dirs, monkeypatch, family):
    """And the shared-prompt forward (each prompt once) equals the per-completion one, log-probs, load-balancing
    loss and gradients, where the model's cache allows it (Qwen3-MoE; gpt-oss's sliding-window layers do not)."""
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)
    model = load_causal_lm(ModelConfig(name_or_path=str(moe_dirs[family])))
    r = grouped_rollout()
    inputs, mask = r.model_inputs(), r.completion_mask
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    calls = []
    real = logprobs_lib._shared_prompt_hidden
    monkeypatch.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: calls.append(real(*a)) or calls[-1])

    def run(impl: str, share: bool = True):
        model.zero_grad()
        with monkeypatch.context() as m:
            if not share:
                m.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: None)
            logps, ent, aux = per_token_logps(
                model, inputs, mask, 0.7, impl, compute_entropy=True, return_aux_loss=True
            )
        ((logps * weight).sum() + aux).backward()
        return logps.detach(), ent, aux.detach(), grads(model)

    fused, materialized, whole = run("fused"), run("materialized"), run("fused", share=False)
    shared = calls[0] is not None
    assert shared == (family == "qwen3_moe")
    assert float(fused[2]) == pytest.approx(float(models_own_aux_loss(model, r)), rel=1e-5)
    for other in (materialized, whole):
        torch.testing.assert_close(fused[0], other[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[1], other[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[2], other[2], rtol=1e-5, atol=1e-6)
        for name, value in other[3].items():
            torch.testing.assert_close(
                fused[3][name], value, rtol=1e-4, atol=2e-5, msg=name
            )  # sums of ~100 terms
    without_aux, _ = per_token_logps(model, inputs, mask, 0.7, "fused")
    torch.testing.assert_close(
        without_aux, fused[0], rtol=1e-5, atol=1e-6
    )  # the last token's routing changes nothing


# ---- DDP, resume, export ----


def _ddp_worker(rank, world, port, path, rollout_path, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module = moe_module(path, router_aux_loss_coef=COEF, gradient_accumulation_steps=1, num_iterations=2)
        r = torch.load(rollout_path, weights_only=False)
        size = r.completion_ids.shape[0] // world
        module.policy.zero_grad()
        loss_of(module, r.micro_batch(rank, size), world_size=world)[0].backward()
        grad = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
        dist.all_reduce(grad)  # what DDP does to gradients: the mean over ranks
        if rank == 0:
            torch.save(grad / world, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_gradient_equals_one_process_on_the_same_rollout(moe_dirs, tmp_path):
    # The load-balancing loss is a per-micro-batch quantity (TRL's): two ranks of 8 rows each match one process
    # whose two micro-batches are those 8-row halves.
    path = moe_dirs["qwen3_moe"]
    single = moe_module(path, router_aux_loss_coef=COEF, gradient_accumulation_steps=2, num_iterations=2)
    r = grouped_rollout(16)
    with torch.no_grad():
        r.old_logps = single._logps(r, "old", entropy=False)[0] + 0.1  # off-policy: ratios away from 1
    single.policy.zero_grad()
    for i in range(2):
        loss_of(single, r.micro_batch(i, 8))[0].backward()
    expected = torch.cat([p.grad.flatten() for p in single.policy.parameters() if p.grad is not None])
    torch.save(r, tmp_path / "rollout.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, 29391, str(path), tmp_path / "rollout.pt", tmp_path / "grad.pt"),
                                nprocs=2)  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "grad.pt"), expected, rtol=1e-4, atol=1e-6)


def _run(path, out, max_steps, ckpt_path=None, every=None):
    L.seed_everything(7)
    cfg = algo(router_aux_loss_coef=COEF, num_iterations=2)
    module = GSPOModule({"name_or_path": str(path)}, REWARDS, cfg)
    data = PromptGroupDataModule(make_dataset(64, seed=3), algorithm=cfg)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    t = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged(out) if (
        out / "csv" / "metrics.csv"
    ).exists() else []  # none before a batch is used up


def test_resume_in_the_middle_of_a_generation_batch_reproduces_the_run(moe_dirs, tmp_path):
    path = moe_dirs["qwen3_moe"]
    full_module, full = _run(path, tmp_path / "full", max_steps=4)
    _run(path, tmp_path / "first", max_steps=1, every=1)  # one of the generation batch's two optimizer steps
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=1.ckpt")
    resumed_module, resumed = _run(path, tmp_path / "second", max_steps=4, ckpt_path=str(ckpt))
    after = [r for r in full if int(r["step"]) > 2]
    assert after and len(after) == len(resumed[-len(after) :])
    for a, b in zip(after, resumed[-len(after) :]):
        for key in ("reward", "loss", "aux_loss", "entropy", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_lora_trained_moe_loads_back_with_the_same_logprobs(moe_dirs, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_gspo.export import ExportCallback, main

    L.seed_everything(0)
    cfg = algo(router_aux_loss_coef=COEF, learning_rate=5e-2)
    module = GSPOModule({"name_or_path": str(moe_dirs[family]), "lora": LORA}, REWARDS, cfg)
    data = PromptGroupDataModule(make_dataset(32, seed=3), algorithm=cfg)
    callbacks = [ExportCallback(tmp_path / "export"), ModelCheckpoint(dirpath=tmp_path / "ckpt")]
    trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True).fit(
        module, datamodule=data
    )
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    main(
        ["--ckpt", str(ckpt), "--out", str(tmp_path / "from_ckpt"), "--merged"]
    )  # the adapters the checkpoint holds
    r = grouped_rollout()

    def logps(model):
        with torch.no_grad():
            return per_token_logps(model.eval(), r.model_inputs(), r.completion_mask, 1.0, "fused")[0]

    trained = logps(module.policy)
    base = AutoModelForCausalLM.from_pretrained(moe_dirs[family])
    assert (logps(base) - trained).abs().max() > 1e-3  # the adapters moved it
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(moe_dirs[family]), tmp_path / "export/adapter"
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export/merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logps(adapter), trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(logps(merged), trained, rtol=1e-5, atol=1e-5)
    from_ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt/merged")
    torch.testing.assert_close(logps(from_ckpt), trained, rtol=1e-5, atol=1e-5)


# ---- MXFP4 checkpoints ----

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of ``w`` (..., K) along its last dimension: per 32 values one power-of-two scale (E8M0, bias 127)
    that brings the largest into [4, 8), each value rounded to the nearest E2M1 number (clamped at 6); two
    4-bit codes per byte, the even element in the low nibble. Blocks (..., K/32, 16), scales (..., K/32)."""
    x = w.double().reshape(*w.shape[:-1], -1, 32)
    exponent = torch.floor(torch.log2(x.abs().amax(-1, keepdim=True).clamp(min=2.0**-126))) - 2
    y = (x / 2.0**exponent).clamp(-6, 6)
    code = ((y.abs().unsqueeze(-1) - FP4).abs().argmin(-1) + 8 * (y < 0)).to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), (exponent.squeeze(-1) + 127).to(torch.uint8)


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([blocks & 15, blocks >> 4], -1).flatten(-2).long()
    return (torch.cat([FP4, -FP4])[codes] * 2.0 ** (scales.double() - 127).unsqueeze(-1)).flatten(-2)


def write_mxfp4_copy(src, dst) -> dict[str, torch.Tensor]:
    """``src`` (a gpt-oss directory) rewritten as the hub's gpt-oss checkpoints are: the experts' weights as MXFP4
    blocks and scales along their input dimension, a quantization_config naming mxfp4. Returns each expert
    weight's dequantised value, computed here."""
    shutil.copytree(src, dst)
    state, out, expected = load_file(dst / "model.safetensors"), {}, {}
    for key, value in state.items():
        if key.endswith(tuple(EXPERTS)):
            blocks, scales = to_mxfp4(value.transpose(1, 2))
            out[key + "_blocks"], out[key + "_scales"] = blocks, scales
            expected[key] = from_mxfp4(blocks, scales).transpose(1, 2)
        else:
            out[key] = value
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    keep = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": keep}
    (dst / "config.json").write_text(json.dumps(config))
    return expected


def test_an_mxfp4_checkpoint_is_dequantised_and_trains(moe_dirs, tmp_path):
    expected = write_mxfp4_copy(moe_dirs["gpt_oss"], tmp_path / "mxfp4")
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "mxfp4")))
    state = dict(model.named_parameters())
    original = load_file(moe_dirs["gpt_oss"] / "model.safetensors")
    for key, value in expected.items():
        assert state[key].dtype == torch.float32 and state[key].requires_grad
        torch.testing.assert_close(state[key].double(), value, rtol=0, atol=0)  # exactly the MXFP4 values
        assert (value - original[key].double()).abs().max() < 0.25 * original[
            key
        ].abs().max()  # ~FP4 rounding
    r = grouped_rollout()
    logps, _, aux = per_token_logps(
        model, r.model_inputs(), r.completion_mask, 1.0, "fused", return_aux_loss=True
    )
    (logps.sum() + aux).backward()
    assert all(state[key].grad.abs().max() > 0 for key in expected)

    with pytest.raises(
        ValueError, match=r"dequantize_mxfp4=false keeps the experts in MXFP4, which cannot be trained"
    ):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "mxfp4"), dequantize_mxfp4=False))
    with pytest.raises(ValueError, match="MXFP4 checkpoint, which bitsandbytes cannot re-quantise"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "mxfp4"), lora=LORA, load_in_4bit=True))


# ---- presets and bad input ----


def test_the_moe_presets_load_and_name_their_experts():
    for name in ("tiny-moe", "tiny-gpt-oss", "gpt-oss-20b", "qwen3-30b-a3b"):
        full, lora = load_preset(name), load_preset(name + "-lora")
        assert full.lora is None and lora.lora.target_parameters == EXPERTS and lora.lora.dropout == 0
        assert full.name_or_path == lora.name_or_path and full.dequantize_mxfp4
    assert load_preset("gpt-oss-20b").name_or_path == "openai/gpt-oss-20b"
    assert load_preset("qwen3-30b-a3b").name_or_path == "Qwen/Qwen3-30B-A3B"


def test_bad_input_is_named_at_start_up(moe_dirs, tiny_dir):
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=-0.1 must be >= 0"):
        GSPOConfig(router_aux_loss_coef=-0.1)
    with pytest.raises(
        ValueError, match=r"algorithm.router_aux_loss_coef=0.01 but Qwen2ForCausalLM is not a mixture"
    ):
        moe_module(tiny_dir, router_aux_loss_coef=0.01)
    assert moe_module(tiny_dir, router_aux_loss_coef=0.0).router_aux_coef == 0.0  # TRL: 0 is fine anywhere
    assert moe_module(tiny_dir).router_aux_coef == 0.0  # None on a dense model: nothing to weight
    assert moe_module(moe_dirs["gpt_oss"]).router_aux_coef == 0.001  # None: the model config's own
    with pytest.raises(
        ValueError,
        match=r"target_parameters: \['mlp.experts.up_proj'\] match no parameter .* "
        r"Its fused expert parameters are mlp.experts.down_proj, mlp.experts.gate_up_proj",
    ):
        moe_module(moe_dirs["qwen3_moe"], {"lora": {**LORA, "target_parameters": ["mlp.experts.up_proj"]}})
    with pytest.raises(
        ValueError, match=r"\['up_proj'\] match no module .* name them in model.lora.target_parameters"
    ):
        moe_module(moe_dirs["gpt_oss"], {"lora": {**LORA, "target_modules": ["q_proj", "up_proj"]}})
    with pytest.raises(ValueError, match=r"model.lora.dropout=0.1 with model.lora.target_parameters"):
        ModelConfig(lora={**LORA, "dropout": 0.1})
    with pytest.raises(ValueError, match="chat_template_kwargs=.* must be a mapping"):
        GSPOConfig(chat_template_kwargs=["reasoning_effort"])
    with pytest.raises(ValueError, match="chat_template_kwargs='low' is not a JSON object"):
        GSPOConfig(chat_template_kwargs="low")
