"""The command line asks OpenMP's idle threads to sleep when other processes keep the cores busy
(lightning_gspo.openmp), before torch loads OpenMP."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_gspo.openmp import BUSY_CORES, busy_cores, prefer_passive_wait

ROOT = Path(__file__).resolve().parents[1]


def test_passive_on_busy_cores_unless_the_user_chose_or_torch_is_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh process
    env = {}
    assert prefer_passive_wait(env, busy=1.0) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert not prefer_passive_wait(env, busy=BUSY_CORES / 2) and env == {}  # idle cores: OpenMP's default
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(chosen)
        assert not prefer_passive_wait(env, busy=1.0) and env == chosen
    monkeypatch.undo()
    env = {}
    assert not prefer_passive_wait(env, busy=1.0) and env == {}  # too late: torch has OpenMP loaded


def _spinner():
    """A process that keeps one core busy, as another user's job would."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    return spin


def test_busy_cores_sees_another_busy_process():
    spin = _spinner()
    try:
        assert busy_cores() >= 0.8
    finally:
        spin.kill()


def _policy_seen_by(args, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-P", *args], cwd=ROOT, env={**env, **env_extra}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("given, seen", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_the_cli_process_beside_a_busy_one_runs_with_the_policy(given, seen):
    # The composed config reads the variable inside the training process, after every import.
    spin = _spinner()
    try:
        out = _policy_seen_by(
            [
                "-m",
                "lightning_gspo.train",
                "+omp=${oc.env:OMP_WAIT_POLICY,unset}",
                "--cfg",
                "job",
                "--resolve",
            ],
            given,
        )
    finally:
        spin.kill()
    assert f"omp: {seen}" in out


def test_importing_the_training_module_changes_nothing():
    assert (
        _policy_seen_by(
            ["-c", "import os, lightning_gspo.train as t; print(os.environ.get('OMP_WAIT_POLICY'))"], {}
        )
        == "None\n"
    )
