"""Vision-language policies on the tiny LLaVA (the fixed image layout: one (3, H, W) pixel_values row and a fixed
number of image tokens per image, 1-D positions): its processor with and without the composition, rollouts,
log-probs, per-row slicing of the image tensors, training (full, LoRA, with the tower) and the start-up errors."""

import copy

import pytest
import torch
from helpers import logged, loss_of, trainer
from pictures import odd_digits, picture, png_bytes

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.decode_engine import build_engine
from lightning_gspo.image_batch import ImageBatch
from lightning_gspo.models import ModelConfig, load_causal_lm, load_preset, load_tokenizer
from lightning_gspo.module import GSPOModule
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.rollout import Rollout, eos_ids, sample_completions
from lightning_gspo.vision import VisionProcessor
from lightning_gspo.vision_prompts import check_records

SIZES = [(40, 70), (100, 30), (60, 60), (150, 200)]  # (height, width): all resized and cropped to 56 x 56
TOKENS = 16  # (56 / 14) ** 2 patches; the CLS token is dropped
UNUSED = "post_layernorm"  # LLaVA takes the tower's hidden states before CLIP's last norm: it has no gradient


@pytest.fixture(scope="module")
def llava_config(tmp_path_factory):
    return ModelConfig(name_or_path="tiny-llava:digits", tiny_dir=str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def llava(llava_config):
    return load_causal_lm(llava_config), load_tokenizer(llava_config)


def records(n: int = 4):
    """Rows with one image (PIL) or two (bytes and PIL), of different sizes."""
    out = []
    for i in range(n):
        a, b = SIZES[i % 4], SIZES[(i + 1) % 4]
        images = (
            [picture(*a, seed=i)] if i % 2 == 0 else [png_bytes(picture(*a, seed=i)), picture(*b, seed=i)]
        )
        out.append({"prompt": [{"role": "user", "content": f"{i}+{i}="}], "images": images})
    return out


# ---- the processor ----
def test_own_and_composed_processors_give_the_hand_expansion(llava, llava_config, monkeypatch):
    _, proc = llava
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    assert type(proc.processor).__name__ == "LlavaProcessor"  # builds without torchvision
    with monkeypatch.context() as m:  # as where the processor cannot be built: composed from the config
        m.setattr(transformers.AutoProcessor, "from_pretrained", _unbuildable)
        composed = load_tokenizer(llava_config)
    assert isinstance(composed, VisionProcessor) and composed.processor is None
    assert composed.image_token == "<image>"
    assert composed.tokens_per_image == TOKENS
    # The PIL backend is what the processor uses here; with torchvision installed it takes its own backend.
    pil = isinstance(proc.image_processor, LlavaImageProcessorPil)
    reference = (
        proc.image_processor
        if not pil
        else LlavaImageProcessorPil.from_pretrained(f"{llava_config.tiny_dir}/llava-digits")
    )
    tok = proc.tokenizer
    images = [picture(*s) for s in SIZES]
    for pair in (images[:1], images[1:3], images[3:] + images[:1]):
        messages = [
            {"role": "user", "content": [*({"type": "image"} for _ in pair), {"type": "text", "text": "3"}]}
        ]
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = tok("Q: ", add_special_tokens=False)["input_ids"] + [proc.image_token_id] * (
            TOKENS * len(pair)
        )
        expected += tok("3\nA: ", add_special_tokens=False)["input_ids"]
        ref = reference(images=pair, return_tensors="pt")["pixel_values"]
        assert ref.shape == (len(pair), 3, 56, 56)
        for p in (proc, composed):
            ids, pixels, grid = p.encode(text, pair)
            assert ids == expected and grid is None
            torch.testing.assert_close(pixels, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.max_pixels=3136: .* resizes every image to one size"):
        load_tokenizer(ModelConfig(**{**llava_config.to_dict(), "max_pixels": 56 * 56}))


def _unbuildable(*args, **kwargs):
    raise ImportError("no torchvision")


# ---- rollouts and log-probs ----
def _rollout(llava, rows, g: int = 2, **cfg) -> Rollout:
    model, proc = llava
    config = GSPOConfig(**{"num_generations": g, "max_completion_length": 5, "max_prompt_length": 128, **cfg})
    engine = build_engine(proc, config, eos_ids(proc, model))
    torch.manual_seed(0)
    return sample_completions(model, proc, rows, config, engine, eos_ids(proc, model))


def test_rollout_carries_each_rows_images_and_never_samples_the_image_token(llava):
    model, proc = llava
    assert proc.placeholder_ids == [proc.image_token_id]
    # A head that favours <image> by far: unsuppressed, generate samples nothing else; the rollout never does.
    bias = torch.zeros(len(proc))
    bias[proc.image_token_id] = 1e4
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        r = _rollout(llava, records(), g=3, per_device_train_batch_size=12)
        free = model.generate(**r.rows(slice(0, 1)).model_inputs(), max_new_tokens=3, do_sample=True)
    finally:
        hook.remove()
    assert (free[:, -3:] == proc.image_token_id).all()
    assert not (r.completion_ids == proc.image_token_id).any()
    assert r.images.row_images == [[0]] * 3 + [[1, 2]] * 3 + [[3]] * 3 + [[4, 5]] * 3
    assert r.images.image_grid_thw is None and r.images.pixel_values.shape == (6, 3, 56, 56)
    inputs = r.rows(torch.tensor([4, 0, 9])).model_inputs()  # two images, one, two
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}  # no grid, no mm_token_type_ids
    pv = r.images.pixel_values
    assert torch.equal(inputs["pixel_values"], pv[[1, 2, 0, 4, 5]])
    assert (inputs["input_ids"] == proc.image_token_id).sum() == TOKENS * 5
    joined = Rollout.cat([r.rows(slice(0, 3)), r.rows(slice(3, 6))], proc.pad_token_id)
    assert torch.equal(
        joined.model_inputs()["pixel_values"], r.rows(slice(0, 6)).model_inputs()["pixel_values"]
    )
    state = ImageBatch.from_state(r.images.rows(slice(3, 7)).state_dict())
    assert state.row_images == [[1, 2]] * 3 + [[3]] and torch.equal(state.pixel_values, pv)
    assert ImageBatch.cat([r.images.rows([0]), r.images.rows([3])]).model_inputs(
        torch.zeros(2, 1, dtype=torch.long)
    )["pixel_values"].shape == (3, 3, 56, 56)


def test_logps_fused_equal_materialised_and_the_models_own_forward_in_float64(llava):
    model, proc = llava
    r = _rollout(llava, records())
    inputs = r.model_inputs()
    model64 = copy.deepcopy(model).double()
    inputs64 = {**inputs, "pixel_values": inputs["pixel_values"].double()}
    with torch.no_grad():
        fused, _ = per_token_logps(model64, inputs64, r.completion_mask, 0.7, "fused")
        mat, _ = per_token_logps(model64, inputs64, r.completion_mask, 0.7, "materialized")
        # The model's own forward and image features, at the 1-D positions of a text model (rotary angles are
        # float32 in Llama, so other offsets of the same relative positions would differ by ~1e-9).
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model64(**inputs64, position_ids=positions)
        fused32, _ = per_token_logps(model, inputs, r.completion_mask, 0.7, "fused")
        moved = {**inputs64, "pixel_values": inputs64["pixel_values"].flip(0)}  # other images, other numbers
        other, _ = per_token_logps(model64, moved, r.completion_mask, 0.7, "fused")
    c = r.completion_ids.shape[1]
    direct = (out.logits[:, -c - 1 : -1] / 0.7).log_softmax(-1)
    direct = direct.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    direct = torch.where(r.completion_mask, direct, 0.0)
    assert fused.dtype == mat.dtype == torch.float64
    torch.testing.assert_close(fused, mat, rtol=0, atol=1e-12)
    torch.testing.assert_close(mat, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused32.double(), fused, rtol=0, atol=2e-5)
    assert not torch.allclose(other, fused, atol=1e-4)


def test_micro_batches_give_the_whole_batchs_logps_loss_and_gradient(llava):
    model, proc = llava
    r = _rollout(llava, records(n=4))  # 8 rows: one or two images per row
    g = torch.Generator().manual_seed(0)
    r.advantages = torch.randn(8, generator=g)
    with torch.no_grad():
        current, _ = per_token_logps(model, r.model_inputs(), r.completion_mask, 1.0, "fused")
    r.old_logps = current + 0.2 * torch.randn(current.shape, generator=g)
    r.num_items = r.completion_mask.sum().float()
    cfg = dict(num_generations=2, per_device_train_batch_size=8, gradient_accumulation_steps=1, loss_type="dapo",
               num_iterations=2, max_completion_length=5, logprobs_impl="fused")  # fmt: skip
    module = GSPOModule(model, [odd_digits], GSPOConfig(**cfg), tokenizer=proc)
    tower = [p for n, p in model.named_parameters() if ".vision_tower." in n and UNUSED not in n]
    for p in tower:  # the tower's gradient depends on which images each row gets: check it too
        p.requires_grad_(True)
    grads = {}
    try:
        for size in (8, 3, 1):  # 3: micro-batches that start inside a group and mix one- and two-image rows
            model.zero_grad()
            logps, loss = [], 0.0
            for start in range(0, 8, size):
                micro = r.rows(slice(start, start + size))
                out, _ = loss_of(module, micro, world_size=1)
                out.backward()
                loss += out.item()
                with torch.no_grad():
                    logps.append(per_token_logps(model, micro.model_inputs(), micro.completion_mask, 1.0)[0])
            flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            grads[size] = (flat, loss, torch.cat([p.grad.flatten() for p in tower]))
            torch.testing.assert_close(torch.cat(logps), current, rtol=0, atol=1e-5)
    finally:
        for p in tower:
            p.requires_grad_(False)
    assert grads[8][0].abs().max() > 0 and grads[8][2].abs().max() > 0
    for size in (3, 1):
        torch.testing.assert_close(grads[size][0], grads[8][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[size][2], grads[8][2], rtol=1e-4, atol=1e-6)
        assert grads[size][1] == pytest.approx(grads[8][1], rel=1e-5, abs=1e-7)
    model.zero_grad(set_to_none=True)


# ---- training ----
@pytest.mark.parametrize(
    "lora, tower_trains",
    [(None, False), ({"r": 4, "alpha": 8, "target_modules": "all-linear"}, False), (None, True)],
    ids=["full", "lora-checkpointed", "full-with-tower"],
)
def test_tiny_llava_trains(llava_config, tmp_path, lora, tower_trains):
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_completion_length=4, max_prompt_length=128, learning_rate=1e-2, logging_steps=1,
                     num_iterations=2, lr_scheduler_type="constant", seed=1)  # fmt: skip
    model_cfg = {**llava_config.to_dict(), "lora": lora, "train_vision_tower": tower_trains}
    model_cfg["gradient_checkpointing"] = lora is not None
    module = GSPOModule(model_cfg, [odd_digits], cfg)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in module.policy.modules())
    assert checkpointed == model_cfg["gradient_checkpointing"]
    tower = {n: p.detach().clone() for n, p in module.policy.named_parameters() if ".vision_tower." in n}
    assert tower and not any("lora" in n for n in tower)
    trainable = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable) == (lora is not None)
    assert all(n in trainable for n in tower) == tower_trains
    trainer(tmp_path, max_steps=2).fit(module, datamodule=PromptGroupDataModule(records(8), algorithm=cfg))
    params = dict(module.policy.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items() if n not in tower)
    changed = [not torch.equal(params[n], v) for n, v in tower.items() if UNUSED not in n]
    assert all(changed) if tower_trains else not any(changed)
    rows = logged(tmp_path)
    assert any(row.get("reward") not in (None, "") for row in rows)
    assert any(row.get("grad_norm") not in (None, "") for row in rows)


