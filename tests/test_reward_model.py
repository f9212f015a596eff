"""Reward models as reward functions: TRL 1.16's texts and scores, batching, weights beside callables, load-time
errors, and training with one (frozen, outside the optimizer and the checkpoint, rebuilt by evaluate)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import algo, logged, trainer

from lightning_gspo.advantages import STD_EPS, group_advantages
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.module import GSPOModule
from lightning_gspo.rewards import BUILT_REWARD_MODEL, resolve_reward_funcs, score_completions
from lightning_gspo.rewards.reward_model import RewardModel
from lightning_gspo.tasks.arithmetic import make_dataset
from lightning_gspo.tiny import build_char_tokenizer, build_tiny_reward_model

FORMAT = "lightning_gspo.rewards.arithmetic.format_reward"
SMALL_RM = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
# Rows of different lengths (the empty completion included), so padding decides which token is scored.
PLAIN = (["1+1=", "12+30=", "7=", "100+200=", "13+4="], ["2", "42 yes", "", "300", "7 (I think so)"])
CHAT = (
    [[{"role": "user", "content": q}] for q in ["1+1?", "What is 12+30?", "7?", "100+200?", "13+4?"]],
    [[{"role": "assistant", "content": a}] for a in ["2", "42", "", "The answer is 300.", "7"]],
)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny reward model (Qwen2ForSequenceClassification, num_labels=1, a chat template) saved as a directory;
    its tokenizer starts encodings with BOS, so scoring without special tokens (TRL's) is what is tested."""
    return build_tiny_reward_model(
        tmp_path_factory.mktemp("reward") / "tiny_rm", "ascii", add_bos=True, **SMALL_RM
    )


def direct_scores(path, texts: list[str]) -> list[float]:
    """Each text through a freshly loaded copy of the model alone (no padding at all): the reference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [
            model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item() for t in texts
        ]


def test_strings_resolve_to_reward_models_or_functions(rm_dir, monkeypatch):
    funcs, names = resolve_reward_funcs([str(rm_dir), FORMAT])
    assert isinstance(funcs[0], RewardModel) and names == ["tiny_rm", "format_reward"]
    assert funcs[0].source == str(rm_dir)
    monkeypatch.chdir(rm_dir.parent)  # an existing directory without "/" is a model too
    (rm,), _ = resolve_reward_funcs(["tiny_rm"])
    assert isinstance(rm, RewardModel)
    options = {"model": "tiny_rm", "batch_size": 2, "chat_template": "chatml"}
    (rm,), _ = resolve_reward_funcs([options])
    assert rm.batch_size == 2 and rm.source == options
    assert "<|im_start|>user" in rm.texts(CHAT[0][:1], CHAT[1][:1])[0]  # its own chat template


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_scores_equal_a_direct_forward_at_any_batch_size(rm_dir, kind, batch_size):
    prompts, completions = PLAIN if kind == "plain" else CHAT
    rm = RewardModel.from_pretrained(str(rm_dir), batch_size=batch_size)
    tok = rm.tokenizer
    if kind == "plain":
        texts = [p + c for p, c in zip(prompts, completions)]
    else:
        texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    assert rm.texts(prompts, completions) == texts
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) == len(texts)  # every row is padded in a batch of more than one
    scores = rm(prompts=prompts, completions=completions, completion_ids=[[0]] * len(prompts))
    assert scores == pytest.approx(direct_scores(rm_dir, texts), abs=1e-5)
    assert len(set(scores)) == len(scores)


def trl_trainer(rm: RewardModel):
    """What TRL 1.16's ``GRPOTrainer._calculate_rewards`` reads, for one process on the CPU with one model
    reward; its own __init__ would set the config's pad token id as ``RewardModel`` does."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    vars(t).update(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(device=torch.device("cpu"), report_to=[]),
        state=SimpleNamespace(global_step=0),
        reward_funcs=[rm.model],
        reward_processing_classes=[rm.tokenizer],
        reward_func_names=[rm.__name__],
        chat_template_kwargs={},
        environments=None,
        is_deepspeed_enabled=False,
        _log_completion_extra=None,
        _log_metric=None,
    )
    return GRPOTrainer, t


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_scores_are_trls(rm_dir, kind):
    pytest.importorskip("trl")
    prompts, completions = PLAIN if kind == "plain" else CHAT
    rm = RewardModel.from_pretrained(str(rm_dir), batch_size=2)
    cls, t = trl_trainer(rm)
    inputs = [{"prompt": p} for p in prompts]
    theirs = cls._calculate_rewards(t, inputs, prompts, completions, [[0]] * len(prompts))[:, 0]
    assert rm(prompts, completions) == pytest.approx(theirs.tolist(), abs=1e-6)


