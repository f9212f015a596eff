"""``CachedGenerate`` on vision-language policies, both image layouts (the tiny Qwen2.5-VL: patch grids and 3-D
rotary positions; the tiny LLaVA: one pixel_values row per image, 1-D positions): greedy completions equal
``generate``'s, every step's logits equal the model's own forward on the sequence so far, early exit and shared
prefill change no sampled completion, image placeholders are never drawn, and the vision tower encodes each
prompt's images once."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_gspo.decode_engine as decode_engine
from lightning_gspo.config import GSPOConfig
from lightning_gspo.decode_engine import CachedGenerate, build_engine
from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.rollout import HFGenerate, completion_mask, eos_ids, prompt_text

FLAGS = [
    dict(early_exit=False, shared_prefill=False, preallocate=False),  # the plain loop on transformers' cache
    dict(early_exit=False),  # shared prefill alone
    dict(shared_prefill=False),  # early exit alone
    dict(),  # the defaults
]
G = 3


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# One and two images of different sizes, prompts of different lengths; the last two differ only in their image.
RECORDS = [
    {"prompt": [{"role": "user", "content": "1+2="}], "images": [picture(40, 70, 0)]},
    {
        "prompt": [{"role": "user", "content": "123+45+6="}],
        "images": [picture(100, 30, 1), picture(150, 200, 2)],
    },
    {"prompt": [{"role": "user", "content": "7="}], "images": [picture(60, 60, 3)]},
    {"prompt": [{"role": "user", "content": "7="}], "images": [picture(60, 60, 4)]},
]


def tower(model):
    """The vision tower: Qwen2.5-VL's ``visual``, LLaVA's ``vision_tower``."""
    return getattr(model.model, "visual", None) or model.model.vision_tower


@pytest.fixture(scope="module", params=["tiny-vlm:digits", "tiny-llava:digits"])
def vlm(request, tmp_path_factory):
    """A tiny VLM with weights large enough that completions vary with the prompt and its image."""
    cfg = ModelConfig(name_or_path=request.param, tiny_dir=str(tmp_path_factory.mktemp("tiny")))
    model, proc = load_causal_lm(cfg), load_tokenizer(cfg)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "visual" in name or "vision_tower" in name else 0.3)
    prompts = [r["prompt"] for r in RECORDS]
    ids, mask, images, _ = proc.encode_prompts(prompts, RECORDS, None, lambda p: prompt_text(p, proc))
    assert (
        len(set(mask.sum(1).tolist())) >= 2 and images.image_grid_thw is not None or "llava" in request.param
    )
    eos = eos_ids(proc, model)
    return SimpleNamespace(model=model, proc=proc, ids=ids, mask=mask, images=images, eos=eos)


def digit(proc) -> int:
    """A token the tiny models often pick: as a second EOS, some rows stop early."""
    return proc.convert_tokens_to_ids("2")


def algo(**kw) -> GSPOConfig:
    return GSPOConfig(
        **{"max_completion_length": 10, "num_generations": G, "per_device_train_batch_size": 12, **kw}
    )


def cached(v, cfg, eos=None, **flags) -> torch.Tensor:
    return CachedGenerate(v.proc, cfg, eos or v.eos, **flags).generate(
        v.model, v.ids, v.mask, G, images=v.images
    )


def test_build_engine_samples_vlms_with_the_cached_engine(vlm):
    for name in ("auto", "cached"):
        assert type(build_engine(vlm.proc, algo(generation_engine=name), vlm.eos)) is CachedGenerate
    assert type(build_engine(vlm.proc, algo(generation_engine="hf"), vlm.eos)) is HFGenerate


@pytest.mark.parametrize("stop", ["eos", "digit"])
def test_greedy_equals_hf_generate(vlm, stop):
    """With the model's EOS (rows run to the limit) and with a common digit as a second EOS (rows stop early)."""
    v = vlm if stop == "eos" else SimpleNamespace(**{**vars(vlm), "eos": [*vlm.eos, digit(vlm.proc)]})
    hf = HFGenerate(v.proc, algo(), v.eos, greedy=True).generate(v.model, v.ids, v.mask, G, images=v.images)
    for flags in FLAGS:
        assert torch.equal(cached(v, algo(), **flags, greedy=True), hf), flags
    if stop == "eos":
        firsts = hf[::G].tolist()
        assert len({tuple(r) for r in firsts}) == len(firsts)  # the prompts' completions differ
        assert firsts[2] != firsts[3]  # the same text with another image: the image reaches the completion
    else:  # rows stop at different steps: some leave the batch while others decode
        assert len(set(completion_mask(hf, v.eos)[0].sum(1).tolist())) >= 2


def test_prompts_without_images_beside_and_alone_equal_hf_generate(vlm):
    """A row without images among image rows (Qwen: 3-D positions that are plain text positions on that row), and a
    batch with no image at all (no pixel_values; Qwen still gets its 3-D text positions)."""
    text_only = {"prompt": [{"role": "user", "content": "45+6="}], "images": []}
    for rows in ([RECORDS[0], text_only, RECORDS[1]], [text_only]):
        prompts = [r["prompt"] for r in rows]
        ids, mask, images, _ = vlm.proc.encode_prompts(
            prompts, rows, None, lambda p: prompt_text(p, vlm.proc)
        )
        cfg = algo()
        hf = HFGenerate(vlm.proc, cfg, vlm.eos, greedy=True).generate(vlm.model, ids, mask, G, images=images)
        ours = CachedGenerate(vlm.proc, cfg, vlm.eos, greedy=True).generate(
            vlm.model, ids, mask, G, images=images
        )
        assert torch.equal(ours, hf)


