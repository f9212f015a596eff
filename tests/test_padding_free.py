"""Log-prob layouts without the padding (``lightning_gspo.length_buckets``): trimmed rows and length buckets
give the padded block's log-probs, entropies and gradients, with and without the shared-prompt forward,
fused and materialised; a training run's losses and gradient norms do not move."""

import functools

import pytest
import torch
from helpers import logged, module_and_data, trainer

import lightning_gspo.length_buckets as buckets_lib
import lightning_gspo.policy_logprobs as logprobs_lib
from lightning_gspo.length_buckets import _partition, plan_rows
from lightning_gspo.models import ModelConfig, load_causal_lm
from lightning_gspo.policy_logprobs import per_token_logps

PAD = 0
C = 7  # completion width: rows of length 1 and rows that fill it


def _batch(lengths, prompts=((5, 13, 6, 16, 4, 8), (7, 16, 3), (9, 12, 16, 5, 6)), runs=(4, 1, 3), seed=1):
    """Prompts of different lengths, left-padded to one width, in runs of identical prompts (so the shared-prompt
    forward has something to share), and completions right-padded to C, with garbage after each row's end."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(p) + 1 for p in prompts)  # one column of padding in every row: trimmed off
    ids, attn = [], []
    for p, k in zip(prompts, runs):
        for _ in range(k):
            ids.append(
                torch.cat(
                    [
                        torch.full((width - len(p),), PAD),
                        torch.tensor(p),
                        torch.randint(2, 17, (C,), generator=g),
                    ]
                )
            )
            attn.append(torch.cat([torch.zeros(width - len(p)), torch.ones(len(p) + C)]))
    ids, attn = torch.stack(ids), torch.stack(attn).long()
    cmask = torch.arange(C).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    attn[:, width:] = cmask.long()
    return {"input_ids": ids, "attention_mask": attn}, cmask


LENGTHS = {
    "spread": [5, 3, 1, 7, 4, 6, 2, 7],  # length 1 and rows that fill the width
    "same": [4] * 8,
    "one empty": [0, 3, 1, 2, 5, 3, 2, 1],  # a row with nothing scored (a masked truncated completion)
    "short": [2, 1, 1, 2, 1, 2, 1, 1],  # the micro-batch's longest is far below C
}


def _run(model, inputs, cmask, impl, layout, grad_out):
    model.zero_grad(set_to_none=True)
    logps, ent = per_token_logps(model, inputs, cmask, 0.7, impl, entropy_grad=True, layout=layout)
    g_logp, g_ent = grad_out
    (logps * g_logp + ent * g_ent).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), ent.detach(), grads


@pytest.fixture(scope="module")
def model64(tiny_dir):
    return load_causal_lm(ModelConfig(name_or_path=str(tiny_dir))).double()


def _close(got, want, tol, msg):
    """Equal up to ``tol`` relative to the tensor's own scale (a gradient's small entries are sums that cancel)."""
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-30), msg=msg)


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("shared", [False, True], ids=["whole", "shared"])
@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_every_layout_gives_the_padded_numbers_in_float64(model64, monkeypatch, lengths, shared, impl):
    monkeypatch.setattr(buckets_lib, "CALL_COST_POSITIONS", 1)  # cheap calls: several buckets
    inputs, cmask = _batch(LENGTHS[lengths])
    gen = torch.Generator().manual_seed(2)
    grad_out = tuple(torch.randn(cmask.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    # The reference: every row through the whole padded sequence.
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 10**9)
    ref_logps, ref_ent, ref_grads = _run(model64, inputs, cmask, impl, "padded", grad_out)
    assert ref_logps.dtype == torch.float64 and len(ref_grads) > 10 and ref_logps.abs().sum() > 0
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    real, used = logprobs_lib._shared_prompt_hidden, []
    monkeypatch.setattr(logprobs_lib, "_shared_prompt_hidden", lambda *a: used.append(real(*a)) or used[-1])
    for layout in ("padded", "trimmed", "buckets"):
        # The shared-prompt forward's gradients differ from the whole sequences' by ~1e-7 of their scale even
        # in float64 (so in the padded layout too): its own rounding, not the layout's.
        tol = 1e-6 if shared else 1e-11
        used.clear()
        logps, ent, grads = _run(model64, inputs, cmask, impl, layout, grad_out)
        if layout == "padded":  # each bucket decides for itself whether sharing its prompts pays
            assert (impl == "fused" and shared) == any(h is not None for h in used), layout
        assert logps.shape == ent.shape == cmask.shape
        assert (logps[~cmask] == 0).all() and (ent[~cmask] == 0).all()
        _close(logps, ref_logps, tol, layout)
        _close(ent, ref_ent, tol, layout)
        assert grads.keys() == ref_grads.keys()
        for name, value in ref_grads.items():
            _close(grads[name], value, tol, f"{layout} {name}")


@pytest.mark.parametrize("shared", [False, True], ids=["whole", "shared"])
def test_buckets_in_float32_and_no_grad(tiny_dir, monkeypatch, shared):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    monkeypatch.setattr(buckets_lib, "CALL_COST_POSITIONS", 2)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    inputs, cmask = _batch(LENGTHS["spread"])
    gen = torch.Generator().manual_seed(3)
    grad_out = (torch.randn(cmask.shape, generator=gen), torch.randn(cmask.shape, generator=gen))
    ref = _run(model, inputs, cmask, "fused", "padded", grad_out)
    got = _run(model, inputs, cmask, "fused", "buckets", grad_out)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name, value in ref[2].items():
        torch.testing.assert_close(got[2][name], value, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the old/reference pass
        old, _ = per_token_logps(model, inputs, cmask, 0.7, layout="buckets")
    torch.testing.assert_close(old, ref[0], rtol=1e-5, atol=1e-5)


def test_each_bucket_is_trimmed_to_its_own_rows(tiny_dir, monkeypatch):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 10**9)
    monkeypatch.setattr(buckets_lib, "CALL_COST_POSITIONS", 0.5)  # near-free calls: one per distinct width
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)))
    shapes = []
    real = model.model.forward

    @functools.wraps(real)
    def spy(**kw):
        tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]
        shapes.append(tuple(tokens.shape[:2]))
        return real(**kw)

    monkeypatch.setattr(model.model, "forward", spy)
    # rows 0-3 have a 6-token prompt, row 4 a 3-token one, rows 5-7 a 5-token one, left-padded to 7 columns
    inputs, cmask = _batch([2, 2, 5, 5, 5, 1, 2, 5])
    per_token_logps(model, inputs, cmask, 1.0, layout="buckets")
    # each call holds one bucket's rows, from their first prompt column to their longest completion, the last
    # token left out; near-free calls split rows of different completion or prompt lengths apart
    plan = plan_rows(cmask, inputs["attention_mask"][:, :7], "buckets")
    expected = [(len(b.rows), 7 - b.prompt_start + b.width - 1) for b in plan.buckets("buckets", 7)]
    assert sorted(shapes) == sorted(expected) and len(expected) >= 4
    assert sum(n for n, _ in shapes) == 8 and (1, 5) in shapes  # row 5: 5 prompt tokens + 1 - 1
    assert sum(n * t for n, t in shapes) < 8 * (7 + 7 - 1)  # fewer positions than the padded block
    shapes.clear()
    per_token_logps(model, inputs, cmask, 1.0, layout="trimmed")  # one call, cut to the longest row
    assert shapes == [(8, 10)]


def test_plan_trims_and_the_partition_minimises_the_cost():
    cmask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()  # a hole; an empty row
    pmask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])
    plan = plan_rows(cmask, pmask, "buckets")
    assert plan.lengths == [2, 3, 0] and plan.width == 3 and plan.prompt_start == 1 and plan.scored == [0, 1]
    assert plan_rows(cmask, pmask, "padded").width == 5
    # with a high call cost everything is one call; near-free calls give one per distinct width
    assert _partition([1, 2, 2, 9], [0] * 4, True, 1000) == [0, 4]
    assert _partition([1, 2, 2, 9], [0] * 4, True, 0.5) == [0, 1, 3, 4]
    # 8 rows of 1 and 8 of 60: two calls (cost 2x40 + 8 + 480) beat one (40 + 960)
    assert _partition([1] * 8 + [60] * 8, [0] * 16, True, 40) == [0, 8, 16]
    with pytest.raises(ValueError, match="logprobs_layout"):
        plan_rows(cmask, pmask, "ragged")


def test_a_training_run_is_the_padded_run(tiny_dir, tmp_path, monkeypatch):
    """Losses and gradient norms of a few off-policy steps with old and reference log-probs (every forward the
    layout touches) equal the padded run's, with completions of spread lengths."""
    monkeypatch.setattr(buckets_lib, "CALL_COST_POSITIONS", 1)  # several buckets even for 8-token completions
    runs = {}
    for layout in ("padded", "buckets"):
        torch.manual_seed(0)
        module, data = module_and_data(
            tiny_dir,
            logprobs_layout=layout,
            num_iterations=2,
            beta=0.04,
            max_completion_length=8,
            temperature=1.5,
        )
        trainer(tmp_path / layout, max_steps=6).fit(module, datamodule=data)
        runs[layout] = [r for r in logged(tmp_path / layout) if r.get("loss")]
    assert len(runs["padded"]) == len(runs["buckets"]) == 3
    lengths = [
        (float(r["completions/min_length"]), float(r["completions/max_length"])) for r in runs["padded"]
    ]
    assert any(lo < hi for lo, hi in lengths), lengths  # spread lengths: the buckets differ from padding
    for a, b in zip(runs["padded"], runs["buckets"]):
        for key in ("loss", "grad_norm", "kl", "completions/mean_length"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key


def test_bad_layouts_are_refused_with_the_field_named():
    from lightning_gspo.config import GSPOConfig

    for layout in ("ragged", "packed"):  # packing is not offered (length_buckets says why)
        with pytest.raises(ValueError, match="logprobs_layout"):
            GSPOConfig(logprobs_layout=layout)
