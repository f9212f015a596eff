"""The sampler's per-step distribution is transformers' (the processor chain ``generate`` builds, in its order),
and its draws are samples of that distribution."""

import pytest
import torch

from lightning_gspo.config import GSPOConfig
from lightning_gspo.sampling import (
    SamplingSettings,
    inverse_cdf_sample,
    min_p_filter,
    next_tokens,
    process_logits,
    seen_tokens,
    top_k_filter,
    top_p_filter,
)

V = 24


@pytest.fixture(scope="module")
def hf_model():
    """A one-layer model: only its ``_get_logits_processor``, the chain ``generate`` uses, is needed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def hf_chain(model, settings: dict, mask: torch.Tensor):
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=True, **settings)
    return model._get_logits_processor(
        gc, input_ids_seq_length=mask.shape[1], model_kwargs={"attention_mask": mask}, device="cpu"
    )


def batch(dtype=torch.float32, ties: bool = False, seed: int = 0):
    """Logits (4, V), left-padded prompts with generated tokens after them, and their mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((4, V), generator=g, dtype=torch.float64) * 3
    if ties:  # few distinct values: equal logits inside and at every cut-off
        logits = logits.round()
    prompt = torch.randint(3, V, (4, 7), generator=g)
    mask = torch.ones((4, 7), dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :6] = 0
    # The pad id (0) is a token of the vocabulary: left padding must not count as seen.
    prompt = prompt.masked_fill(mask == 0, 0)
    generated = torch.randint(0, V, (4, 3), generator=g)
    return logits.to(dtype), prompt, mask, generated


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_k=V + 10),
    dict(top_p=0.9),
    dict(top_p=0.3),
    dict(top_p=1e-6),  # keeps only the most likely token (min_tokens_to_keep)
    dict(min_p=0.1),
    dict(min_p=1.0),  # keeps the most likely token and those tied with it
    dict(min_p=0.0),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.6),
    dict(temperature=0.7, top_k=8, top_p=0.8),
    dict(temperature=1.3, top_p=0.95, min_p=0.05),
    dict(repetition_penalty=1.2, temperature=0.8, top_k=10, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_distribution_equals_transformers_chain(hf_model, settings, dtype, ties):
    logits, prompt, mask, generated = batch(dtype, ties)
    ids = torch.cat([prompt, generated], 1)
    hf = hf_chain(hf_model, settings, mask)(ids, logits.clone())
    seen = seen_tokens(ids, torch.cat([mask, torch.ones_like(generated)], 1), V)
    ours = process_logits(logits.clone(), SamplingSettings(**settings), seen)
    assert torch.equal(ours.isinf(), hf.isinf())  # the same tokens filtered
    atol = 1e-7 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(ours.softmax(-1), hf.softmax(-1), rtol=0, atol=atol)


def test_seen_tokens_follow_transformers_padding_rule():
    ids = torch.tensor([[0, 0, 5, 6], [7, 0, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # the second row's inner 0 is a real token
    seen = seen_tokens(ids, mask, 10)
    assert seen[0].nonzero().flatten().tolist() == [5, 6]
    assert seen[1].nonzero().flatten().tolist() == [0, 7, 8, 9]


@pytest.mark.parametrize("keep", [1, 3, 7])
def test_min_tokens_to_keep_matches_transformers_on_ties(keep):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 2.0, 2.0, 1.0, 1.0, 0.0, -1.0, -1.0, -1.0, -3.0, -3.0, -3.0]])
    cases = [
        (top_k_filter, TopKLogitsWarper, 2),
        (top_p_filter, TopPLogitsWarper, 0.05),
        (top_p_filter, TopPLogitsWarper, 0.7),
        (min_p_filter, MinPLogitsWarper, 0.9),
        (min_p_filter, MinPLogitsWarper, 0.2),
    ]
    for ours, theirs, value in cases:
        expected = theirs(value, min_tokens_to_keep=keep)(None, logits.clone())
        got = ours(logits.clone(), value, keep)
        assert torch.equal(got, expected), (ours.__name__, value, keep)
        assert int((~got.isinf()).sum()) >= keep


def test_settings_come_from_the_config_as_hf_generate_takes_them():
    cfg = GSPOConfig(temperature=0.8, top_p=0.9, top_k=20, generation_kwargs={"top_k": 5, "min_p": 0.1})
    s = SamplingSettings.from_config(cfg)
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.greedy) == (0.8, 0.9, 5, 0.1, False)
    assert SamplingSettings.from_config(cfg, greedy=True) == SamplingSettings(greedy=True)


# ---- the draw ----


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.5, top_p=0.9), dict(top_k=6, min_p=0.05)])
def test_draws_follow_the_processed_distribution(settings):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((1, 12), generator=g) * 1.5
    s = SamplingSettings(**settings)
    probs = process_logits(logits, s).softmax(-1)[0]
    n = 200_000
    uniforms = torch.rand(n, generator=g, dtype=torch.float64)
    tokens = next_tokens(logits.expand(n, -1), s, uniforms)
    counts = torch.bincount(tokens, minlength=12).double()
    assert counts[probs == 0].sum() == 0  # a filtered token is never drawn
    support = probs > 0
    # chi-square over the kept tokens, df = |support| - 1 <= 11; 31.3 is the 0.999 quantile at df 11.
    assert chi_square(counts[support], probs[support].double()) < 31.3


def test_a_biased_draw_fails_the_frequency_check():
    """The check above has power: one token's share moved by 1% of the mass is caught."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(12, generator=g) * 1.5, -1).double()
    n = 200_000
    tokens = inverse_cdf_sample(probs.expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64))
    counts = torch.bincount(tokens, minlength=12).double()
    biased = probs.clone()
    biased[0] += 0.01
    biased[1] -= 0.01
    assert chi_square(counts, probs) < 31.3 < chi_square(counts, biased)


def test_extreme_uniforms_never_draw_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0]] * 3)
    uniforms = torch.tensor([0.0, 0.31, 1.0 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf_sample(probs, uniforms).tolist() == [1, 3, 3]


def test_a_rows_token_depends_on_its_own_numbers_only():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn((6, V), generator=g)
    uniforms = torch.rand(6, generator=g, dtype=torch.float64)
    s = SamplingSettings(temperature=0.9, top_p=0.95)
    together = next_tokens(logits, s, uniforms)
    alone = torch.cat([next_tokens(logits[i : i + 1], s, uniforms[i : i + 1]) for i in range(6)])
    part = next_tokens(logits[[4, 1]], s, uniforms[[4, 1]])
    assert torch.equal(together, alone) and part.tolist() == together[[4, 1]].tolist()


def test_greedy_is_the_argmax_of_the_raw_logits():
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_tokens(logits, SamplingSettings(greedy=True), None).tolist() == [1, 0]  # first of a tie