def test_sampled_completions_do_not_depend_on_early_exit_or_shared_prefill(vlm):
    cfg, eos = algo(temperature=0.9, top_k=12), [*vlm.eos, digit(vlm.proc)]
    outs = []
    for flags in FLAGS:
        torch.manual_seed(3)
        outs.append(cached(vlm, cfg, eos, **flags))
    for flags, out in zip(FLAGS[1:], outs[1:]):
        assert torch.equal(out, outs[0]), flags
    assert len({tuple(r) for r in outs[0][:G].tolist()}) > 1  # a group's completions differ
    lengths = completion_mask(outs[0], eos)[0].sum(1)
    assert len(set(lengths.tolist())) >= 3  # rows leave the batch at different steps


def reference_logits(v, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) last-position logits of the model's own forward on whole sequences (each row's prompt images): Qwen
    computes its 3-D positions itself (``get_rope_index``), LLaVA gets the mask's running count, as ``generate``
    gives it."""
    images = v.images.rows(torch.arange(len(v.images)).repeat_interleave(G))
    extra = images.model_inputs(sequences)
    if "image_grid_thw" not in extra:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return v.model(input_ids=sequences, attention_mask=mask, **extra).logits[:, -1].float()


def test_every_steps_logits_equal_a_full_forward_on_the_sequence_so_far(vlm, monkeypatch):
    """The prefill's logits (step 0) and every decode step's, for every row still decoding: positions that drifted
    from the model's own (3-D after an image) or image features that did not reach the cache would show here. In
    float64, so the only difference left is the engine's float32 logits' rounding."""
    vlm = SimpleNamespace(**{**vars(vlm), "model": copy.deepcopy(vlm.model).double()})
    seen, sample = [], decode_engine.next_tokens

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample(logits, *args, **kwargs)

    monkeypatch.setattr(decode_engine, "next_tokens", recording)
    torch.manual_seed(5)
    # Without early exit every step holds all rows, in order; with shared prefill the prefill ran on U rows.
    out = cached(vlm, algo(), early_exit=False)
    n, placeholders = vlm.ids.shape[0] * G, torch.tensor(vlm.proc.placeholder_ids)
    prompts, prompt_mask = vlm.ids.repeat_interleave(G, 0), vlm.mask.repeat_interleave(G, 0)
    eos = torch.isin(out, torch.tensor(vlm.eos))
    assert len(seen) == out.shape[1] >= 5
    for t, logits in enumerate(seen):
        live = ~eos[:, :t].any(1)  # rows whose sequence so far is what the engine fed
        sequences = torch.cat([prompts, out[:, :t]], 1)
        mask = torch.cat([prompt_mask, torch.ones((n, t), dtype=prompt_mask.dtype)], 1)
        expected = reference_logits(vlm, sequences, mask).index_fill(1, placeholders, float("-inf"))
        torch.testing.assert_close(logits[live], expected[live], rtol=1e-5, atol=1e-5, msg=f"step {t}")
    assert live.sum() >= 2


def test_placeholders_are_never_sampled_even_when_most_likely(vlm):
    ids = vlm.proc.placeholder_ids

    def boost(module, args, output):
        output.logits[..., ids] += 1e3
        return output

    handle = vlm.model.register_forward_hook(boost)
    try:
        with torch.no_grad():
            logits = vlm.model(
                input_ids=vlm.ids, attention_mask=vlm.mask, **vlm.images.model_inputs(vlm.ids)
            ).logits
        assert torch.isin(logits[:, -1].argmax(-1), torch.tensor(ids)).all()  # the boost makes one the argmax
        hf = HFGenerate(vlm.proc, algo(), vlm.eos, greedy=True).generate(
            vlm.model, vlm.ids, vlm.mask, G, images=vlm.images
        )
        outs = [cached(vlm, algo(), greedy=True)]
        for temperature in (1.0, 2.0):
            torch.manual_seed(0)
            outs.append(cached(vlm, algo(temperature=temperature)))
    finally:
        handle.remove()
    assert torch.equal(outs[0], hf)  # the next most likely token, as generate's suppression picks it
    for out in outs:
        assert not torch.isin(out, torch.tensor(ids)).any()


def test_the_vision_tower_encodes_each_prompts_images_once(vlm):
    encoded = []

    def count(module, args, kwargs, output):
        pixels = args[0] if args else next(iter(kwargs.values()))
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        encoded.append(pixels.shape[0] if grid is None else grid.shape[0])  # images in this call

    images = sum(len(r) for r in vlm.images.row_images)
    handle = tower(vlm.model).register_forward_hook(count, with_kwargs=True)
    try:
        runs = {}
        for name, engine in {
            "cached": CachedGenerate(vlm.proc, algo(), vlm.eos, greedy=True),
            "unshared": CachedGenerate(vlm.proc, algo(), vlm.eos, greedy=True, shared_prefill=False),
            "hf": HFGenerate(vlm.proc, algo(), vlm.eos, greedy=True),
        }.items():
            encoded.clear()
            engine.generate(vlm.model, vlm.ids, vlm.mask, G, images=vlm.images)
            runs[name] = list(encoded)
    finally:
        handle.remove()
    assert runs == {"cached": [images], "unshared": [images * G], "hf": [images * G]}
