"""Vision-language policies on the tiny Qwen2.5-VL: the processor without torchvision, rollouts with images,
log-probs with 3-D positions, per-row slicing of image tensors, training (full and LoRA) and the start-up errors."""

import io

import pytest
import torch
from helpers import logged, loss_of, trainer
from pictures import odd_digits, picture, png_bytes

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.decode_engine import build_engine
from lightning_gspo.models import ModelConfig, load_causal_lm, load_preset, load_tokenizer
from lightning_gspo.module import GSPOModule
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.rollout import HFGenerate, Rollout, eos_ids, sample_completions
from lightning_gspo.vision import VisionProcessor
from lightning_gspo.vision_prompts import check_records

SIZES = [(40, 70), (100, 30), (60, 60), (150, 200)]  # (height, width): grids 2x4, 8x2, 4x4, 6x8 patches


@pytest.fixture(scope="module")
def vlm_config(tmp_path_factory):
    return ModelConfig(name_or_path="tiny-vlm:digits", tiny_dir=str(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def vlm(vlm_config):
    return load_causal_lm(vlm_config), load_tokenizer(vlm_config)


def records(tmp_path=None, n: int = 4):
    """Rows with one or two images of different sizes each, as PIL images, bytes and (with tmp_path) files."""
    out = []
    for i in range(n):
        a, b = SIZES[i % 4], SIZES[(i + 1) % 4]
        images = (
            [picture(*a, seed=i)] if i % 2 == 0 else [png_bytes(picture(*a, seed=i)), picture(*b, seed=i)]
        )
        if tmp_path is not None and i % 4 == 2:
            images[0].save(tmp_path / f"img{i}.png")
            images = [str(tmp_path / f"img{i}.png")]
        out.append({"prompt": [{"role": "user", "content": f"{i}+{i}="}], "images": images})
    return out


# ---- 1. the processor ----
def composed_processor(config, monkeypatch):
    """The processor as it is built where the model's own cannot be (no torchvision): composed."""
    import transformers

    def unbuildable(*args, **kwargs):
        raise ImportError("no torchvision")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoProcessor, "from_pretrained", unbuildable)
        proc = load_tokenizer(config)
    assert isinstance(proc, VisionProcessor) and proc.processor is None
    return proc


def test_composed_processor_equals_the_reference_processing(vlm_config, monkeypatch):
    proc = composed_processor(vlm_config, monkeypatch)
    from transformers import AutoImageProcessor

    # The image processor alone (its PIL backend here; torchvision's where it loads), with the ids expanded by hand.
    reference = AutoImageProcessor.from_pretrained(f"{vlm_config.tiny_dir}/vlm-digits")
    tok = proc.tokenizer
    images = [picture(*s) for s in SIZES]
    for pair in (images[:1], images[1:3], images[3:]):
        messages = [
            {"role": "user", "content": [*({"type": "image"} for _ in pair), {"type": "text", "text": "3"}]}
        ]
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, pixels, grid = proc.encode(text, pair)
        ref = reference(images=pair, return_tensors="pt")
        torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=0)
        assert torch.equal(grid, ref["image_grid_thw"])
        # The ids the processor's placeholder expansion gives: one <|image_pad|> per 2x2 merged patches.
        expected = tok("Q: ", add_special_tokens=False)["input_ids"]
        for g in ref["image_grid_thw"]:
            n = int(g.prod()) // 4
            expected += [tok.convert_tokens_to_ids("<|vision_start|>")] + [proc.image_token_id] * n
            expected += [tok.convert_tokens_to_ids("<|vision_end|>")]
        expected += tok("3\nA: ", add_special_tokens=False)["input_ids"]
        assert ids == expected
    # max_pixels caps the image: 150 x 200 (6 x 8 merged tokens at the default) becomes 28 x 56, 2 x 4 patches.
    small = composed_processor(ModelConfig(**{**vlm_config.to_dict(), "max_pixels": 56 * 56}), monkeypatch)
    _, _, grid = small.encode("<|image_pad|>", [images[3]])
    assert grid.tolist() == [[1, 2, 4]] and small.max_pixels == 56 * 56


