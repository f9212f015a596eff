import re
import warnings

import pytest

from lightning_gspo.config import GSPOConfig

# The Unsloth GSPO notebook's settings, as TRL users write them.
UNSLOTH = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=4,
    learning_rate=5e-6,
    adam_beta1=0.9,
    adam_beta2=0.99,
    weight_decay=0.1,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    optim="adamw_8bit",
    epsilon=3e-4,
    epsilon_high=4e-4,
    num_generations=8,
    max_prompt_length=1024,
    max_completion_length=1024,
    max_grad_norm=0.1,
    temperature=0.9,
    num_train_epochs=2,
    importance_sampling_level="sequence",
    loss_type="dr_grpo",
)


def test_unsloth_config_builds_and_resolves():
    cfg = GSPOConfig(**UNSLOTH)
    assert cfg.steps_per_generation_for(1) == 4  # TRL: steps_per_generation defaults to accumulation steps
    assert cfg.prompts_per_rank(1) == 4  # 8 x 4 completions / 8 per group
    assert not cfg.is_off_policy
    assert cfg.epsilon_hi == 4e-4


def test_off_policy_detection():
    assert GSPOConfig(num_iterations=2).is_off_policy
    assert GSPOConfig(steps_per_generation=2, gradient_accumulation_steps=1).is_off_policy


def test_from_trl_carries_every_shared_field_and_reports_the_rest():
    trl = pytest.importorskip("trl")
    trl_fields = {k: v for k, v in UNSLOTH.items() if k not in ("warmup_ratio", "max_prompt_length")}
    args = trl.GRPOConfig(
        output_dir="/tmp/lgspo-trl", use_cpu=True, use_vllm=True, warmup_steps=0.1, **trl_fields
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = GSPOConfig.from_trl(args)
    for key, value in trl_fields.items():
        assert getattr(cfg, key) == value, key
    assert cfg.warmup_steps == 0.1
    skipped = [str(w.message) for w in caught if "does not implement" in str(w.message)]
    assert len(skipped) == 1 and "use_vllm=True" in skipped[0]
    assert "output_dir" not in skipped[0] and "activation_checkpointing" not in skipped[0]


# TRL 1.16's objective fields beyond the clipped GRPO loss, each set away from TRL's default.
OBJECTIVE = dict(
    loss_type="vespo",
    sapo_temperature_neg=1.3,
    sapo_temperature_pos=0.9,
    vespo_k_pos=1.5,
    vespo_lambda_pos=2.5,
    vespo_k_neg=2.5,
    vespo_lambda_neg=1.5,
    top_entropy_quantile=0.2,
    entropy_coef=0.01,
    use_adaptive_entropy=True,
    entropy_coef_min=0.001,
    entropy_coef_max=0.05,
    entropy_coef_delta=0.002,
    entropy_target=1.5,
    off_policy_mask_threshold=0.5,
)


def test_from_trl_carries_the_objective_fields():
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(output_dir="/tmp/lgspo-trl", use_cpu=True, **OBJECTIVE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = GSPOConfig.from_trl(args)
    for key, value in OBJECTIVE.items():
        assert getattr(cfg, key) == value, key
    assert not [w for w in caught if "does not implement" in str(w.message)]


def test_objective_fields_have_trl_defaults():
    trl = pytest.importorskip("trl")
    theirs, ours = trl.GRPOConfig(output_dir="/tmp/lgspo-trl", use_cpu=True), GSPOConfig()
    for key in OBJECTIVE:
        assert getattr(ours, key) == getattr(theirs, key), key


def test_loss_types_are_trl_loss_types():
    trl = pytest.importorskip("trl")
    from lightning_gspo.kernels.policy_loss import LOSS_TYPES

    help_text = trl.GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = re.search(r"Supported values are (.*?)\. ", help_text).group(1)
    assert set(re.findall(r"'(\w+)'", supported)) == set(LOSS_TYPES)


def test_entropy_bonus_is_on_with_a_coefficient_or_adaptive_control():
    assert not GSPOConfig().entropy_bonus_enabled
    assert GSPOConfig(entropy_coef=0.01).entropy_bonus_enabled
    assert GSPOConfig(use_adaptive_entropy=True).entropy_bonus_enabled  # even at coefficient 0


def test_every_loss_type_and_level_is_accepted():
    # TRL 1.16 computes every combination (warning where a loss type expects another level); so do we.
    from lightning_gspo.kernels.policy_loss import LEVELS, LOSS_TYPES

    for level in LEVELS:
        for loss_type in LOSS_TYPES:
            GSPOConfig(importance_sampling_level=level, loss_type=loss_type)


def test_delta_is_checked_only_for_the_clipped_loss_types():
    GSPOConfig(loss_type="cispo", epsilon_high=5.0, delta=2.0)  # cispo never reads delta
    with pytest.raises(ValueError, match="delta"):
        GSPOConfig(loss_type="luspo", epsilon_high=5.0, delta=2.0)


def test_unknown_key_suggests_the_field():
    with pytest.raises(ValueError, match=r"'epsilon_hgh' \(did you mean 'epsilon_high'\?\)"):
        GSPOConfig.from_dict({"epsilon_hgh": 0.28})


def test_scale_rewards_bool_is_trl_compatible():
    assert GSPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GSPOConfig(scale_rewards=True).scale_rewards == "group"


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon_high=-0.1), "epsilon_high"),
        (dict(delta=1.1, epsilon=0.2), "delta"),
        (dict(beta=-1.0), "beta"),
        (dict(num_generations=1), "num_generations"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(per_device_train_batch_size=6, num_generations=4), "num_generations"),
        (dict(steps_per_generation=1, per_device_train_batch_size=6, num_generations=4), "num_generations"),
        (dict(steps_per_generation=2, generation_batch_size=16), "steps_per_generation"),
        (dict(scale_rewards="max"), "scale_rewards"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(adam_beta2=1.0), "adam_beta2"),
        (dict(optim="sgd"), "optim"),
        (dict(lr_scheduler_type="poly"), "lr_scheduler_type"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(max_prompt_length=0), "max_prompt_length"),
        (dict(reward_weights=[]), "reward_weights"),
        (dict(backend="cuda"), "backend"),
        (dict(logprobs_impl="dense"), "logprobs_impl"),
        (dict(generation_engine="vllm"), "generation_engine"),
        (dict(generation_engine="cached", generation_kwargs={"num_beams": 2}), "num_beams"),
        (dict(loss_type="cispo_"), "loss_type"),
        (dict(top_entropy_quantile=-0.1), "top_entropy_quantile"),
        (dict(top_entropy_quantile=1.2), "top_entropy_quantile"),
        (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_min"),
        (dict(entropy_coef_delta=-0.01), "entropy_coef_delta"),
        (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
        (dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
        (dict(backend="triton", loss_type="sapo"), "loss_type='sapo'"),
        (dict(backend="triton", top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
        (dict(backend="triton", off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
        (dict(backend="triton", use_adaptive_entropy=True), "entropy_coef=0.0"),
    ],
)
def test_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GSPOConfig(**bad)


def test_generation_batch_size_resolves_per_world_size():
    cfg = GSPOConfig(generation_batch_size=32, per_device_train_batch_size=8, num_generations=8)
    assert cfg.steps_per_generation_for(1) == 4
    assert cfg.steps_per_generation_for(2) == 2
    with pytest.raises(ValueError, match="generation_batch_size"):
        cfg.steps_per_generation_for(3)
