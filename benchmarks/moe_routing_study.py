"""Routing drift on a tiny mixture-of-experts policy: GRPO (token-level ratios) against GSPO (sequence-level),
each with and without routing replay, off-policy, on the CPU demo's task.

GSPO's paper (arXiv 2507.18071) says token-level ratios become unstable on MoE models when an update flips a
token's experts, so GRPO needed Routing Replay and GSPO did not; the R3 paper and Megatron-LM #4168 report GRPO
collapsing without replay. This study shows the effect small enough for two CPU cores: a randomly initialised
Qwen3-MoE model (4 layers, 64 wide, 8 experts, top-2) on the digits vocabulary learns single-digit addition mod
10 (``experiment=tiny_arithmetic``), with 4 optimizer steps per generation batch (``steps_per_generation=4``
micro-batches per pass, 2 per optimizer step, ``num_iterations=2`` passes), so every later pass runs on weights
that moved since the completions were sampled.

Each of the 12 runs (2 levels x replay on/off x ``--seeds`` seeds) is a subprocess with one thread; ``--jobs``
run at once. Per run it logs held-out greedy accuracy (``eval/rewards/correctness_reward/mean``), the clip
fraction (``clip_ratio/region_mean``) and ``routing/expert_flip_rate``; the study writes ``curves.csv``,
``summary.json``, ``curves.png`` and, with ``--report``, a markdown table.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/moe_routing_study.py --out outputs/moe_study --jobs 2 \\
        --report outputs/moe_study/report.md                     # the whole study (~35 minutes on 2 cores)
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/moe_routing_study.py --out /tmp/moe_smoke --seeds 1 \\
        --steps 20 --eval-every 10 --jobs 2 --report /tmp/moe_smoke/report.md      # a smoke test

Choices, and why:
- The model is built here (``build_moe_model``) from ``transformers.Qwen3MoeConfig`` and the digits tokenizer;
  a package-level tiny MoE builder can replace that one function.
- Router weights start at std 0.5 (instead of 0.02) so routing is decided from the start and updates flip
  choices that matter; at 0.02 every expert is nearly tied and the flip rate measures noise.
- Held-out accuracy is the greedy completion's correctness on the 20 held-out sums (the same split in every run,
  ``data.seed``); sampled evaluation is off (``num_generations_eval=0``) to spend the time on training.
- RL starts from a supervised warm start (``warm_start``: the training sums only, until the greedy answer is right
  on ``--warm-target`` of them), as RL starts from a pretrained model: from random weights 600 steps left every
  arm at chance. The warm-started model has memorised part of the training sums and none of the held-out ones, so
  the training reward shows the optimisation and the held-out accuracy whether it generalises.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARMS = [(algo, replay) for algo in ("grpo", "gspo") for replay in (False, True)]
METRICS = {
    "accuracy": "eval/rewards/correctness_reward/mean",
    "clip": "clip_ratio/region_mean",
    "flip": "routing/router_flip_rate",  # the drift, also under replay (which makes expert_flip_rate 0)
    "reward": "reward",
}


def build_moe_model(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen3-MoE causal LM and the digits tokenizer, written with save_pretrained."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lightning_gspo.tiny import build_char_tokenizer

    if (path / "config.json").exists():
        return path
    tok = build_char_tokenizer("digits")
    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.data.normal_(0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# The held-out split (data.seed): the same 20 of the 100 distinct sums in every run and in the warm start.
SPLIT_SEED = 1234


def warm_start(model_dir: Path, target: float, max_steps: int) -> dict[str, float]:
    """Supervised steps on the training sums only (never the held-out ones) until the greedy answer is right on
    ``target`` of them: RL then starts from a model that knows part of the task, as RL from a pretrained model
    does, instead of spending its whole budget finding the answer format from random weights (600 steps from
    random weights left every arm at chance). Writes the weights back; returns the accuracies reached."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_gspo.data import hold_out
    from lightning_gspo.tasks.arithmetic import make_dataset

    stamp = model_dir / "warm_start.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train, held = hold_out(make_dataset(4096, seed=0), 0.2, SPLIT_SEED)

    def encode(ds):  # "a+b=" answer EOS: 4 prompt tokens, the answer, EOS
        pairs = sorted(set(zip(ds["prompt"], ds["answer"])))
        rows = [tok(p + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p, a in pairs]
        return torch.tensor(rows)

    x, x_held = encode(train), encode(held)

    def accuracy(rows):
        with torch.no_grad():
            return (model(rows[:, :4]).logits[:, -1].argmax(-1) == rows[:, 4]).float().mean().item()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    step, acc = 0, accuracy(x)
    while acc < target and step < max_steps:
        batch = x[torch.randint(len(x), (64,), generator=gen)]
        logits = model(batch[:, :-1]).logits[:, 3:]  # the positions that predict the answer and EOS
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 4:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 5 == 0:
            acc = accuracy(x)
    result = {"steps": step, "train_accuracy": acc, "held_out_accuracy": accuracy(x_held)}
    model.save_pretrained(model_dir)
    stamp.write_text(json.dumps(result))
    return result


def run_name(algo: str, replay: bool, seed: int) -> str:
    return f"{algo}_{'replay' if replay else 'plain'}_s{seed}"


def worker(args: argparse.Namespace) -> None:
    """One training run, in this process, through the Hydra entry point's ``build``."""
    from hydra import compose, initialize_config_module

    from lightning_gspo.train import build

    overrides = [
        f"algorithm={args.algo}",
        f"model.name_or_path={args.model}",
        f"algorithm.routing_replay={str(args.replay).lower()}",
        f"algorithm.max_steps={args.steps}",
        f"algorithm.eval_steps={args.eval_every}",
        f"algorithm.seed={args.seed}",
        f"data.seed={SPLIT_SEED}",
        "algorithm.per_device_train_batch_size=16",
        "algorithm.steps_per_generation=4",
        "algorithm.gradient_accumulation_steps=2",
        "algorithm.num_iterations=2",
        "algorithm.num_generations_eval=0",
        "algorithm.logging_steps=1",
        f"algorithm.learning_rate={args.lr}",
        f"output_dir={args.run_dir}",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "plot=false",
    ]
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    (Path(args.run_dir) / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def read_series(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    from lightning_gspo.plots import read_metrics

    series = read_metrics(csv_path)
    return {short: series.get(key, []) for short, key in METRICS.items()}


def launch(args: argparse.Namespace, model: Path) -> dict[str, dict]:
    """Run every (arm, seed) as a one-thread subprocess, ``--jobs`` at a time; their series and times."""
    queue = [(a, r, s) for s in range(args.seeds) for a, r in ARMS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONSAFEPATH"] = "1"
    running: list[tuple[subprocess.Popen, str, float]] = []
    results: dict[str, dict] = {}
    while queue or running:
        while queue and len(running) < args.jobs:
            algo, replay, seed = queue.pop(0)
            name = run_name(algo, replay, seed)
            run_dir = args.out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--worker", "--algo", algo, "--seed", str(seed), "--model", str(model),
                   "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--lr", str(args.lr),
                   "--run-dir", str(run_dir)] + (["--replay"] if replay else [])  # fmt: skip
            log = open(run_dir / "log.txt", "w")
            running.append(
                (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), name, time.time())
            )
            print(f"started {name}", flush=True)
        time.sleep(1)
        for proc, name, started in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, name, started))
            seconds = time.time() - started
            if proc.returncode:
                sys.exit(f"{name} failed (exit {proc.returncode}); see {args.out / name / 'log.txt'}")
            algo, replay, seed = name.split("_")[0], "_replay_" in name, int(name.rsplit("_s", 1)[1])
            series = read_series(args.out / name / "csv" / "metrics.csv")
            results[name] = {
                "algo": algo,
                "replay": replay,
                "seed": seed,
                "seconds": seconds,
                "series": series,
            }
            print(f"finished {name} in {seconds:.0f} s", flush=True)
    return results


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(results: dict[str, dict]) -> list[dict]:
    rows = []
    for algo, replay in ARMS:
        runs = [r for r in results.values() if r["algo"] == algo and r["replay"] == replay]
        if not runs:
            continue
        finals = [r["series"]["accuracy"][-1][1] for r in runs if r["series"]["accuracy"]]
        rows.append({
            "algorithm": "GRPO (token)" if algo == "grpo" else "GSPO (sequence)",
            "replay": replay,
            "runs": len(runs),
            "final_accuracy": _mean(finals),
            "final_accuracy_sd": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "best_accuracy": _mean([max(v for _, v in r["series"]["accuracy"]) for r in runs if r["series"]["accuracy"]]),
            # the mean training reward (correctness 1 + format 0.5) over each run's last tenth of logged steps
            "final_reward": _mean([_mean([v for _, v in r["series"]["reward"][-max(1, len(r["series"]["reward"]) // 10) :]]) for r in runs]),
            "clip_fraction": _mean([v for r in runs for _, v in r["series"]["clip"]]),
            "expert_flip_rate": _mean([v for r in runs for _, v in r["series"]["flip"]]),
            "seconds_per_run": _mean([r["seconds"] for r in runs]),
        })  # fmt: skip
    return rows


def write_outputs(args: argparse.Namespace, results: dict[str, dict], rows: list[dict]) -> None:
    with open(args.out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "algorithm", "replay", "seed", "metric", "step", "value"])
        for name, r in sorted(results.items()):
            for metric, points in r["series"].items():
                for step, value in points:
                    w.writerow([name, r["algo"], r["replay"], r["seed"], metric, step, value])
    (args.out / "summary.json").write_text(json.dumps({"settings": _settings(args), "arms": rows}, indent=2))
    plot(results, args.out / "curves.png")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(args, rows))


def _settings(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "seeds": args.seeds,
        "eval_every": args.eval_every,
        "lr": args.lr,
        "jobs": args.jobs,
        "warm": getattr(args, "warm", None),
    }


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    head = (
        "| algorithm | replay | runs | held-out accuracy (final, mean ± sd) | best | training reward (last tenth) | "
        "clip fraction | router flip rate | s per run |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['algorithm']} | {'yes' if r['replay'] else 'no'} | {r['runs']} | {r['final_accuracy']:.3f} ± "
        f"{r['final_accuracy_sd']:.3f} | {r['best_accuracy']:.3f} | {r['final_reward']:.3f} | {r['clip_fraction']:.4f} | "
        f"{r['expert_flip_rate']:.4f} | {r['seconds_per_run']:.0f} |\n"
        for r in rows
    )
    s = _settings(args)
    return (
        f"Tiny Qwen3-MoE (8 experts, top-2) on single-digit addition, {s['steps']} optimizer steps per run, "
        f"4 per generation batch, lr {s['lr']}, {s['seeds']} seed(s) per arm. Clip fraction and flip rate are "
        "means over the logged steps; the router flip rate is the share of (token, layer) choices whose experts the "
        "router would change since sampling (under replay: the share replay overrode). "
        f"Warm start: {s.get('warm')}.\n\n" + head + body
    )


def plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_gspo.plots import mean_window, rolling_mean

    panels = [("accuracy", "held-out accuracy (greedy)"), ("reward", "training reward"),
              ("clip", "clip fraction"), ("flip", "router flip rate")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colours = {("grpo", False): "tab:red", ("grpo", True): "tab:orange", ("gspo", False): "tab:blue",
               ("gspo", True): "tab:cyan"}  # fmt: skip
    for ax, (metric, title) in zip(axes.flat, panels):
        labelled = set()
        for r in results.values():
            points = r["series"][metric]
            if not points:
                continue
            steps, values = zip(*points)
            if metric != "accuracy":
                values = rolling_mean(list(values), mean_window(len(values)))
            arm = (r["algo"], r["replay"])
            label = None if arm in labelled else f"{r['algo'].upper()}{' + replay' if r['replay'] else ''}"
            labelled.add(arm)
            ax.plot(steps, values, "o-" if metric == "accuracy" else "-", color=colours[arm], alpha=0.7,
                    markersize=3, label=label)  # fmt: skip
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/moe_routing_study"))
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=100, help="optimizer steps between held-out evaluations")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each one thread)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--report", type=Path, default=None, help="write a markdown table here")
    p.add_argument(
        "--warm-target", type=float, default=0.4, help="supervised warm start to this train accuracy"
    )
    p.add_argument("--warm-max-steps", type=int, default=2000)
    # one run, as a subprocess of the study
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_moe_model(args.out / "model")
    warm = warm_start(model, args.warm_target, args.warm_max_steps)
    print(f"warm start: {warm}", flush=True)
    args.warm = warm
    start = time.time()
    results = launch(args, model)
    rows = summarise(results)
    write_outputs(args, results, rows)
    print(report(args, rows))
    print(f"{len(results)} runs in {time.time() - start:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
