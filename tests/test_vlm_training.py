"""Every training path with images, on the tiny Qwen2.5-VL: the Qwen2.5-VL presets and Unsloth's vision-RL
experiment, gradient checkpointing, the reference model, DDP with 2 gloo processes, resume in the middle of a
generation batch, and export of the adapter and the merged model with the processor."""

import json

import lightning as L
import pytest
import torch
from helpers import logged, loss_of, trainer
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf, open_dict
from pictures import odd_digits, picture
from test_config import UNSLOTH

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.decode_engine import build_engine
from lightning_gspo.models import ModelConfig, load_causal_lm, load_preset, load_tokenizer
from lightning_gspo.module import GSPOModule
from lightning_gspo.policy_logprobs import per_token_logps
from lightning_gspo.rollout import Rollout, eos_ids, sample_completions
from lightning_gspo.vision import VisionProcessor
from lightning_gspo.vision_prompts import check_records, record_images

SIZES = [
    (40, 70),
    (100, 30),
    (60, 60),
    (150, 200),
]  # (height, width): 2x4, 8x2, 4x4, 6x8 patches of 14 pixels


def image_rows(n: int) -> list[dict]:
    """Chat prompts with one or two images of different sizes each."""
    rows = []
    for i in range(n):
        a, b = SIZES[i % 4], SIZES[(i + 1) % 4]
        images = [picture(*a, seed=i)] if i % 2 == 0 else [picture(*a, seed=i), picture(*b, seed=i)]
        rows.append({"prompt": [{"role": "user", "content": f"{i}+{i}="}], "images": images})
    return rows


@pytest.fixture(scope="module")
def vlm_config(tmp_path_factory):
    return ModelConfig(name_or_path="tiny-vlm:digits", tiny_dir=str(tmp_path_factory.mktemp("tiny_vlm")))


def vlm_module(vlm_config, **algo) -> GSPOModule:
    model = algo.pop("model", {})
    cfg = dict(num_generations=2, per_device_train_batch_size=8, gradient_accumulation_steps=1,
               max_completion_length=5, max_prompt_length=128, loss_type="dr_grpo",
               importance_sampling_level="sequence", num_iterations=2)  # fmt: skip
    return GSPOModule({**vlm_config.to_dict(), **model}, [odd_digits], GSPOConfig(**{**cfg, **algo}))


def off_policy_rollout(module: GSPOModule, n_prompts: int = 4, seed: int = 0) -> Rollout:
    """A sampled rollout with images, advantages and old log-probs away from the current ones (ratios != 1)."""
    cfg, proc = module.config, module.tokenizer
    engine = build_engine(proc, cfg, eos_ids(proc, module.policy))
    torch.manual_seed(seed)
    r = sample_completions(
        module.policy, proc, image_rows(n_prompts), cfg, engine, eos_ids(proc, module.policy)
    )
    g = torch.Generator().manual_seed(seed)
    r.advantages = torch.randn(r.completion_ids.shape[0], generator=g)
    with torch.no_grad():
        current, _ = per_token_logps(module.policy, r.model_inputs(), r.completion_mask, cfg.temperature)
    r.old_logps = current + 0.05 * torch.randn(current.shape, generator=g)
    r.num_items = r.completion_mask.sum().float()
    return r


def grads(module: GSPOModule) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


# ---- presets and the guide's experiment ----
@pytest.mark.parametrize("size", ["3b", "7b"])
@pytest.mark.parametrize("kind", ["", "-lora", "-qlora"])
def test_qwen25_vl_presets_validate(size, kind):
    cfg = load_preset(f"qwen2.5-vl-{size}-instruct{kind}")
    assert cfg.name_or_path == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    assert (cfg.lora is None) == (kind == "") and cfg.load_in_4bit == (kind == "-qlora")
    assert not cfg.train_vision_tower and cfg.gradient_checkpointing and cfg.max_pixels == 512 * 512
    if cfg.lora is not None:  # the language model's projections; the tower is kept out by lora_exclude
        assert (cfg.lora.r, cfg.lora.alpha) == (16, 32)
        assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}  # fmt: skip


