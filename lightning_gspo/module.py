"""``GSPOModule``: GRPO/GSPO training as a LightningModule. Orchestration and Lightning hooks only.

One Lightning training step is one micro-batch, which keeps every backward paired with one forward (what DDP
and FSDP expect). The data module yields each generation batch of prompts ``num_iterations x
steps_per_generation`` times; on the first the module samples ``num_generations`` completions per prompt and
scores them (``scored_sampling.ScoredSampler``, which with dynamic sampling also refills flat groups), computes
advantages, and (only when they are needed) old and reference log-probs; on every step it takes its micro-batch
of that rollout, computes the loss (``loss.micro_batch_loss``) and accumulates gradients, stepping the optimizer
every ``gradient_accumulation_steps`` micro-batches (manual optimization, TRL's semantics). Held-out evaluation's
hooks are in ``evaluation_hooks.py``.

- Old log-probs are needed only when the run is off-policy; on-policy the ratio is exactly 1 and
  ``policy_loss`` uses the current log-probs, detached, saving a forward pass. Off-policy, when the whole first
  pass over a generation batch runs before the next optimizer step (the default, ``steps_per_generation ==
  gradient_accumulation_steps``) and the policy has no active dropout, the log-probs that pass computes with
  gradients *are* the old log-probs, bit for bit: they are kept from it instead of a separate no-grad pass.
  Otherwise (more micro-batches per generation than per optimizer step, or dropout) the separate pass runs.
- A mixture-of-experts policy's routing is recorded where the old log-probs are computed (the no-grad pass, or
  the first pass when it stands in for it) and compared with, or replayed in, the later passes
  (``routing.py``; ``routing/expert_flip_rate``, ``routing_replay``). The recording lives in the rollout.
- The reference model exists only when ``beta > 0``, and never enters the checkpoint or the optimizer. Nor do
  reward models (``rewards.reward_model``): frozen, outside the module's registry, moved to its device here.
- With ``beta = 0`` zero-advantage completions skip the forward and backward (``loss.py`` says how the loss
  stays the micro-batch's, and when the entropy keeps every row); a micro-batch with nothing left is skipped on
  one process.
- An entropy bonus's coefficient lives in ``RunState`` (``entropy_control.py``): fixed, or adapted after each
  optimizer step from that step's entropy, and logged as ``entropy_coef``.
- A mixture-of-experts policy's load-balancing loss coefficient is resolved against the loaded model once, at
  construction (``router_aux.py``: TRL's rules, a clear error for a coefficient on a dense model); only the
  policy's own forward with gradients computes that loss.
- Checkpoints carry the run's settings (``hyper_parameters``: model, reward functions, algorithm) and its
  ``RunState``, so a resumed run continues exactly as an uninterrupted one and export needs no other file.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import lightning as L
import torch

from lightning_gspo.adapters import is_peft_model
from lightning_gspo.advantages import group_advantages
from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptBatch
from lightning_gspo.decode_engine import build_engine
from lightning_gspo.entropy_control import EntropyControl
from lightning_gspo.evaluation import Evaluator
from lightning_gspo.evaluation_hooks import EvaluationHooks
from lightning_gspo.loss import micro_batch_loss, scored_rows
from lightning_gspo.models import (
    ModelConfig,
    disable_dropout,
    frozen_copy,
    has_active_dropout,
    load_causal_lm,
    load_tokenizer,
)
from lightning_gspo.optim import build_optimizer, build_scheduler, clip_grad_norm
from lightning_gspo.policy_logprobs import fused_unsupported, per_token_logps
from lightning_gspo.policy_state import with_frozen, without_frozen
from lightning_gspo.reporting import completion_rows, reduce_mean, show_completions
from lightning_gspo.rewards import resolve_reward_funcs, reward_func_settings
from lightning_gspo.rollout import GenerationEngine, Rollout, eos_ids
from lightning_gspo.router_aux import resolve_router_aux_coef
from lightning_gspo.routing import routing_tracer
from lightning_gspo.run_state import RunState
from lightning_gspo.scored_sampling import ScoredSampler
from lightning_gspo.vision_prompts import check_image_rows
from lightning_gspo.vlm_models import image_only_parameters

# Checkpoints hold the state after the optimizer step together with the rollout and RNG that follow it, which is
# what an exact resume needs; Lightning's warning about pre-optimization state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class GSPOModule(EvaluationHooks, L.LightningModule):
    """Args:
    model: a ``ModelConfig`` (or its dict), a name/path, or an already built causal LM.
    reward_funcs: callables with TRL's signature, their import paths, or reward models (a directory or hub name, a
        built sequence classifier, a ``RewardModel``); see ``lightning_gspo.rewards.resolve_reward_funcs``.
    config: the algorithm config (``GSPOConfig`` or a dict of GRPOConfig field names).
    tokenizer: needed when ``model`` is a built model; loaded from the model's path otherwise.
    engine: the ``GenerationEngine`` that samples completions; by default the one ``config.generation_engine``
        names.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: list,
        config: GSPOConfig | dict | None = None,
        tokenizer=None,
        engine: GenerationEngine | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.config = cfg = GSPOConfig.coerce(config)
        self.policy, self.tokenizer, self.model_config = _load_policy(model, tokenizer)
        self.reward_funcs, self.reward_names = resolve_reward_funcs(reward_funcs)
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(cfg.reward_weights)} entries for {len(self.reward_funcs)} reward functions "
                f"({', '.join(self.reward_names)}); give one weight each."
            )
        if cfg.disable_dropout:
            disable_dropout(self.policy)
        self.logprobs_impl = cfg.logprobs_impl
        if self.logprobs_impl == "fused" and (why := fused_unsupported(self.policy)):
            warnings.warn(
                f"logprobs_impl='fused' is not used: {why}; computing log-probs from the model's logits.",
                UserWarning,
                stacklevel=2,
            )
            self.logprobs_impl = "materialized"
        self.router_aux_coef = resolve_router_aux_coef(self.policy, cfg.router_aux_loss_coef)
        # The reference sits outside the module's registry: not in the checkpoint, the optimizer or DDP. With
        # LoRA it is the policy with its adapters disabled (see _logps): no second copy of the weights.
        ref = frozen_copy(self.policy) if cfg.beta > 0 and not is_peft_model(self.policy) else None
        object.__setattr__(self, "ref_model", ref)
        # After the reference copy, which must not carry the policy's routing hooks.
        self.routing = routing_tracer(self.policy, cfg.routing_replay)
        self.image_params = image_only_parameters(self.policy)
        self.eos = eos_ids(self.tokenizer, self.policy)
        engine = engine or build_engine(self.tokenizer, cfg, self.eos)
        self.sampler = ScoredSampler(
            self.tokenizer, cfg, engine, self.eos, self.reward_funcs, self.reward_names
        )
        self.evaluator = Evaluator(self.tokenizer, cfg, self.eos, self.reward_funcs, self.reward_names)
        self.forward_counts = {"policy": 0, "old": 0, "ref": 0}
        self.state = RunState(entropy=EntropyControl.from_config(cfg))
        settings = _run_settings(
            self.model_config, reward_func_settings(reward_funcs, self.reward_funcs), cfg
        )
        self.save_hyperparameters(settings)

    # ---- Lightning hooks ----
    def setup(self, stage: str) -> None:
        if self.trainer.precision == "16-mixed":
            raise ValueError(
                "precision='16-mixed' needs loss scaling this module does not do; use 'bf16-mixed'."
            )
        self.spg = self.config.steps_per_generation_for(self.trainer.world_size)
        dm = getattr(self.trainer, "datamodule", None)
        if (
            stage == "fit" and getattr(dm, "dataset", None) is not None
        ):  # images: bad rows named before step one
            check_image_rows(dm.dataset, self.tokenizer)
        if self.sampler.dynamic is not None and stage == "fit" and not hasattr(dm, "extra_prompts"):
            raise ValueError(
                "dynamic_sampling=True draws further prompts from the data module: train with a "
                "PromptGroupDataModule (trainer.fit(module, datamodule=...)), or give your data module an "
                "extra_prompts(start, count) method, or set dynamic_sampling=False."
            )

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.sampler.reward_models_to(self.device)
        self.state.rollout_to(self.device)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.config, [p for p in self.policy.parameters() if p.requires_grad])
        self._total_steps = total = self._total_optimizer_steps()
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": build_scheduler(self.config, optimizer, total), "interval": "step"},
        }

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        cfg, state = self.config, self.state
        state.apply_pending_rng()
        if batch.is_first or state.rollout is None:
            state.rollout = self._make_rollout(batch.records)
        micro = state.rollout.micro_batch(batch.repeat % self.spg, cfg.per_device_train_batch_size)
        record_old = state.old_from_first_pass and batch.repeat < self.spg
        loss = self._micro_loss(micro, record_old)
        state.micro_steps += 1
        if state.micro_steps % cfg.gradient_accumulation_steps == 0:
            self._optimizer_step()
        state.position = (batch.epoch, batch.index, batch.repeat)
        if batch.repeat == cfg.num_iterations * self.spg - 1:  # the generation batch is used up
            self._maybe_log()
        return loss

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
                logger.save()

    # ---- the rollout ----
    @torch.no_grad()
    def _make_rollout(self, records: list[dict[str, Any]]) -> Rollout:
        cfg, g = self.config, self.config.num_generations
        r, rewards, refilled = self.sampler.generation_batch(
            self.policy, records, self.device, self._extra_prompts, self._any_rank_short
        )
        prompts, completions = r.texts["prompts"], r.texts["completions"]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        gathered = self.all_gather(rewards).reshape(-1, rewards.shape[1]) if world > 1 else rewards
        adv = group_advantages(gathered, g, cfg.reward_weights, cfg.scale_rewards, self.reward_names)
        r.advantages = adv.advantages[rank * len(prompts) : (rank + 1) * len(prompts)].to(self.device)
        r.num_items = self.trainer.strategy.reduce(r.completion_mask.sum().float(), reduce_op="sum")
        self.state.old_from_first_pass = False
        if cfg.is_off_policy or self.spg > cfg.gradient_accumulation_steps:
            if self.routing is not None:  # filled where the old log-probs are computed
                r.routes = self.routing.empty_routes(r.model_inputs()["attention_mask"])
            if self._first_pass_is_on_policy():
                # Filled row by row by the first pass (see training_step); rows it leaves out for a zero
                # advantage are left out of every pass, so they are never read.
                r.old_logps = torch.zeros(r.completion_ids.shape, dtype=torch.float32, device=self.device)
                self.state.old_from_first_pass = True
            else:
                r.old_logps = self._logps_no_grad(r, "old")
        if cfg.beta > 0:
            r.ref_logps = self._logps_no_grad(r, "ref")
        lengths = r.completion_mask.sum(1).float()
        metrics = {
            **adv.metrics,
            **refilled,
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": r.is_truncated.float().mean().item(),
        }
        self.state.window.add(reduce_mean(metrics, self.trainer.strategy) if world > 1 else metrics)
        self._last_rows = (prompts, completions, rewards, adv.advantages)
        return r

    def _extra_prompts(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` prompts of the data module's extra-prompt stream (dynamic sampling)."""
        start = self.state.extra_prompts_drawn
        self.state.extra_prompts_drawn += count
        return self.trainer.datamodule.extra_prompts(start, count)

    def _any_rank_short(self, flat_groups: int) -> bool:
        if self.trainer.world_size == 1:
            return flat_groups > 0
        total = self.trainer.strategy.reduce(
            torch.tensor(float(flat_groups), device=self.device), reduce_op="sum"
        )
        return total.item() > 0

    def _first_pass_is_on_policy(self) -> bool:
        """Whether the first pass over a rollout made now computes its log-probs with the weights that sampled
        it, deterministically: no optimizer step falls inside that pass (micro-steps ``m`` to ``m + spg - 1``
        with an optimizer step after every ``gradient_accumulation_steps``-th), and no dropout is active."""
        ga = self.config.gradient_accumulation_steps
        return self.state.micro_steps % ga + self.spg <= ga and not has_active_dropout(self.policy)

    # ---- log-probs: the policy, the old policy (no gradient) and the reference ----
    def _logps_no_grad(self, rollout: Rollout, which: str) -> torch.Tensor:
        size = self.config.per_device_train_batch_size
        chunks = range(math.ceil(rollout.completion_ids.shape[0] / size))
        return torch.cat([self._logps(rollout.micro_batch(i, size), which, entropy=False)[0] for i in chunks])

    def _logps(self, r: Rollout, which: str, entropy: bool):
        self.forward_counts[which] += 1
        args = (r.model_inputs(), r.completion_mask, self.config.temperature, self.logprobs_impl, entropy)
        control = self.state.entropy
        bonus = which == "policy" and control is not None and control.applied() != 0
        # The entropy bonus differentiates the entropy, nothing else does; the policy's own forward also returns
        # the load-balancing loss (a third item) while its coefficient is not 0. The old pass forwards the same
        # tokens (the last one too), so a routing recording covers every token the later passes route.
        args = (*args, bonus, which != "ref" and self.router_aux_coef != 0, self.config.logprobs_layout)
        if which == "ref":
            with torch.no_grad():
                if self.ref_model is None:  # PEFT: the base network with adapters off
                    with self.policy.disable_adapter():
                        return per_token_logps(self.policy, *args)
                return per_token_logps(self.ref_model, *args)
        recording = self._routing(r, record=True) if which == "old" else contextlib.nullcontext()
        with torch.set_grad_enabled(which == "policy"), recording:
            return per_token_logps(self.policy, *args)

    def _routing(self, r: Rollout, record: bool, rows: torch.Tensor | None = None):
        """The routing session of a forward over micro-batch ``r`` (its ``rows``): recording the experts of the
        old policy, or comparing the current router's with them (replaying them with ``routing_replay``); none
        when the rollout has no recording (lightning_gspo.routing)."""
        if self.routing is None or r.routes is None:
            return contextlib.nullcontext()
        mode = "record" if record else "replay" if self.config.routing_replay else "compare"
        return self.routing.session(mode, r.routes, rows)

    # ---- the loss and the optimizer ----
    def _micro_loss(self, r: Rollout, record_old: bool = False) -> torch.Tensor:
        world = self.trainer.world_size
        rows = scored_rows(r, self.config, router_aux=self.router_aux_coef != 0)
        if rows[1] == 0 and world == 1:  # nothing to learn, and no other rank to line up with
            return torch.zeros((), device=self.device)
        with self._routing(r, record_old, rows[0]) as routed:
            loss, metrics = micro_batch_loss(
                r,
                self.config,
                lambda s: self._logps(s, "policy", entropy=True),
                world_size=world,
                steps_per_generation=self.spg,
                record_old=record_old,
                rows=rows,
                entropy_control=self.state.entropy,
                router_aux_loss_coef=self.router_aux_coef,
            )
        if routed is not None and routed.flip_rate is not None:
            metrics["routing/expert_flip_rate"] = float(routed.flip_rate)
            metrics["routing/router_flip_rate"] = float(routed.router_flip_rate)
        if world > 1 and self.image_params:
            # A micro-batch without images leaves the vision tower (or a projector) out of the backward, and DDP
            # waits for every trainable parameter's gradient: they join with zero (they are few beside the model).
            loss = loss + 0.0 * sum(p.sum() for p in self.image_params)
        self.manual_backward(loss)
        self.state.window.add(reduce_mean(metrics, self.trainer.strategy))
        return loss.detach()

    def _optimizer_step(self) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = clip_grad_norm(params, max_norm, getattr(self.trainer.strategy, "model", None))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.state.window.add({"grad_norm": grad_norm, "learning_rate": sched.get_last_lr()[0]})
        if (control := self.state.entropy) is not None:  # adaptive control updates for the next step
            control.step()
            self.state.window.add({"entropy_coef": control.coef})

    def _total_optimizer_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(
            1, math.ceil(self.trainer.estimated_stepping_batches / self.config.gradient_accumulation_steps)
        )

    # ---- logging ----
    def _maybe_log(self) -> None:
        step, window = self.global_step, self.state.window
        if "reward" in window.sums:
            reward = window.sums["reward"] / window.counts["reward"]
            self.log("reward", reward, prog_bar=True, logger=False, rank_zero_only=True)
        if step - self.state.last_logged_step < self.config.logging_steps and step < self._total_steps:
            return
        means = window.means()
        window.reset()
        self.state.last_logged_step = step
        self._log_metrics(means)
        if self.config.log_completions and self.global_rank == 0:
            limit = self.config.num_completions_to_print or self.config.num_generations
            prompts, completions, rewards, advantages = self._last_rows
            rows = completion_rows(prompts, completions, rewards, self.reward_names, advantages, limit)
            show_completions(rows, step, self.loggers)

    # ---- checkpoints ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gspo"] = self.state.state_dict()
        if is_peft_model(self.policy):  # the adapters, not the frozen base (lightning_gspo.policy_state)
            checkpoint["state_dict"] = without_frozen(self.policy, checkpoint["state_dict"], "policy.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if is_peft_model(self.policy):
            checkpoint["state_dict"] = with_frozen(self.policy, checkpoint["state_dict"], "policy.")
        if state := checkpoint.get("gspo"):
            self.state.load_state_dict(state)
            trainer = self._trainer
            self.state.resume_data(getattr(trainer, "datamodule", None) if trainer is not None else None)


def _load_policy(model: Any, tokenizer) -> tuple[torch.nn.Module, Any, ModelConfig | None]:
    """(policy in training mode, tokenizer, the ModelConfig it was loaded from or None for a built model)."""
    if isinstance(model, (str, dict, ModelConfig)):
        if isinstance(model, str):
            model = ModelConfig(name_or_path=model)
        mcfg = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        policy = load_causal_lm(mcfg)
        tokenizer = tokenizer or load_tokenizer(mcfg)
    else:
        policy, mcfg = model, None
    if tokenizer is None:
        raise ValueError("a built model needs its tokenizer: GSPOModule(model, ..., tokenizer=tokenizer).")
    policy.train()  # from_pretrained returns eval mode; dropout is governed by disable_dropout
    return policy, tokenizer, mcfg


def _run_settings(model_config: ModelConfig | None, reward_funcs: list, cfg: GSPOConfig) -> dict[str, Any]:
    """The run's settings for the checkpoint's ``hyper_parameters``: the model's loading recipe (None for a built
    model), the reward functions as ``reward_func_settings`` records them, the algorithm config."""
    return {
        "model": None if model_config is None else model_config.to_dict(),
        "reward_funcs": reward_funcs,
        "config": cfg.to_dict(),
    }
