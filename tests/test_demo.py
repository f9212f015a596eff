"""The default job (`make train`) learns: correctness climbs from chance to >= 0.8, on 2 CPU cores.

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
        series = [float(r["rewards/correctness_reward/mean"]) for r in csv.DictReader(f)]
    assert series[0] < 0.3  # near chance (0.1) at the start
    assert max(series[-4:]) >= 0.8, series[-8:]
    assert (tmp_path / "reward_curve.png").exists()