def _compose(*overrides):
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def test_unsloth_vlm_experiment_is_the_guides_settings():
    cfg = _compose("experiment=unsloth_gspo_vlm")
    assert cfg.output_dir == "vlm-grpo-unsloth"
    algo = GSPOConfig.from_dict(OmegaConf.to_container(cfg.algorithm, resolve=True))
    for key, value in {**UNSLOTH, "log_completions": False}.items():
        assert getattr(algo, key) == value, key
    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    assert model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and model.load_in_4bit
    assert (model.lora.r, model.lora.alpha, model.max_pixels) == (16, 32, 512 * 512)
    assert not model.train_vision_tower and model.gradient_checkpointing
    source = cfg.data.source
    assert (source._target_, source.path, source.split) == (
        "lightning_gspo.tasks.mathvista.make_dataset", "AI4Math/MathVista", "testmini"
    )  # fmt: skip
    assert list(cfg.reward.funcs) == [
        "lightning_gspo.rewards.math.correctness_reward",
        "lightning_gspo.rewards.math.format_reward",
    ]


def mathvista_rows(tmp_path, n: int = 8):
    """Rows laid out as AI4Math/MathVista's: the picture in decoded_image, a relative name in image."""
    rows = []
    for i in range(n):
        path = tmp_path / f"mv{i}.png"
        picture(*SIZES[i % 4], seed=i).save(path)
        answer = "B" if i == 3 else str(i % 10)  # one multiple-choice answer: dropped
        rows.append({"pid": str(i), "question": f"What is {i}+0?", "image": f"images/{i}.jpg",
                     "decoded_image": str(path), "answer": answer})  # fmt: skip
    source = tmp_path / "mathvista.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    return source


def test_mathvista_rows_become_image_prompts(tmp_path, vlm_config):
    from lightning_gspo.tasks.mathvista import make_dataset

    with pytest.warns(UserWarning, match="1 of 8 MathVista rows"):
        ds = make_dataset(str(mathvista_rows(tmp_path)))
    assert len(ds) == 7 and set(ds.column_names) == {"prompt", "image", "answer", "question"}
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("What is 0+0?")
    assert "<answer>" in row["prompt"][0]["content"] and row["answer"] == "0"
    (image,) = record_images(row)
    assert image.size == (70, 40)  # the picture itself, not the relative name
    check_records(ds, load_tokenizer(vlm_config))
    with pytest.raises(ValueError, match="no column 'decoded_image_'"):
        make_dataset(str(mathvista_rows(tmp_path)), image_column="decoded_image_")


def test_unsloth_vlm_experiment_trains_a_step_on_the_tiny_vlm(tmp_path, vlm_config):
    from lightning_gspo.train import build

    pytest.importorskip("bitsandbytes")  # the guide's adamw_8bit
    # The random tiny VLM never writes the <answer> layout, so reward=math would give every group zero advantage and
    # nothing to train on: a reward that varies between random completions stands in for it.
    cfg = _compose("experiment=unsloth_gspo_vlm", "model=tiny-vlm", "trainer=cpu", "callbacks=none",
                   f"data.source.path={mathvista_rows(tmp_path, n=8)}", "algorithm.max_steps=1",
                   "algorithm.max_completion_length=6", "reward.funcs=[test_vlm_training.odd_digits]",
                   "reward.weights=null")  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.model.tiny_dir = vlm_config.tiny_dir
        cfg.trainer.enable_progress_bar = False
    data, module, t = build(cfg)
    assert isinstance(module.tokenizer, VisionProcessor) and module.tokenizer.max_pixels == 512 * 512
    t.fit(module, datamodule=data)
    assert t.global_step == 1 and module.forward_counts["policy"] == 4  # 4 micro-batches of 8
    assert module.state.rollout.images is not None and module.state.rollout.completion_ids.shape[0] == 32


# ---- gradient checkpointing and the reference ----
@pytest.mark.parametrize(
    "lora", [None, {"r": 4, "alpha": 8, "target_modules": "all-linear"}], ids=["full", "lora"]
)
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(vlm_config, lora):
    plain = vlm_module(vlm_config, model={"lora": lora})
    checkpointed = vlm_module(vlm_config, model={"lora": lora, "gradient_checkpointing": True})
    checkpointed.policy.load_state_dict(plain.policy.state_dict())
    r = off_policy_rollout(plain)
    mlp = next(m for n, m in checkpointed.policy.named_modules() if n.endswith("language_model.layers.0.mlp"))
    calls, forward = [], mlp.forward  # counted in forward itself: a recomputation runs no module hooks
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    out = {}
    for name, module in (("plain", plain), ("checkpointed", checkpointed)):
        module.policy.zero_grad(set_to_none=True)
        loss, _ = loss_of(module, r, world_size=1)
        loss.backward()
        out[name] = (loss.detach(), grads(module))
    assert len(calls) == 2  # the layer's MLP ran again in the backward pass: checkpointing is on
    assert out["plain"][1].abs().max() > 0
    torch.testing.assert_close(out["checkpointed"][0], out["plain"][0], rtol=0, atol=1e-7)
    torch.testing.assert_close(out["checkpointed"][1], out["plain"][1], rtol=1e-5, atol=1e-8)
    tower = [p for n, p in checkpointed.policy.named_parameters() if ".visual." in n]
    assert tower and all(p.grad is None for p in tower)  # frozen: no gradient reaches it