def test_the_models_own_processor_is_used_where_torchvision_loads(vlm_config, monkeypatch):
    """With torchvision (a GPU machine) the model's own processor is used, and the composed one gives its inputs."""
    pytest.importorskip("torchvision")
    proc = load_tokenizer(vlm_config)
    assert proc.processor is not None
    images = [picture(*s) for s in SIZES[:2]]
    text = "Q: <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>3\nA: "
    ids, pixels, grid = proc.encode(text, images)
    ref = proc.processor(text=[text], images=images, return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    torch.testing.assert_close(pixels, ref["pixel_values"])
    for max_pixels in (None, 56 * 56):
        cfg = ModelConfig(**{**vlm_config.to_dict(), "max_pixels": max_pixels})
        own, composed = load_tokenizer(cfg), composed_processor(cfg, monkeypatch)
        assert own.processor is not None
        for pair in (images[:1], images):
            t = text if len(pair) == 2 else "Q: <|vision_start|><|image_pad|><|vision_end|>3\nA: "
            a, b = own.encode(t, pair), composed.encode(t, pair)
            assert a[0] == b[0] and torch.equal(a[2], b[2])
            # torchvision's resize and PIL's round differently: the pixels agree to a few 1e-2 (of a unit std).
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0.1)


# ---- 2-5. rollouts and log-probs ----
def _rollout(vlm, rows, g: int = 2, **cfg) -> Rollout:
    model, proc = vlm
    config = GSPOConfig(**{"num_generations": g, "max_completion_length": 5, "max_prompt_length": 128, **cfg})
    engine = build_engine(proc, config, eos_ids(proc, model))
    torch.manual_seed(0)
    return sample_completions(model, proc, rows, config, engine, eos_ids(proc, model))


def test_rollout_carries_each_rows_images_and_never_samples_placeholders(vlm):
    model, proc = vlm
    assert isinstance(
        build_engine(proc, GSPOConfig(generation_engine="hf"), eos_ids(proc, model)), HFGenerate
    )
    r = _rollout(vlm, records(), g=3, per_device_train_batch_size=12)
    assert r.images.row_images == [[0]] * 3 + [[1, 2]] * 3 + [[3]] * 3 + [[4, 5]] * 3
    assert not torch.isin(r.completion_ids, torch.tensor(proc.placeholder_ids)).any()
    picked = r.rows(torch.tensor([4, 0]))  # one row with two images, one with one
    inputs = picked.model_inputs()
    grids = r.images.image_grid_thw
    assert torch.equal(inputs["image_grid_thw"], grids[[1, 2, 0]])
    start = int(grids[0].prod())
    size = int(grids[1].prod() + grids[2].prod())
    expected = torch.cat(
        [r.images.pixel_values[start : start + size], r.images.pixel_values[: grids[0].prod()]]
    )
    assert torch.equal(inputs["pixel_values"], expected)
    assert (inputs["mm_token_type_ids"] == 1).sum() == (inputs["input_ids"] == proc.image_token_id).sum()
    joined = Rollout.cat([r.rows(slice(0, 3)), r.rows(slice(3, 6))], proc.pad_token_id)
    assert torch.equal(
        joined.model_inputs()["pixel_values"], r.rows(slice(0, 6)).model_inputs()["pixel_values"]
    )


def test_logps_fused_equal_materialised_and_the_models_own_forward(vlm):
    model, proc = vlm
    r = _rollout(vlm, records())
    inputs = r.model_inputs()
    with torch.no_grad():
        fused, _ = per_token_logps(model, inputs, r.completion_mask, 0.7, "fused")
        mat, _ = per_token_logps(model, inputs, r.completion_mask, 0.7, "materialized")
        # The model's own forward: its own 3-D positions from mm_token_type_ids and the grids.
        out = model(**inputs)
    torch.testing.assert_close(fused, mat, rtol=0, atol=2e-6)
    c = r.completion_ids.shape[1]
    direct = (out.logits[:, -c - 1 : -1].double() / 0.7).log_softmax(-1)
    direct = direct.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    direct = torch.where(r.completion_mask, direct, 0.0).float()
    torch.testing.assert_close(mat, direct, rtol=0, atol=2e-6)
    # 1-D positions from the mask (what a text model gets) give other numbers: the 3-D ones are in use.
    with torch.no_grad():
        flat = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"},
                       position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))  # fmt: skip
    assert not torch.allclose(flat.logits[:, -c - 1 : -1], out.logits[:, -c - 1 : -1], atol=1e-4)


def test_micro_batches_give_the_whole_batchs_logps_loss_and_gradient(vlm):
    model, proc = vlm
    r = _rollout(vlm, records(n=4))  # 8 rows: one or two images per row, four sizes
    g = torch.Generator().manual_seed(0)
    r.advantages = torch.randn(8, generator=g)
    with torch.no_grad():
        current, _ = per_token_logps(model, r.model_inputs(), r.completion_mask, 1.0, "fused")
    r.old_logps = current + 0.2 * torch.randn(current.shape, generator=g)
    r.num_items = r.completion_mask.sum().float()
    # dapo divides by the generation batch's token count (num_items), so micro-batch losses add up to the whole's.
    cfg = dict(num_generations=2, per_device_train_batch_size=8, gradient_accumulation_steps=1, loss_type="dapo",
               num_iterations=2, max_completion_length=5, logprobs_impl="fused")  # fmt: skip
    module = GSPOModule(model, [odd_digits], GSPOConfig(**cfg), tokenizer=proc)
    grads = {}
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
        grads[size] = (torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), loss)
        torch.testing.assert_close(torch.cat(logps), current, rtol=0, atol=1e-5)
    assert grads[8][0].abs().max() > 0
    for size in (3, 1):
        torch.testing.assert_close(grads[size][0], grads[8][0], rtol=1e-4, atol=1e-6)
        assert grads[size][1] == pytest.approx(grads[8][1], rel=1e-5, abs=1e-7)
    model.zero_grad(set_to_none=True)


