"""Per-token log-probs (``lightning_gspo.policy_logprobs``): against a hand computation, the shared-prompt forward
and the tied-embedding gradient against the plain paths."""

import pytest
import torch

import lightning_gspo.policy_logprobs as logprobs_lib
from lightning_gspo.models import ModelConfig, load_causal_lm
from lightning_gspo.policy_logprobs import _prompt_runs, _shared_prompt_hidden, per_token_logps

EOS, PAD = 1, 0


def inputs(ids, attn):
    return {"input_ids": ids, "attention_mask": attn}


def test_logprobs_match_a_hand_computation(tiny_dir):
    # Independent reference: run the model on each full sequence without padding, take log_softmax of the
    # logits at the position before each completion token, divided by the temperature.
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir))).eval()
    prompts = [torch.tensor([5, 13, 6, 16]), torch.tensor([7, 16])]
    completions = [torch.tensor([4, 5, EOS]), torch.tensor([8, EOS, PAD])]
    width = 4
    ids = torch.stack(
        [torch.cat([torch.full((width - len(p),), PAD), p, c]) for p, c in zip(prompts, completions)]
    )
    attn = torch.stack(
        [torch.cat([torch.zeros(width - len(p)), torch.ones(len(p) + 3)]) for p in prompts]
    ).long()
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    attn[1, -1] = 0
    for impl in ("materialized", "fused"):
        logps, ent = per_token_logps(
            model, inputs(ids, attn), cmask, temperature=0.7, impl=impl, compute_entropy=True
        )
        for i, (p, c) in enumerate(zip(prompts, completions)):
            n = int(cmask[i].sum())
            seq = torch.cat([p, c[:n]]).unsqueeze(0)
            with torch.no_grad():
                logits = model(seq).logits[0, len(p) - 1 : -1].double() / 0.7
            ref = logits.log_softmax(-1).gather(-1, c[:n].unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(logps[i, :n].double(), ref, rtol=1e-4, atol=1e-5)
            p_ = logits.softmax(-1)
            torch.testing.assert_close(ent[i, :n].double(), -(p_ * p_.log()).sum(-1), rtol=1e-4, atol=1e-5)
        assert logps[1, 2] == 0 and ent[1, 2] == 0  # padding is zero, not garbage


def test_entropy_carries_a_gradient_only_when_asked(tiny_dir):
    # An entropy bonus needs d(entropy)/d(weights); without one the backward must not pay for it. Both paths
    # give the same weight gradient of the summed entropy.
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    ids = torch.tensor([[5, 13, 6, 16, 4, 5, EOS], [PAD, PAD, 7, 16, 8, EOS, PAD]])
    attn = (ids != PAD).long()
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    grads = {}
    for impl in ("materialized", "fused"):
        _, ent = per_token_logps(model, inputs(ids, attn), cmask, 0.7, impl, compute_entropy=True)
        assert not ent.requires_grad
        model.zero_grad()
        _, ent = per_token_logps(model, inputs(ids, attn), cmask, 0.7, impl, entropy_grad=True)
        ent.sum().backward()  # .grad, not autograd.grad: a tied embedding's rows are added into .grad directly
        grads[impl] = model.lm_head.weight.grad.clone()
    assert grads["fused"].abs().max() > 0
    torch.testing.assert_close(grads["fused"], grads["materialized"], rtol=1e-4, atol=1e-6)


def _grouped_batch():
    """Three prompts of different lengths (left-padded), in runs of 4, 1 and 3 completions."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.tensor([5, 13, 6, 16]), torch.tensor([7, 16]), torch.tensor([9, 12, 16])]
    runs = [4, 1, 3]
    width, c = 4, 5
    rows, attn = [], []
    for p, k in zip(prompts, runs):
        for _ in range(k):
            rows.append(
                torch.cat([torch.full((width - len(p),), PAD), p, torch.randint(2, 17, (c,), generator=g)])
            )
            attn.append(torch.cat([torch.zeros(width - len(p)), torch.ones(len(p) + c)]))
    ids, attn = torch.stack(rows), torch.stack(attn).long()
    lengths = torch.tensor([5, 3, 1, 4, 4, 5, 2, 5])
    cmask = torch.arange(c).unsqueeze(0) < lengths.unsqueeze(1)
    attn[:, width:] = cmask.long()
    return ids, attn, cmask


def test_shared_prompt_forward_gives_the_same_logprobs_and_gradients(tiny_dir, monkeypatch):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)  # a tiny batch: share whatever it saves
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    ids, attn, cmask = _grouped_batch()
    g = torch.randn(cmask.shape, generator=torch.Generator().manual_seed(2))
    shapes = []
    backbone = model.model
    real_forward = backbone.forward

    def spy(**kw):
        x = kw.get("input_ids")
        shapes.append(tuple((x if x is not None else kw["inputs_embeds"]).shape[:2]))
        return real_forward(**kw)

    monkeypatch.setattr(backbone, "forward", spy)

    def run(shared: bool):
        model.zero_grad()
        with monkeypatch.context() as m:
            if not shared:
                m.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: None)
            logps, ent = per_token_logps(model, inputs(ids, attn), cmask, 0.7, "fused", compute_entropy=True)
        (logps * g).sum().backward()
        return logps.detach(), ent, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shapes.clear()
    lp_shared, ent_shared, grads_shared = run(shared=True)
    # each distinct prompt once, then every completion but its last token (whose output predicts nothing)
    assert shapes == [(3, 4), (8, 4)]
    lp_whole, ent_whole, grads_whole = run(shared=False)
    lp_mat, _ = per_token_logps(model, inputs(ids, attn), cmask, 0.7, "materialized")
    assert lp_shared.abs().sum() > 0 and len(grads_shared) == len(grads_whole) > 10
    torch.testing.assert_close(lp_shared, lp_whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_shared, lp_mat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_shared, ent_whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_shared, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shared_prompt_forward_is_used_only_where_it_pays_and_works(tiny_dir, monkeypatch):
    ids, attn, cmask = _grouped_batch()
    first, run = _prompt_runs(ids[:, :4], attn[:, :4])
    assert first.tolist() == [0, 4, 5] and run.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert _prompt_runs(ids[[0, 4, 5], :4], attn[[0, 4, 5], :4]) is None  # no two neighbours share one
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), gradient_checkpointing=True))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    # 5 rows x 4 = 20 prompt positions saved: fewer than pays for a second pass over the weights
    assert _shared_prompt_hidden(model, model.model, ids, attn, pos, 5) is None
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 20)
    assert _shared_prompt_hidden(model, model.model, ids, attn, pos, 5) is None  # no cache in training
    model.gradient_checkpointing_disable()
    hidden = _shared_prompt_hidden(model, model.model, ids, attn, pos, 5)
    assert hidden.hidden.shape == (8, 5, model.config.hidden_size)
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 21)
    assert _shared_prompt_hidden(model, model.model, ids, attn, pos, 5) is None


def test_shared_prompt_forward_with_one_completion_token(tiny_dir, monkeypatch):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir))).eval()
    ids, attn, cmask = _grouped_batch()
    ids, attn, cmask = ids[:, :5], attn[:, :5], torch.ones(8, 1, dtype=torch.bool)
    with torch.no_grad():
        shared, _ = per_token_logps(model, inputs(ids, attn), cmask, 1.0, "fused")
        monkeypatch.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: None)
        whole, _ = per_token_logps(model, inputs(ids, attn), cmask, 1.0, "fused")
    assert shared.abs().min() > 0
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_tied_embedding_rows_added_straight_into_the_gradient(tiny_dir, monkeypatch, shared):
    """The embedding's gradient rows go straight into the tied matrix's .grad: the same gradients as torch's
    dense embedding backward, padding row included, accumulated over two backward passes."""
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    emb = model.get_input_embeddings()
    assert emb.weight is model.get_output_embeddings().weight and emb.padding_idx == PAD
    ids, attn, cmask = _grouped_batch()
    ids[0, 5] = PAD  # the padding id as an attended token (as when pad == eos): its lookup gets no gradient
    g = torch.randn(cmask.shape, generator=torch.Generator().manual_seed(3))
    calls = []
    real = logprobs_lib._tied_embeddings
    monkeypatch.setattr(logprobs_lib, "_tied_embeddings", lambda *a: calls.append(1) or real(*a))

    def grads(direct: bool):
        model.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            if not direct:
                m.setattr(logprobs_lib, "_tied_embeddings", lambda *a: None)
            for scale in (1.0, -0.5):  # two micro-batches into the same .grad
                logps, _ = per_token_logps(model, inputs(ids, attn), cmask, 0.7, "fused")
                (scale * logps * g).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    direct, dense = grads(True), grads(False)
    assert len(calls) == 2 and direct.keys() == dense.keys()
    for name, value in dense.items():
        torch.testing.assert_close(direct[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert dense["model.embed_tokens.weight"][PAD].abs().sum() > 0  # the head's share reaches the pad row

    with torch.no_grad():
        assert real(model.model, model.lm_head, ids) is None  # nothing to add without a backward
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert real(model.model, model.lm_head, ids) is None  # DDP/FSDP hooks need the ordinary path


def _sliding_models():
    """Tiny models whose cache is not a plain key/value cache on every layer: Gemma 3 (sliding-window layers
    between global ones) and Qwen2 with its sliding window switched on."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    small = dict(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    gemma = Gemma3TextConfig(**small, num_key_value_heads=1, head_dim=16, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    qwen = Qwen2Config(
        **small, num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=0
    )
    return {"gemma3": Gemma3ForCausalLM(gemma), "qwen2-sliding": Qwen2ForCausalLM(qwen)}


@pytest.mark.parametrize("name", ["gemma3", "qwen2-sliding"])
def test_no_prompt_pass_for_a_model_whose_cache_cannot_be_shared(tiny_dir, monkeypatch, name):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)  # sharing would pay, if it could work
    ids, attn, cmask = _grouped_batch()
    shareable = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    calls = {}
    for key, model in (("plain", shareable), (name, _sliding_models()[name])):
        model.eval()
        calls[key] = []
        model.model.register_forward_pre_hook(
            lambda m, a, kw, log=calls[key]: log.append(1), with_kwargs=True
        )
        with torch.no_grad():
            logps, _ = per_token_logps(model, inputs(ids, attn), cmask, 1.0, "fused")
            whole, _ = per_token_logps(model, inputs(ids, attn), cmask, 1.0, "materialized")
        torch.testing.assert_close(logps, whole, rtol=1e-5, atol=1e-5)
    assert len(calls["plain"]) == 2 + 1  # prompts once, then the completions; then the materialised check
    assert len(calls[name]) == 1 + 1  # the whole sequences at once: no prompt pass run and thrown away
