"""The algorithm configuration, with TRL ``GRPOConfig``'s field names and defaults.

A TRL or Unsloth user's ``GRPOConfig`` carries over field for field: ``GSPOConfig.from_trl(grpo_config)`` copies
every field we share and warns, by name, about each non-default field we do not implement (vLLM, tools, ...),
so nothing is dropped silently. Validation happens here, at construction, so a bad value fails before any model
loads, with a message that names the field and the fix.

Batch vocabulary is TRL's: ``per_device_train_batch_size`` counts completions (not prompts) per micro-batch;
one generation batch is ``per_device_train_batch_size * steps_per_generation`` completions per rank, generated
once and reused ``num_iterations`` times; the optimizer steps every ``gradient_accumulation_steps``
micro-batches. One difference: a prompt's whole group of ``num_generations`` completions lives on one rank, so
the per-rank generation batch must be a multiple of ``num_generations``.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

from lightning_gspo.config_checks import (
    GENERATION_ENGINES,
    LOGPROB_IMPLS,
    OPTIMIZERS,
    SCALE_REWARDS,
    SCHEDULERS,
    validate,
)
from lightning_gspo.trl_compat import carry_over

__all__ = ["GSPOConfig", "GENERATION_ENGINES", "LOGPROB_IMPLS", "OPTIMIZERS", "SCALE_REWARDS", "SCHEDULERS"]


@dataclass
class GSPOConfig:
    """Everything the GRPO/GSPO algorithm needs, named as TRL's ``GRPOConfig`` names it."""

    # ---- the loss ----
    importance_sampling_level: str = "token"
    """'token' (GRPO: one ratio per token), 'sequence' (GSPO: one length-normalised ratio per sequence) or
    'sequence_token' (GSPO-token: the sequence ratio's value with per-token gradients)."""
    loss_type: str = "dapo"
    """The objective and how per-token losses are averaged, as TRL defines them: 'grpo', 'bnpo', 'dr_grpo',
    'dapo' (the clipped surrogate under four normalisations), 'luspo' (clipped, each sequence weighted by its
    length; meant for the sequence level), 'cispo' (MiniMax-M1: the ratio clipped at epsilon_high and detached,
    times log p; ScaleRL uses epsilon_high=5.0), 'sapo' (a soft sigmoid gate instead of the clip) or 'vespo'
    (a smooth gamma weight of each sequence's ratio; meant for the token level)."""
    epsilon: float = 0.2
    """Lower clip width: ratios below 1 - epsilon stop pulling down. GSPO uses 3e-4."""
    epsilon_high: float | None = None
    """Upper clip width (DAPO's clip-higher); None means epsilon. GSPO uses 4e-4."""
    delta: float | None = None
    """Upper bound on the unclipped ratio (two-sided clipping, INTELLECT-2); must exceed 1 + epsilon_high."""
    beta: float = 0.0
    """KL coefficient towards the reference model (k3 estimator). 0 loads no reference model."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL by the importance ratio, as TRL does by default."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature where the advantage is not positive; above sapo_temperature_pos, so those
    off-policy tokens, whose updates spread over many unsampled tokens, are damped faster (the paper's 1.05)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature where the advantage is positive."""
    vespo_k_pos: float = 2.0
    """VESPO's power exponent k for A >= 0: how strongly sequences whose ratio is below 1 are down-weighted."""
    vespo_lambda_pos: float = 3.0
    """VESPO's decay lambda for A >= 0: how strongly sequences whose ratio is above 1 are down-weighted."""
    vespo_k_neg: float = 3.0
    """VESPO's power exponent k for A < 0."""
    vespo_lambda_neg: float = 2.0
    """VESPO's decay lambda for A < 0."""
    top_entropy_quantile: float = 1.0
    """Keep in the policy loss only this share of completion tokens, those of highest entropy ("Beyond the 80/20
    rule" recommends 0.2); 1.0 keeps all, 0.0 only the highest. The KL term keeps every token."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus: the loss subtracts this times the mean entropy of the tokens the policy loss
    acts on, whatever the loss type. With use_adaptive_entropy, the starting value."""
    use_adaptive_entropy: bool = False
    """Skywork-OR1's adaptive control: after each optimizer step entropy_coef moves by entropy_coef_delta, up when
    that step's mean entropy is at or below entropy_target, down otherwise, within [entropy_coef_min,
    entropy_coef_max]; the bonus applies only while the last measured entropy is at or below the target."""
    entropy_coef_min: float = 0.0
    """Lower bound of the adaptive entropy coefficient."""
    entropy_coef_max: float = 1.0
    """Upper bound of the adaptive entropy coefficient."""
    entropy_coef_delta: float = 0.005
    """Step of the adaptive entropy coefficient per optimizer step."""
    entropy_target: float = 0.2
    """Mean per-token entropy (nats) the adaptive control holds the policy above; set it near the entropy
    logged early in training (language models start at 2-10 nats, so 0.2 acts only on near collapse)."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask: leave out of the policy loss each sequence with a negative
    advantage whose mean (old - current) log-prob exceeds this (e.g. 0.5). None disables it."""
    backend: str = "auto"
    """Policy-loss implementation: 'auto' (Triton on CUDA, PyTorch on CPU), 'torch' or 'triton'."""
    logprobs_impl: str = "fused"
    """Per-token log-probs: 'fused' (hidden states x head, never holding the (N, V) logits) or 'materialized'
    (the model's own logits, then log_softmax; for comparison and exotic heads)."""
    routing_replay: bool = False
    """Mixture-of-experts policies: reuse, in the later passes over a generation batch, the experts each token
    was routed to when the old log-probs were computed (Routing Replay, R3), with gating weights from the current
    router at those experts, so token ratios do not jump when an update flips a token's experts. Off-policy
    only; lightning_gspo.routing says which routers it knows. routing/router_flip_rate (the drift) is logged
    either way."""
    router_aux_loss_coef: float | None = None
    """Weight of a mixture-of-experts model's load-balancing loss (its router's auxiliary loss), added to each
    micro-batch's loss as TRL adds it. None takes the model config's own coefficient (Qwen3-30B-A3B's 0.001,
    gpt-oss-20b's 0.9); 0 turns it off (nothing is computed), which RL fine-tuning may prefer (see the README). A
    non-zero value on a dense model is an error. See lightning_gspo.router_aux."""
    logprobs_layout: str = "buckets"
    """How a micro-batch's rows go through the log-prob forward (policy, old and reference alike; the numbers are
    the same): 'buckets' (rows sorted by completion length, cut into runs by a cost model, each run trimmed to
    its own longest completion and prompt), 'trimmed' (the micro-batch trimmed to its longest completion and
    prompt) or 'padded' (the whole padded block, for comparison). Forwards with image inputs, the
    mixture-of-experts load-balancing loss or a routing recording take the padded block. See
    lightning_gspo/length_buckets.py."""

    # ---- groups, rewards, advantages ----
    num_generations: int = 8
    """Completions sampled per prompt (the group size G). At least 2."""
    num_iterations: int = 1
    """Passes over each generation batch (PPO epochs, mu). Above 1 the run is off-policy and GSPO differs from
    GRPO."""
    steps_per_generation: int | None = None
    """Micro-batches per generation batch; None means gradient_accumulation_steps."""
    generation_batch_size: int | None = None
    """Completions per generation batch over all ranks; alternative to steps_per_generation (not both)."""
    scale_rewards: str = "group"
    """Divide advantages by the group's reward std ('group'), the batch's ('batch') or not at all ('none')."""
    reward_weights: list[float] | None = None
    """One weight per reward function; None weighs each by 1."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without an EOS out of the loss."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: a group whose rewards are all equal teaches nothing (its advantages are 0), so it
    is replaced by the group of a newly drawn prompt until the generation batch holds only informative groups or
    dynamic_sampling_max_rounds extra rounds have run. Extra prompts come from their own seeded order of the
    training prompts (lightning_gspo.dynamic_sampling)."""
    dynamic_sampling_max_rounds: int = 4
    """Extra sampling rounds per generation batch at most; groups still without reward variance then stay in the
    batch (with zero advantage), and dynamic_sampling/groups_left says how many."""

    # ---- generation ----
    max_prompt_length: int | None = 512
    """Prompts longer than this are truncated from the left (with a warning that counts them). None: no limit."""
    max_completion_length: int = 256
    """Most tokens generated per completion; also dr_grpo's normalising constant."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature, as TRL does."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    min_p: float | None = None
    """Minimum probability relative to the most likely token; None disables."""
    repetition_penalty: float = 1.0
    """Hugging Face generate's repetition penalty; 1.0 disables."""
    generation_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for ``model.generate``; they override the fields above. With
    generation_engine='cached' only the sampling fields above and max_new_tokens may be given."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for the tokenizer's ``apply_chat_template`` when chat prompts are rendered for
    sampling and evaluation, e.g. {reasoning_effort: low} for gpt-oss or {enable_thinking: false} for Qwen3.
    A JSON object string is accepted too, as TRL's command line gives it."""
    generation_engine: str = "auto"
    """What samples the completions: 'cached' (``lightning_gspo.decode_engine``: each prompt prefilled once for
    its group, finished completions leaving the batch; 1.7-2x ``generate``'s tokens/s on SmolLM2), 'hf'
    (transformers' ``generate``, the reference), or 'auto': 'cached' unless ``generation_kwargs`` asks for
    something only ``generate`` does (beams, stopping strings, ...), then 'hf'. Both draw from the same
    sampling distribution and give completions in the same format; the same seed gives different draws."""

    # ---- optimization (TrainingArguments' names) ----
    learning_rate: float = 1e-6
    """Peak learning rate."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    optim: str = "adamw_torch_fused"
    """'adamw_torch_fused' (transformers' default with torch >= 2.8), 'adamw_torch', 'adamw_8bit' /
    'adamw_bnb_8bit' or 'paged_adamw_8bit' (bitsandbytes)."""
    lr_scheduler_type: str = "linear"
    """'linear', 'cosine', 'constant' or 'constant_with_warmup'."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming up linearly from 0."""
    warmup_steps: float = 0
    """Warm-up optimizer steps; overrides warmup_ratio when > 0. A value below 1 is a ratio (transformers 5)."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this before each optimizer step; 0 disables."""
    per_device_train_batch_size: int = 8
    """Completions per micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_train_epochs: float = 3.0
    """Passes over the prompt dataset (used when max_steps is not set)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from num_train_epochs."""
    seed: int = 42
    """Seed for sampling, data order and initialisation."""
    disable_dropout: bool = False
    """Turn off dropout in the policy (and reference) so log-probs are deterministic."""

    # ---- logging ----
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    log_completions: bool = False
    """Show a table of sampled prompts, completions and rewards every logging_steps."""
    num_completions_to_print: int | None = None
    """Rows in that table; None shows one group."""

    # ---- evaluation on held-out prompts (lightning_gspo.evaluation) ----
    num_generations_eval: int | None = None
    """Completions sampled per held-out prompt for the sampled metrics and pass@k; None takes num_generations,
    0 skips them (the greedy completion is always scored)."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (the Hydra entry point sets the trainer's val_check_interval
    from it); None leaves that to the trainer."""
    eval_on_start: bool = False
    """Evaluate once before the first training step: the baseline the later evaluations compare against."""
    eval_success_reward: str | None = None
    """The reward function (by name) whose value decides a completion's success for pass@k; None: the first."""
    eval_success_threshold: float = 1.0
    """A completion succeeds when that reward function gives at least this."""

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):  # TRL accepts the old boolean form
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        if self.generation_kwargs is not None:
            self.generation_kwargs = dict(self.generation_kwargs)
        if isinstance(self.chat_template_kwargs, str):  # TRL's command-line form
            self.chat_template_kwargs = _json_object("chat_template_kwargs", self.chat_template_kwargs)
        if hasattr(self.chat_template_kwargs, "keys"):  # a Hydra node or another mapping
            self.chat_template_kwargs = dict(self.chat_template_kwargs)
        validate(self)

    @property
    def epsilon_hi(self) -> float:
        """The upper clip width in force (epsilon_high, or epsilon when it is None)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def entropy_bonus_enabled(self) -> bool:
        """Whether the loss carries an entropy bonus (adaptive control keeps it on even at a zero coefficient)."""
        return self.entropy_coef != 0 or self.use_adaptive_entropy

    @property
    def is_off_policy(self) -> bool:
        """Whether the ratio can differ from 1: several passes, or several optimizer steps per generation."""
        return self.num_iterations > 1 or self.steps_per_generation_for(1) > self.gradient_accumulation_steps

    def steps_per_generation_for(self, world_size: int) -> int:
        """Micro-batches per generation batch on each rank, resolving generation_batch_size for ``world_size``."""
        if self.steps_per_generation is not None:
            spg = self.steps_per_generation
        elif self.generation_batch_size is not None:
            per_step = self.per_device_train_batch_size * world_size
            if self.generation_batch_size % per_step:
                raise ValueError(
                    f"generation_batch_size={self.generation_batch_size} must be divisible by "
                    f"per_device_train_batch_size x world size = {per_step}."
                )
            spg = self.generation_batch_size // per_step
        else:
            spg = self.gradient_accumulation_steps
        local = self.per_device_train_batch_size * spg
        if local % self.num_generations:
            raise ValueError(
                f"each rank generates per_device_train_batch_size x steps_per_generation = {local} completions per "
                f"generation batch, which must be a multiple of num_generations={self.num_generations} so every "
                "prompt's group stays whole on one rank; change per_device_train_batch_size, "
                "gradient_accumulation_steps/steps_per_generation or num_generations."
            )
        return spg

    def prompts_per_rank(self, world_size: int = 1) -> int:
        """Prompts each rank draws per generation batch."""
        return (
            self.per_device_train_batch_size
            * self.steps_per_generation_for(world_size)
            // self.num_generations
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, config: GSPOConfig | dict | None) -> GSPOConfig:
        """A config from a config, a mapping of field names, or None (the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        return cls.from_dict(dict(config))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GSPOConfig:
        """Build from a mapping (a Hydra node, a YAML file), with a clear error for an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown algorithm field(s): {', '.join(hints)}. The fields are GRPOConfig's names; see "
                "lightning_gspo.config.GSPOConfig."
            )
        return cls(**dict(values))

    @classmethod
    def from_trl(cls, grpo_config: Any) -> GSPOConfig:
        """Carry a TRL ``GRPOConfig`` (or its ``to_dict()``) over field for field.

        Fields of ours take TRL's values (``epsilon`` maps to ``epsilon``; TRL's ``epsilon_low`` is the same
        thing). TRL fields we do not implement are listed in one warning when they differ from TRL's default.
        """
        taken, skipped = carry_over(grpo_config, {f.name for f in fields(cls)})
        if skipped:
            warnings.warn(
                "GRPOConfig fields lightning-gspo does not implement were skipped: " + ", ".join(skipped),
                UserWarning,
                stacklevel=2,
            )
        return cls(**taken)


def _json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}={text!r} is not a JSON object: {err}.") from err
    if not isinstance(value, dict):
        raise ValueError(f"{name}={text!r} must be a mapping of keyword arguments (a JSON object).")
    return value
