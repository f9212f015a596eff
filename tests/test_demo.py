"""The default job (`make train`) learns: correctness climbs from chance to >= 0.8 on the training sums, on 2 CPU
cores, and rises on the 20 held-out sums it never trains on.

This runs the whole default configuration, as a user's `make train` does; it is the slowest test (minutes).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_job_learns_arithmetic(tmp_path):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "LIGHTNING_GSPO_CACHE": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "lightning_gspo.train",
        f"hydra.run.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    series = [
        float(r["rewards/correctness_reward/mean"]) for r in rows if r["rewards/correctness_reward/mean"]
    ]
    assert series[0] < 0.3  # near chance (0.1) at the start
    assert max(series[-4:]) >= 0.8, series[-8:]
    held_out = [(int(r["step"]), float(r["eval/pass@1"])) for r in rows if r["eval/pass@1"]]
    assert [s for s, _ in held_out] == [0, 500, 1000, 1500, 2000, 2500, 3000]  # before, during and after
    assert held_out[0][1] < 0.2 and held_out[-1][1] > 2 * held_out[0][1], held_out
    assert (tmp_path / "reward_curve.png").exists()