@pytest.mark.parametrize(
    "lora", [None, {"r": 4, "alpha": 8, "target_modules": "all-linear"}], ids=["full", "lora"]
)
def test_the_reference_is_the_starting_policy_with_images(vlm_config, lora):
    module = vlm_module(vlm_config, beta=0.04, model={"lora": lora})
    r = off_policy_rollout(module)
    start = module._logps(r, "policy", entropy=False)[0].detach()
    with torch.no_grad():  # move the policy away from its start (for LoRA: only the adapters move)
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ref = module._logps(r, "ref", entropy=False)[0]
    moved = module._logps(r, "policy", entropy=False)[0].detach()
    torch.testing.assert_close(ref, start, rtol=0, atol=1e-6)
    assert (moved - start).abs().max() > 1e-3
    assert (module.ref_model is None) == (lora is not None)  # LoRA: the base with adapters off, no copy


def test_qlora_with_checkpointing_and_a_reference_trains(vlm_config, tmp_path):
    # The -qlora presets' path: a 4-bit base, LoRA on the language model, checkpointing, beta > 0.
    pytest.importorskip("bitsandbytes")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = {"lora": {"r": 4, "alpha": 8, "target_modules": targets}, "load_in_4bit": True,
             "bnb_4bit_compute_dtype": "float32", "gradient_checkpointing": True}  # fmt: skip
    module = vlm_module(vlm_config, model=model, beta=0.04, per_device_train_batch_size=4, learning_rate=1e-2)
    assert type(
        module.policy.get_base_model().model.language_model.layers[0].mlp.up_proj.base_layer
    ).__name__ == ("Linear4bit")
    trainable = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".visual." not in n for n in trainable)
    trainer(tmp_path, max_steps=2).fit(
        module, datamodule=PromptGroupDataModule(image_rows(8), algorithm=module.config)
    )
    assert module.forward_counts["ref"] == 1 and module.forward_counts["policy"] == 2
    params = dict(module.policy.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())