def test_export_writes_llavas_processor_and_the_merged_model_reloads(llava_config, tmp_path):
    from transformers import AutoModelForImageTextToText

    from lightning_gspo.export import export_model
    from lightning_gspo.vision import load_processor

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=4, max_completion_length=4)
    module = GSPOModule({**llava_config.to_dict(), "lora": lora}, [odd_digits], cfg)
    with torch.no_grad():  # adapters that change the model, so the merge is seen
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    policy, proc = module.policy.eval(), module.tokenizer
    (record,) = records(1)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1+1="}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids, pixels, _ = proc.encode(text, record["images"])
    inputs = {"input_ids": torch.tensor([ids + ids[-3:]]), "attention_mask": torch.ones(1, len(ids) + 3)}
    inputs["pixel_values"] = pixels
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        expected, _ = per_token_logps(policy, inputs, mask, 1.0)
    written = export_model(policy, proc, tmp_path / "export", merged=True, model_config=llava_config)
    assert set(written) == {"adapter", "merged"}
    for path in written.values():  # LLaVA's own processor files beside each, so AutoProcessor rebuilds it
        from transformers import AutoTokenizer

        again = load_processor(str(path), AutoTokenizer.from_pretrained(path))
        assert type(again.processor).__name__ == "LlavaProcessor" and again.image_token == "<image>"
        ids_again, pixels_again, _ = again.encode(text, record["images"])
        assert ids_again == ids and torch.equal(pixels_again, pixels)
    merged = AutoModelForImageTextToText.from_pretrained(written["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        got, _ = per_token_logps(merged, inputs, mask, 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tiny_llava_preset_loads():
    cfg = load_preset("tiny-llava")
    assert cfg.name_or_path == "tiny-llava:digits" and cfg.lora is None and cfg.max_pixels is None


# ---- bad input ----
def test_bad_image_inputs_are_refused_before_the_first_step(llava, llava_config, tmp_path):
    _, proc = llava
    good = records(n=2)
    one_block = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1"}]}]
    cases = [
        (
            [{"prompt": one_block, "images": [picture(40, 40), picture(50, 50)]}],
            r"1 image block\(s\) .* 2 image",
        ),
        ([{"prompt": "1+1=", "images": good[0]["images"]}], "plain-text prompt"),
        ([{"prompt": one_block}], "image blocks but the row has no image"),
        ([{"prompt": "Q: <image>1+1="}], r"holds the image placeholder <image>"),
        (
            [good[0], {**good[1], "images": [b"not an image"]}],
            "row 1 of the prompt dataset: the image cannot be",
        ),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            check_records(rows, proc)
    check_records(good, proc)
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=2, max_completion_length=2)
    module = GSPOModule(llava_config.to_dict(), [odd_digits], cfg)
    data = PromptGroupDataModule([{**good[0], "prompt": one_block}, cases[0][0][0]], algorithm=cfg)
    with pytest.raises(ValueError, match=r"row 1 of the prompt dataset: the prompt has 1 image block"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert module.forward_counts["policy"] == 0