# ---- 6. training ----
@pytest.mark.parametrize(
    "lora", [None, {"r": 4, "alpha": 8, "target_modules": "all-linear"}], ids=["full", "lora"]
)
def test_tiny_vlm_trains_with_the_vision_tower_frozen(vlm_config, tmp_path, lora):
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_completion_length=4, max_prompt_length=128, learning_rate=1e-2, logging_steps=1,
                     num_iterations=2, lr_scheduler_type="constant", seed=1)  # fmt: skip
    module = GSPOModule({**vlm_config.to_dict(), "lora": lora}, [odd_digits], cfg)
    tower = {n: p.detach().clone() for n, p in module.policy.named_parameters() if ".visual." in n}
    assert tower and not any("lora" in n for n in tower)
    trainable = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable) == (lora is not None)
    data = PromptGroupDataModule(records(tmp_path, n=8), algorithm=cfg)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    params = dict(module.policy.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in tower.items())
    rows = logged(tmp_path)
    assert any(row.get("reward") not in (None, "") for row in rows)
    assert any(row.get("grad_norm") not in (None, "") for row in rows)


def test_train_vision_tower_puts_it_in_the_optimizer(vlm_config):
    module = GSPOModule({**vlm_config.to_dict(), "train_vision_tower": True}, [odd_digits], GSPOConfig())
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if ".visual." in n)


def test_tiny_vlm_preset_loads():
    cfg = load_preset("tiny-vlm")
    assert cfg.name_or_path == "tiny-vlm:digits" and cfg.lora is None


# ---- bad input ----
def test_bad_image_inputs_are_refused_before_the_first_step(vlm, tiny_dir, tmp_path):
    _, proc = vlm
    text_tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    good = records(n=2)
    cases = [
        ([{**good[0], "images": [b"not an image"]}], proc, r"row 0 of the prompt dataset: the image cannot be opened"),
        ([good[0], {**good[1], "images": [str(tmp_path / "missing.png")]}], proc, r"row 1 .*cannot be opened"),
        (good, text_tok, "row 0 of the prompt dataset has images .* text-only model"),
        ([{"prompt": "1+1=", "images": good[0]["images"]}], proc, "plain-text prompt"),
        ([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1"}]}]}], proc,
         "image blocks but the row has no image"),
        ([{"prompt": "Q: <|image_pad|>1+1="}], proc, "holds the image placeholder"),
        ([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1"}]}],
           "images": [picture(40, 40), picture(50, 50)]}], proc, r"1 image block\(s\) .* for 2 image\(s\)"),
    ]  # fmt: skip
    for rows, tok, message in cases:
        with pytest.raises(ValueError, match=message):
            check_records(rows, tok)
    check_records(good, proc)
    # Through training: the error comes from setup, before any step runs.
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=2, max_completion_length=2)
    module = GSPOModule(str(tiny_dir), [odd_digits], cfg)
    data = PromptGroupDataModule(good, algorithm=cfg)
    with pytest.raises(ValueError, match="text-only model"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert module.forward_counts["policy"] == 0
    # And in the sampler, for rows that bypass the data module.
    with pytest.raises(ValueError, match="text-only model"):
        sample_completions(module.policy, text_tok, good, cfg, build_engine(text_tok, cfg, [1]), [1])


def test_cutting_image_tokens_is_an_error(vlm):
    with pytest.raises(ValueError, match="cutting it would remove image tokens"):
        _rollout(vlm, records(n=1), max_prompt_length=4)


def test_a_checkpointed_rollout_keeps_its_images(vlm):
    from lightning_gspo.run_state import RunState

    r = _rollout(vlm, records(n=2))
    state = RunState()
    state.rollout = r
    saved = torch.load(_save(state.state_dict()), weights_only=False)
    restored = RunState()
    restored.load_state_dict(saved)
    restored.rollout_to(torch.device("cpu"))
    for key, value in r.model_inputs().items():
        assert torch.equal(restored.rollout.model_inputs()[key], value), key


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