# ---- DDP: groups and their images on one rank ----
def _ddp_worker(rank, world, port, config, rollout_path, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module = vlm_module(ModelConfig(**config), per_device_train_batch_size=4)
        r = torch.load(rollout_path, weights_only=False)
        mine = r.micro_batch(rank, r.completion_ids.shape[0] // world)  # whole groups, with their images
        loss, _ = loss_of(module, mine, world_size=world)
        loss.backward()
        grad = grads(module)
        dist.all_reduce(grad)  # what DDP does to gradients: the mean over ranks
        torch.save({"grad": grad / world, "inputs": mine.model_inputs()}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_gradient_with_images_equals_one_process(vlm_config, tmp_path):
    single = vlm_module(vlm_config, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    r = off_policy_rollout(single)  # 4 prompts x 2 completions: rank 0 takes prompts 0-1, rank 1 prompts 2-3
    single.policy.zero_grad()
    for i in range(2):
        loss_of(single, r.micro_batch(i, 4), world_size=1)[0].backward()
    expected = grads(single)
    torch.save(r, tmp_path / "rollout.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, 29613, vlm_config.to_dict(), tmp_path / "rollout.pt", tmp_path),
                                nprocs=2)  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    torch.testing.assert_close(ranks[0]["grad"], expected, rtol=1e-4, atol=1e-7)
    # Each rank received exactly its own prompts' images, in its rows' order, and nothing of the other's.
    images = r.images
    starts = images.offsets
    for rank, got in enumerate(ranks):
        order = [i for row in images.row_images[4 * rank : 4 * rank + 4] for i in row]
        assert {*order}.isdisjoint(
            i for row in images.row_images[4 * (1 - rank) : 4 * (2 - rank)] for i in row
        )
        pixels = torch.cat([images.pixel_values[starts[i] : starts[i + 1]] for i in order])
        assert torch.equal(got["inputs"]["pixel_values"], pixels)
        assert torch.equal(got["inputs"]["image_grid_thw"], images.image_grid_thw[order])


def test_each_rank_draws_whole_prompts_with_their_images():
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    rows = [{**row, "id": i} for i, row in enumerate(image_rows(8))]
    seen = []
    for rank in range(2):
        data = PromptGroupDataModule(rows, algorithm=cfg)
        data.rank, data.world_size = rank, 2
        data.setup("fit")
        batches = list(data.train_dataloader())
        seen.append([(b.index, r["id"], len(record_images(r))) for b in batches for r in b.records])
    ids = [{(i, k) for i, k, _ in s} for s in seen]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) == 8
    assert all(n == 1 + k % 2 for s in seen for _, k, n in s)  # every prompt arrives with all of its images


# ---- resume ----
def _run(vlm_config, out, max_steps, ckpt_path=None, every=None):
    L.seed_everything(7)
    module = vlm_module(vlm_config, per_device_train_batch_size=4, max_completion_length=4, learning_rate=1e-2,
                        lr_scheduler_type="constant", logging_steps=1, seed=1)  # fmt: skip
    data = PromptGroupDataModule(image_rows(8), algorithm=module.config)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    t = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged(out) if (out / "csv" / "metrics.csv").exists() else []


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_resume_in_the_middle_of_a_generation_batch_with_images(vlm_config, tmp_path, family):
    # Two optimizer steps per generation batch (num_iterations=2): step 1 stops between them, so the resumed run
    # must take its second step on the checkpointed rollout, images included (both image layouts).
    if family == "llava":
        vlm_config = ModelConfig(**{**vlm_config.to_dict(), "name_or_path": "tiny-llava:digits"})
    full_module, full = _run(vlm_config, tmp_path / "full", max_steps=4)
    _run(vlm_config, tmp_path / "first", max_steps=1, every=1)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=1.ckpt")
    saved = torch.load(ckpt, weights_only=False)["gspo"]["rollout"]
    assert saved["images"]["pixel_values"].shape[0] > 0 and len(saved["images"]["row_images"]) == 4
    resumed_module, resumed = _run(vlm_config, tmp_path / "second", max_steps=4, ckpt_path=str(ckpt))
    after = [r for r in full if int(r["step"]) > 1]
    assert len(after) == 2 and len(resumed) == 2
    for a, b in zip(after, resumed):
        for key in ("reward", "loss", "entropy", "clip_ratio/region_mean", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


# ---- export ----
@pytest.mark.parametrize(
    "lora", [None, {"r": 4, "alpha": 8, "target_modules": "all-linear"}], ids=["full", "lora"]
)
def test_export_writes_the_processor_and_the_merged_model_reloads(vlm_config, tmp_path, lora):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from lightning_gspo.export import export_model
    from lightning_gspo.vision import load_processor

    module = vlm_module(vlm_config, model={"lora": lora})
    with torch.no_grad():  # a trained-looking policy: LoRA's B matrices start at zero
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    r = off_policy_rollout(module, n_prompts=2)
    policy = module.policy.eval()
    with torch.no_grad():
        expected, _ = per_token_logps(policy, r.model_inputs(), r.completion_mask, 0.9)
    cfg = ModelConfig(**{**vlm_config.to_dict(), "lora": lora})
    written = export_model(policy, module.tokenizer, tmp_path / "export", merged=True, model_config=cfg)
    assert set(written) == ({"adapter", "merged"} if lora else {"merged"})
    for path in written.values():  # the processor beside each: tokenizer, chat template, image processor
        assert (path / "preprocessor_config.json").exists() and (path / "tokenizer_config.json").exists()
        proc = load_processor(
            str(path), AutoTokenizer.from_pretrained(path)
        )  # the adapter has no config.json
        assert isinstance(proc, VisionProcessor) and proc.chat_template == module.tokenizer.chat_template
        text = proc.apply_chat_template(
            image_rows(1)[0]["prompt"], tokenize=False, add_generation_prompt=True
        )
        text = text.replace("Q: ", "Q: <|vision_start|><|image_pad|><|vision_end|>", 1)
        ids, pixels, grid = proc.encode(text, [picture(*SIZES[3])])
        ref_ids, ref_pixels, ref_grid = module.tokenizer.encode(text, [picture(*SIZES[3])])
        assert ids == ref_ids and torch.equal(pixels, ref_pixels) and torch.equal(grid, ref_grid)
    merged = AutoModelForImageTextToText.from_pretrained(written["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        got, _ = per_token_logps(merged, r.model_inputs(), r.completion_mask, 0.9)
    assert r.images is not None and r.completion_mask.any()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    # And through the project's loader, as the next run would load it.
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(written["merged"])))
    with torch.no_grad():
        again, _ = per_token_logps(reloaded.eval(), r.model_inputs(), r.completion_mask, 0.9)
    torch.testing.assert_close(again, expected, rtol=0, atol=2e-5)


def test_export_from_a_checkpoint_of_a_lora_run(vlm_config, tmp_path):
    from transformers import AutoModelForImageTextToText

    from lightning_gspo.export import main as export_main

    lora = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    module = vlm_module(vlm_config, per_device_train_batch_size=4, max_completion_length=4, learning_rate=1e-2,
                        lr_scheduler_type="constant", model={"lora": lora})  # fmt: skip
    data = PromptGroupDataModule(image_rows(8), algorithm=module.config)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(module, datamodule=data)
    (path,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    r = off_policy_rollout(module, n_prompts=2)
    with torch.no_grad():
        expected, _ = per_token_logps(module.policy.eval(), r.model_inputs(), r.completion_mask, 0.9)
        with module.policy.disable_adapter():
            base, _ = per_token_logps(module.policy, r.model_inputs(), r.completion_mask, 0.9)
    assert (expected - base).abs().max() > 1e-4  # the adapters trained: the merge has something to carry
    written = export_main(["--ckpt", str(path), "--out", str(tmp_path / "export"), "--merged"])
    assert (written["adapter"] / "adapter_config.json").exists()
    assert all((p / "preprocessor_config.json").exists() for p in written.values())
    merged = AutoModelForImageTextToText.from_pretrained(written["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        got, _ = per_token_logps(merged, r.model_inputs(), r.completion_mask, 0.9)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.ddp
def test_the_guides_experiment_runs_under_ddp_on_two_cpu_processes(tmp_path):
    # Lightning's own DDP (trainer=ddp_sim, gloo): each rank samples its own prompts' groups with their images.
    from test_conf import _cli

    rows, _ = _cli(tmp_path, "experiment=unsloth_gspo_vlm", "model=tiny-vlm", "trainer=ddp_sim", "callbacks=none",
                   f"output_dir={tmp_path / 'run'}", f"data.source.path={mathvista_rows(tmp_path, n=16)}",
                   "algorithm.max_steps=2", "algorithm.max_completion_length=6", "algorithm.num_generations=4",
                   "algorithm.per_device_train_batch_size=4", "algorithm.gradient_accumulation_steps=2",
                   "algorithm.optim=adamw_torch", "reward.funcs=[lightning_gspo.rewards.arithmetic.format_reward]",
                   "reward.weights=null")  # fmt: skip
    trained = [r for r in rows if r.get("grad_norm")]
    assert trained and int(trained[-1]["step"]) == 2  # both optimizer steps ran on both ranks
    assert any(float(r["grad_norm"]) > 0 for r in trained)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "model",
    [["model=tiny-vlm", "model.train_vision_tower=true"], ["model=tiny-llava"]],
    ids=["tower", "projector"],
)
def test_ddp_trains_when_one_rank_draws_prompts_without_images(tmp_path, model):
    # Rank 0 draws the image prompts, rank 1 the text-only ones (no shuffle): rank 1's forward never reaches the
    # trained tower (Qwen2.5-VL with train_vision_tower) or LLaVA's projector, whose gradients DDP still waits for.
    # Without their zero gradients the two processes wait on each other for ever.
    from test_conf import _cli

    rows = []
    for i in range(16):
        image = None
        if (i // 2) % 2 == 0:
            image = str(tmp_path / f"p{i}.png")
            picture(56, 56, seed=i).save(image)
        rows.append({"prompt": [{"role": "user", "content": f"{i % 10}+1="}], "image": image})
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    got, _ = _cli(tmp_path, *model, "trainer=ddp_sim", "callbacks=none", "data=files", f"data.source={source}",
                  "data.shuffle=false", "algorithm.max_steps=2", "algorithm.logging_steps=1",
                  "algorithm.max_completion_length=4", "algorithm.num_generations=2",
                  "algorithm.per_device_train_batch_size=4", "algorithm.gradient_accumulation_steps=1",
                  "reward.funcs=[lightning_gspo.rewards.arithmetic.format_reward]", "reward.weights=null",
                  f"output_dir={tmp_path / 'run'}",
                  timeout=240)  # fmt: skip
    trained = [r for r in got if r.get("grad_norm")]
    assert trained and int(trained[-1]["step"]) == 2  # both optimizer steps ran on both ranks
