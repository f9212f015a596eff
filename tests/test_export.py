"""Export: the LoRA adapter and the merged model in Hugging Face format, at the end of training and from a
checkpoint, giving the adapted model's logits."""

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, trainer
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf, open_dict
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.export import ExportCallback, export_model, main
from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.module import GSPOModule
from lightning_gspo.tasks.arithmetic import make_dataset

LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
IDS = torch.tensor([[5, 9, 3, 14, 7, 16, 4, 11], [12, 3, 3, 8, 15, 6, 10, 9]])


def logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS.to(model.device)).logits.float().cpu()
    model.train(was_training)
    return out


def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def fit_lora(tiny_dir, tmp_path, callbacks, max_steps: int = 4, **model) -> GSPOModule:
    L.seed_everything(0)
    cfg = algo(learning_rate=1e-2)
    module = GSPOModule({"name_or_path": str(tiny_dir), "lora": LORA, **model}, REWARDS, cfg)
    data = PromptGroupDataModule(make_dataset(64, seed=3), algorithm=cfg)
    trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True).fit(
        module, datamodule=data
    )
    return module


def test_callback_writes_adapter_and_merged_model_with_the_adapted_logits(tiny_dir, tmp_path):
    module = fit_lora(tiny_dir, tmp_path, [ExportCallback(tmp_path / "export")])
    adapted = logits(module.policy)
    assert not torch.allclose(adapted, logits(AutoModelForCausalLM.from_pretrained(tiny_dir)))  # it trained

    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "export/adapter"
    )
    torch.testing.assert_close(logits(adapter), adapted, rtol=0, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export/merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    for folder in ("adapter", "merged"):  # each loads its tokenizer
        tok = AutoTokenizer.from_pretrained(tmp_path / "export" / folder)
        assert tok("3+4=")["input_ids"] == module.tokenizer("3+4=")["input_ids"]


def test_lm_head_in_modules_to_save_survives_the_merge(tiny_dir, tmp_path):
    """The tiny model ties its head to the embeddings; a trained copy of the head must not be re-tied on load."""
    cfg = ModelConfig(name_or_path=str(tiny_dir), lora={**LORA, "modules_to_save": ["lm_head"]})
    policy = load_causal_lm(cfg)
    perturb(policy)
    assert not torch.allclose(
        logits(policy), logits(AutoModelForCausalLM.from_pretrained(tiny_dir)), atol=1e-3
    )
    written = export_model(policy, load_tokenizer(cfg), tmp_path / "out", model_config=cfg)
    merged = AutoModelForCausalLM.from_pretrained(written["merged"])
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(logits(merged), logits(policy), rtol=1e-5, atol=1e-5)
    # Without a model config the base named in the adapter's config is used.
    written = export_model(policy, None, tmp_path / "no_config")
    merged = AutoModelForCausalLM.from_pretrained(written["merged"])
    torch.testing.assert_close(logits(merged), logits(policy), rtol=1e-5, atol=1e-5)


def test_qlora_merges_into_the_unquantised_base(tiny_dir, tmp_path):
    cfg = ModelConfig(
        name_or_path=str(tiny_dir), lora=LORA, load_in_4bit=True, bnb_4bit_compute_dtype="float32"
    )
    policy = load_causal_lm(cfg)
    perturb(policy)
    written = export_model(policy, load_tokenizer(cfg), tmp_path / "out", model_config=cfg)
    merged = AutoModelForCausalLM.from_pretrained(written["merged"])
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # The merged model is the adapter on the full-precision base: exactly what PEFT gives for that pair ...
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), written["adapter"])
    torch.testing.assert_close(logits(merged), logits(full), rtol=1e-5, atol=1e-5)
    # ... and the 4-bit training model differs from it by the quantisation error only.
    error = (logits(merged) - logits(policy)).abs().max()
    assert 0 < error < 0.1 * logits(merged).abs().max()


def test_full_fine_tuning_exports_the_model_itself(tiny_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_dir))
    policy = load_causal_lm(cfg)
    with torch.no_grad():
        policy.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    written = export_model(policy, load_tokenizer(cfg), tmp_path / "out")
    assert set(written) == {"merged"}
    merged = AutoModelForCausalLM.from_pretrained(written["merged"])
    torch.testing.assert_close(logits(merged), logits(policy), rtol=1e-5, atol=1e-5)


def _run_config(tmp_path, run, *overrides) -> None:
    """What Hydra writes to <run>/.hydra/config.yaml, composed from the package's configs."""
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(run)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")


def test_export_from_a_checkpoint_with_the_runs_hydra_config(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _run_config(tmp_path, run, "model=tiny-lora", f"model.name_or_path={tiny_dir}", "model.lora.r=4",
                "model.lora.alpha=8")  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, every_n_train_steps=2)
    module = fit_lora(tiny_dir, tmp_path, [ckpt])
    written = main(
        ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out"), "--merged"]
    )
    assert "merged: " in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(written["merged"])
    torch.testing.assert_close(logits(merged), logits(module.policy), rtol=1e-5, atol=1e-5)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), written["adapter"])
    torch.testing.assert_close(logits(adapter), logits(module.policy), rtol=0, atol=1e-5)

    # Settings that do not fit the checkpoint are named, not half-loaded.
    last, config = str(run / "checkpoints" / "last.ckpt"), str(run / ".hydra" / "config.yaml")
    with pytest.raises(ValueError, match=r"has 20 the model lacks .* target modules"):
        main(["--ckpt", last, "--out", str(tmp_path / "bad"), "lora.target_modules=[q_proj, gate_proj]"])
    with pytest.raises(ValueError, match="does not fit the model built from these settings"):
        main(["--ckpt", last, "--out", str(tmp_path / "bad"), "--config", config, "lora.r=8"])

    # A checkpoint away from its run carries its model settings (without --merged only the adapter is written).
    moved = tmp_path / "elsewhere" / "step.ckpt"
    moved.parent.mkdir()
    moved.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    written = main(["--ckpt", str(moved), "--out", str(tmp_path / "carried")])
    assert set(written) == {"adapter"}
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), written["adapter"])
    torch.testing.assert_close(logits(adapter), logits(module.policy), rtol=0, atol=1e-5)

    # One without them (a built model's) needs settings: they are asked for by name.
    saved = torch.load(moved, weights_only=False)
    del saved["hyper_parameters"]
    torch.save(saved, moved)
    with pytest.raises(ValueError, match=r"carries no model settings.*--preset NAME"):
        main(["--ckpt", str(moved), "--out", str(tmp_path / "bad")])
    settings = [f"name_or_path={tiny_dir}", "lora.r=4", "lora.alpha=8"]
    written = main(
        ["--ckpt", str(moved), "--out", str(tmp_path / "explicit"), "--preset", "tiny-lora", *settings]
    )
    assert set(written) == {"adapter"}
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), written["adapter"])
    torch.testing.assert_close(logits(adapter), logits(module.policy), rtol=0, atol=1e-5)
