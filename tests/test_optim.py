"""16-bit full fine-tuning: float32 master weights behind every AdamW, clipping on float32 gradients, and the
master copies in checkpoints."""

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, logged, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.module import GSPOModule
from lightning_gspo.optim import MasterWeights, build_optimizer, clip_grad_norm
from lightning_gspo.tasks.arithmetic import make_dataset

OPTIMS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit"]


def _pair(tiny_dir):
    """The tiny model in bfloat16 and in float32 with the same (bfloat16-representable) weights, and the same
    gradients (the float32 model's, rounded for the bfloat16 one)."""
    m32 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    m16 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(m32.parameters(), m16.parameters()):
            a.copy_(b)
    ids = torch.randint(3, 18, (4, 12), generator=torch.Generator().manual_seed(0))
    m32(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(m32.parameters(), m16.parameters()):
        b.grad = a.grad.to(torch.bfloat16)
    return m16, m32


@pytest.mark.parametrize("optim", OPTIMS)
def test_a_small_bf16_step_lands_in_float32_master_weights(tiny_dir, optim):
    m16, m32 = _pair(tiny_dir)
    cfg = GSPOConfig(learning_rate=1e-5, optim=optim)
    opt16, opt32 = build_optimizer(cfg, list(m16.parameters())), build_optimizer(cfg, list(m32.parameters()))
    assert isinstance(opt16, MasterWeights) and not isinstance(opt32, MasterWeights)
    before = [p.detach().clone() for p in m32.parameters()]
    opt16.step()
    opt32.step()
    masters = [opt16.master_of(p) for p in m16.parameters()]
    assert all(m.dtype == torch.float32 for m in masters)
    changed32 = sum(int((p != b).sum()) for p, b in zip(m32.parameters(), before))
    changed_both = sum(int(((p != b) & (m != b)).sum()) for p, m, b in zip(m32.parameters(), masters, before))
    assert changed32 > 0.9 * sum(b.numel() for b in before)
    assert changed_both >= 0.999 * changed32  # the float32 step's changes, (almost) all of them
    for p, m, b in zip(m32.parameters(), masters, before):
        # The same update up to the gradients' bfloat16 rounding (Adam's first step is ~lr * sign(grad)).
        torch.testing.assert_close(m - b, p.detach() - b, rtol=0, atol=2e-7)
    for p, m in zip(m16.parameters(), masters):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))  # the model holds the master, rounded
        assert p.grad is None  # the 16-bit gradient was moved into the master copy, not kept twice


def test_master_weights_accumulate_updates_bf16_alone_would_round_away(tiny_dir):
    """Thirty lr-1e-5 steps: the bfloat16 model follows the float32 run (rounded); stepping bfloat16 directly
    leaves most weights where they were."""
    m16, m32 = _pair(tiny_dir)
    grads = [p.grad.clone() for p in m32.parameters()]
    cfg = GSPOConfig(learning_rate=1e-5)
    opt16, opt32 = build_optimizer(cfg, list(m16.parameters())), build_optimizer(cfg, list(m32.parameters()))
    for _ in range(30):
        for a, b, g in zip(m32.parameters(), m16.parameters(), grads):
            a.grad, b.grad = g.clone(), g.to(torch.bfloat16)
        opt16.step()
        opt32.step()
        opt16.zero_grad()
        opt32.zero_grad()
    weights = [(a, b) for a, b in zip(m32.parameters(), m16.parameters()) if a.dim() == 2]  # matrices
    same = sum(int((b.detach() == a.detach().to(torch.bfloat16)).sum()) for a, b in weights)
    assert same >= 0.99 * sum(a.numel() for a, _ in weights)


def test_clipping_sees_the_float32_gradients(tiny_dir):
    m16, m32 = _pair(tiny_dir)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in m16.parameters()]))
    opt = build_optimizer(GSPOConfig(learning_rate=1e-5), list(m16.parameters()))
    norm = clip_grad_norm(list(m16.parameters()), 0.5)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    clipped = torch.stack([opt.master_of(p).grad.norm() for p in m16.parameters()])
    torch.testing.assert_close(torch.linalg.vector_norm(clipped), torch.tensor(0.5), rtol=1e-5, atol=0)


def test_float32_weights_keep_the_plain_optimizer(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    opt = build_optimizer(GSPOConfig(), list(model.parameters()))
    assert type(opt) is torch.optim.AdamW and "master_weights" not in opt.state_dict()


def _bf16_run(tiny_dir, out, max_steps, ckpt_path=None, every=None):
    L.seed_everything(7)
    cfg = algo(num_iterations=2, learning_rate=1e-4)
    module = GSPOModule({"name_or_path": str(tiny_dir), "dtype": "bfloat16"}, REWARDS, cfg)
    data = PromptGroupDataModule(make_dataset(64, seed=3), algorithm=cfg)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    fit = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, fit, logged(out)


def test_bf16_full_fine_tuning_trains_and_resumes_from_its_master_weights(tiny_dir, tmp_path):
    full, fit, rows = _bf16_run(tiny_dir, tmp_path / "full", max_steps=4)
    assert all(p.dtype == torch.bfloat16 for p in full.policy.parameters())
    (opt,) = fit.optimizers
    masters = opt.state_dict()["master_weights"]
    assert len(masters) == len(list(full.policy.parameters())) and masters[0].dtype == torch.float32
    _bf16_run(tiny_dir, tmp_path / "first", max_steps=2, every=2)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=2.ckpt")
    assert (
        torch.load(ckpt, weights_only=False)["optimizer_states"][0]["master_weights"][0].dtype
        == torch.float32
    )
    resumed, fit2, rows2 = _bf16_run(tiny_dir, tmp_path / "second", max_steps=4, ckpt_path=str(ckpt))
    assert rows[-1]["step"] == rows2[-1]["step"] == "4"
    for key in ("loss", "reward", "grad_norm"):
        assert float(rows[-1][key]) == pytest.approx(float(rows2[-1][key]), rel=1e-5, abs=1e-7), key
    for a, b in zip(masters, fit2.optimizers[0].state_dict()["master_weights"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the float32 values, not the rounded model's
    for (k, v), w in zip(full.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
