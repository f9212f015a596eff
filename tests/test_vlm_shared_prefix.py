"""The once-per-group image and prompt forward of a vision-language policy (``policy_logprobs`` with
``shared_images``): each distinct prompt (ids and images) goes through the vision tower and the backbone once and
the completions attend to it with their 3-D positions; the numbers and every gradient are the per-completion
forward's, in float64, and rows whose text matches but whose images differ are never shared."""

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_gspo.policy_logprobs as logprobs_lib
from lightning_gspo.adapters import LoraSettings, apply_lora
from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.shared_images import row_images
from lightning_gspo.vlm_models import lora_exclude, vision_tower


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# (text, images, completion lengths). Group 2's text and image size equal group 1's, only the picture differs:
# its ids are group 1's, token for token. Group 3's image is group 2's turned on its side (4 x 8 patches, not
# 8 x 4): the same number of placeholders, so again the same ids, another grid.
GROUPS = [
    ("1+2=", [picture(56, 112, seed=1)], [3, 7, 5]),
    ("1+2=", [picture(56, 112, seed=2)], [6, 2, 7]),
    ("1+2=", [picture(112, 56, seed=2)], [4, 4]),
    ("3+4=", [picture(40, 70, seed=3), picture(100, 30, seed=4)], [7, 1, 5, 3]),
]


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """Qwen2.5-VL's (and Llama's) RMSNorm and Qwen2.5-VL's vision rotary embedding compute in float32 whatever the weights' dtype, so a
    float64 model's gradients carry float32 rounding (~1e-7) wherever two forwards of equal value reach them by
    different sums. Computed in the input's dtype (float32 at least) the model is float64 through and through,
    and 1e-10 can be asked."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    def norm(self, x):
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * y.to(x.dtype)

    def rotary(q, k, cos, sin):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, cos, sin = q.to(dtype), k.to(dtype), cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)
        return q * cos + qwen.rotate_half(q) * sin, k * cos + qwen.rotate_half(k) * sin

    from transformers.models.llama import modeling_llama as llama  # the tiny LLaVA's language model

    monkeypatch.setattr(qwen.Qwen2_5_VLRMSNorm, "forward", norm)
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", norm)
    monkeypatch.setattr(qwen, "apply_rotary_pos_emb_vision", rotary)


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def proc(tiny_vlm_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny-vlm:digits", tiny_dir=tiny_vlm_dir))


def policy(tiny_vlm_dir, dtype=torch.float64, tower: bool = True, lora: bool = False):
    model = load_causal_lm(ModelConfig(name_or_path="tiny-vlm:digits", tiny_dir=tiny_vlm_dir)).to(dtype)
    vision_tower(model)[1].requires_grad_(tower)  # loaded frozen (model.train_vision_tower=false)
    if lora:
        settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
        model = apply_lora(model, settings, exclude=lora_exclude(model, tower))
        with torch.no_grad():  # PEFT starts B at zero; random B makes every adapter's gradient non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


def batch(proc, groups=GROUPS, dtype=torch.float64, seed: int = 0):
    """The model inputs and completion mask of ``groups``: left-padded prompts, each group's images stored once,
    right-padded random digit completions."""
    gen = torch.Generator().manual_seed(seed)
    prompts, pixels, grids, row_imgs, lengths = [], [], [], [], []
    for text, images, lens in groups:
        messages = [
            {
                "role": "user",
                "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}],
            }
        ]
        rendered = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, pv, grid = proc.encode(rendered, images)
        first = sum(g.shape[0] for g in grids)
        pixels.append(pv)
        grids.append(grid)
        for n in lens:
            prompts.append(ids)
            row_imgs.append(list(range(first, first + grid.shape[0])))
            lengths.append(n)
    p, c = max(map(len, prompts)), max(lengths)
    pad = proc.pad_token_id
    prompt_ids = torch.tensor([[pad] * (p - len(x)) + x for x in prompts])
    prompt_mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    digits = torch.tensor(proc.tokenizer.convert_tokens_to_ids(list("0123456789")))
    completion = digits[torch.randint(0, 10, (len(prompts), c), generator=gen)]
    mask = torch.arange(c)[None] < torch.tensor(lengths)[:, None]
    completion = torch.where(mask, completion, pad)
    images = ImageBatch(torch.cat(pixels).to(dtype), torch.cat(grids), row_imgs, proc.image_token_id)
    ids = torch.cat([prompt_ids, completion], 1)
    inputs = {"input_ids": ids, "attention_mask": torch.cat([prompt_mask, mask.long()], 1)}
    return {**inputs, **images.model_inputs(ids)}, mask, images


class Counter:
    """Rows of patches through the vision tower and (rows, positions) of each language-model call."""

    def __init__(self, model):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.patches, self.calls = [], []
        self.handles = [
            lm.model.visual.register_forward_pre_hook(lambda m, a: self.patches.append(a[0].shape[0])),
            lm.model.language_model.register_forward_pre_hook(
                lambda m, a, kw: self.calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
            ),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def weights(mask, dtype=torch.float64):
    """Fixed weights of each (row, token)'s log-prob and entropy in the summed loss."""
    w = torch.linspace(-1, 1, mask.numel(), dtype=dtype).view(mask.shape)
    return w, w.flip(0)


