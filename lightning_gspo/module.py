"""``GSPOModule``: GRPO/GSPO training as a LightningModule.

One Lightning training step is one micro-batch, which keeps every backward paired with one forward (what DDP
and FSDP expect). The data module yields each generation batch of prompts ``num_iterations x
steps_per_generation`` times; on the first the module samples ``num_generations`` completions per prompt,
scores them, computes advantages, and (only when they are needed) old and reference log-probs; on every step it
takes its micro-batch of that rollout, computes the loss and accumulates gradients, stepping the optimizer every
``gradient_accumulation_steps`` micro-batches (manual optimization, TRL's semantics).

- Old log-probs are needed only when the run is off-policy; on-policy the ratio is exactly 1 and
  ``policy_loss`` uses the current log-probs, detached, saving a forward pass. Off-policy, when the whole first
  pass over a generation batch runs before the next optimizer step (the default, ``steps_per_generation ==
  gradient_accumulation_steps``) and the policy has no active dropout, the log-probs that pass computes with
  gradients *are* the old log-probs, bit for bit: they are kept from it instead of a separate no-grad pass.
  Otherwise (more micro-batches per generation than per optimizer step, or dropout) the separate pass runs.
- The reference model exists only when ``beta > 0``, and never enters the checkpoint or the optimizer.
- With ``beta = 0``, a completion whose advantage is zero has zero loss and zero gradient, so it is left out of
  the forward and backward, and the loss is rescaled so the gradient is unchanged (``grpo`` and ``dr_grpo`` by
  kept rows over rows, ``bnpo`` by kept tokens over tokens, ``dapo`` needs nothing: its normaliser is the
  whole batch's). A micro-batch with nothing left is skipped on one process; under DDP every rank still runs
  one row with its loss multiplied by 0, so the gradient collectives line up. TRL's clip-ratio metrics are
  reproduced exactly (the left-out rows count as unclipped); the entropy metric is the mean over the scored
  rows' tokens.
- Checkpoints carry the rollout in flight, the accumulation position and the RNG state, so a resumed run
  continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch

from lightning_gspo.advantages import group_advantages
from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptBatch, _as_config
from lightning_gspo.kernels import policy_loss
from lightning_gspo.models import ModelConfig, disable_dropout, frozen_copy, load_causal_lm, load_tokenizer
from lightning_gspo.optim import build_optimizer, build_scheduler
from lightning_gspo.reporting import MetricWindow, completion_rows, reduce_mean, show_completions
from lightning_gspo.rewards import resolve_reward_funcs
from lightning_gspo.rollout import (
    Rollout,
    completion_mask,
    eos_ids,
    fused_unsupported,
    generate,
    per_token_logps,
    prompt_text,
    tokenize_prompts,
)

# Checkpoints hold the state after the optimizer step together with the rollout and RNG that follow it, which is
# what an exact resume needs; Lightning's warning about pre-optimization state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class GSPOModule(L.LightningModule):
    """Args:
    model: a ``ModelConfig`` (or its dict), a name/path, or an already built causal LM.
    reward_funcs: callables with TRL's signature, or their import paths.
    config: the algorithm config (``GSPOConfig`` or a dict of GRPOConfig field names).
    tokenizer: needed when ``model`` is a built model; loaded from the model's path otherwise.
    """

    def __init__(
        self, model: Any, reward_funcs: list, config: GSPOConfig | dict | None = None, tokenizer=None
    ):
        super().__init__()
        self.automatic_optimization = False
        self.config = cfg = _as_config(config)
        # The loading recipe (quantisation, LoRA, checkpointing) is kept for exporting a merged model later.
        self.model_config: ModelConfig | None = None
        if isinstance(model, (str, dict, ModelConfig)):
            mcfg = (
                model
                if isinstance(model, ModelConfig)
                else ModelConfig(**model)
                if isinstance(model, dict)
                else ModelConfig(name_or_path=model)
            )
            self.model_config = mcfg
            self.policy = load_causal_lm(mcfg)
            tokenizer = tokenizer or load_tokenizer(mcfg)
        else:
            self.policy = model
        self.policy.train()  # from_pretrained returns eval mode; dropout is governed by disable_dropout
        if tokenizer is None:
            raise ValueError(
                "a built model needs its tokenizer: GSPOModule(model, ..., tokenizer=tokenizer)."
            )
        self.tokenizer = tokenizer
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
        # The reference sits outside the module's registry: not in the checkpoint, the optimizer or DDP.
        object.__setattr__(self, "ref_model", self._build_reference() if cfg.beta > 0 else None)
        self.eos = eos_ids(self.tokenizer, self.policy)
        self.forward_counts = {"policy": 0, "old": 0, "ref": 0}
        self._rollout: Rollout | None = None
        self._micro_steps = 0
        self._old_from_first_pass = False
        self._window = MetricWindow()
        self._last_logged_step = 0
        self._position: tuple[int, int, int] | None = None
        self._pending_rng = None

    def _build_reference(self):
        from lightning_gspo.models import is_peft_model

        if is_peft_model(self.policy):
            return None  # PEFT: the reference is the same network with its adapters disabled (see _logps)
        return frozen_copy(self.policy)

    # ---- Lightning hooks ----
    def setup(self, stage: str) -> None:
        if self.trainer.precision == "16-mixed":
            raise ValueError(
                "precision='16-mixed' needs loss scaling this module does not do; use 'bf16-mixed'."
            )
        self.spg = self.config.steps_per_generation_for(self.trainer.world_size)

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        if self._rollout is not None:  # restored from a checkpoint before the model reached its device
            for key, value in self._rollout.tensors().items():
                setattr(self._rollout, key, value.to(self.device))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.config, [p for p in self.policy.parameters() if p.requires_grad])
        self._total_steps = total = self._total_optimizer_steps()
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": build_scheduler(self.config, optimizer, total), "interval": "step"},
        }

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        cfg = self.config
        if self._pending_rng is not None:
            cpu, cuda = self._pending_rng
            torch.set_rng_state(cpu)
            if cuda is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
            self._pending_rng = None
        if batch.is_first or self._rollout is None:
            self._rollout = self._make_rollout(batch.records)
        micro = self._rollout.micro_batch(batch.repeat % self.spg, cfg.per_device_train_batch_size)
        record_old = self._old_from_first_pass and batch.repeat < self.spg
        loss = self._micro_loss(micro, record_old)
        self._micro_steps += 1
        if self._micro_steps % cfg.gradient_accumulation_steps == 0:
            self._optimizer_step()
        self._position = (batch.epoch, batch.index, batch.repeat)
        if batch.repeat == cfg.num_iterations * self.spg - 1:  # the generation batch is used up
            self._maybe_log()
        return loss

    # ---- the rollout ----
    @torch.no_grad()
    def _make_rollout(self, records: list[dict[str, Any]]) -> Rollout:
        cfg, g = self.config, self.config.num_generations
        prompts = [r["prompt"] for r in records for _ in range(g)]
        columns = {k: [r[k] for r in records for _ in range(g)] for k in records[0] if k != "prompt"}
        prompt_ids, prompt_mask, cut = tokenize_prompts(
            [prompt_text(p, self.tokenizer) for p in prompts[::g]], self.tokenizer, cfg.max_prompt_length
        )
        if cut:
            warnings.warn(
                f"{cut} of {len(records)} prompts were longer than max_prompt_length="
                f"{cfg.max_prompt_length} tokens and lost their beginning.",
                UserWarning,
                stacklevel=2,
            )
        prompt_ids = prompt_ids.repeat_interleave(g, 0).to(self.device)
        prompt_mask = prompt_mask.repeat_interleave(g, 0).to(self.device)
        completion_ids = generate(self.policy, self.tokenizer, prompt_ids, prompt_mask, cfg, self.eos)
        mask, truncated = completion_mask(completion_ids, self.eos)
        if cfg.mask_truncated_completions:
            mask = mask & ~truncated.unsqueeze(1)
        texts = self.tokenizer.batch_decode(
            torch.where(mask, completion_ids, self.tokenizer.pad_token_id), skip_special_tokens=True
        )
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts)
        ]
        rewards = self._score(prompts, completions, completion_ids, mask, columns)
        gathered = (
            self.all_gather(rewards).reshape(-1, rewards.shape[1]) if self.trainer.world_size > 1 else rewards
        )
        adv = group_advantages(gathered, g, cfg.reward_weights, cfg.scale_rewards, self.reward_names)
        rank = self.trainer.global_rank
        rollout = Rollout(
            prompt_ids,
            prompt_mask,
            completion_ids,
            mask,
            truncated,
            advantages=adv.advantages[rank * len(prompts) : (rank + 1) * len(prompts)].to(self.device),
            texts={"prompts": prompts, "completions": completions},
        )
        rollout.num_items = self.trainer.strategy.reduce(mask.sum().float(), reduce_op="sum")
        self._old_from_first_pass = False
        if cfg.is_off_policy or self.spg > cfg.gradient_accumulation_steps:
            if self._first_pass_is_on_policy():
                # Filled row by row by the first pass (see training_step); rows it leaves out for a zero
                # advantage are left out of every pass, so they are never read.
                rollout.old_logps = torch.zeros(completion_ids.shape, dtype=torch.float32, device=self.device)
                self._old_from_first_pass = True
            else:
                rollout.old_logps = self._logps_no_grad(rollout, "old")
        if cfg.beta > 0:
            rollout.ref_logps = self._logps_no_grad(rollout, "ref")
        lengths = mask.sum(1).float()
        metrics = dict(adv.metrics)
        metrics.update(
            {
                "completions/mean_length": lengths.mean().item(),
                "completions/min_length": lengths.min().item(),
                "completions/max_length": lengths.max().item(),
                "completions/clipped_ratio": truncated.float().mean().item(),
            }
        )
        self._window.add(
            reduce_mean(metrics, self.trainer.strategy) if self.trainer.world_size > 1 else metrics
        )
        self._last_rows = (prompts, completions, rewards, adv.advantages)
        return rollout

    def _first_pass_is_on_policy(self) -> bool:
        """Whether the first pass over a rollout made now computes its log-probs with the weights that sampled
        it, deterministically: no optimizer step falls inside that pass (micro-steps ``m`` to ``m + spg - 1``
        with an optimizer step after every ``gradient_accumulation_steps``-th), and no dropout is active."""
        ga = self.config.gradient_accumulation_steps
        return self._micro_steps % ga + self.spg <= ga and not has_active_dropout(self.policy)

    def _score(self, prompts, completions, completion_ids, mask, columns) -> torch.Tensor:
        """(B, R) rewards, NaN where a function returned None; a failing function stops the run by name."""
        ids = [row[m].tolist() for row, m in zip(completion_ids, mask)]
        out = torch.full((len(prompts), len(self.reward_funcs)), float("nan"))
        for j, (fn, name) in enumerate(zip(self.reward_funcs, self.reward_names)):
            try:
                values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
            except Exception as err:
                raise RuntimeError(
                    f"reward function {name!r} raised {type(err).__name__}: {err}. First sample: "
                    f"prompt={prompts[0]!r}, completion={completions[0]!r}"
                ) from err
            if values is None or len(values) != len(prompts):
                raise ValueError(
                    f"reward function {name!r} returned {None if values is None else len(values)} "
                    f"values for {len(prompts)} completions; it must return one per completion."
                )
            for i, v in enumerate(values):
                if v is None:
                    continue
                if not math.isfinite(float(v)):
                    raise ValueError(
                        f"reward function {name!r} returned {v} for prompt={prompts[i]!r}, "
                        f"completion={completions[i]!r}; rewards must be finite numbers or None."
                    )
                out[i, j] = float(v)
        return out.to(self.device)

    def _logps_no_grad(self, rollout: Rollout, which: str) -> torch.Tensor:
        chunks = []
        size = self.config.per_device_train_batch_size
        for i in range(math.ceil(rollout.completion_ids.shape[0] / size)):
            chunks.append(self._logps(rollout.micro_batch(i, size), which, entropy=False)[0])
        return torch.cat(chunks)

    def _logps(self, r: Rollout, which: str, entropy: bool):
        self.forward_counts[which] += 1
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        attn = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
        args = (ids, attn, r.completion_mask, self.config.temperature, self.logprobs_impl, entropy)
        if which == "ref":
            with torch.no_grad():
                if self.ref_model is None:  # PEFT: the base network with adapters off
                    with self.policy.disable_adapter():
                        return per_token_logps(self.policy, *args)
                return per_token_logps(self.ref_model, *args)
        with torch.set_grad_enabled(which == "policy"):
            return per_token_logps(self.policy, *args)

    # ---- the loss and the optimizer ----
    def _micro_loss(self, r: Rollout, record_old: bool = False) -> torch.Tensor:
        rows = self._scored_rows(r)
        if (
            rows[1] == 0 and self.trainer.world_size == 1
        ):  # nothing to learn, and no other rank to line up with
            return torch.zeros((), device=self.device)
        loss, metrics = self.micro_batch_loss(r, record_old, rows)
        self.manual_backward(loss)
        self._window.add(reduce_mean(metrics, self.trainer.strategy))
        return loss.detach()

    def micro_batch_loss(
        self, r: Rollout, record_old: bool = False, rows: tuple[torch.Tensor | None, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backpropagate for one micro-batch of a rollout, already scaled for accumulation (TRL's
        rule: dapo's normaliser spans the accumulation window; the others are per-micro-batch means, divided by
        the number of micro-batches in the window), and its metrics.

        At ``beta = 0`` only rows with a non-zero advantage are computed, the loss rescaled so the gradient is
        the whole micro-batch's. ``record_old``: this is the first pass and its log-probs are the old ones: the
        ratio is taken as 1 and the computed rows' log-probs are written into ``r.old_logps`` (a view of the
        rollout's). ``rows``: ``_scored_rows(r)`` when the caller has it already."""
        cfg = self.config
        keep, scale = rows or self._scored_rows(r)
        s = r if keep is None else r.rows(keep)
        logps, entropy = self._logps(s, "policy", entropy=True)
        if record_old:
            r.old_logps[slice(None) if keep is None else keep] = logps.detach().to(r.old_logps.dtype)
        ga, world = cfg.gradient_accumulation_steps, self.trainer.world_size
        loss, metrics = policy_loss(
            logps,
            None if record_old or scale == 0 else s.old_logps,
            s.advantages,
            s.completion_mask,
            s.ref_logps,
            importance_sampling_level=cfg.importance_sampling_level,
            loss_type=cfg.loss_type,
            epsilon_low=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            delta=cfg.delta,
            beta=cfg.beta,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            max_completion_length=cfg.max_completion_length,
            num_items_in_batch=r.num_items / world * ga / self.spg,
            backend=cfg.backend,
        )
        if keep is not None:
            loss = loss * scale
            metrics = _with_left_out_rows(metrics, r, keep, cfg.importance_sampling_level)
        m = s.completion_mask
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["loss"] = float(loss.detach())
        metrics["entropy"] = float(torch.where(m, entropy, 0).sum() / m.sum().clamp(min=1))
        return (loss if cfg.loss_type == "dapo" else loss / ga), metrics

    def _scored_rows(self, r: Rollout) -> tuple[torch.Tensor | None, float]:
        """Which rows to compute (None: all) and the factor that makes their loss the micro-batch's."""
        if self.config.beta != 0:
            return None, 1.0
        keep = r.advantages != 0
        n = int(keep.sum())
        if n == keep.numel():
            return None, 1.0
        if n == 0:  # one row with a zero loss: a backward that lines up with the other ranks'
            return torch.zeros(1, dtype=torch.long, device=keep.device), 0.0
        rows = keep.nonzero().squeeze(1)
        loss_type = self.config.loss_type
        if loss_type == "dapo":
            return rows, 1.0
        if loss_type == "bnpo":
            tokens = r.completion_mask.sum()
            return rows, float(r.completion_mask[rows].sum() / tokens.clamp(min=1))
        return rows, n / keep.numel()

    def _optimizer_step(self) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = self._clip_grad_norm(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._window.add({"grad_norm": grad_norm, "learning_rate": sched.get_last_lr()[0]})

    def _clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's ``clip_grad_norm_``; under FSDP the root module's, which reduces the norm over the ranks'
        shards (torch's, on a rank's own shards, would clip each rank by its own piece of the norm)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self.trainer.strategy, "model", None)
        if isinstance(root, FullyShardedDataParallel):
            return root.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _total_optimizer_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(
            1, math.ceil(self.trainer.estimated_stepping_batches / self.config.gradient_accumulation_steps)
        )

    # ---- logging ----
    def _maybe_log(self) -> None:
        step = self.global_step
        if "reward" in self._window.sums:
            self.log(
                "reward",
                self._window.sums["reward"] / self._window.counts["reward"],
                prog_bar=True,
                logger=False,
                rank_zero_only=True,
            )
        if step - self._last_logged_step < self.config.logging_steps and step < self._total_steps:
            return
        means = self._window.means()
        self._window.reset()
        self._last_logged_step = step
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(means, step=step)
                logger.save()
        if self.config.log_completions and self.global_rank == 0:
            limit = self.config.num_completions_to_print or self.config.num_generations
            show_completions(
                completion_rows(*self._last_rows[:3], self.reward_names, self._last_rows[3], limit),
                step,
                self.loggers,
            )

    # ---- checkpoints: the rollout in flight, the accumulation position, the RNG ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gspo"] = {
            "micro_steps": self._micro_steps,
            "old_from_first_pass": self._old_from_first_pass,
            "position": self._position,
            "last_logged_step": self._last_logged_step,
            "window": (dict(self._window.sums), dict(self._window.counts)),
            "rollout": None
            if self._rollout is None
            else {**{k: v.cpu() for k, v in self._rollout.tensors().items()}, "texts": self._rollout.texts},
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gspo")
        if not state:
            return
        self._micro_steps, self._last_logged_step = state["micro_steps"], state["last_logged_step"]
        self._old_from_first_pass = state.get("old_from_first_pass", False)
        self._window.sums.update(state["window"][0])
        self._window.counts.update(state["window"][1])
        if state["rollout"] is not None:
            saved = dict(state["rollout"])
            texts = saved.pop("texts")
            self._rollout = Rollout(**saved, texts=texts)
        # Applied at the next training step: Lightning draws from the global generator while it sets up (the
        # data loader's base seed), which the uninterrupted run did before the checkpoint, not after it.
        self._pending_rng = (state["rng"], state["cuda_rng"])
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if state["position"] is not None:
            if hasattr(dm, "resume_after"):
                dm.resume_after(*state["position"])
            else:
                warnings.warn(
                    "resuming without a PromptGroupDataModule: the prompt order restarts at the beginning "
                    "of the epoch.",
                    UserWarning,
                    stacklevel=2,
                )


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward in training mode is random: a dropout layer with p > 0, or a dropout probability in the
    model's config (attention dropout is applied functionally, outside any layer)."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0 for k, v in values.items())


def _with_left_out_rows(metrics: dict, r: Rollout, keep: torch.Tensor, level: str) -> dict:
    """TRL's clip metrics of the whole micro-batch from those of its computed rows: a left-out row (advantage 0)
    is never clipped, so it adds to the denominators and puts a 0 into the per-row minimum and maximum."""
    lengths = r.completion_mask.sum(1)
    left_out = torch.ones_like(lengths, dtype=torch.bool)
    left_out[keep] = False
    if level == "token":
        share = lengths[keep].sum() / lengths.sum().clamp(min=1)
        zero_rows = bool((left_out & (lengths > 0)).any())
    else:
        share = torch.tensor(keep.numel() / lengths.numel())
        zero_rows = bool(left_out.any())
    out = dict(metrics)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        out[key] = metrics[key] * share.to(metrics[key].dtype)
    if zero_rows:
        zero = torch.zeros_like(metrics["clip_ratio/low_min"])
        out["clip_ratio/low_min"] = torch.fmin(metrics["clip_ratio/low_min"], zero)
        out["clip_ratio/high_max"] = torch.fmax(metrics["clip_ratio/high_max"], zero)
    return out