def test_a_reward_model_and_a_callable_combine_by_their_weights(tiny_dir, rm_dir):
    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    cfg = algo(num_generations=4, reward_weights=[2.0, 0.5])
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [str(rm_dir), length], cfg)
    assert module.reward_names == ["tiny_rm", "length"]
    prompts = ["1+1="] * 4 + ["2+5="] * 4
    completions = ["2", "3", "22", "", "7", "7 ", "8", "77"]
    columns = {"answer": ["2"] * 4 + ["7"] * 4}
    scores = score_completions(
        module.reward_funcs, module.reward_names, prompts, completions, [[0]] * 8, columns
    )
    adv = group_advantages(
        torch.tensor(scores), 4, cfg.reward_weights, cfg.scale_rewards, module.reward_names
    )

    model = torch.tensor(direct_scores(rm_dir, [p + c for p, c in zip(prompts, completions)]))
    lengths = torch.tensor([float(len(c)) for c in completions])
    rewards = (2.0 * model + 0.5 * lengths).view(2, 4)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + STD_EPS)
    assert torch.allclose(adv.rewards, rewards.flatten(), atol=1e-5)
    assert torch.allclose(adv.advantages, expected.flatten(), atol=1e-4)
    assert adv.metrics["rewards/tiny_rm/mean"] == pytest.approx(model.mean().item(), abs=1e-6)


def test_a_reward_model_needs_one_label(tmp_path, tiny_dir):
    two = build_tiny_reward_model(tmp_path / "two", "ascii", num_labels=2, **SMALL_RM)
    with pytest.raises(ValueError, match=r"'two' has num_labels=2.*num_labels=1"):
        resolve_reward_funcs([str(two)])
    # A causal LM's directory is no reward model (its config has the default two labels).
    with pytest.raises(ValueError, match="num_labels=2"):
        resolve_reward_funcs([str(tiny_dir)])
    from transformers import AutoModelForSequenceClassification

    built = AutoModelForSequenceClassification.from_pretrained(two)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel(built, build_char_tokenizer("ascii"))


def test_a_tokenizer_without_a_pad_token_is_refused(tmp_path, rm_dir):
    from transformers import AutoModelForSequenceClassification

    tok = build_char_tokenizer("ascii")
    tok.pad_token = None
    assert tok.pad_token_id is None
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer\.pad_token"):
        RewardModel(model, tok)
    model.save_pretrained(tmp_path / "no_pad")
    tok.save_pretrained(tmp_path / "no_pad")
    with pytest.raises(ValueError, match="'no_pad': its tokenizer has no pad token"):
        resolve_reward_funcs([str(tmp_path / "no_pad")])


def test_strings_that_are_neither_a_function_nor_a_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="'no_such_module.reward' is neither an importable function"):
        resolve_reward_funcs(["no_such_module.reward"])
    with pytest.raises(
        ValueError, match=r"'/no/such/dir' cannot be loaded as a reward model.*save_pretrained"
    ):
        resolve_reward_funcs(["/no/such/dir"])
    with pytest.raises(ValueError, match="no config.json"):
        resolve_reward_funcs([str(tmp_path)])  # a directory, but no model in it
    with pytest.raises(ValueError, match="only the options.*unknown: batch"):
        resolve_reward_funcs([{"model": str(tmp_path), "batch": 2}])
    with pytest.raises(ValueError, match="built in memory.*pass the reward functions explicitly"):
        resolve_reward_funcs([f"{BUILT_REWARD_MODEL}: rm"])