def run(model, inputs, mask, monkeypatch, shared: bool, impl: str = "fused", w=None):
    """Log-probs, entropies and the gradient of every trainable parameter of a weighted sum of both (``w``:
    their weights, by default ``weights(mask)``)."""
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    model.zero_grad(set_to_none=True)
    counter = Counter(model)
    try:
        logps, ent = per_token_logps(model, inputs, mask, 0.7, impl, compute_entropy=True, entropy_grad=True)
    finally:
        counter.close()
    w_logps, w_ent = weights(mask, logps.dtype) if w is None else w
    ((logps * w_logps).sum() + (ent * w_ent).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logps.detach(), ent.detach(), grads, counter


def assert_same(a, b, rtol: float, atol: float):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("variant", ["tower", "frozen", "lora"])
def test_shared_prefix_equals_the_per_completion_forward_in_float64(tiny_vlm_dir, proc, monkeypatch, variant):
    model = policy(tiny_vlm_dir, tower=variant == "tower", lora=variant == "lora")
    inputs, mask, _ = batch(proc)
    shared = run(model, inputs, mask, monkeypatch, shared=True)
    alone = run(model, inputs, mask, monkeypatch, shared=False)
    reference = run(model, inputs, mask, monkeypatch, shared=False, impl="materialized")
    assert_same(shared, alone, rtol=1e-10, atol=1e-12)
    assert_same(shared, reference, rtol=1e-10, atol=1e-12)
    tower_grads = [n for n in shared[2] if ".visual." in n]
    assert bool(tower_grads) == (variant == "tower")  # the tower trains only when asked to
    assert all(shared[2][n].abs().max() > 0 for n in tower_grads)

    # Each distinct prompt (4 groups) ran the tower once, on its own images only, and the backbone once.
    per_group = [int(sum(g.prod() for g in _grids(proc, imgs))) for _, imgs, _ in GROUPS]
    rows = sum(len(lens) for *_, lens in GROUPS)
    p = inputs["input_ids"].shape[1] - mask.shape[1]
    assert shared[3].patches == [sum(per_group)]
    assert shared[3].calls == [(len(GROUPS), p), (rows, mask.shape[1] - 1)]
    assert alone[3].patches == [sum(n * len(lens) for n, (*_, lens) in zip(per_group, GROUPS))]
    assert alone[3].calls == [(rows, inputs["input_ids"].shape[1] - 1)]


def _grids(proc, images):
    return proc.encode(proc.image_token * len(images), images)[2]


def test_rows_with_the_same_text_and_other_images_are_not_shared(tiny_vlm_dir, proc, monkeypatch):
    model = policy(tiny_vlm_dir)
    inputs, mask, _ = batch(proc, GROUPS[:3])  # three groups, one text, ids equal token for token
    assert (inputs["input_ids"][:, : -mask.shape[1]] == inputs["input_ids"][0, : -mask.shape[1]]).all()
    shared = run(model, inputs, mask, monkeypatch, shared=True)
    alone = run(model, inputs, mask, monkeypatch, shared=False)
    assert shared[3].calls[0][0] == 3  # one prompt run per picture, not one for the shared text
    assert_same(shared, alone, rtol=1e-10, atol=1e-12)

    # The same patches laid out on another grid (4 x 8 against 8 x 4: the same placeholders, so the same ids) are
    # another image too.
    inputs, mask, _ = batch(proc, GROUPS[1:3])
    grid, pixels = inputs["image_grid_thw"], inputs["pixel_values"].clone()
    assert grid[0].prod() == grid[-1].prod() and not torch.equal(grid[0], grid[-1])
    n = int(grid[0].prod())
    rows_first = len(GROUPS[1][2])
    pixels[rows_first * n :] = pixels[:n].repeat(len(GROUPS[2][2]), 1)
    inputs["pixel_values"] = pixels
    shared = run(model, inputs, mask, monkeypatch, shared=True)
    assert shared[3].calls[0][0] == 2
    assert_same(shared, run(model, inputs, mask, monkeypatch, shared=False), rtol=1e-10, atol=1e-12)

    # The same picture in every row (and only that) makes them one prompt.
    same = [(text, GROUPS[0][1], lens) for text, _, lens in GROUPS[:3]]
    inputs, mask, _ = batch(proc, same)
    once = run(model, inputs, mask, monkeypatch, shared=True)
    assert once[3].calls[0][0] == 1 and len(once[3].patches) == 1
    assert_same(once, run(model, inputs, mask, monkeypatch, shared=False), rtol=1e-10, atol=1e-12)


def test_each_row_gets_its_own_images_from_the_flat_inputs(tiny_vlm_dir, proc):
    inputs, mask, _ = batch(proc)
    config = policy(tiny_vlm_dir).config
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    rows = row_images(config, extra, inputs["input_ids"])
    # The flat inputs hold every row's images in row order: rows of 1, 1, 1 and 2 images, 3, 3, 2 and 4 rows.
    counts = [len(imgs) for _, imgs, lens in GROUPS for _ in lens]
    ends = np.cumsum(counts).tolist()
    assert rows.spans == [(e - n, e) for n, e in zip(counts, ends)]
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    assert rows.patch_offsets == [0, *np.cumsum(sizes).tolist()]
    # Counts that do not add up (a placeholder too many) or inputs of another layout: no sharing, no guess.
    broken = dict(extra, mm_token_type_ids=extra["mm_token_type_ids"].clone())
    broken["mm_token_type_ids"][0, -1] = 1
    assert row_images(config, broken, inputs["input_ids"]) is None
    assert row_images(config, dict(extra, pixel_attention_mask=torch.ones(1)), inputs["input_ids"]) is None


def test_float32_shared_prefix_is_close(tiny_vlm_dir, proc, monkeypatch):
    model = policy(tiny_vlm_dir, dtype=torch.float32)
    inputs, mask, _ = batch(proc, dtype=torch.float32)
    shared = run(model, inputs, mask, monkeypatch, shared=True)
    alone = run(model, inputs, mask, monkeypatch, shared=False)
    assert shared[3].calls[0][0] == len(GROUPS)
    assert_same(shared, alone, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_and_small_batches_keep_the_whole_sequences(tiny_vlm_dir, proc, monkeypatch):
    model = policy(tiny_vlm_dir)
    inputs, mask, _ = batch(proc)
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 10**6)  # the default threshold's rule
    counter = Counter(model)
    with torch.no_grad():
        per_token_logps(model, inputs, mask, 1.0)
    assert len(counter.calls) == 1
    model.gradient_checkpointing_enable()
    model.train()
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1)
    per_token_logps(model, inputs, mask, 1.0)[0].sum().backward()
    counter.close()
    assert len(counter.calls) == 2  # one call each: neither shared


def test_micro_batches_cut_inside_groups_share_what_they_hold(tiny_vlm_dir, proc, monkeypatch):
    """Micro-batches of 5 and 2 rows start inside groups and mix one- and two-image prompts: each shares within
    its own rows, takes exactly its rows' images, and the pieces give the whole batch's numbers and gradient."""
    model = policy(tiny_vlm_dir)
    inputs, mask, images = batch(proc)
    whole = run(model, inputs, mask, monkeypatch, shared=False)
    rows = inputs["input_ids"].shape[0]
    for size in (5, 2):
        logps, grads, prompt_runs = [], {}, 0
        for start in range(0, rows, size):
            picked = list(range(start, min(start + size, rows)))
            part = {
                "input_ids": inputs["input_ids"][picked],
                "attention_mask": inputs["attention_mask"][picked],
            }
            part.update(
                images.rows(picked).model_inputs(part["input_ids"])
            )  # as a micro-batch's rollout gives
            out = run(
                model, part, mask[picked], monkeypatch, shared=True, w=[x[picked] for x in weights(mask)]
            )
            logps.append(out[0])
            prompt_runs += out[3].calls[0][0] if len(out[3].calls) == 2 else 0
            for name, g in out[2].items():
                grads[name] = grads.get(name, 0) + g
        assert prompt_runs > 0  # some micro-batches shared
        torch.testing.assert_close(torch.cat(logps), whole[0], rtol=1e-10, atol=1e-12)
        for name, g in whole[2].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