def test_training_leaves_the_reward_model_frozen_and_out_of_the_checkpoint(tiny_dir, rm_dir, tmp_path):
    L.seed_everything(0)
    cfg = algo(reward_weights=[1.0, 0.5])
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [str(rm_dir), FORMAT], cfg)
    rm = module.reward_funcs[0]
    rm_before = copy.deepcopy(rm.model.state_dict())
    policy_before = copy.deepcopy(module.policy.state_dict())
    calls = []
    forward = rm.model.forward

    def spy(*args, **kwargs):  # how every scoring forward ran
        out = forward(*args, **kwargs)
        calls.append((torch.is_grad_enabled(), out.logits.requires_grad, rm.model.training))
        return out

    rm.model.forward = spy
    moved, to = [], rm.to
    rm.to = lambda device: (moved.append(torch.device(device)), to(device))[1]
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=PromptGroupDataModule(make_dataset(64, seed=3), algorithm=cfg))

    assert t.global_step == 2
    assert any(not torch.equal(v, policy_before[k]) for k, v in module.policy.state_dict().items())
    assert all(torch.equal(v, rm_before[k]) for k, v in rm.model.state_dict().items())
    assert calls and set(calls) == {(False, False, False)}
    assert moved and set(moved) == {module.device}  # on_fit_start put it where the policy is
    assert not any(p.requires_grad for p in rm.model.parameters())
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in rm.model.parameters()}
    rows = logged(tmp_path)
    assert any(r.get("rewards/tiny_rm/mean") for r in rows)

    t.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=False)
    assert set(saved["state_dict"]) == {f"policy.{k}" for k in module.policy.state_dict()}
    assert not any("score" in k for k in saved["state_dict"])  # the classifier's head
    assert saved["hyper_parameters"]["reward_funcs"] == [str(rm_dir), FORMAT]

    # evaluate rebuilds the reward model from the path the checkpoint recorded.
    from lightning_gspo.evaluate import evaluate

    metrics = evaluate(
        ["algorithm.num_generations_eval=0", "data.eval_batch_size=10"], ckpt=tmp_path / "run.ckpt"
    )
    assert "eval/rewards/tiny_rm/mean" in metrics and "eval/rewards/format_reward/mean" in metrics


def test_a_built_reward_model_is_recorded_by_name_and_evaluate_asks_for_it(tiny_dir, rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_gspo.evaluate import evaluate

    built = RewardModel(
        AutoModelForSequenceClassification.from_pretrained(rm_dir), AutoTokenizer.from_pretrained(rm_dir)
    )
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [built, FORMAT], algo(reward_weights=[1.0, 0.5]))
    assert module.hparams["reward_funcs"] == [f"{BUILT_REWARD_MODEL}: tiny_rm", FORMAT]
    assert not any("score" in k for k in module.state_dict())
    ckpt = tmp_path / "built.ckpt"
    policy = {f"policy.{k}": v for k, v in module.policy.state_dict().items()}
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": policy}, ckpt)
    overrides = ["algorithm.num_generations_eval=0", "data.eval_batch_size=10"]
    with pytest.raises(ValueError, match="built in memory.*Pass the reward functions explicitly"):
        evaluate(overrides, ckpt=ckpt)
    metrics = evaluate(overrides, ckpt=ckpt, reward_funcs=[built, FORMAT])
    assert "eval/rewards/tiny_rm/mean" in metrics


def test_a_built_model_gets_its_tokenizers_pad_token_id(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    # Without it the classifier cannot find the last real token of a padded row.
    model.config.pad_token_id = None
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = RewardModel(model, tok, batch_size=3)
    assert model.config.pad_token_id == tok.pad_token_id
    texts = [p + c for p, c in zip(*PLAIN)]
    assert rm(*PLAIN) == pytest.approx(direct_scores(rm_dir, texts), abs=1e-5)


def test_a_hydra_reward_config_lists_a_model_beside_functions(rm_dir, tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from lightning_gspo.train import build

    entries = f"[{rm_dir},{{model:'{rm_dir}',batch_size:4,dtype:bfloat16}},{FORMAT}]"
    overrides = [f"reward.funcs={entries}", "reward.weights=[1.0,0.5,0.25]", "model.tiny.num_hidden_layers=2"]
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.model.tiny_dir = str(tmp_path / "tiny")
    _, module, _ = build(cfg)
    assert module.reward_names == ["tiny_rm", "tiny_rm", "format_reward"]
    assert [getattr(f, "batch_size", None) for f in module.reward_funcs] == [32, 4, None]
    assert module.reward_funcs[1].model.dtype == torch.bfloat16
    assert module.config.reward_weights == [1.0, 0.5, 0.25]
    options = {"model": str(rm_dir), "batch_size": 4, "dtype": "bfloat16"}
    assert module.hparams["reward_funcs"] == [str(rm_dir), options, FORMAT]