# ---- the fixed-token layout (LLaVA): one pixel_values row per image, 1-D positions ----
LLAVA_GROUPS = [
    ("1+2=", [picture(56, 56, seed=1)], [3, 7, 5]),
    ("1+2=", [picture(56, 56, seed=2)], [6, 2, 7]),  # same ids as the group before, another picture
    ("3+4=", [picture(56, 56, seed=3), picture(56, 56, seed=4)], [7, 1, 5, 3]),
]


def llava_batch(proc, groups=LLAVA_GROUPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompts, pixels, row_imgs, lengths = [], [], [], []
    for text, images, lens in groups:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
        rendered = proc.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        ids, pv, grid = proc.encode(rendered, images)
        assert grid is None
        first = sum(x.shape[0] for x in pixels)
        pixels.append(pv)
        for n in lens:
            prompts.append(ids)
            row_imgs.append(list(range(first, first + pv.shape[0])))
            lengths.append(n)
    p, c, pad = max(map(len, prompts)), max(lengths), proc.pad_token_id
    prompt_ids = torch.tensor([[pad] * (p - len(x)) + x for x in prompts])
    prompt_mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    digits = torch.tensor(proc.tokenizer.convert_tokens_to_ids(list("0123456789")))
    mask = torch.arange(c)[None] < torch.tensor(lengths)[:, None]
    completion = torch.where(mask, digits[torch.randint(0, 10, (len(prompts), c), generator=gen)], pad)
    images = ImageBatch(torch.cat(pixels).double(), None, row_imgs, proc.image_token_id)
    ids = torch.cat([prompt_ids, completion], 1)
    inputs = {"input_ids": ids, "attention_mask": torch.cat([prompt_mask, mask.long()], 1)}
    return {**inputs, **images.model_inputs(ids)}, mask


def test_llava_shared_prefix_equals_the_per_completion_forward_in_float64(tmp_path, monkeypatch):
    config = ModelConfig(name_or_path="tiny-llava:digits", tiny_dir=str(tmp_path))
    proc = load_tokenizer(config)
    model = load_causal_lm(config).to(torch.float64)
    vision_tower(model)[1].requires_grad_(True)
    inputs, mask = llava_batch(proc)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    rows = row_images(model.config, {"pixel_values": inputs["pixel_values"]}, inputs["input_ids"])
    ends = np.cumsum([1] * 6 + [2] * 4).tolist()  # every row's images, in row order
    assert rows.spans == [(e - n, e) for n, e in zip([1] * 6 + [2] * 4, ends)] and not rows.grid

    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda m, a, kw: calls.append(1), with_kwargs=True
    )
    try:
        shared = run_llava(model, inputs, mask, monkeypatch, shared=True)
        images_in_shared_run = len(calls)
        calls.clear()
        alone = run_llava(model, inputs, mask, monkeypatch, shared=False)
    finally:
        hook.remove()
    reference = run_llava(model, inputs, mask, monkeypatch, shared=False, impl="materialized")
    for a, b in ((shared, alone), (shared, reference)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)
        assert a[2].keys() == b[2].keys()
        for name in a[2]:
            torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-10, atol=1e-12, msg=name)
    assert any("vision_tower" in n for n in shared[2])
    # The tower saw each distinct prompt's images once: 4 images, not the 14 of the per-completion forward.
    assert shared[3] == [4] and alone[3] == [14]
    assert images_in_shared_run == 1


def run_llava(model, inputs, mask, monkeypatch, shared: bool, impl: str = "fused"):
    monkeypatch.setattr(logprobs_lib, "SHARE_MIN_SAVED_POSITIONS", 1 if shared else 10**9)
    model.zero_grad(set_to_none=True)
    images = []
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda m, a, kw: images.append((a[0] if a else kw["pixel_values"]).shape[0]), with_kwargs=True
    )
    try:
        logps, ent = per_token_logps(model, inputs, mask, 0.7, impl, compute_entropy=True, entropy_grad=True)
    finally:
        hook.remove()
    w_logps, w_ent = weights(mask)
    ((logps * w_logps).sum() + (ent * w_ent).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logps.detach(), ent.detach(), grads, images
